"""A diverged run stops before garbage reaches the weights, the checkpoints or the metrics (issue: never silently
train on garbage). Uses the 2D toy's model (milliseconds per epoch) with the real training loop."""

import argparse
import json
import os

import pytest
import torch

import flow_grpo as fg
import runfiles
from toy import run as toy


def toy_setup(tmp_path, **overrides):
    args = argparse.Namespace(
        out=str(tmp_path / "run"), seed=0, beta=toy.TOY_BETA, epochs=2, noise_level=0.7, sde_type="sde",
        fast_window=0, fast_window_range=5,
    )
    cfg = toy.toy_config(args)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = toy.ToyModel(toy.pretrained(0), cfg.guidance_scale)
    return cfg, model, [fg.Prompt(p) for p in toy.PROMPTS]


class NaNWhenTraining(toy.ToyModel):
    """Samples normally; the training forward (gradients on) returns NaN, as a blown-up network would."""

    def velocity(self, x, t, cond):
        v = super().velocity(x, t, cond)
        return v * float("nan") if torch.is_grad_enabled() else v


def test_a_nan_loss_stops_before_the_first_optimiser_step_and_writes_no_checkpoint(tmp_path):
    cfg, model, prompts = toy_setup(tmp_path, save_every=1)
    model.__class__ = NaNWhenTraining
    before = [p.detach().clone() for p in model.trainable_parameters()]
    with pytest.raises(fg.DivergenceError, match=r"epoch 0, optimiser step 1 of this epoch: loss nan.*--lr") as info:
        fg.train(cfg, model, toy.toy_reward, prompts, log=lambda line: None)
    assert "no update was applied" in str(info.value)
    for p, b in zip(model.trainable_parameters(), before):
        assert torch.equal(p.detach(), b)  # the optimiser never ran
    assert runfiles.latest_checkpoint(cfg.out) is None


def test_nan_weights_stop_sampling_and_are_never_checkpointed(tmp_path):
    cfg, model, prompts = toy_setup(tmp_path)
    with torch.no_grad():
        model.trainable_parameters()[0].view(-1)[0] = float("nan")
    with pytest.raises(fg.DivergenceError, match="sampled latents hold NaN"):
        fg.train(cfg, model, toy.toy_reward, prompts, log=lambda line: None)
    opt = torch.optim.AdamW(model.trainable_parameters())
    with pytest.raises(fg.DivergenceError, match="checkpoint not written"):
        fg.save_checkpoint(cfg.out, 1, 0, model, opt, None, cfg)
    assert runfiles.latest_checkpoint(cfg.out) is None


def test_metrics_are_strict_json_with_null_for_values_that_are_not_numbers(tmp_path):
    # a reward whose diagnostic applies to no sample of the epoch: its mean is NaN, written as null
    class WithDiagnostic:
        weights = {"bump": 1.0}

        def components(self, images, prompts, metadata):
            n = len(prompts)
            return {"bump": toy.toy_reward(images, prompts, metadata), "bump/never": torch.full((n,), float("nan"))}

        def combine(self, parts):
            return parts["bump"]

    cfg, model, prompts = toy_setup(tmp_path, epochs=1)
    history = fg.train(cfg, model, WithDiagnostic(), prompts, log=lambda line: None)
    assert history[0]["reward/bump/never"] != history[0]["reward/bump/never"]  # NaN in memory
    lines = open(os.path.join(cfg.out, "metrics.jsonl")).read().splitlines()

    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    row = json.loads(lines[0], parse_constant=reject)
    assert row["reward/bump/never"] is None and isinstance(row["reward/mean"], float)
    assert "policy/zero_adv_frac" in row and 0 <= row["policy/zero_adv_frac"] <= 1
