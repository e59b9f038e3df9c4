"""Real clients, run when the libraries are installed (skipped cleanly when not):
Hugging Face ``Trainer(optimizers=(af.AdamW(...), None))`` trains a tiny GPT-2,
checkpoints, and resumes bitwise; a nanoGPT-style ``configure_optimizers`` with
``fused=True`` (in test_torch_flags.py)."""
from __future__ import annotations

import os

import pytest
import torch

import amos_fused as af

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

STEPS = 30


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=32, vocab_size=128,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, index):
        ids = torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def _trainer(output_dir, max_steps):
    model = _model()
    opt = af.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4, save_steps=STEPS // 2,
        save_strategy="steps", logging_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, sched))


def test_hf_trainer_trains_checkpoints_and_resumes_bitwise(tmp_path):
    straight = _trainer(str(tmp_path / "straight"), STEPS)
    straight.train()
    resumed_dir = str(tmp_path / "resumed")
    first = _trainer(resumed_dir, STEPS)
    first.train()  # writes checkpoint-15 and checkpoint-30
    checkpoint = os.path.join(resumed_dir, f"checkpoint-{STEPS // 2}")
    assert os.path.isdir(checkpoint)
    resumed = _trainer(resumed_dir, STEPS)
    resumed.train(resume_from_checkpoint=checkpoint)
    losses = [h["train_loss"] for h in straight.state.log_history if "train_loss" in h]
    assert losses and losses[0] < 6.0  # it learned something (log 128 ≈ 4.85 at the start)
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a.detach(), b.detach()), name
    assert isinstance(resumed.optimizer.optimizer if hasattr(resumed.optimizer, "optimizer")
                      else resumed.optimizer, af.AdamW)
