"""LoRA training parity with HF PEFT + torch: same base, same adapter init, same batches, AdamW
with weight decay and clipping, float32: the loss of each of 20 steps agrees within 1e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_train_loss import make_batch
from train_fixtures import write_model

import mistral_nnx
from mistral_nnx.train.export import peft_tensors, set_peft_tensors
from mistral_nnx.train.lora import LoraConfig, apply_lora
from mistral_nnx.train.step import OptimConfig, Trainer

STEPS, LR, WD, CLIP, RANK, ALPHA = 20, 3e-3, 0.1, 1.0, 4, 16.0


def test_twenty_steps_match_peft(tmp_path: Path) -> None:
    import peft
    import torch
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
    optim = OptimConfig(steps=STEPS, lr=LR, schedule="constant", weight_decay=WD, clip=CLIP)
    trainer = Trainer(model, optim)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    ours, theirs = [], []
    for step in range(STEPS):
        batch = make_batch(hf.config.vocab_size, seed=100 + step % 5, t=24)
        ours.append(trainer.step(batch)["loss"])
        ids = torch.tensor(batch["tokens"], dtype=torch.long)
        labels = torch.where(torch.tensor(batch["loss_mask"]), ids, torch.tensor(-100))
        out = pm(input_ids=ids, attention_mask=torch.tensor(batch["valid"]).long(), labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad()
        theirs.append(float(out.loss.detach()))
    assert theirs[-1] < theirs[0] - 0.05  # it learns: the comparison is not between two flat lines
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    # and the adapters end where PEFT's do (weight decay, clipping and AdamW's step included)
    final = peft_tensors(trainer.model)
    for name, value in pm.state_dict().items():
        if "lora_" in name:
            want = value.detach().numpy()
            got = final[name.replace(".default", "")]
            np.testing.assert_allclose(got, want, atol=1.5e-4, err_msg=name)
