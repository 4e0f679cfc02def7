"""Tests for toy/run.py: the 2D toy that runs flow_grpo.train end to end on a laptop CPU.

Two short seeded runs (β > 0 and β = 0, same seed, 30 epochs; they share one pre-training) are made once for
the module; the checks below read their metrics and output files. The rest are cheap unit checks of the toy's
FlowModel: the batched CFG forward against two separate forwards, the reference context, safetensors round trip.
"""

import json
import os

import pytest
import torch
from PIL import Image

from toy import run as toy

EPOCHS = 30  # ~4 s per run after the shared ~4 s pre-training; the default run uses 60
SEED = 0
REQUIRED_KEYS = {
    "reward_before", "reward_after", "kl_to_ref", "on_manifold_before", "on_manifold_after", "seconds", "args"
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{β: (metrics, out folder)} for β = toy.TOY_BETA = 3 (the default) and β = 0."""
    results = {}
    for beta in (toy.TOY_BETA, 0.0):
        out = str(tmp_path_factory.mktemp(f"toy_beta{beta}"))
        argv = ["--beta", str(beta), "--seed", str(SEED), "--epochs", str(EPOCHS), "--out", out, "--quiet"]
        results[beta] = (toy.run(argv), out)
    return results


def test_reward_rises_and_samples_stay_on_their_modes(runs):
    m, _ = runs[toy.TOY_BETA]
    # the pre-trained model splits each prompt ~50/50 between its modes: reward ≈ 0.33 of the 0.57 reachable on
    # the data. Seeds 0–3 gain 0.16–0.17 in 30 epochs; the standard error of each mean is ≈ 0.01.
    assert m["reward_before"] == pytest.approx(0.33, abs=0.05)
    assert m["reward_after"] > m["reward_before"] + 0.1
    # ... without leaving the data: the KL keeps the samples on their prompt's modes
    assert m["on_manifold_before"] > 0.9
    assert m["on_manifold_after"] > 0.8  # 0.84–0.97 on seeds 0–3 (a few samples are mid-way to the better mode)
    assert m["reward_after"] < m["reward_best_on_manifold"] + 0.02
    # before any update the model IS the reference
    assert m["kl_to_ref_before"] == 0.0


def test_kl_penalty_keeps_the_model_closer_to_the_reference(runs):
    kept, _ = runs[toy.TOY_BETA]
    free, _ = runs[0.0]
    # same seed, so the same pre-trained model and the same "before"
    assert kept["reward_before"] == free["reward_before"]
    # β > 0 ends much closer to the pre-trained model; β = 0 hacks the reward: it leaves the data for the peak
    assert kept["kl_to_ref"] < 0.2 * free["kl_to_ref"]
    assert free["on_manifold_after"] < 0.5 < kept["on_manifold_after"]
    assert free["reward_after"] > free["reward_best_on_manifold"]


def test_outputs_are_written(runs):
    m, out = runs[toy.TOY_BETA]
    with open(os.path.join(out, "metrics.json")) as f:
        on_disk = json.load(f)
    assert REQUIRED_KEYS <= on_disk.keys()
    assert on_disk["args"]["epochs"] == EPOCHS and on_disk["args"]["beta"] == toy.TOY_BETA
    assert len(on_disk["reward_curve"]) == EPOCHS
    assert on_disk["reward_after"] == m["reward_after"]
    with Image.open(os.path.join(out, "toy.png")) as image:
        assert image.format == "PNG" and image.width > 1000 and image.height > 400
    # flow_grpo.train's per-epoch log and final checkpoint (written by ToyModel.save_weights)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert len(f.readlines()) == EPOCHS
    assert os.path.exists(os.path.join(out, "checkpoints", f"epoch-{EPOCHS:06d}", "lora", "model.safetensors"))


def test_printed_evaluation_is_the_readme_quantity(tmp_path, capsys):
    # A 2-epoch run (pre-training is cached in-process), printed: each evaluated epoch's line shows the mean reward
    # of the same 1024 fixed-noise ODE samples (40 steps) as reward_after, from another draw of the noise, and their
    # fraction on their prompt's modes. Rewards have std ≈ 0.3 per sample, so two independent 1024-sample means
    # differ with std 0.3·√(2/1024) ≈ 0.013: 0.05 is 4 of them (a 4-sample mean, std ≈ 0.15, would miss it). The
    # on-manifold fraction p ≈ 0.9: std √(2·p(1 − p)/1024) ≈ 0.013, 0.05 again.
    m = toy.run(["--seed", str(SEED), "--epochs", "2", "--out", str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2
    # the time field (0.1 s resolution, a toy epoch takes ~50 ms) is dropped; the last line gives the mean
    assert not any(line.endswith("s") for line in lines)
    fields = dict(f.rsplit(" ", 1) for f in lines[-1].split(" | ")[1:])  # {"eval": "+0.33", "on manifold": ...}
    assert float(fields["eval"]) == pytest.approx(m["reward_after"], abs=0.05)
    assert float(fields["on manifold"]) == pytest.approx(m["on_manifold_after"], abs=0.05)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        assert json.loads(f.readlines()[-1])["eval/reward_mean"] == pytest.approx(float(fields["eval"]), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The toy's FlowModel, piece by piece (no training)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def model():
    torch.manual_seed(0)
    return toy.ToyModel(toy.VelocityMLP(), guidance_scale=1.5)


def test_cfg_in_one_forward_equals_two_forwards(model):
    x = torch.randn(6, 2)
    t = torch.rand(6)
    cond = model.encode([toy.PROMPTS[i] for i in (0, 1, 2, 3, 0, 2)])
    ids = cond["prompt_id"]
    v_uncond = model.net(x, t, torch.full_like(ids, toy.NULL_ID))
    v_cond = model.net(x, t, ids)
    expected = v_uncond + 1.5 * (v_cond - v_uncond)
    torch.testing.assert_close(model.velocity(x, t, cond), expected, rtol=1e-5, atol=1e-6)


def test_reference_context_uses_the_frozen_copy(model):
    x, t = torch.randn(4, 2), torch.rand(4)
    cond = model.encode(toy.PROMPTS)
    before = model.velocity(x, t, cond)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1)
    after = model.velocity(x, t, cond)
    assert not torch.allclose(after, before)
    with model.reference():
        torch.testing.assert_close(model.velocity(x, t, cond), before)
    torch.testing.assert_close(model.velocity(x, t, cond), after)  # the context restores the trained weights
    assert not any(p.requires_grad for p in model.ref_net.parameters())


def test_save_and_load_weights_round_trip(model, tmp_path):
    x, t = torch.randn(4, 2), torch.rand(4)
    cond = model.encode(toy.PROMPTS)
    model.save_weights(str(tmp_path))
    expected = model.velocity(x, t, cond)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.zero_()
    model.load_weights(str(tmp_path))
    torch.testing.assert_close(model.velocity(x, t, cond), expected)


def test_encode_rejects_unknown_prompts(model):
    with pytest.raises(ValueError, match="toy knows the prompts"):
        model.encode(["a cat"])


def test_reward_peak_is_off_the_data_and_prefers_one_mode_per_prompt():
    # the peak pays 1, more than any mode: leaving the data is rewarded, so hacking is possible
    assert toy.toy_reward(toy.REWARD_CENTRE[None], [], []).item() == pytest.approx(1.0)
    mode_rewards = toy.toy_reward(toy.MODES, [], [])  # (K,)
    assert mode_rewards.max() < 0.8
    assert not toy.on_manifold(toy.REWARD_CENTRE[None], torch.tensor([0])).item()
    # every prompt's two modes score differently: there is a choice to learn
    pair = mode_rewards[toy.PROMPT_MODES]  # (P, 2)
    assert ((pair[:, 0] - pair[:, 1]).abs() > 0.2).all()
