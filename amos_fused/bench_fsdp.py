"""Time the optimizer step of a CPU-offloaded FSDP2 model: the case where the
whole step runs on the host.

    python -m amos_fused.bench_fsdp [--ranks 2] [--rounds 3] [--steps 10] [--json PATH | --no-json]

``--ranks`` processes (gloo) shard the gpt2-39m workload with ``fully_shard(...,
offload_policy=CPUOffloadPolicy(pin_memory=False))``; each rank times
``optimizer.step()`` between barriers (the slowest rank's time is the step's time)
for torch.optim.AdamW(fused=True), our AdamW, our AdamW8bit (FP8 states of the
matrices, whose dim-0 shards hold whole blocks) and our Amos (factored slots for
the matrices, elementwise for the sharded vectors, no momentum), in interleaved rounds,
and rank 0 writes the table and bench/results/<device>-fsdp2-offload-<date>.json
(the schema of ``python -m amos_fused.bench``, without a floor)."""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amos_fused.bench import (ADAMW_HYPER, AMOS_LR, MAX_THREADS, OUR_ALGORITHMS, device_slug, gbps, log,
                              triton_version, writable_path, write_json)
from amos_fused.bench_workloads import WORKLOADS

WORKLOAD = "gpt2-39m"
TORCH_FUSED = "torch-fused-adamw"


def _optimizer(name, model):
    import amos_fused as af

    params = list(model.parameters())
    if name == TORCH_FUSED:
        return torch.optim.AdamW(params, **ADAMW_HYPER, fused=True)
    if name == "cpu-adamw":
        return af.AdamW(params, **ADAMW_HYPER)
    if name == "cpu-adamw8bit":  # FP8 states: every matrix's rows are whole blocks of 256
        return af.AdamW8bit(params, **ADAMW_HYPER)
    if name == "cpu-amos":  # factored where the slot stays within a shard (Shard(0): trailing dims)
        matrices = [p for p in params if p.dim() == 2]
        vectors = [p for p in params if p.dim() != 2]
        return af.Amos([{"params": matrices, "reduce_axes": (1,)}, {"params": vectors}], lr=AMOS_LR, eta=0.5)
    raise ValueError(name)


IMPLS = {TORCH_FUSED: 28, "cpu-adamw": 28, "cpu-adamw8bit": OUR_ALGORITHMS["adamw8bit"],
         "cpu-amos": OUR_ALGORITHMS["amos"]}


def _time(rank, world, path, args, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.set_num_threads(args.threads // world + (rank < args.threads % world))  # (threads in all, split)
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    times = {name: [] for name in IMPLS}
    sizes = {}
    for _ in range(args.rounds):
        for name in IMPLS:
            model = WORKLOADS[WORKLOAD]("cpu", torch.float32)
            for p in model.parameters():
                p.grad = None
            fully_shard(model, offload_policy=CPUOffloadPolicy(pin_memory=False))
            gen = torch.Generator().manual_seed(rank)
            for p in model.parameters():
                p.grad = p.detach().clone()
                p.grad.to_local().copy_(torch.randn(p.to_local().shape, generator=gen))
            opt = _optimizer(name, model)
            sizes = dict(params=sum(p.numel() for p in model.parameters()),
                         tensors=len(list(model.parameters())))
            for step in range(args.warmup + args.steps):
                dist.barrier()
                start = time.perf_counter()
                opt.step()
                dist.barrier()
                if step >= args.warmup:
                    times[name].append(1e3 * (time.perf_counter() - start))
            del opt, model
    if rank == 0:
        torch.save({"times": times, "sizes": sizes}, out)
    dist.barrier()  # no rank tears down while another still talks to it
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m amos_fused.bench_fsdp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads in all, split over the ranks (default: torch's thread count, at least "
                             "one per rank)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", metavar="PATH")
    output.add_argument("--no-json", action="store_true")
    args = parser.parse_args(argv)
    if args.ranks < 1 or args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--ranks, --rounds and --steps must be >= 1, --warmup >= 0")
    if args.threads is None:
        args.threads = max(args.ranks, torch.get_num_threads())
    if not args.ranks <= args.threads <= MAX_THREADS:
        parser.error(f"--threads must be in [--ranks ({args.ranks}), {MAX_THREADS}] (one at least per rank), "
                     f"got {args.threads}")
    if args.json is not None and not writable_path(args.json):
        parser.error(f"--json {args.json}: cannot write there (checked before the benchmark runs)")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        log(f"timing {list(IMPLS)} on {WORKLOAD}, FSDP2 + CPU offload, {args.ranks} ranks ...")
        mp.spawn(_time, args=(args.ranks, os.path.join(tmp, "store"), args, out), nprocs=args.ranks)
        measured = torch.load(out)
    times, sizes = measured["times"], measured["sizes"]
    ms = {name: statistics.median(values) for name, values in times.items()}
    workload = f"{WORKLOAD}-fsdp2-offload-{args.ranks}ranks"
    rows = [{
        "workload": workload, "impl": name, "dtype": "float32", "params": sizes["params"],
        "tensors": sizes["tensors"], "ms": round(ms[name], 4),
        "gbps": round(gbps(IMPLS[name] * sizes["params"], ms[name]), 3),
        "bytes_per_param": IMPLS[name], "floor": None, "floor_gbps": None, "fraction_of_floor": None,
        "copy_gbps": None, "fraction_of_copy_bandwidth": None,
        "ratio_vs_torch_fused": round(ms[TORCH_FUSED] / ms[name], 4),
    } for name in IMPLS]
    slug_, date = device_slug(torch.device("cpu")), datetime.date.today().isoformat()
    print(f"device {slug_}  torch {torch.__version__}  {workload}: {sizes['params']:,} params in "
          f"{sizes['tensors']} tensors; median of {args.rounds} x {args.steps} steps\n")
    print(f"{'impl':<18}  {'ms':>9}  {'GB/s':>7}  {'x vs torch fused':>16}  {'ms / torch fused':>16}")
    for r in rows:
        print(f"{r['impl']:<18}  {r['ms']:>9.3f}  {r['gbps']:>7.2f}  {r['ratio_vs_torch_fused']:>15.2f}x  "
              f"{r['ms'] / ms[TORCH_FUSED]:>16.2f}")
    if not args.no_json:
        path = args.json or os.path.join("bench", "results", f"{slug_}-fsdp2-offload-{date}.json")
        write_json(path, {"device": slug_, "torch": torch.__version__, "triton": triton_version(), "date": date,
                          "command": " ".join(["python", "-m", "amos_fused.bench_fsdp"] + sys.argv[1:]),
                          "results": rows})
        print(f"\nresults written to {path}")


if __name__ == "__main__":
    main()
