"""DTensor params under FSDP2 (``fully_shard``), 2 processes with gloo on CPU:
every algorithm steps the local shards and equals the unsharded run, with and
without CPU offload — ScaledAdamW, LAMB and Amos slots averaged over a sharded dim
sum their partial sums over the shards (one all-reduce per bucket); states are
DTensors (such slots replicated; FP8 codes and absmax sharded like the param), so
distributed checkpoints save, reshard (2 → 1 ranks) and resume them."""
from __future__ import annotations

import copy
import datetime
import itertools
import math
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


def _fp8_optimizers():
    import amos_fused as af

    return {
        "AdamW8bit": lambda ps: af.AdamW8bit(ps, lr=0.01, weight_decay=0.1),
        "Adam8bit": lambda ps: af.Adam8bit(ps, lr=0.01, weight_decay=0.1),
        "RAdam8bit": lambda ps: af.RAdam8bit(ps, lr=0.01, weight_decay=0.1),
        "Lion8bit": lambda ps: af.Lion8bit(ps, lr=1e-3, weight_decay=0.1),
        "AdamW8bit-reference": lambda ps: af.AdamW8bit(ps, lr=0.01, weight_decay=0.1, backend="reference"),
        "Amos8bit-rows": lambda ps: af.Amos8bit(
            [{"params": [p for p in ps if p.dim() == 2], "reduce_axes": (1,)},
             {"params": [p for p in ps if p.dim() != 2]}], lr=0.01, eta=0.5, momentum=0.9),
        # slots averaged over the sharded dim: the all-reduced step on the decoded momentum
        "Amos8bit-cols": lambda ps: af.Amos8bit(
            [{"params": [p for p in ps if p.dim() == 2], "reduce_axes": (0,)},
             {"params": [p for p in ps if p.dim() != 2], "reduce_axes": "all"}], lr=0.01, eta=0.5, momentum=0.9),
    }


def _model(dtype, width=8, hidden=16):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 6)).to(dtype)


def _wide_model(dtype):
    """Its first weight (25 × 256) keeps FP8 states when sharded: rows of one block,
    split 13 + 12 over 2 ranks."""
    return _model(dtype, width=256, hidden=25)


def _train(model, opt, first, last, dtype):
    width = next(model.parameters()).shape[1]
    for step in range(first, last):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, width, generator=gen, dtype=dtype), torch.randn(4, 6, generator=gen, dtype=dtype)
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
                if name in ("ScaledAdamW", "Lamb", "Amos-all"):  # one all-reduce per bucket and step,
                    # after the one that waits for every rank (one mesh here)
                    calls = []
                    real = dist.all_reduce
                    dist.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
                    try:
                        opt.step()  # the grads of the last training step, once more
                    finally:
                        dist.all_reduce = real
                    assert len(calls) == 2, (name, len(calls))
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


def _fsdp_fp8_states(rank, world, path, offload):
    """The 8-bit optimizers under FSDP2 (with and without CPU offload): a weight
    whose rows are whole blocks keeps FP8 states, its codes and absmax DTensors
    sharded like it (13 + 12 rows), bitwise the unsharded run's, and so is the
    run (float32, bfloat16, bfloat16 with master weights); a weight whose rows
    are not whole blocks keeps full-precision states and
    steps like the full-precision optimizer.  A sharded AdamW checkpoint loads
    into AdamW8bit (quantized as the unsharded one) and back (decoded)."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        policy = CPUOffloadPolicy(pin_memory=False) if offload else None
        for name, make in _fp8_optimizers().items():
            for dtype, master in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
                sharded, single = _wide_model(dtype), _wide_model(dtype)
                fully_shard(sharded, offload_policy=policy)
                opt, single_opt = make(list(sharded.parameters())), make(list(single.parameters()))
                for group in opt.param_groups + single_opt.param_groups:
                    group["master_weights"] = master
                _train(sharded, opt, 0, STEPS, dtype)
                _train(single, single_opt, 0, STEPS, dtype)
                coded = [k for k in opt.fp8_state_keys]
                # (Amos8bit-cols: the shards' sums of g² all-reduced in float64 and stepped
                # eagerly, the single process's by the kernels: equal up to the last bits)
                bitwise = not name.endswith("-cols")
                for p, q in zip(sharded.parameters(), single.parameters()):
                    if not bitwise:  # a momentum code flipped at a tie moves its element by about lr·|mu|/8
                        diff = (_full(p).float() - q.float()).abs()
                        assert float(diff.max()) <= 1e-3 and float((diff > 1e-5).float().mean()) <= 0.01, name
                        assert sorted(opt.state[p]) == sorted(single_opt.state[q]), name
                        continue
                    assert torch.equal(_full(p), q), (name, dtype, master, tuple(p.shape))
                    if master:
                        assert torch.equal(_full(opt.state[p]["master_param"]), single_opt.state[q]["master_param"])
                    state, single_state = opt.state[p], single_opt.state[q]
                    assert sorted(state) == sorted(single_state), (name, sorted(state), sorted(single_state))
                    for key in coded:
                        if q.numel() < 4096:
                            assert state[key].dtype == (torch.float32 if master else dtype), (name, key)
                            continue
                        codes, absmax = state[key], state[key + "_absmax"]
                        assert isinstance(codes, DTensor) and codes.placements == p.placements, (name, key)
                        assert isinstance(absmax, DTensor) and absmax.placements == p.placements, (name, key)
                        assert absmax.shape == (p.shape[0], p.shape[1] // 256), (name, tuple(absmax.shape))
                        assert absmax.to_local().shape[0] == p.to_local().shape[0] == (13, 12)[rank]
                        assert torch.equal(_full(codes), single_state[key]), (name, key)
                        assert torch.equal(_full(absmax).reshape(-1), single_state[key + "_absmax"]), (name, key)
        # rows of 16 elements are not whole blocks: full-precision states, as af.AdamW's
        sharded, single = (torch.nn.Sequential(torch.nn.Linear(16, 300)) for _ in range(2))
        single.load_state_dict(sharded.state_dict())
        fully_shard(sharded, offload_policy=policy)
        opt, single_opt = af.AdamW8bit(sharded.parameters(), lr=0.01), af.AdamW(single.parameters(), lr=0.01)
        for model, o in ((sharded, opt), (single, single_opt)):
            for step in range(3):
                o.zero_grad()
                model(torch.randn(4, 16, generator=torch.Generator().manual_seed(step))).square().mean().backward()
                o.step()
        for p, q in zip(sharded.parameters(), single.parameters()):
            assert opt.state[p]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[p]
            torch.testing.assert_close(_full(p), q, rtol=0, atol=0)
        # DTensors placed otherwise: replicated keeps FP8 (absmax replicated), Shard(1) does not
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        value, grad = torch.randn(20, 512, generator=torch.Generator().manual_seed(1)), torch.randn(20, 512)
        for placement, fp8 in ((Replicate(), True), (Shard(1), False), (Shard(0), True)):
            p = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, [placement]))
            q = torch.nn.Parameter(value.clone())
            opt = af.AdamW8bit([p], lr=0.01)
            single_opt = (af.AdamW8bit if fp8 else af.AdamW)([q], lr=0.01)  # Shard(1): full precision
            for _ in range(3):
                p.grad, q.grad = distribute_tensor(grad, mesh, [placement]), grad.clone()
                opt.step()
                single_opt.step()
            assert torch.equal(_full(p), q), placement
            assert ("exp_avg_absmax" in opt.state[p]) == fp8, placement
            if fp8:
                absmax = opt.state[p]["exp_avg_absmax"]
                assert absmax.placements == (placement,) and absmax.dim() == (2 if placement == Shard(0) else 1)
                assert torch.equal(_full(absmax).reshape(-1), single_opt.state[q]["exp_avg_absmax"])
        # a full (gathered) state dict of the sharded run loads into the unsharded optimizer
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)

        sharded, single = _wide_model(torch.float32), _wide_model(torch.float32)
        fully_shard(sharded, offload_policy=policy)
        opt, single_opt = af.AdamW8bit(sharded.parameters(), lr=0.01), af.AdamW8bit(single.parameters(), lr=0.01)
        _train(sharded, opt, 0, 3, torch.float32)
        _train(single, single_opt, 0, 3, torch.float32)
        full = get_optimizer_state_dict(sharded, opt, options=StateDictOptions(full_state_dict=True))
        fresh = _wide_model(torch.float32)
        fresh_opt = af.AdamW8bit(fresh.parameters(), lr=0.01)
        set_optimizer_state_dict(fresh, fresh_opt, full)
        fresh.load_state_dict(single.state_dict())  # (equal to the sharded run's, checked above)
        for q, r in zip(single.parameters(), fresh.parameters()):
            for key, value in single_opt.state[q].items():
                assert torch.equal(fresh_opt.state[r][key], value), key
        _train(single, single_opt, 3, 5, torch.float32)
        _train(fresh, fresh_opt, 3, 5, torch.float32)
        for q, r in zip(single.parameters(), fresh.parameters()):
            assert torch.equal(q, r)
        # checkpoints across precisions: AdamW's sharded state quantized on load, and back
        sharded, single = _wide_model(torch.float32), _wide_model(torch.float32)
        fully_shard(sharded, offload_policy=policy)
        full, single_full = af.AdamW(sharded.parameters(), lr=0.01), af.AdamW(single.parameters(), lr=0.01)
        _train(sharded, full, 0, 3, torch.float32)
        _train(single, single_full, 0, 3, torch.float32)
        coded, single_coded = af.AdamW8bit(sharded.parameters()), af.AdamW8bit(single.parameters())
        coded.load_state_dict(full.state_dict())
        single_coded.load_state_dict(single_full.state_dict())
        back, single_back = af.AdamW(sharded.parameters()), af.AdamW(single.parameters())
        back.load_state_dict(coded.state_dict())
        single_back.load_state_dict(single_coded.state_dict())
        for p, q in zip(sharded.parameters(), single.parameters()):
            for key, value in single_coded.state[q].items():
                if key != "step":
                    assert torch.equal(_full(coded.state[p][key]).reshape(value.shape), value), key
            if q.numel() >= 4096:
                assert isinstance(coded.state[p]["exp_avg_absmax"], DTensor)
                decoded = back.state[p]["exp_avg_sq"]
                assert isinstance(decoded, DTensor) and decoded.placements == p.placements
                assert torch.equal(_full(decoded), single_back.state[q]["exp_avg_sq"])
    except BaseException:
        dist.destroy_process_group()  # no barrier: another rank may be stuck
        raise
    _finish()


# The runs the checkpoint test saves and resumes: optimizer, model and dtype.
_CHECKPOINTED = ("AdamW", "Amos-rows", "Amos-all", "AdamW8bit", "Lion8bit")


def _checkpointed(name):
    if name in _fp8_optimizers():
        return _fp8_optimizers()[name], _wide_model(torch.float32), torch.float32
    return _optimizers()[name], _model(torch.float64), torch.float64


def _checkpoint(rank, world, path, directory, resume):
    """Saves after 4 steps (resume=False), or loads that checkpoint onto ``world``
    ranks, trains 4 more steps and compares with an uninterrupted 8-step run."""
    _init(rank, world, path)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.fsdp import fully_shard

        for name in _CHECKPOINTED:
            make, model, dtype = _checkpointed(name)
            fully_shard(model)
            opt = make(list(model.parameters()))
            where = os.path.join(directory, name)
            if not resume:
                _train(model, opt, 0, 4, dtype)
            model_state, optim_state = get_state_dict(model, opt)
            state = {"model": model_state, "optim": optim_state}
            if not resume:
                dcp.save(state, checkpoint_id=where)
                continue
            dcp.load(state, checkpoint_id=where)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            _train(model, opt, 4, 8, dtype)
            _, single, _ = _checkpointed(name)
            single_opt = make(list(single.parameters()))
            _train(single, single_opt, 0, 8, dtype)
            for p, q in zip(model.parameters(), single.parameters()):
                torch.testing.assert_close(_full(p), q, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")
                for key, value in single_opt.state[q].items():  # FP8 codes and absmax resharded bitwise
                    if key != "step" and value.dtype in (torch.uint8,) or key.endswith("_absmax"):
                        assert torch.equal(_full(opt.state[p][key]).reshape(value.shape), value), (name, key)
    except BaseException:
        dist.destroy_process_group()  # no barrier: another rank may be stuck
        raise
    _finish()


def _dtensor_corners(rank, world, path):
    """Corners of DTensor params (plain distribute_tensor on a 1-D mesh): a grad
    placed otherwise than its param (Partial) is redistributed as torch's ops would;
    bf16 stochastic rounding draws other bits on each shard and the same on
    replicas; a sharded reduction whose all-reduce raises leaves the counters; a
    failing wait for the other ranks or sum over shards leaves every bucket; a
    found_inf that skips the step on some ranks only (or is set on some only) is
    refused on every rank."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        import amos_fused.norm_scaled as norm_scaled
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(0)
        value, grad = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
        # 1. a Partial grad of a replicated param: the step sees the summed grad
        p = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, [Replicate()]))
        p.grad = DTensor.from_local(grad / world, mesh, [Partial()], run_check=False)
        single = torch.nn.Parameter(value.clone())
        single.grad = (grad / world) * world
        af.AdamW([p], lr=0.1).step()
        af.AdamW([single], lr=0.1).step()
        torch.testing.assert_close(p.to_local(), single.detach(), rtol=1e-6, atol=1e-7)
        # 2. stochastic rounding: the shards of one param draw distinct bits, replicas the same
        half = torch.full((2 * world, 4096), 1.0 + 2.0 ** -10, dtype=torch.bfloat16)
        for placement in (Shard(0), Replicate()):
            q = torch.nn.Parameter(distribute_tensor(half.clone(), mesh, [placement]))
            q.grad = distribute_tensor(torch.ones_like(half), mesh, [placement])
            af.Lion([q], lr=2.0 ** -12, bf16_stochastic_round=True).step()
            rows = [torch.empty_like(q.to_local()) for _ in range(world)]
            dist.all_gather(rows, q.to_local().contiguous())
            same = torch.equal(rows[0], rows[1])
            assert same == (placement == Replicate()), (placement, same)
        # 3. a failing all-reduce of a sharded reduction leaves every counter as it was
        r = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, [Shard(0)]))
        opt = af.Lamb([r], lr=0.01)
        r.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
        opt.step()
        before = float(opt.state[r]["step"])

        def broken(parts, groups):
            raise RuntimeError("all-reduce failed")
        saved, norm_scaled.sum_over_shards = norm_scaled.sum_over_shards, broken
        try:
            opt.step()
            raise AssertionError("the broken all-reduce did not raise")
        except RuntimeError as error:
            assert "all-reduce failed" in str(error)
        finally:
            norm_scaled.sum_over_shards = saved
        assert float(opt.state[r]["step"]) == before
        # 4. a step with a bucket summed over shards waits for every rank before anything is
        # written, and steps such buckets first: a wait or a sum that fails leaves every bucket
        # (the one needing no sum too) and every counter as they were
        import amos_fused.optim as optim
        import amos_fused.optimizer_base as optimizer_base
        rows, whole = (torch.nn.Parameter(distribute_tensor(value.clone(), mesh, [Shard(0)])) for _ in range(2))
        opt = af.Amos([{"params": [rows], "reduce_axes": 1}, {"params": [whole], "reduce_axes": "all"}], lr=0.01,
                      eta=0.5)
        for q in (rows, whole):
            q.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
        opt.step()

        def values():
            return [q.to_local().clone() for q in (rows, whole)] + [
                v.to_local().clone() if isinstance(v, DTensor) else v.clone()
                for q in (rows, whole) for v in opt.state[q].values()]

        def lost(*args):
            raise RuntimeError("a peer was lost")
        # (at a first step too: no state stored for a bucket not stepped)
        fresh = af.Amos([{"params": [rows], "reduce_axes": 1}, {"params": [whole], "reduce_axes": "all"}], lr=0.01,
                        eta=0.5)
        saved_sum = optim.sum_over_shards
        optim.sum_over_shards = lambda *args: (_ for _ in ()).throw(RuntimeError("a peer was lost"))
        try:
            fresh.step()
            raise AssertionError("the failing sum did not raise")
        except RuntimeError as error:
            assert "a peer was lost" in str(error), error
        finally:
            optim.sum_over_shards = saved_sum
        assert len(fresh.state) == 0, list(fresh.state.values())
        for module, name in ((optimizer_base, "wait_for_every_shard"), (optim, "sum_over_shards")):
            assert hasattr(module, name), name
            before = values()
            saved = getattr(module, name)
            setattr(module, name, lost)
            try:
                opt.step()
                raise AssertionError(f"the failing {name} did not raise")
            except RuntimeError as error:
                assert "a peer was lost" in str(error), error
            finally:
                setattr(module, name, saved)
            assert all(torch.equal(a, b) for a, b in zip(before, values())), name
        opt.step()  # and steps on
        assert float(opt.state[rows]["step"]) == 2.0
        # 5. GradScaler's found_inf skipping the step on one rank only (not reduced over the
        # ranks): every rank raises before any write, where the sum over the shards would hang;
        # skipped or stepped on every rank alike, the step goes on
        for found in ((1.0, 0.0), (0.0, 1.0)):
            before = values()
            opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(found[rank])
            try:
                opt.step()
                raise AssertionError("a found_inf differing over the ranks did not raise")
            except ValueError as error:
                assert "found_inf skips the step on some of the ranks" in str(error), error
            assert all(torch.equal(a, b) for a, b in zip(before, values()))
        opt.found_inf = torch.tensor(1.0)
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, values()))
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        assert float(opt.state[rows]["step"]) == 3.0
        # 6. found_inf set on one rank only (the other steps without GradScaler): every rank
        # raises, the one without found_inf too (it would otherwise wait in the sum forever)
        r = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, [Shard(0)]))
        r.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
        opt = af.Lamb([r], lr=0.01)
        opt.step()
        if rank == 1:
            opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
        before = [_local(v).clone() for v in [r, *opt.state[r].values()]]
        try:
            opt.step()
            raise AssertionError("found_inf set on one rank only did not raise")
        except ValueError as error:
            assert "skips the step on some of the ranks" in str(error), error
            assert f"on this rank it {'does' if rank == 1 else 'does not'}" in str(error), error
        after = [_local(v) for v in [r, *opt.state[r].values()]]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    except BaseException:
        dist.destroy_process_group()  # no barrier: another rank may be stuck
        raise
    _finish()


def _flattened_checkpoint(rank, world, path):
    """torch.distributed.checkpoint's flattened optimizer state dict (its
    ``flatten_optimizer_state_dict`` option, keys ``param_groups.<fqn>.<key>``
    looked up for every key the live groups have) saves and loads into an
    optimizer whose state was overwritten since (torch's unflattening fills the
    states an optimizer has), and the run resumes bitwise as an unsaved one."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        from torch.distributed.fsdp import fully_shard

        options = StateDictOptions(flatten_optimizer_state_dict=True)
        makers = {"AdamW": lambda m: af.AdamW(m.parameters(), lr=0.01, weight_decay=0.1),
                  "AdamW8bit": lambda m: af.AdamW8bit(m.parameters(), lr=0.01),
                  "Amos": lambda m: af.Amos(af.amos_param_groups(m, lr=0.01), lr=0.01, momentum=0.9),
                  "ScaledAdamW": lambda m: af.ScaledAdamW(m.parameters(), lr=0.01, half_life=10)}
        for name, make in makers.items():
            models = [_wide_model(torch.float32) for _ in range(2)]
            for model in models:
                fully_shard(model)
            opts = [make(model) for model in models]
            for model, opt in zip(models, opts):
                _train(model, opt, 0, 2, torch.float32)
            saved = copy.deepcopy(get_optimizer_state_dict(models[0], opts[0], options=options))  # (as written)
            assert any(key.startswith("param_groups.") for key in saved), name
            for state in opts[0].state.values():
                for value in state.values():
                    value.zero_()
            opts[0].param_groups[0]["lr"] = 0.5
            set_optimizer_state_dict(models[0], opts[0], saved, options=options)
            assert opts[0].param_groups[0]["lr"] == 0.01, name
            _train(models[0], opts[0], 2, 4, torch.float32)
            _train(models[1], opts[1], 2, 4, torch.float32)
            for p, q in zip(models[0].parameters(), models[1].parameters()):
                assert torch.equal(_full(p), _full(q)), name
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _dtensor_versions_and_master_writes(rank, world, path):
    """The step bumps the DTensors' own version counters (not only their local
    shards'), so autograd refuses a backward through a graph that saved a param the
    step then changed, and a user's in-place write to a DTensor param between steps
    (which bumps the DTensor's counter) has its float32 master remade from it."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        for backend in ("cpu", "reference"):
            for make in (lambda ps: af.AdamW(ps, lr=0.1, backend=backend),
                         lambda ps: af.AdamW8bit(ps, lr=0.1, backend=backend)):
                torch.manual_seed(0)
                p = torch.nn.Parameter(distribute_tensor(torch.randn(64, 256), mesh, [Shard(0)]))
                opt = make([p])
                loss = (p * p).sum()  # saves p
                p.grad = distribute_tensor(torch.ones(64, 256), mesh, [Shard(0)])
                version = p._version
                opt.step()
                assert p._version > version
                # states made by this first step are bumped as written too (not only their shards)
                made = [v for v in opt.state[p].values() if isinstance(v, DTensor)]
                assert made and all(v._version > 0 for v in made), [v._version for v in made]
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    loss.backward()
            torch.manual_seed(0)
            p = torch.nn.Parameter(distribute_tensor(torch.randn(16, dtype=torch.bfloat16), mesh, [Shard(0)]))
            opt = af.AdamW([p], lr=1e-3, weight_decay=0.0, master_weights=True, backend=backend)
            p.grad = distribute_tensor(torch.randn(16, dtype=torch.bfloat16), mesh, [Shard(0)])
            opt.step()
            with torch.no_grad():
                p.copy_(distribute_tensor(torch.full((16,), 3.0, dtype=torch.bfloat16), mesh, [Shard(0)]))
            p.grad = distribute_tensor(torch.zeros(16, dtype=torch.bfloat16), mesh, [Shard(0)])
            opt.step()
            assert torch.equal(p.full_tensor(), torch.full((16,), 3.0, dtype=torch.bfloat16))
            # bfloat16 DTensor grads left by a GradScaler step: g·(1/s), the float32 product rounded once
            p = torch.nn.Parameter(distribute_tensor(torch.randn(16, 8).bfloat16(), mesh, [Shard(0)]))
            scaled = (torch.randn(16, 8, generator=torch.Generator().manual_seed(3)) * 9).bfloat16()
            p.grad = distribute_tensor(scaled, mesh, [Shard(0)])
            opt = af.AdamW([p], lr=1e-3, backend=backend)
            opt.grad_scale, opt.found_inf = torch.tensor(3.0), torch.tensor(0.0)
            opt.step()
            expected = (scaled.float() * torch.tensor(1 / 3.0, dtype=torch.float32)).bfloat16()
            assert torch.equal(p.grad.full_tensor(), expected)
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _found_inf_on_a_2d_mesh(rank, world, path):
    """found_inf skipping the step on one rank of a 2 × 2 mesh that shards a param
    over one or both dims: every rank raises (none left waiting in a later group's
    all-reduce, nor stepping on where the others raised), nothing written."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2, 2))
        gen = torch.Generator().manual_seed(0)
        value, grad = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
        # (sharded over both dims; sharded over one and replicated over the other, as HSDP: the
        # replicas raise too, rather than step on apart from the replica that skipped)
        for placements, skipping in itertools.product(([Shard(0), Shard(1)], [Replicate(), Shard(0)],
                                                        [Shard(0), Replicate()]), range(world)):
            r = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, placements))
            r.grad = distribute_tensor(grad.clone(), mesh, placements)
            opt = af.Lamb([r], lr=0.01)
            opt.step()
            before = [_local(v).clone() for v in [r, *opt.state[r].values()]]
            opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(float(rank == skipping))
            try:
                opt.step()
                raise AssertionError("a found_inf differing over the ranks did not raise")
            except ValueError as error:
                assert "skips the step on some of the ranks" in str(error), error
            after = [_local(v) for v in [r, *opt.state[r].values()]]
            assert all(torch.equal(a, b) for a, b in zip(before, after))
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _refused_unwritten(opt, *params):
    """opt.step() raises for a grad on some ranks only, with params and states as they
    were; returns the error's text."""
    held = [t for p in params for t in [p, *opt.state[p].values()]]
    before = [_local(t).clone() for t in held]
    try:
        opt.step()
        raise AssertionError("a grad on some ranks only did not raise")
    except ValueError as error:
        text = str(error)
    assert "a grad on some of the ranks that hold it and not on others" in text, text
    assert all(torch.equal(_local(a), b) for a, b in zip(held, before))
    return text


def _size_one_dims_and_uneven_grads(rank, world, path):
    """(1) Amos slots of a param whose dim of size 1 is sharded (FSDP2's Linear(3, 1):
    rank 1's shard has no rows): kept, the slots have the param's local rows (none
    on rank 1); reduced, they are replicated (one row on every rank).  Either way the
    step equals the single process's and a full state dict loads on every rank.
    (2) A param whose step sums over its shards, with a grad on some ranks only —
    one param of two, or every such param of that rank: every rank raises before
    any write, naming the param where it has no grad (the sums would wait forever
    or add unlike buffers), and steps on once the grads agree."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        for reduce_axes, local_rows in (((1,), int(rank == 0)), ((0,), 1)):
            torch.manual_seed(0)
            single = torch.nn.Linear(3, 1, bias=False)
            model = torch.nn.Linear(3, 1, bias=False)
            model.load_state_dict(single.state_dict())
            fully_shard(model)
            opt, single_opt = (af.Amos(m.parameters(), lr=0.01, eta=0.5, reduce_axes=reduce_axes)
                               for m in (model, single))
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
            for _ in range(2):
                for m, o in ((model, opt), (single, single_opt)):
                    m(x).square().mean().backward()
                    o.step()
                    o.zero_grad()
            v = opt.state[model.weight]["v"]
            assert v.shape == single_opt.state[single.weight]["v"].shape, (v.shape, reduce_axes)
            assert v.to_local().shape[0] == local_rows, (rank, reduce_axes, v.to_local().shape)
            assert torch.equal(v.full_tensor(), single_opt.state[single.weight]["v"]), reduce_axes
            full = model.weight.full_tensor()
            assert torch.equal(full, single.weight.detach()), (reduce_axes, full, single.weight)
            saved = single_opt.state_dict()
            whole = {"state": {"weight": saved["state"][0]},
                     "param_groups": [{**saved["param_groups"][0], "params": ["weight"]}]}
            set_optimizer_state_dict(model, opt, whole, options=StateDictOptions(full_state_dict=True))
            loaded = opt.state[model.weight]["v"]
            assert loaded.to_local().shape == v.to_local().shape and loaded.placements == v.placements
            assert torch.equal(loaded.full_tensor(), single_opt.state[single.weight]["v"])
            for m, o in ((model, opt), (single, single_opt)):  # steps on as the single process
                m(x).square().mean().backward()
                o.step()
            assert torch.equal(model.weight.full_tensor(), single.weight.detach()), reduce_axes
        # (2) grads on some ranks only, on a 1-D mesh and on a 2 x 2 one (sharded over one dim,
        # replicated over the other, as HSDP: replicas that part are refused too)
        meshes = [(init_device_mesh("cpu", (world,)), [Shard(0)])]
        if world == 4:
            meshes = [(init_device_mesh("cpu", (2, 2)), [Replicate(), Shard(0)]),
                      (init_device_mesh("cpu", (2, 2)), [Shard(0), Shard(1)])]
        value = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        for (mesh, placements), missing, both in itertools.product(meshes, range(world), (False, True)):
            p, q = (torch.nn.Parameter(distribute_tensor(value.clone(), mesh, placements)) for _ in range(2))
            plain = torch.nn.Parameter(torch.ones(3))  # (not summed: its grad may differ)
            for make in (lambda: af.Lamb([plain, p, q], lr=0.01),
                         lambda: af.Amos([{"params": [plain]}, {"params": [p, q], "reduce_axes": "all"}],
                                         lr=0.01, eta=0.5),
                         lambda: af.ScaledAdamW([p, plain, q], lr=0.01, p=2.0)):
                opt = make()
                for t in (p, q):
                    t.grad = distribute_tensor(torch.ones(8, 4), mesh, placements)
                plain.grad = torch.ones(3) if rank else None
                opt.step()
                if rank == missing:
                    q.grad = None
                    if both:
                        p.grad = None
                error = _refused_unwritten(opt, p, q)
                if rank == missing:
                    position = [i for i, t in enumerate(opt.param_groups[-1]["params"]) if t is q][0]
                    assert f"['params'][{position}]" in error, error
                for t in (p, q):
                    t.grad = distribute_tensor(torch.ones(8, 4), mesh, placements)
                opt.step()  # and steps on once every rank has the grads
                for t in (p, q):
                    t.grad = None
                opt.step()  # (no grad on any rank: nothing summed, nothing refused)
        if world == 4:  # (3) params on a 2 x 2 mesh and on its submesh, the difference found in the last group
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
            for make in (lambda ps: af.Lamb(ps, lr=0.01),
                         lambda ps: af.Amos(ps, lr=0.01, eta=0.5, reduce_axes="all")):
                p = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, [Shard(0), Replicate()]))
                q = torch.nn.Parameter(distribute_tensor(value.clone(), mesh["tp"], [Shard(0)]))
                opt = make([p, q])
                p.grad = distribute_tensor(torch.ones(8, 4), mesh, [Shard(0), Replicate()])
                q.grad = distribute_tensor(torch.ones(8, 4), mesh["tp"], [Shard(0)])
                opt.step()
                if rank == 0:
                    q.grad = None
                _refused_unwritten(opt, p, q)
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _assert_resume_alike(train, original, resumed, steps):
    """``train(model, opt, steps)`` on the original and on the resumed (model,
    optimizer) pairs; their params end bitwise equal."""
    for model, opt in (original, resumed):
        train(model, opt, steps)
    for p, q in zip(original[0].parameters(), resumed[0].parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor())


def _scalar_states_full_dict(rank, world, path):
    """An Amos over params whose every slot is 'all' (0-dim) holds no state tensor
    of dim ≥ 1, and torch's set_optimizer_state_dict(full_state_dict=True) refuses
    such an optimizer ("Expected device to be set": it takes the device from one).
    The gathered dict that get_optimizer_state_dict gives loads by
    opt.load_state_dict instead (keys turned back into indices), the slots as
    replicated DTensors, and the step goes on bitwise as the run it came from."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, Replicate

        def make():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
            fully_shard(model)
            return model, af.Amos(model.parameters(), lr=0.01, eta=0.5, reduce_axes="all")

        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))

        def train(model, opt, steps):
            for _ in range(steps):
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()

        model, opt = make()
        train(model, opt, 2)
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        fresh, fresh_opt = make()
        with pytest.raises(AssertionError, match="Expected device to be set"):  # (torch's check)
            set_optimizer_state_dict(fresh, fresh_opt, full, options=StateDictOptions(full_state_dict=True))
        fresh.load_state_dict(model.state_dict())
        names = [name for name, _ in fresh.named_parameters()]
        fresh_opt.load_state_dict({
            "state": {names.index(name): state for name, state in full["state"].items()},
            "param_groups": [{**g, "params": [names.index(n) for n in g["params"]]} for g in full["param_groups"]]})
        for p, q in zip(model.parameters(), fresh.parameters()):
            for key in ("v", "b"):
                loaded = fresh_opt.state[q][key]
                assert isinstance(loaded, DTensor) and loaded.dim() == 0 and loaded.placements == (Replicate(),)
                assert torch.equal(loaded.full_tensor(), opt.state[p][key].full_tensor()), key
        _assert_resume_alike(train, (model, opt), (fresh, fresh_opt), steps=2)
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _full_dict_with_a_key_the_loader_lacks(rank, world, path):
    """A full state dict holding a state key the loading optimizer's state lacks (a
    bf16 param's float32 master, kept by a step that GradScaler's found_inf skipped
    after master_weights was turned off): torch's set_state_dict places only the
    keys the loader holds, so that one arrives as the whole tensor; the load takes
    this rank's shard of it, and the resumed run equals the original bitwise."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
        from torch.distributed.fsdp import fully_shard

        def make():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).bfloat16()
            fully_shard(model)
            return model, af.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)

        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).bfloat16()

        def train(model, opt, steps):
            for _ in range(steps):
                opt.zero_grad()
                model(x).float().square().mean().backward()
                opt.step()

        model, opt = make()
        opt.param_groups[0]["master_weights"] = True
        train(model, opt, 3)
        opt.param_groups[0]["master_weights"] = False
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
        train(model, opt, 1)  # (skipped: the master is kept for the next step that runs to drop)
        del opt.grad_scale, opt.found_inf
        assert all("master_param" in opt.state[p] for p in model.parameters())
        options = StateDictOptions(full_state_dict=True)
        model_state, optim_state = get_state_dict(model, opt, options=options)
        fresh, fresh_opt = make()
        set_state_dict(fresh, fresh_opt, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=options)
        _assert_resume_alike(train, (model, opt), (fresh, fresh_opt), steps=2)
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _cross_precision_checkpoint(rank, world, path, directory):
    """A DCP checkpoint of one precision resumed by an optimizer of the other, as
    README.md says: loaded into an optimizer of the class that saved it, whose state
    dict the other optimizer's load_state_dict quantizes (into AdamW8bit) or decodes
    (into AdamW); the same as loading the saving optimizer's state dict in memory
    (params, codes and absmax bitwise, 3 steps on).  dcp.load straight into the
    other class would copy the saved values into that class's state tensors (float
    moments into uint8 codes), which is why it goes through the saving class."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.fsdp import fully_shard

        routes = [(torch.optim.AdamW, af.AdamW8bit), (af.AdamW, af.AdamW8bit), (af.AdamW8bit, af.AdamW)]
        for saving, resuming in routes:
            where = os.path.join(directory, f"{saving.__module__}.{saving.__name__}")
            model = fully_shard(_wide_model(torch.float32))
            opt = saving(model.parameters(), lr=0.01)
            _train(model, opt, 0, 3, torch.float32)
            model_state, optim_state = get_state_dict(model, opt)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=where)

            loaded = fully_shard(_wide_model(torch.float32))
            staging = saving(loaded.parameters(), lr=0.01)
            model_state, optim_state = get_state_dict(loaded, staging)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=where)
            set_state_dict(loaded, staging, model_state_dict=state["model"], optim_state_dict=state["optim"])
            resumed = resuming(loaded.parameters(), lr=0.01)
            resumed.load_state_dict(staging.state_dict())

            in_memory = fully_shard(_wide_model(torch.float32))
            in_memory.load_state_dict(model.state_dict())
            expected = resuming(in_memory.parameters(), lr=0.01)
            expected.load_state_dict(opt.state_dict())
            for p, q in zip(loaded.parameters(), in_memory.parameters()):
                assert set(resumed.state[p]) == set(expected.state[q])
                for key, value in expected.state[q].items():
                    assert torch.equal(_full(resumed.state[p][key]), _full(value)), (saving, key)
            _train(loaded, resumed, 3, 6, torch.float32)
            _train(in_memory, expected, 3, 6, torch.float32)
            for p, q in zip(loaded.parameters(), in_memory.parameters()):
                assert torch.equal(_full(p), _full(q)), saving
            coded = [v for st in resumed.state.values() for v in st.values() if v.dtype == torch.uint8]
            assert bool(coded) == (resuming is af.AdamW8bit), saving  # (the wide weight: FP8 states)
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _fsdp2_over_tensor_parallel(rank, world, path):
    """FSDP2 over tensor parallelism on a 2 × 2 (dp, tp) mesh: a ColwiseParallel
    Linear, then fully_shard over dp, places its weight and bias
    (_StridedShard(0), Shard(0)) — dim 0 sharded by both mesh dims, the first
    placement no Shard in torch's classes.  The per-tensor sums (LAMB's and
    ScaledAdamW's norms, Amos's inferred η and 'all' slots) cover the whole tensor:
    the single-process run's params within float32 rounding."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate, distribute_tensor
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        makers = {
            "Lamb": lambda ps: af.Lamb(ps, lr=0.01, weight_decay=0.1),
            "ScaledAdamW": lambda ps: af.ScaledAdamW(ps, lr=0.01, half_life=50),
            "Amos, eta inferred": lambda ps: af.Amos(ps, lr=0.01),
            "Amos, 'all' slots": lambda ps: af.Amos(ps, lr=0.01, eta=0.5, reduce_axes="all"),
            "AdamW": lambda ps: af.AdamW(ps, lr=0.01),
        }
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        for name, make in makers.items():
            torch.manual_seed(0)
            single = torch.nn.Linear(8, 16)
            model = torch.nn.Linear(8, 16)
            model.load_state_dict(single.state_dict())
            parallelize_module(model, mesh["tp"], ColwiseParallel())
            fully_shard(model, mesh=mesh["dp"])
            assert type(model.weight.placements[0]).__name__ == "_StridedShard", model.weight.placements
            opt, single_opt = make(list(model.parameters())), make(list(single.parameters()))
            for step in range(3):
                for i, (p, q) in enumerate(zip(model.parameters(), single.parameters())):
                    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(10 * step + i))
                    q.grad = g.clone()
                    p.grad = distribute_tensor(g, p.device_mesh, [Replicate(), Replicate()]).redistribute(
                        p.device_mesh, p.placements)
                opt.step()
                single_opt.step()
            for p, q in zip(model.parameters(), single.parameters()):
                torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=0, atol=1e-6, msg=name)
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _gathered_fp8_into_full_precision(rank, world, path):
    """A gathered 8-bit state dict (get_optimizer_state_dict(full_state_dict=True) of
    an FSDP2 AdamW8bit run) set into optimizers that keep that param's states in
    full precision — AdamW on the same FSDP2 model, AdamW8bit under RowwiseParallel
    (Shard(1): blocks would straddle the shards) — decodes the whole state and places
    it like the param: the gathered codes' values, and a step runs on."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from amos_fused import fp8_states
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate, distribute_tensor
        from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,))

        def model(layout):
            torch.manual_seed(0)
            m = torch.nn.Linear(512, 12, bias=False)  # rows of 2 blocks
            if layout == "fsdp":
                fully_shard(m, mesh=mesh)
            else:
                parallelize_module(m, mesh, RowwiseParallel())
            return m

        def step(m, opt, seed):
            g = torch.randn(12, 512, generator=torch.Generator().manual_seed(seed))
            m.weight.grad = distribute_tensor(g, mesh, [Replicate()]).redistribute(mesh, m.weight.placements)
            opt.step()

        src = model("fsdp")
        src_opt = af.AdamW8bit(src.parameters(), lr=0.01)
        for seed in range(3):
            step(src, src_opt, seed)
        assert src_opt.state[src.weight]["exp_avg"].dtype == torch.uint8
        options = StateDictOptions(full_state_dict=True)
        full = get_optimizer_state_dict(src, src_opt, options=options)
        saved = full["state"]["weight"]
        expected = {key: fp8_states.decoded(saved[key], saved[key + "_absmax"], key == "exp_avg_sq")
                    for key in ("exp_avg", "exp_avg_sq")}
        for layout, cls in (("fsdp", af.AdamW), ("row", af.AdamW8bit)):
            dst = model(layout)
            opt = cls(dst.parameters(), lr=0.01)
            set_optimizer_state_dict(dst, opt, full, options=options)
            state = opt.state[dst.weight]
            assert not any(key.endswith("_absmax") for key in state), sorted(state)
            for key, values in expected.items():
                assert state[key].dtype == torch.float32 and state[key].placements == dst.weight.placements
                assert torch.equal(state[key].full_tensor(), values), (layout, key)
            step(dst, opt, 3)
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _grouping_beside_summing_params(rank, world, path):
    """A DTensor param whose step needs no sum over shards (replicated; or Shard(0)
    with Amos slots over dim 1) steps bitwise as the single-process run whether it
    has a group of its own or shares one with a param whose step sums (Shard(0)
    under LAMB and 'all' slots, Shard(1) under row slots): the summing params are
    bucketed apart, the others stepped by the fused kernels."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(0)
        va, vb = torch.randn(64, 300, generator=gen), torch.randn(64, 300, generator=gen)
        grads = [(torch.randn(64, 300, generator=gen), torch.randn(64, 300, generator=gen)) for _ in range(3)]
        cases = (("Lamb", lambda g: af.Lamb(g, lr=0.01, weight_decay=0.1), [Replicate()], [Shard(0)]),
                 ("Amos 'all'", lambda g: af.Amos(g, lr=0.01, eta=0.5, reduce_axes="all"), [Replicate()], [Shard(0)]),
                 ("Amos rows", lambda g: af.Amos(g, lr=0.01, eta=0.5, reduce_axes=(1,)), [Shard(0)], [Shard(1)]))
        for name, make, placed_a, placed_b in cases:
            q = torch.nn.Parameter(va.clone())
            single = make([q])
            for ga, _ in grads:
                q.grad = ga.clone()
                single.step()
            for split in (True, False):
                a = torch.nn.Parameter(distribute_tensor(va.clone(), mesh, placed_a))
                b = torch.nn.Parameter(distribute_tensor(vb.clone(), mesh, placed_b))
                opt = make([{"params": [a]}, {"params": [b]}] if split else [{"params": [a, b]}])
                for ga, gb in grads:
                    a.grad = distribute_tensor(ga.clone(), mesh, placed_a)
                    b.grad = distribute_tensor(gb.clone(), mesh, placed_b)
                    opt.step()
                assert torch.equal(a.full_tensor(), q.detach()), (name, "own group" if split else "shared group")
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _sharded_sums_at_any_thread_count(rank, world, path):
    """Amos slots averaged over a sharded dim (a Shard(0) float64 weight with 'all'
    and column slots, local shards past torch's parallel grain, β = 0 so that v is
    each step's mean g²): the summing step's sums are taken in a fixed order, so v
    is bitwise the same at 1, 2 and 3 threads after every step (torch's own sum
    moved v's last bit at one of these 8 steps)."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(0)
        value = torch.randn(4096, 96, generator=gen, dtype=torch.float64)
        scale = torch.logspace(-3, 3, 96, dtype=torch.float64)
        grads = [torch.randn(4096, 96, generator=gen, dtype=torch.float64) * scale for _ in range(8)]
        for axes in ("all", (0,)):
            runs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                p = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, [Shard(0)]))
                opt = af.Amos([p], lr=0.01, eta=0.5, reduce_axes=axes, beta=0.0)
                history = []
                for g in grads:
                    p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                    opt.step()
                    history.append(_local(opt.state[p]["v"]).clone())
                runs.append(history + [_local(p).clone()])
            for other in runs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(runs[0], other)), axes
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _dtensor_refusals_named(rank, world, path):
    """Refusals that only DTensors meet name the param as the plain params' do, with
    nothing written: Amos's bad reduce_axes for a sharded param (asked first where
    the params that sum over their shards are split off), and a DTensor where a
    plain tensor belongs (a step counter; a plain param's state)."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(0)
        sharded = lambda *shape: distribute_tensor(torch.randn(*shape, generator=gen), mesh, [Shard(0)])  # noqa: E731

        def refused(opt, params, edit, undo, *words):
            held = [t for p in params for t in [p, *opt.state[p].values()]]
            before = [_local(t).clone() for t in held]
            edit()
            try:
                opt.step()
                raise AssertionError(f"{words} did not raise")
            except ValueError as error:
                text = str(error)
            undo()
            assert "param_groups[1]['params'][0]" in text and all(w in text for w in words), text
            assert all(torch.equal(_local(a), b) for a, b in zip(held, before)), words

        a, b = torch.nn.Parameter(sharded(8, 5)), torch.nn.Parameter(sharded(64, 32))
        opt = af.Amos([{"params": [a]}, {"params": [b], "reduce_axes": (1,)}], lr=0.01)
        a.grad, b.grad = sharded(8, 5), sharded(64, 32)
        opt.step()
        group = opt.param_groups[1]
        for bad, words in (("bogus", ("reduce_axes", "'bogus'")), ((5,), ("reduce_axes (5,)", "out of range"))):
            refused(opt, [a, b], lambda: group.__setitem__("reduce_axes", bad),
                    lambda: group.__setitem__("reduce_axes", (1,)), *words)

        a, b = torch.nn.Parameter(sharded(8, 5)), torch.nn.Parameter(sharded(64, 32))
        opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=0.01)
        a.grad, b.grad = sharded(8, 5), sharded(64, 32)
        opt.step()
        step = opt.state[b]["step"]
        refused(opt, [a, b], lambda: opt.state[b].__setitem__("step", distribute_tensor(step.clone(), mesh, [Replicate()])),
                lambda: opt.state[b].__setitem__("step", step), "state['step']", "not a DTensor")

        c, d = torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(64, 32))
        opt = af.AdamW([{"params": [c]}, {"params": [d]}], lr=0.01)
        c.grad, d.grad = torch.randn(8, 5), torch.randn(64, 32)
        opt.step()
        exp_avg = opt.state[d]["exp_avg"]
        refused(opt, [c, d], lambda: opt.state[d].__setitem__("exp_avg", distribute_tensor(exp_avg.clone(), mesh, [Replicate()])),
                lambda: opt.state[d].__setitem__("exp_avg", exp_avg), "state['exp_avg']", "not a DTensor")
        opt.step()  # mended: it steps
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _a_refusal_on_some_ranks(rank, world, path):
    """A step that sums over the shards, refused by one rank's checks only (its step
    counter negative, its lr out of range, Amos's reduce_axes out of range or
    deleted, or each rank's own problem): that rank raises its own error and the
    others a RuntimeError saying so, all at once (not at the process group's
    timeout) and with nothing written on any rank; refused on every rank, each
    raises its own; mended, the step goes on as an unrefused run's."""
    _init(rank, world, path)
    try:
        import time

        import amos_fused as af
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        value = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
        grad = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
        makers = (lambda ps: af.Lamb(ps, lr=0.01), lambda ps: af.ScaledAdamW(ps, lr=0.01, half_life=10, sigma=0.02),
                  lambda ps: af.Amos(ps, lr=0.01, eta=0.5, reduce_axes="all"))
        for make in makers:
            runs = []
            for refusing in (True, False):
                p = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, [Shard(0)]))
                opt = make([p])
                p.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
                opt.step()
                if refusing:
                    for bad_ranks, edit, undo, own in (
                            ((1,), lambda: opt.state[p].__setitem__("step", torch.tensor(-1.0)),
                             lambda: opt.state[p].__setitem__("step", torch.tensor(1.0)), "step"),
                            ((1,), lambda: opt.param_groups[0].__setitem__("lr", -1.0),
                             lambda: opt.param_groups[0].__setitem__("lr", 0.01), "learning rate"),
                            (tuple(range(world)), lambda: opt.param_groups[0].__setitem__("lr", -1.0),
                             lambda: opt.param_groups[0].__setitem__("lr", 0.01), "learning rate"),
                            # (a setting that cannot say whether the param sums: this rank tells anyway)
                            *([((1,), lambda: opt.param_groups[0].__setitem__("reduce_axes", (7,)),
                                lambda: opt.param_groups[0].__setitem__("reduce_axes", "all"), "out of range"),
                               ((1,), lambda: opt.param_groups[0].pop("reduce_axes"),
                                lambda: opt.param_groups[0].__setitem__("reduce_axes", "all"), "reduce_axes"),
                               ((0, 1), lambda: opt.param_groups[0].__setitem__(
                                   "reduce_axes" if rank == 0 else "lr", (7,) if rank == 0 else -1.0),
                                lambda: opt.param_groups[0].update(reduce_axes="all", lr=0.01),
                                "out of range" if rank == 0 else "learning rate")]
                              if isinstance(opt, af.Amos) else [])):
                        held = [p, *opt.state[p].values()]
                        before = [_local(t).clone() for t in held]
                        if rank in bad_ranks:
                            edit()
                        started = time.monotonic()
                        try:
                            opt.step()
                            raise AssertionError("a step refused on some ranks did not raise")
                        except (ValueError, TypeError, RuntimeError) as error:
                            text = str(error)
                        assert time.monotonic() - started < 60, "the ranks waited for the timeout"
                        if rank in bad_ranks:
                            undo()
                            assert own in text and "another rank" not in text, text
                        else:
                            assert "the step raised on another rank" in text, text
                        assert all(torch.equal(_local(a), b) for a, b in zip(held, before))
                for _ in range(2):
                    opt.step()
                runs.append(p.full_tensor())
            assert torch.equal(*runs)
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _stepped_once_on_shard0(make, mesh, placements=None, make_single=None):
    """(p, opt, q, single, grads): a (8, 512) param placed Shard(0) (or
    ``placements``) and its single-process twin, each stepped once by its own
    ``make([param])`` (the twin's by ``make_single`` when given), and the grads of
    that step and of two more."""
    from torch.distributed.tensor import Shard, distribute_tensor
    placements = placements or [Shard(0)]
    value = torch.randn(8, 512, generator=torch.Generator().manual_seed(0))
    grads = [torch.randn(8, 512, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    p = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, placements))
    q = torch.nn.Parameter(value.clone())
    opt, single = make([p]), (make_single or make)([q])
    p.grad, q.grad = distribute_tensor(grads[0], mesh, placements), grads[0].clone()
    opt.step()
    single.step()
    return p, opt, q, single, grads


def _8bit_and_full_precision_makers():
    """{name: (make the 8-bit optimizer, make its full-precision class)} over a list of params."""
    import amos_fused as af

    amos = dict(lr=0.01, eta=0.5, momentum=0.9, reduce_axes=(1,))
    return {"AdamW8bit": (lambda ps: af.AdamW8bit(ps, lr=0.01), lambda ps: af.AdamW(ps, lr=0.01)),
            "Amos8bit": (lambda ps: af.Amos8bit(ps, **amos), lambda ps: af.Amos(ps, **amos))}


def _8bit_state_loaded_under_other_placements(rank, world, path):
    """An 8-bit state_dict saved with the param placed Shard(0), loaded by
    load_state_dict into an optimizer whose param (the same values) is placed
    Replicate() (FP8 states kept: codes and absmax both moved there) or Shard(1)
    (full-precision states: decoded whole, placed like the param): two more steps
    give the single-process run's params bitwise (for Shard(1), the run whose
    8-bit state was decoded into the full-precision class; Amos's row slots then
    sum over the shards: up to the order of summation)."""
    _init(rank, world, path)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        makers = _8bit_and_full_precision_makers()
        for (name, (make, make_full)), new in itertools.product(makers.items(), ([Replicate()], [Shard(1)])):
            p, opt, q, single, grads = _stepped_once_on_shard0(make, mesh)
            if new == [Shard(1)]:  # (blocks would straddle the shards: full-precision states, decoded)
                full = make_full([q])
                full.load_state_dict(single.state_dict())
                single = full
            moved = torch.nn.Parameter(distribute_tensor(p.detach().full_tensor(), mesh, new))
            resumed = make([moved])
            resumed.load_state_dict(opt.state_dict())
            for key, state in resumed.state[moved].items():
                if key != "step":
                    assert tuple(state.placements) == tuple(new) or key in ("v", "b"), (name, key, state.placements)
            for g in grads[1:]:
                moved.grad, q.grad = distribute_tensor(g, mesh, new), g.clone()
                resumed.step()
                single.step()
            if name == "Amos8bit" and new == [Shard(1)]:  # (its row slots then sum over the shards)
                torch.testing.assert_close(moved.detach().full_tensor(), q.detach(), rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(moved.detach().full_tensor(), q.detach()), (name, new)
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _state_moved_to_a_param_placed_otherwise(rank, world, path):
    """A param stepped placed Shard(0), then replaced by the same values placed
    Shard(1) with its state moved over (opt.state[new] = opt.state.pop(old), as a
    reshard leaves it): the states are stepped placed like the new param, as
    torch.optim's DTensor ops redistribute them, and stored so — the
    single-process run's params bitwise."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        for make in (lambda ps: af.AdamW(ps, lr=0.01), lambda ps: af.Lion(ps, lr=0.01),
                     lambda ps: af.AdamW(ps, lr=0.01, backend="reference")):
            p, opt, q, single, grads = _stepped_once_on_shard0(make, mesh)
            moved = torch.nn.Parameter(distribute_tensor(p.detach().full_tensor(), mesh, [Shard(1)]))
            opt.param_groups[0]["params"] = [moved]
            opt.state[moved] = opt.state.pop(p)
            for g in grads[1:]:
                moved.grad, q.grad = distribute_tensor(g, mesh, [Shard(1)]), g.clone()
                opt.step()
                single.step()
            assert torch.equal(moved.detach().full_tensor(), q.detach())
            for key, state in opt.state[moved].items():
                assert key == "step" or tuple(state.placements) == (Shard(1),), key
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _8bit_state_moved_to_a_param_placed_otherwise(rank, world, path):
    """8-bit states moved in memory (opt.state[new] = opt.state.pop(old), as a
    reshard leaves them) to a param placed so that it keeps the other precision:
    Shard(0) → Shard(1) decodes the codes in their own placement and steps the
    full-precision states placed Shard(1); Shard(1) → Shard(0) quantizes the
    full-precision states into codes placed Shard(0); Shard(0) → Replicate moves
    codes and absmax; Amos's slots are placed as the new param's are.  Two more
    steps give bitwise the single-process run whose state went through
    load_state_dict into the other precision (Amos8bit's row slots summed over
    Shard(1)'s shards: up to the order of summation)."""
    _init(rank, world, path)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        makers = _8bit_and_full_precision_makers()
        moves = ([Shard(0)], [Shard(1)]), ([Shard(1)], [Shard(0)]), ([Shard(0)], [Replicate()])
        for (name, (make, make_full)), (old, new) in itertools.product(makers.items(), moves):
            coded_before, coded_after = old != [Shard(1)], new != [Shard(1)]
            # the twin: full precision while the sharded param keeps full-precision states
            p, opt, q, single, grads = _stepped_once_on_shard0(make, mesh, old, None if coded_before else make_full)
            if coded_before != coded_after:
                other = (make if coded_after else make_full)([q])
                other.load_state_dict(single.state_dict())  # quantized, or decoded
                single = other
            moved = torch.nn.Parameter(distribute_tensor(p.detach().full_tensor(), mesh, new))
            opt.param_groups[0]["params"] = [moved]
            opt.state[moved] = opt.state.pop(p)
            for g in grads[1:]:
                moved.grad, q.grad = distribute_tensor(g, mesh, new), g.clone()
                opt.step()
                single.step()
            state = opt.state[moved]
            assert ("mu_absmax" in state or "exp_avg_absmax" in state) == coded_after, (name, old, new, list(state))
            for key, value in state.items():
                if key not in ("step", "v", "b"):
                    assert tuple(value.placements) == tuple(new), (name, key, value.placements)
            if name == "Amos8bit" and [Shard(1)] in (old, new):  # (row slots summed over Shard(1)'s shards)
                torch.testing.assert_close(moved.detach().full_tensor(), q.detach(), rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(moved.detach().full_tensor(), q.detach()), (name, old, new)
                for key, value in single.state[q].items():
                    if key != "step":
                        # (a sharded absmax is (rows, blocks per row); the plain param's, 1-D)
                        assert torch.equal(state[key].full_tensor().reshape(value.shape), value), (name, old, new, key)
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _rms_of_params_stepped_on_some_ranks(rank, world, path):
    """opt.rms() of FSDP2 params that the ranks first stepped in different orders
    (rank 1 had no grad for the first weight at step 0: a step needing no sum takes
    a grad on some ranks only) is each whole param's RMS on every rank; a param
    rank 1 never stepped reads NaN where rank 0 stepped it, rather than another
    param's sums (or a hang)."""
    _init(rank, world, path)
    try:
        import amos_fused as af
        from torch.distributed.fsdp import fully_shard

        for missing in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            fully_shard(model)
            params = list(model.parameters())
            opt = af.AdamW(params, lr=0.01, track_rms=True)
            for step in range(2):
                opt.zero_grad()
                model(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).square().mean().backward()
                if rank == 1 and (step == 0 or missing):
                    params[0].grad = None
                before = [p.full_tensor().detach().clone() for p in params]
                opt.step()
            rms = opt.rms()
            for i, (p, b) in enumerate(zip(params, before)):
                a = p.full_tensor().detach().double()
                if missing and i == 0:
                    assert (p not in rms) if rank == 1 else math.isnan(rms[p].weight)
                    continue
                assert math.isclose(rms[p].weight, math.sqrt(float(a.square().mean())), rel_tol=1e-6), i
                update = math.sqrt(float((a - b.double()).square().mean())) / 0.01
                assert math.isclose(rms[p].update, update, rel_tol=1e-5), i
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(world, os.path.join(tmp, "store"), *args), nprocs=world, join=True)


def test_a_full_state_dict_key_the_loader_lacks_is_placed_like_its_param():
    _spawn(_full_dict_with_a_key_the_loader_lacks, 2)


@pytest.mark.parametrize("offload", [False, True], ids=["fsdp2", "fsdp2-cpu-offload"])
def test_fsdp2_matches_single_process(offload):
    _spawn(_fsdp_matches_single_process, 2, offload)


@pytest.mark.parametrize("offload", [False, True], ids=["fsdp2", "fsdp2-cpu-offload"])
def test_fsdp2_master_weights_match_single_process(offload):
    _spawn(_fsdp_master_weights, 2, offload)


@pytest.mark.parametrize("offload", [False, True], ids=["fsdp2", "fsdp2-cpu-offload"])
def test_fsdp2_fp8_states_match_single_process(offload):
    _spawn(_fsdp_fp8_states, 2, offload)


@pytest.mark.parametrize("resume_world", [2, 1], ids=["2-to-2", "2-to-1"])
def test_distributed_checkpoint_reshards_and_resumes(resume_world):
    with tempfile.TemporaryDirectory() as directory:
        _spawn(_checkpoint, 2, directory, False)
        _spawn(_checkpoint, resume_world, directory, True)


def test_dtensor_grad_placement_stochastic_rounding_and_failed_reductions():
    _spawn(_dtensor_corners, 2)


def test_flattened_distributed_checkpoint_loads_and_resumes():
    _spawn(_flattened_checkpoint, 1)


def test_dtensor_version_counters_and_master_writes():
    _spawn(_dtensor_versions_and_master_writes, 2)


def test_a_found_inf_differing_over_a_2d_mesh_is_refused_on_every_rank():
    _spawn(_found_inf_on_a_2d_mesh, 4)


@pytest.mark.parametrize("world", [2, 4])
def test_size_one_sharded_dims_and_grads_on_some_ranks_only(world):
    _spawn(_size_one_dims_and_uneven_grads, world)


def test_amos_with_scalar_slots_only_loads_a_gathered_state_dict_by_load_state_dict():
    _spawn(_scalar_states_full_dict, 2)


def test_a_checkpoint_of_the_other_precision_resumes_through_the_saving_class():
    with tempfile.TemporaryDirectory() as directory:
        _spawn(_cross_precision_checkpoint, 2, directory)


def test_fsdp2_over_tensor_parallel_sums_over_every_shard():
    _spawn(_fsdp2_over_tensor_parallel, 4)


def test_a_gathered_8bit_state_decodes_into_full_precision_states_of_a_sharded_param():
    _spawn(_gathered_fp8_into_full_precision, 2)


def test_params_needing_no_sum_step_alike_in_any_grouping_beside_summing_ones():
    _spawn(_grouping_beside_summing_params, 2)


def test_sums_over_shards_are_bitwise_the_same_at_any_thread_count():
    _spawn(_sharded_sums_at_any_thread_count, 2)


def test_an_8bit_state_loads_under_other_placements_of_its_param():
    _spawn(_8bit_state_loaded_under_other_placements, 2)


def test_a_state_moved_to_a_param_placed_otherwise_steps_as_torch_optim():
    _spawn(_state_moved_to_a_param_placed_otherwise, 2)


def test_an_8bit_state_moved_to_a_param_keeping_the_other_precision_steps_in_it():
    _spawn(_8bit_state_moved_to_a_param_placed_otherwise, 2)


def test_rms_of_sharded_params_stepped_on_some_ranks_only():
    _spawn(_rms_of_params_stepped_on_some_ranks, 2)


def test_refusals_that_only_dtensors_meet_name_the_param():
    _spawn(_dtensor_refusals_named, 1)


def test_a_step_refused_on_some_ranks_raises_on_every_rank_at_once():
    _spawn(_a_refusal_on_some_ranks, 2)
