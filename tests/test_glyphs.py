"""Tests for toy/glyphs.py: Flow-GRPO teaching a small flow model to write digits, judged by a held-out classifier.

One short seeded run (β = the default, SHORT_EPOCHS epochs, no β = 0 run) is made once for the module; the first
checks read its metrics and files; their thresholds come from the spread of the default runs over seeds 0–4. The
rest are cheap unit checks: the renderer is deterministic by seed, the reward is a pure function of images and
prompts, the writer's x̂₀ stays in the data range, the distance and diversity measures against hand-computed
values.
"""

import json
import os

import pytest
import torch
from PIL import Image

from toy import glyphs

SEED = 0
# 11 epochs: ~20 s of CPU with the set-up (rendering, two classifiers, pre-training); the default run uses 80.
# 11 and not 10 so that the numbers below can be read off the default runs' evaluation after epoch 11 (the training
# is the same computation whatever --epochs and --eval_every are).
SHORT_EPOCHS = 11


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("glyphs"))
    argv = ["--seed", str(SEED), "--epochs", str(SHORT_EPOCHS), "--eval_every", "0", "--no_beta0", "--quiet"]
    return glyphs.run(argv + ["--out", out]), out


def test_short_run_raises_heldout_accuracy(short_run):
    m, _ = short_run
    # the pre-trained writer is mediocre on purpose: 0.52–0.59 held-out accuracy over seeds 0–4
    assert 0.4 <= m["heldout_accuracy_before"] <= 0.7
    # after 11 epochs, over seeds 0–4: held-out accuracy +0.136 to +0.254, reward +0.185 to +0.238
    assert m["heldout_accuracy_after"] > m["heldout_accuracy_before"] + 0.1
    assert m["reward_after"] > m["reward_before"] + 0.1
    # ... without leaving the data: the distance to the nearest real glyph changed by −0.022 to −0.005
    assert m["distance_to_data_after"] < m["distance_to_data_before"] + 0.01
    # the classifiers read fresh real glyphs almost perfectly (0.985–0.996 over seeds 0–4)
    assert m["ocr_accuracy_real"] > 0.97 and m["heldout_accuracy_real"] > 0.97
    # the KL to the pre-trained writer is what β penalises: positive once the writer has moved, and small
    # (0.0036 after these 11 epochs on seed 0; 0.0042–0.0046 after 80 epochs over seeds 0–4)
    assert 0 < m["kl_to_ref"] < 0.01


def test_outputs_are_written(short_run):
    m, out = short_run
    with open(os.path.join(out, "metrics.json")) as f:
        on_disk = json.load(f)
    assert on_disk["heldout_accuracy_after"] == m["heldout_accuracy_after"]
    assert len(on_disk["reward_curve"]) == SHORT_EPOCHS
    assert on_disk["beta0"] is None and on_disk["args"]["epochs"] == SHORT_EPOCHS
    with Image.open(os.path.join(out, "glyphs.png")) as image:
        assert image.format == "PNG" and image.width > 1000 and image.height > 600
    with open(os.path.join(out, "main", "metrics.jsonl")) as f:  # flow_grpo.train's own per-epoch log
        assert len(f.readlines()) == SHORT_EPOCHS


# ---------------------------------------------------------------------------------------------------------------
# The renderer
# ---------------------------------------------------------------------------------------------------------------


def test_renderer_is_deterministic_by_seed():
    images, digits = glyphs.render(64, seed=7)
    again, again_digits = glyphs.render(64, seed=7)
    assert torch.equal(images, again) and torch.equal(digits, again_digits)
    other, _ = glyphs.render(64, seed=8)
    assert not torch.equal(images, other)
    assert images.shape == (64, 1, glyphs.SIZE, glyphs.SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    # rendering in chunks is the same computation as one batch
    assert torch.equal(glyphs.render(64, seed=7, chunk=10)[0], images)


def test_every_glyph_is_a_different_drawing_of_its_digit():
    digits = torch.full((8,), 3)
    images, out_digits = glyphs.render(8, seed=0, digits=digits)
    assert torch.equal(out_digits, digits)
    flat = images.flatten(1)  # (8, S²)
    distinct = torch.cdist(flat, flat) + torch.eye(8)  # the diagonal is 0 by definition: lift it
    assert (distinct > 0.1).all()  # stroke, scale, rotation and shift differ per sample
    # every glyph has ink, and the border rows/columns stay empty (shift ≤ 1.5 px, height ≤ 11.5 px of 16)
    assert (images.amax(dim=(1, 2, 3)) > 0.5).all()
    assert images[:, :, 0, :].max() < 0.05 and images[:, :, -1, :].max() < 0.05


# ---------------------------------------------------------------------------------------------------------------
# The reward: a pure function of (images, prompts)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward():
    torch.manual_seed(0)
    return glyphs.DigitReward(glyphs.ocr_net().eval().requires_grad_(False))  # untrained: purity needs no training


def test_reward_is_a_pure_function_of_images_and_prompts(reward):
    images, _ = glyphs.render(12, seed=1)
    prompts = [str(d) for d in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 3]]
    kept = images.clone()
    r = reward(images, prompts, [{}] * 12)
    assert torch.equal(images, kept)  # the images are not modified
    assert torch.equal(reward(images, prompts, [{}] * 12), r)  # no state carried between calls
    # one image at a time gives the same values: no batch statistics (float32 rounding of a different matmul
    # blocking is ≤ a few ulp of logits of size ~1, i.e. < 1e-6 on a probability)
    alone = torch.cat([reward(images[i : i + 1], prompts[i : i + 1], [{}]) for i in range(12)])
    torch.testing.assert_close(alone, r, rtol=0, atol=1e-6)
    # the metadata is not read, and reordering the batch reorders the rewards
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    permuted = reward(images[order], [prompts[i] for i in order], [{"x": 1}] * 12)
    torch.testing.assert_close(permuted, r[order], rtol=0, atol=1e-6)


def test_reward_is_the_classifier_probability_of_the_prompted_digit(reward):
    images, _ = glyphs.render(5, seed=2)
    logits = reward.classifier(images).double()  # (5, 10)
    digits = [4, 0, 9, 4, 7]
    # softmax by hand: p_d = exp(l_d) / Σ_k exp(l_k)
    expected = torch.stack([logits[i, d].exp() / logits[i].exp().sum() for i, d in enumerate(digits)])
    got = reward(images, [str(d) for d in digits], [{}] * 5).double()
    # float32 softmax against float64: a few ulp (~1e-7) relative error, well inside 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_reward_rejects_prompts_that_are_not_digits(reward):
    images, _ = glyphs.render(2, seed=3)
    with pytest.raises(ValueError, match="prompts are the digits"):
        reward(images, ["7", "seven"], [{}, {}])


# ---------------------------------------------------------------------------------------------------------------
# The writer and the measures
# ---------------------------------------------------------------------------------------------------------------


def test_writer_predicts_a_clean_image_within_the_data_range():
    # x̂₀ = x − t·v must stay in (−1, 1) even far from the data: that keeps the SDE's trajectories bounded
    torch.manual_seed(0)
    writer = glyphs.GlyphWriter()
    x = 30 * torch.randn(16, 1, glyphs.SIZE, glyphs.SIZE)
    t = torch.linspace(glyphs.T_MIN, 1, 16)
    v = writer(x, t, torch.arange(16) % 11)
    x0 = x - t[:, None, None, None] * v  # (16, 1, S, S)
    # |x − t·(x − x̂₀)/t − x̂₀| is float32 rounding of values ≤ 30·4 ulp ≈ 1e-5
    assert x0.abs().max() < 1 + 1e-4


def test_glyph_model_uses_the_digits_and_the_null_prompt():
    torch.manual_seed(0)
    model = glyphs.GlyphModel(glyphs.GlyphWriter(), guidance_scale=2.0)
    x, t = torch.randn(3, 1, glyphs.SIZE, glyphs.SIZE), torch.rand(3)
    cond = model.encode(["3", "0", "9"])
    assert cond["prompt_id"].tolist() == [3, 0, 9]
    v_uncond = model.net(x, t, torch.full((3,), glyphs.NULL_ID))
    v_cond = model.net(x, t, cond["prompt_id"])
    # v = v_uncond + w·(v_cond − v_uncond); one forward of 2N rows vs two of N: float32 rounding only
    torch.testing.assert_close(model.velocity(x, t, cond), v_uncond + 2.0 * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
    # decoding maps [−1, 1] back to [0, 1] and clamps whatever lies outside
    assert model.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_distance_to_data_against_hand_computed_values():
    s = glyphs.SIZE
    reference = torch.zeros(3, 1, s, s)
    reference[1] = 1.0  # digit 0: an empty and a full glyph; digit 1: a half-grey glyph
    reference[2] = 0.5
    reference_digits = torch.tensor([0, 0, 1])
    images = torch.stack([torch.full((1, s, s), 0.9), torch.full((1, s, s), 0.9)])
    d = glyphs.distance_to_data(images, torch.tensor([0, 1]), reference, reference_digits)
    # digit 0: nearest is the full glyph, RMS |0.9 − 1| = 0.1; digit 1: only the 0.5 glyph counts, RMS 0.4
    torch.testing.assert_close(d, torch.tensor([0.1, 0.4]), rtol=0, atol=1e-4)  # cdist in float32: ~1e-6 relative


def test_diversity_against_hand_computed_values():
    s = glyphs.SIZE
    images = torch.stack([torch.full((1, s, s), value) for value in (0.0, 0.6, 0.3, 0.3)])
    # digit 0: its two glyphs differ by 0.6 everywhere (RMS 0.6); digit 1: two identical glyphs (0); mean 0.3
    d = glyphs.diversity(images, torch.tensor([0, 0, 1, 1]))
    assert d == pytest.approx(0.3, abs=1e-5)  # cdist in float32: ~1e-6 relative
