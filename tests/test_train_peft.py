"""LoRA training parity with HF PEFT + torch: same base, same adapter init, same batches, AdamW
with weight decay and clipping, float32: the loss of each of 20 steps agrees within 1e-4; with
token-weighted gradient accumulation and the default warmup + cosine schedule too (transformers'
own schedule).
The eval loss of a model with LoRA dropout is PEFT's in eval mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_train_loss import make_batch
from train_fixtures import write_model

import mistral_nnx
from mistral_nnx.train.export import peft_tensors, set_peft_tensors
from mistral_nnx.train.lora import LoraConfig, apply_lora
from mistral_nnx.train.step import OptimConfig, Trainer, accumulation_weights

STEPS, LR, WD, CLIP, RANK, ALPHA = 20, 3e-3, 0.1, 1.0, 4, 16.0


@pytest.mark.parametrize(
    "schedule, accum",
    [("constant", 1), ("cosine", 2)],  # cosine: 3 warmup steps, then the decay to 0 at step 20
)
def test_twenty_steps_match_peft(tmp_path: Path, schedule: str, accum: int) -> None:
    import peft
    import torch
    import transformers
    from test_lora import peft_lora_tensors

    hf = write_model(tmp_path / "base", seed=11, sliding_window=8)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    pm.train()
    model = apply_lora(
        mistral_nnx.load_model(tmp_path / "base", progress=False), LoraConfig(RANK, ALPHA)
    )
    init = peft_lora_tensors(pm)
    set_peft_tensors(model, init, "peft init")  # A random, B = 0 on both sides
    optim = OptimConfig(
        steps=STEPS, lr=LR, schedule=schedule, warmup=3, weight_decay=WD, clip=CLIP,
        grad_accum=accum,
    )  # fmt: skip
    trainer = Trainer(model, optim)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    scheduler = None
    if schedule == "cosine":
        scheduler = transformers.get_cosine_schedule_with_warmup(opt, 3, STEPS)
    ours, theirs = [], []
    for step in range(STEPS):  # an optimizer update every `accum` micro-batches
        group = [
            make_batch(hf.config.vocab_size, seed=100 + (step * accum + i) % 5, t=24)
            for i in range(accum)
        ]
        for batch, weight in zip(group, accumulation_weights(group), strict=True):
            ours.append(trainer.step(batch, weight)["loss"])
        # torch: the mean loss over every target of the step (each micro-batch's mean loss
        # weighted by its share of the targets), as transformers' Trainer accumulates
        counts = [int((b["loss_mask"] & b["valid"])[:, 1:].sum()) for b in group]
        for batch, count in zip(group, counts, strict=True):
            ids = torch.tensor(batch["tokens"], dtype=torch.long)
            labels = torch.where(torch.tensor(batch["loss_mask"]), ids, torch.tensor(-100))
            valid = torch.tensor(batch["valid"]).long()
            out = pm(input_ids=ids, attention_mask=valid, labels=labels)
            (out.loss * count / sum(counts)).backward()
            theirs.append(float(out.loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad()
    assert theirs[-1] < theirs[0] - 0.05  # it learns: the comparison is not between two flat lines
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    # and the adapters end where PEFT's do (weight decay, clipping and AdamW's step included)
    final = peft_tensors(trainer.model)
    for name, value in pm.state_dict().items():
        if "lora_" in name:
            want = value.detach().numpy()
            got = final[name.replace(".default", "")]
            np.testing.assert_allclose(got, want, atol=1.5e-4, err_msg=name)


def test_eval_loss_is_peft_in_eval_mode(tmp_path: Path) -> None:
    """With LoRA dropout 0.5, training draws dropout masks; the eval loss must not (PEFT in
    eval mode), and it uses the adapters (B nonzero here)."""
    import peft
    import torch
    from test_lora import peft_lora_tensors

    hf = write_model(tmp_path / "base", seed=12)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.5, target_modules=["q_proj", "down_proj"]
    )
    pm = peft.get_peft_model(hf, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, value in pm.named_parameters():
            if "lora_B" in name:
                value.copy_(torch.randn(value.shape, generator=gen) * 0.3)
    pm.eval()
    model = apply_lora(
        mistral_nnx.load_model(tmp_path / "base", progress=False),
        LoraConfig(RANK, ALPHA, dropout=0.5, targets=("q", "down")),
    )
    set_peft_tensors(model, peft_lora_tensors(pm), "peft")
    trainer = Trainer(model, OptimConfig(steps=1))
    batch = make_batch(hf.config.vocab_size, seed=3, t=24)
    ids = torch.tensor(batch["tokens"], dtype=torch.long)
    labels = torch.where(torch.tensor(batch["loss_mask"]), ids, torch.tensor(-100))
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=torch.tensor(batch["valid"]).long(), labels=labels)
        with pm.disable_adapter():
            without = pm(
                input_ids=ids, attention_mask=torch.tensor(batch["valid"]).long(), labels=labels
            )
    got, targets = trainer.eval_loss(batch)
    assert targets == batch["loss_mask"][:, 1:].sum()
    np.testing.assert_allclose(got, float(want.loss), rtol=1e-5)
    assert abs(float(without.loss) - got) > 1e-3  # the adapters count
