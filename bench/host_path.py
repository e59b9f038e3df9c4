"""The host's share of a step, per tensor: an optimizer over many small params
(``--tensors`` of ``--numel`` elements) stepped with the kernels' work taken out, so
what is timed is what the host does before and after them (checks, state and
bucket bookkeeping, op calls, coefficient tables, launch arguments).  On a GPU
this is the floor of a step over many tensors whatever the kernels do.

  * ``--backend triton`` runs the Triton backend's host code under its interpreter
    (TRITON_INTERPRET=1, CPU tensors) with every kernel launch replaced by a no-op:
    no GPU needed;
  * ``--backend cpu`` times the whole CPU step (its kernels included: with small
    tensors they are a small part), beside torch's fused AdamW on the same params.

Prints the CPU time of the step's thread per step (lower quartile of ``--steps``
single steps, the garbage collector off while timing) and per tensor.

    python3 bench/host_path.py --backend triton --optimizer AdamW --tensors 2000
"""
import argparse
import gc
import os
import sys
import time


def fake_launches() -> None:
    """Every Triton kernel of the backend launches nothing (``kernel[grid](...)``
    returns at once); the host code around the launches runs as it is."""
    from amos_fused.triton_kernels import adam, amos, amos_fp8, common, fp8, norm_scaled

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in (adam, amos, amos_fp8, common, fp8, norm_scaled):
        for name in dir(module):
            if name.endswith("_kernel"):
                setattr(module, name, NoLaunch())


def per_step(step, steps: int) -> float:
    """Lower quartile of the thread CPU time of ``steps`` single calls, in seconds."""
    for _ in range(3):
        step()
    gc.collect()
    gc.disable()
    try:
        times = []
        for _ in range(steps):
            start = time.thread_time()
            step()
            times.append(time.thread_time() - start)
    finally:
        gc.enable()
    return sorted(times)[len(times) // 4]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("triton", "cpu"), default="triton")
    parser.add_argument("--optimizer", default="AdamW", help="a class of amos_fused (Amos: on amos_param_groups)")
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--numel", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if args.backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # (before the kernels are first imported)
    import torch
    import amos_fused as af
    if args.backend == "triton":
        fake_launches()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    cls = getattr(af, args.optimizer)
    if args.optimizer.startswith("Amos"):
        groups = af.amos_param_groups(torch.nn.ParameterList(params), lr=0.01)
        opt = cls(groups, lr=0.01, backend=args.backend)
    else:
        opt = cls(params, lr=1e-3, backend=args.backend)
    rows = [(f"amos_fused.{args.optimizer} ({args.backend}"
             + (", launches faked)" if args.backend == "triton" else ")"), per_step(opt.step, args.steps))]
    if args.backend == "cpu":
        fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
        rows.append(("torch.optim.AdamW(fused=True)", per_step(fused.step, args.steps)))
    print(f"{args.tensors} tensors of {args.numel} elements, torch {torch.__version__}")
    for name, seconds in rows:
        print(f"  {name:45s} {seconds * 1e3:8.2f} ms/step  {seconds / args.tensors * 1e6:6.2f} us/tensor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
