"""python -m amos_fused.demo: a few steps of a tiny GPT with two optimizers write
the JSON and the plots, with finite losses that go down."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from amos_fused import demo


def test_demo_tiny_run(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    cfg = demo.parse_args([
        "--steps", "30", "--out", str(out), "--optimizers", "adamw,amos", "--seed", "1",
        "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "32", "--batch", "8",
        "--warmup", "3", "--rms-every", "5", "--eval-every", "15", "--eval-batches", "2",
        "--data-bytes", "300000", "--no-progress", "--lr", "adamw=1e-2",
    ])
    report = demo.run(cfg, command="test")
    saved = json.loads((out / "demo.json").read_text())
    for name in ("loss.png", "rms.png", "rms_adamw.png", "state_bytes.png"):
        assert (out / name).stat().st_size > 1000, name
    assert set(saved["results"]) == {"adamw", "amos"}
    for name, r in saved["results"].items():
        assert len(r["train_loss"]) == 30
        assert all(math.isfinite(v) for v in r["train_loss"] + r["val"]["loss"]), name
        assert math.isfinite(r["final_val_loss"]) and r["state_bytes"] > 0
        assert r["rms"]["step"] == [1, 6, 11, 16, 21, 26, 30]
    adamw = saved["results"]["adamw"]["train_loss"]
    assert sum(adamw[-5:]) / 5 < sum(adamw[:5]) / 5 - 0.5
    assert saved["results"]["adamw"]["val"]["loss"][-1] < saved["results"]["adamw"]["val"]["loss"][0]
    # Amos's factored slots: a small fraction of AdamW's two full moments.
    assert saved["results"]["amos"]["state_bytes"] < 0.05 * saved["results"]["adamw"]["state_bytes"]
    check = saved["checks"]["adamw"]
    assert check["weight_rms_equilibrium_predicted"] == pytest.approx(math.sqrt(1e-2 / (2 * 1.0)), rel=1e-5)
    assert check["update_rms_predicted"] == pytest.approx(math.sqrt(0.1 / 1.9), rel=1e-5)
    assert report["results"]["adamw"]["final_val_loss"] == pytest.approx(saved["results"]["adamw"]["final_val_loss"],
                                                                         rel=1e-5)


def test_demo_without_matplotlib_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit, match=r"pip install --no-build-isolation -e \.\[demo\]"):
        demo.main(["--steps", "1"])


def test_demo_help_needs_no_matplotlib(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--help"])
    assert exit_.value.code == 0 and "--optimizers" in capsys.readouterr().out


def test_demo_rejects_unknown_optimizer():
    with pytest.raises(SystemExit, match="unknown optimizer"):
        demo.parse_args(["--optimizers", "adamw,sgd"])


def test_demo_rejects_an_lr_for_a_run_it_does_not_make(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.parse_args(["--optimizers", "adamw", "--lr", "amos=0.1"])
    assert exit_.value.code == 2 and "'amos' is not among the runs" in capsys.readouterr().err


def test_demo_bf16_runs(tmp_path):
    """The bf16 runs train a bfloat16 copy of the model; they are not in the default set."""
    pytest.importorskip("matplotlib")
    assert "adamw-bf16-sr" not in demo.DemoConfig().optimizers
    out = tmp_path / "demo"
    cfg = demo.parse_args([
        "--steps", "12", "--out", str(out), "--optimizers", "adamw-bf16,adamw-bf16-sr", "--seed", "1",
        "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "32", "--batch", "8",
        "--warmup", "3", "--rms-every", "4", "--eval-every", "6", "--eval-batches", "2",
        "--data-bytes", "300000", "--no-progress",
    ])
    demo.run(cfg, command="test")
    saved = json.loads((out / "demo.json").read_text())
    nearest, stochastic = (saved["results"][n] for n in ("adamw-bf16", "adamw-bf16-sr"))
    for r in (nearest, stochastic):
        assert all(math.isfinite(v) for v in r["train_loss"])
        assert r["train_loss"][-1] < r["train_loss"][0]
    assert nearest["train_loss"] != stochastic["train_loss"]  # the rounding differs
    # bf16 states: half of float32 AdamW's 8 bytes per param (and a step counter per tensor)
    assert nearest["state_bytes"] == pytest.approx(4 * saved["model"]["params"], rel=0.01)


def _tiny_8bit_args(out, optimizers):
    # d_model 64: every matrix and the embedding have at least 4096 elements (FP8 states)
    return demo.parse_args([
        "--steps", "12", "--out", str(out), "--optimizers", optimizers, "--seed", "1",
        "--d-model", "64", "--n-layer", "1", "--n-head", "2", "--seq-len", "32", "--batch", "8",
        "--warmup", "3", "--rms-every", "4", "--eval-every", "6", "--eval-batches", "2",
        "--data-bytes", "300000", "--no-progress",
    ])


def test_demo_8bit_runs(tmp_path):
    """adamw8bit and lion8bit: the hyper-parameters of adamw and lion, FP8 states (about
    a quarter of AdamW's bytes), in the default set; bnb-adamw8bit is not."""
    pytest.importorskip("matplotlib")
    defaults = demo.DemoConfig().optimizers
    assert {"adamw8bit", "lion8bit"} <= set(defaults) and "bnb-adamw8bit" not in defaults
    out = tmp_path / "demo"
    demo.run(_tiny_8bit_args(out, "adamw,adamw8bit,lion,lion8bit"), command="test")
    saved = json.loads((out / "demo.json").read_text())
    results = saved["results"]
    for low, full in (("adamw8bit", "adamw"), ("lion8bit", "lion")):
        assert results[low]["lr"] == results[full]["lr"] and results[low]["hparams"] == results[full]["hparams"]
        r = results[low]
        assert all(math.isfinite(v) for v in r["train_loss"] + r["val"]["loss"]), low
        assert r["train_loss"][-1] < r["train_loss"][0]
        assert r["train_loss"] != results[full]["train_loss"]  # the states are quantized
        check = saved["checks"][f"{low}_vs_{full}"]
        assert check["state_bytes_ratio"] == pytest.approx(r["state_bytes"] / results[full]["state_bytes"], rel=1e-5)
        assert check["state_bytes_ratio"] < 0.35  # codes + absmax; float32 states of the vectors
    assert "adamw8bit_vs_bnb-adamw8bit" not in saved["checks"]


def test_demo_bnb_adamw8bit_run(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "demo"
    demo.run(_tiny_8bit_args(out, "adamw8bit,bnb-adamw8bit"), command="test")
    saved = json.loads((out / "demo.json").read_text())
    bnb, ours = saved["results"]["bnb-adamw8bit"], saved["results"]["adamw8bit"]
    assert bnb["hparams"] == {**ours["hparams"], "min_8bit_size": 4096} and bnb["lr"] == ours["lr"]
    assert all(math.isfinite(v) for v in bnb["train_loss"]) and bnb["train_loss"][-1] < bnb["train_loss"][0]
    # 8-bit states of the same params (bnb: plus two shared 1 KB maps, less the step tensors)
    assert bnb["state_bytes"] == pytest.approx(ours["state_bytes"], rel=0.02)
    assert "adamw8bit_vs_bnb-adamw8bit" in saved["checks"]


def test_demo_bnb_run_without_bitsandbytes_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(SystemExit, match=r"pip install bitsandbytes"):
        demo.parse_args(["--optimizers", "adamw,bnb-adamw8bit"])
    assert demo.parse_args(["--optimizers", "adamw8bit"]).optimizers == ["adamw8bit"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "-1"], "--steps must be >= 1"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--rms-every", "0"], "--rms-every must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--threads", "-1"], "--threads must be in [1, 4096]"),
    (["--threads", "100000"], "--threads must be in [1, 4096]"),
    (["--lr", "adamw=abc"], "VALUE a finite number > 0"),
    (["--lr", "adamw=0"], "VALUE a finite number > 0"),
    (["--lr", "adamw=inf"], "VALUE a finite number > 0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number > 0"),
    (["--weight-decay", "0"], "--weight-decay must be a finite number > 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number > 0"),
    (["--weight-decay", "1000"], "--weight-decay 1000.0 times the lr of adamw (0.003) must be < 1"),
    (["--weight-decay", "2", "--lr", "adamw=0.5"], "--weight-decay 2.0 times the lr of adamw (0.5) must be < 1"),
    (["--optimizers", "radam", "--lr", "radam=0.1", "--weight-decay", "10"],
     "--weight-decay 10.0 times the lr of radam (0.1) must be < 1"),
    (["--optimizers", "torch-adamw", "--lr", "torch-adamw=1.5"],
     "--weight-decay 1.0 times the lr of torch-adamw (1.5) must be < 1"),
    (["--seed", str(2**70)], "--seed must be in [0, 2**63)"),
    (["--optimizers", " , "], "--optimizers ' , ': name at least one"),
    (["--out", "/dev/null/x"], "not a directory"),
    (["--n-head", "3", "--d-model", "32"], "must be a multiple of --n-head"),
])
def test_bad_command_lines_are_refused_before_training(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
