"""The plots of ``python -m amos_fused.demo`` (matplotlib, the Agg backend: PNG
files, no display needed), drawn from the report that ``demo.json`` holds."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .demo_model import KINDS  # noqa: E402

COLORS = {"torch-adamw": "tab:gray", "adamw": "tab:blue", "amos": "tab:red", "lion": "tab:green",
          "radam": "tab:purple", "scaled-adamw": "tab:orange", "lamb": "tab:brown",
          "adamw-bf16": "tab:olive", "adamw-bf16-sr": "tab:cyan",
          "adamw8bit": "midnightblue", "lion8bit": "darkgreen", "bnb-adamw8bit": "tab:pink"}
DECAYED_KINDS = ("attention", "mlp", "embedding", "head")  # λ applies to tensors with dim >= 2


def ema(values, span: int = 20):
    alpha = 2.0 / (span + 1)
    out, acc = [], None
    for v in values:
        acc = v if acc is None else acc + alpha * (v - acc)
        out.append(acc)
    return out


def _color(name):
    return COLORS.get(name, "tab:pink")


def plot_loss(report: dict, path: pathlib.Path) -> None:
    results = report["results"]
    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    lows, highs = [], []
    for name, r in results.items():
        smooth = ema(r["train_loss"])
        steps = range(1, len(smooth) + 1)
        label = f"{r['label']} (lr {r['lr']:g})"
        ax_step.plot(steps, smooth, color=_color(name), label=label, lw=1.4)
        ax_step.plot(r["val"]["step"], r["val"]["loss"], "o--", color=_color(name), ms=3.5, lw=0.8, alpha=0.8)
        ax_time.plot(r["train_time_s"], smooth, color=_color(name), label=label, lw=1.4)
        lows.append(min(smooth + r["val"]["loss"]))
        highs.append(max(smooth[len(smooth) // 10:]))
    if lows:
        ax_step.set_ylim(min(lows) - 0.05, min(max(highs) + 0.3, 5.6))
        ax_time.set_ylim(*ax_step.get_ylim())
    ax_step.set_xlabel("step")
    ax_step.set_ylabel("loss (nats/byte)")
    ax_step.set_title("train loss (EMA over 20 steps, lines) and val loss (dots)")
    ax_time.set_xlabel("wall time of the training steps (s)")
    ax_time.set_title("train loss vs wall time")
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
    ax_time.legend(fontsize=8)
    m = report["model"]
    fig.suptitle(f"byte-level GPT ({m['params'] / 1e6:.2f}M params, d={m['d_model']}, {m['n_layer']} layers) "
                 f"on the Python stdlib sources — {report['device']['threads']} CPU threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rms(report: dict, path: pathlib.Path) -> None:
    results = report["results"]
    theory = report["theory"]
    fig, axes = plt.subplots(2, len(KINDS), figsize=(3.3 * len(KINDS), 6.6), sharex=True)
    for col, kind in enumerate(KINDS):
        ax_w, ax_u = axes[0][col], axes[1][col]
        for name, r in results.items():
            rms = r["rms"]
            ax_w.plot(rms["step"], rms["weight"][kind], color=_color(name), lw=1.2, label=r["label"])
            ax_u.plot(rms["step"], rms["update"][kind], color=_color(name), lw=1.2, label=r["label"])
        if "adamw" in results or "torch-adamw" in results:
            if kind in DECAYED_KINDS:
                ax_w.axhline(theory["adamw_weight_rms"], color="k", ls="--", lw=1, label="AdamW theory √(η/2λ)")
            ax_u.axhline(theory["adamw_update_rms"], color="k", ls=":", lw=1, label="AdamW theory √((1−β1)/(1+β1))")
        ax_w.set_title(kind)
        ax_w.set_yscale("log")
        ax_u.set_yscale("log")
        ax_u.set_xlabel("step")
        for ax in (ax_w, ax_u):
            ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("weight RMS")
    axes[1][0].set_ylabel("update RMS / lr  (RMS(Δθ)/lr)")
    handles, labels = [], []
    for ax in (axes[0][0], axes[1][0]):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.suptitle("weight RMS and update RMS per layer kind (pooled over the kind's entries)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_rms_adamw(report: dict, path: pathlib.Path) -> bool:
    checks = report["checks"]
    names = [n for n in ("adamw", "torch-adamw") if n in checks]
    if not names:
        return False
    results = report["results"]
    fig, (ax_w, ax_u) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        r, c = results[name], checks[name]
        rms = r["rms"]
        ls = "-" if name == "adamw" else "--"
        ax_w.plot(rms["step"], rms["weight"]["matrices"], color=_color(name), ls=ls, label=f"{r['label']} measured")
        ax_u.plot(rms["step"], rms["update"]["matrices"], color=_color(name), ls=ls,
                  label=f"{r['label']} RMS(Δθ)/η")
        ax_u.plot(rms["step"], rms["update_no_decay"]["matrices"], color=_color(name), ls=ls, alpha=0.45,
                  label=f"{r['label']} RMS(Δθ+ηλθ)/η (decay removed)")
    c = checks[names[0]]
    steps = results[names[0]]["rms"]["step"]
    ax_w.axhline(c["weight_rms_equilibrium_predicted"], color="k", ls="--", lw=1,
                 label=f"equilibrium √(η/2λ) = {c['weight_rms_equilibrium_predicted']:.4f}")
    ax_w.plot(steps, c["weight_rms_transient_series"], color="k", ls=":", lw=1.2,
              label="mean-field transient from the init RMS")
    ax_w.plot(steps, c["weight_rms_transient_measured_update_series"], color="tab:red", ls=":", lw=1.2,
              label="same, random walk scaled by the measured update RMS")
    ax_u.axhline(c["update_rms_predicted"], color="k", ls="--", lw=1,
                 label=f"√((1−β1)/(1+β1)) = {c['update_rms_predicted']:.4f}")
    ax_w.set_title(f"AdamW weight RMS, attention + MLP matrices (1/(ηλ) = {c['timescale_steps_1_over_eta_lambda']:.0f}"
                   " steps)", fontsize=9)
    ax_u.set_title("AdamW update RMS / lr, attention + MLP matrices", fontsize=9)
    for ax in (ax_w, ax_u):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_state_bytes(report: dict, path: pathlib.Path) -> None:
    results = report["results"]
    names = list(results)
    values = [max(results[n]["state_bytes"], 1) for n in names]
    params = next(iter(results.values()))["param_bytes"] if results else 1
    fig, ax = plt.subplots(figsize=(10, 4.4))
    bars = ax.bar(range(len(names)), values, color=[_color(n) for n in names])
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), [results[n]["label"].replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel("optimizer state (bytes, log scale)")
    ax.axhline(params, color="k", ls=":", lw=1, label=f"the parameters ({params:,} B)")
    adamw = next((results[n]["state_bytes"] for n in ("adamw", "torch-adamw") if n in results), None)
    for bar, v in zip(bars, values):
        text = f"{v:,} B\n{v / params:.2%} of params"
        if adamw:
            text += f"\n{v / adamw:.2%} of AdamW"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=6.5)
    ax.set_ylim(top=max(values + [params]) * 8)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("optimizer-state bytes (every tensor in optimizer.state)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(report: dict, out: pathlib.Path) -> list:
    out = pathlib.Path(out)
    written = []
    for name, fn in (("loss.png", plot_loss), ("rms.png", plot_rms), ("rms_adamw.png", plot_rms_adamw),
                     ("state_bytes.png", plot_state_bytes)):
        if fn(report, out / name) is not False:
            written.append(name)
    report["plots"] = written
    return written
