"""The model and the data of ``python -m amos_fused.demo``: a small byte-level GPT
(pre-LayerNorm, learned positions, causal attention; Radford et al., "Language
Models are Unsupervised Multitask Learners", 2019) trained on the Python standard
library's own ``.py`` sources, which every Python installation carries."""
from __future__ import annotations

import hashlib
import math
import pathlib
import sysconfig
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 256  # bytes


@dataclass
class GPTConfig:
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    seq_len: int = 128

    def as_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Byte-level GPT with an untied output head (so every parameter has one
    module kind, which ``amos_param_groups`` reads)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(VOCAB, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """Entries of every matrix drawn with std sqrt(1/fan_in) (embeddings:
        sqrt(1/d_model)), the projections back into the residual stream scaled by
        1/sqrt(2·n_layer) as in GPT-2; zero biases, unit LayerNorm gains.  These are
        the scales ``residual_scale_overrides`` tells Amos."""
        residual = 1.0 / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = math.sqrt(1.0 / module.in_features)
                if name.endswith("c_proj"):
                    std *= residual
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=math.sqrt(1.0 / module.embedding_dim))

    def residual_scale_overrides(self) -> Dict[str, Dict[str, float]]:
        """``amos_param_groups`` overrides: η of the residual projections, whose
        init std is sqrt(1/in)/sqrt(2·n_layer) rather than the table's sqrt(1/in)."""
        residual = 1.0 / math.sqrt(2 * self.cfg.n_layer)
        return {
            "h.*.attn.c_proj.weight": {"eta": math.sqrt(1.0 / self.cfg.d_model) * residual},
            "h.*.mlp.c_proj.weight": {"eta": math.sqrt(1.0 / (4 * self.cfg.d_model)) * residual},
        }

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))  # (bf16 models: in fp32)


# ---------------------------------------------------------------------------
# Layer kinds (for the RMS plots)
# ---------------------------------------------------------------------------

KINDS = ("attention", "mlp", "embedding", "head", "norm", "bias")


def layer_kind(name: str, param: torch.Tensor) -> str:
    """attention / mlp (their weight matrices), embedding (token and position
    tables), head (output projection), norm (LayerNorm gains and shifts), bias
    (biases of the Linear layers)."""
    if name.startswith(("wte.", "wpe.")):
        return "embedding"
    if name.startswith("head."):
        return "head"
    if ".ln_" in name or name.startswith("ln_f."):
        return "norm"
    if name.endswith(".bias"):
        return "bias"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    raise ValueError(f"no layer kind for {name} {tuple(param.shape)}")


# ---------------------------------------------------------------------------
# Data: the standard library's .py sources, as bytes
# ---------------------------------------------------------------------------

def stdlib_sources() -> List[pathlib.Path]:
    """The ``.py`` files of the standard library (``sysconfig.get_paths()['stdlib']``),
    site-packages excluded, sorted by their path relative to the stdlib root."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise SystemExit(f"the standard library's sources are not at {root}")
    files = sorted(
        (p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise SystemExit(f"no .py files under {root}")
    return files


@dataclass
class Corpus:
    train: torch.Tensor  # uint8
    val: torch.Tensor    # uint8
    info: dict


def load_corpus(max_bytes: int = 8_000_000, val_every: int = 10) -> Corpus:
    """Reads the stdlib sources in sorted order until ``max_bytes``; every
    ``val_every``-th file (by position in that order) goes to the validation split,
    the rest to training.  Deterministic for a given Python installation; the file
    count, byte counts and a SHA-256 of both splits are returned in ``info``."""
    files = stdlib_sources()
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train, val, total, used = bytearray(), bytearray(), 0, 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        if total + len(data) > max_bytes and total > 0:
            break
        (val if i % val_every == 0 else train).extend(data)
        total += len(data)
        used += 1
    if len(val) < 4096 or len(train) < 4096:
        raise SystemExit(f"too little text under {root} ({len(train)} train / {len(val)} val bytes)")
    digest = hashlib.sha256(bytes(train) + b"\0" + bytes(val)).hexdigest()
    info = dict(root=str(root), files=used, files_available=len(files), train_bytes=len(train),
                val_bytes=len(val), sha256=digest, val_every=val_every)
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(val), info)


def batch_offsets(n_tokens: int, seq_len: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch) random start offsets, drawn once from ``seed`` so every
    optimizer sees the same batches in the same order."""
    if n_tokens < seq_len + 2:
        raise SystemExit(f"--seq-len {seq_len} needs more text than the {n_tokens} bytes of a split "
                         "(raise --data-bytes or lower --seq-len)")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len - 1, (steps, batch), generator=gen)


def get_batch(data: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    idx = offsets[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]
