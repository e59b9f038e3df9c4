"""DTensor params under FSDP2 (``fully_shard``), 2 processes with gloo on CPU:
every algorithm steps the local shards and equals the unsharded run, with and
without CPU offload — ScaledAdamW, LAMB and Amos slots averaged over a sharded dim
sum their partial sums over the shards (one all-reduce per bucket); states are
DTensors (such slots replicated), so distributed checkpoints save, reshard (2 → 1
ranks) and resume them."""
from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

STEPS = 10


def _optimizers():
    import amos_fused as af

    return {
        "AdamW": lambda ps: af.AdamW(ps, lr=0.01, weight_decay=0.1),
        "Adam": lambda ps: af.Adam(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
        "RAdam": lambda ps: af.RAdam(ps, lr=0.01, decoupled_weight_decay=True, weight_decay=0.1),
        "Lion": lambda ps: af.Lion(ps, lr=1e-3, weight_decay=0.1),
        "Amos": lambda ps: af.Amos(ps, lr=0.01, eta=0.5, momentum=0.9),
        "Amos-rows": lambda ps: af.Amos(
            [{"params": [p for p in ps if p.dim() == 2], "reduce_axes": (1,)},
             {"params": [p for p in ps if p.dim() != 2]}], lr=0.01, eta=0.5),
        "AdamW-reference": lambda ps: af.AdamW(ps, lr=0.01, weight_decay=0.1, backend="reference"),
        "Amos-all": lambda ps: af.Amos(ps, lr=0.01, eta=0.5, reduce_axes="all", momentum=0.9,
                                       clip_value=0.5),
        "Amos-cols": lambda ps: af.Amos(
            [{"params": [p for p in ps if p.dim() == 2], "reduce_axes": (0,)},
             {"params": [p for p in ps if p.dim() != 2], "reduce_axes": "all"}], lr=0.01, eta=0.5),
        "ScaledAdamW": lambda ps: af.ScaledAdamW(ps, lr=0.01, p=2.0),
        "Lamb": lambda ps: af.Lamb(ps, lr=0.01, weight_decay=0.1),
    }


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6)).to(dtype)


def _train(model, opt, first, last, dtype):
    for step in range(first, last):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 8, generator=gen, dtype=dtype), torch.randn(4, 6, generator=gen, dtype=dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _init(rank, world, path):
    # A stuck collective fails in 2 minutes instead of hanging the suite.
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def _finish():
    """Every rank reaches the end before any tears its process group down (a rank
    that exits while another still talks to it can abort in gloo's threads), then
    leaves at once: a normal interpreter exit can still abort in a gloo thread's
    destructor ("terminate called without an active exception", seen under load)
    after every check has passed."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _fsdp_matches_single_process(rank, world, path, offload):
    _init(rank, world, path)
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
        from torch.distributed.tensor import DTensor, Replicate, Shard

        for dtype in (torch.float64, torch.float32):
            for name, make in _optimizers().items():
                sharded, single = _model(dtype), _model(dtype)
                fully_shard(sharded, offload_policy=CPUOffloadPolicy(pin_memory=False) if offload else None)
                opt, single_opt = make(list(sharded.parameters())), make(list(single.parameters()))
                for group in opt.param_groups + single_opt.param_groups:
                    group["track_rms"] = True
                _train(sharded, opt, 0, STEPS, dtype)
                _train(single, single_opt, 0, STEPS, dtype)
                tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else {}
                for p, q in zip(sharded.parameters(), single.parameters()):
                    torch.testing.assert_close(_full(p), q, **tol, msg=lambda m: f"{name} {dtype}: {m}")
                # telemetry: the shards' sums all-reduced, as the unsharded param's
                rms, single_rms = opt.rms(), single_opt.rms()
                rel = 1e-9 if dtype == torch.float64 else 1e-4
                for p, q in zip(sharded.parameters(), single.parameters()):
                    assert rms[p].weight == pytest.approx(single_rms[q].weight, rel=rel), name
                    assert rms[p].update == pytest.approx(single_rms[q].update, rel=rel, abs=1e-12), name
                if name in ("ScaledAdamW", "Lamb", "Amos-all"):  # one all-reduce per bucket and step
                    calls = []
                    real = dist.all_reduce
                    dist.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
                    try:
                        opt.step()  # the grads of the last training step, once more
                    finally:
                        dist.all_reduce = real
                    assert len(calls) == 1, (name, len(calls))
                for p in sharded.parameters():
                    for key, value in opt.state[p].items():
                        if key == "step":
                            continue
                        assert isinstance(value, DTensor), (name, key)
                        # like the param; an Amos slot averaged over a sharded dim is replicated there
                        expected = tuple(
                            pl if not isinstance(pl, Shard) or (value.dim() and value.shape[pl.dim] == p.shape[pl.dim])
                            else Replicate() for pl in p.placements)
                        assert value.placements == expected, (name, key, value.placements)
    except BaseException:
        dist.destroy_process_group()  # no barrier: another rank may be stuck
        raise
    _finish()


def _fsdp_master_weights(rank, world, path, offload):
    """bfloat16 params under FSDP2 (with and without CPU offload) with
    master_weights=True: each master is a DTensor placed like its param, the states
    too, and the run equals the unsharded one (nothing FSDP2 does to the params
    between steps is taken for a user's write)."""
    _init(rank, world, path)
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        from amos_fused.master_weights import MASTER_KEY

        for name in ("AdamW", "Lion", "Amos-rows", "AdamW-reference", "ScaledAdamW"):
            sharded, single = _model(torch.bfloat16), _model(torch.bfloat16)
            fully_shard(sharded, offload_policy=CPUOffloadPolicy(pin_memory=False) if offload else None)
            opt, single_opt = (_optimizers()[name](list(m.parameters())) for m in (sharded, single))
            for group in opt.param_groups + single_opt.param_groups:
                group["master_weights"] = True
            _train(sharded, opt, 0, STEPS, torch.bfloat16)
            _train(single, single_opt, 0, STEPS, torch.bfloat16)
            for p, q in zip(sharded.parameters(), single.parameters()):
                master = opt.state[p][MASTER_KEY]
                assert isinstance(master, DTensor) and master.placements == p.placements, name
                assert master.dtype == torch.float32 and opt.state[p]["step"] is not None
                torch.testing.assert_close(_full(master), single_opt.state[q][MASTER_KEY], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{name}: {m}")
                assert torch.equal(_full(p), _full(master).to(torch.bfloat16)), name
    except BaseException:
        dist.destroy_process_group()  # no barrier: another rank may be stuck
        raise
    _finish()


def _checkpoint(rank, world, path, directory, resume):
    """Saves after 4 steps (resume=False), or loads that checkpoint onto ``world``
    ranks, trains 4 more steps and compares with an uninterrupted 8-step run."""
    _init(rank, world, path)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.fsdp import fully_shard

        for name in ("AdamW", "Amos-rows", "Amos-all"):
            model = _model(torch.float64)
            fully_shard(model)
            opt = _optimizers()[name](list(model.parameters()))
            where = os.path.join(directory, name)
            if not resume:
                _train(model, opt, 0, 4, torch.float64)
            model_state, optim_state = get_state_dict(model, opt)
            state = {"model": model_state, "optim": optim_state}
            if not resume:
                dcp.save(state, checkpoint_id=where)
                continue
            dcp.load(state, checkpoint_id=where)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            _train(model, opt, 4, 8, torch.float64)
            single = _model(torch.float64)
            single_opt = _optimizers()[name](list(single.parameters()))
            _train(single, single_opt, 0, 8, torch.float64)
            for p, q in zip(model.parameters(), single.parameters()):
                torch.testing.assert_close(_full(p), q, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")
    except BaseException:
        dist.destroy_process_group()  # no barrier: another rank may be stuck
        raise
    _finish()


def _spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(world, os.path.join(tmp, "store"), *args), nprocs=world, join=True)


@pytest.mark.parametrize("offload", [False, True], ids=["fsdp2", "fsdp2-cpu-offload"])
def test_fsdp2_matches_single_process(offload):
    _spawn(_fsdp_matches_single_process, 2, offload)


@pytest.mark.parametrize("offload", [False, True], ids=["fsdp2", "fsdp2-cpu-offload"])
def test_fsdp2_master_weights_match_single_process(offload):
    _spawn(_fsdp_master_weights, 2, offload)


@pytest.mark.parametrize("resume_world", [2, 1], ids=["2-to-2", "2-to-1"])
def test_distributed_checkpoint_reshards_and_resumes(resume_world):
    with tempfile.TemporaryDirectory() as directory:
        _spawn(_checkpoint, 2, directory, False)
        _spawn(_checkpoint, resume_world, directory, True)
