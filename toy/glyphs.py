"""Flow-GRPO teaches a small flow model to write digits: the paper's OCR result in miniature, on a laptop CPU.

    python toy/glyphs.py              # seed 0, β = 0.1 and β = 0: writes toy/out/glyphs/glyphs.png and metrics.json
    python toy/glyphs.py --no_beta0   # only the β = 0.1 run

What you should see (seed 0 with torch's AVX-512 kernels, 80 epochs per run; in brackets the range over --seed 0 … 4
with AVX-512, 0 … 2 with ATEN_CPU_CAPABILITY=avx2, 0 and 1 with =default: exact values depend on the kernels):
    β = 0.1     the held-out judge's accuracy on fixed-noise ODE samples rises from 0.54 (0.52–0.59) to 0.99
                (0.88–1.00); it first reaches 90% after 26 epochs (21–46; seed 0 with AVX2: 21), 22 s of CPU from
                the start, set-up and pre-training included (18–32 s). The samples move closer to the real glyphs
                (distance 0.178 → 0.130).
    β = 0       both classifiers read most samples as their digit (mini-OCR 0.98 (0.83–1.00), judge 0.98
                (0.89–1.00); which reads more depends on the seed and the kernels), but every digit collapses
                toward one glyph with speckled strokes (diversity 0.07 (0.04–0.08), against 0.13 (0.11–0.14) with
                β = 0.1 and 0.32 for real glyphs), no closer to the real glyphs than before (0.183 (0.175–0.207)
                against 0.130 with β = 0.1), 3–7× further from the pre-trained writer (KL). That is reward
                hacking, and the KL term is what holds it back.
    Both runs together: 83 s of CPU (78–103 s) on one thread.

metrics.json (the β = 0.1 run at the top level, the β = 0 run under "beta0"; ODE samples: 50 per digit from fixed
noise, 40 steps, the same noise before, during and after):
    heldout_accuracy_before, _after   fraction of the ODE samples the held-out judge reads as their digit
    ocr_accuracy_before, _after       the same for the mini-OCR (the reward's classifier)
    reward_before, _after             mean mini-OCR probability of the prompted digit (the reward) of the ODE samples
    distance_to_data_before, _after   mean RMS pixel distance to the nearest of 500 real glyphs of the digit
    diversity_before, _after          mean RMS pixel distance between two samples of the same digit
    kl_to_ref                         toy/run.py's kl_to_reference: the KL the loss penalises, on fixed-noise SDE
                                      trajectories, after training
    reward_curve                      per epoch, the mean reward of its 320 SDE training samples
    eval_curve                        every --eval_every epochs: the numbers above, with seconds and cpu_seconds
    epoch_heldout_90, seconds_to_heldout_90, cpu_seconds_to_heldout_90
                                      the first evaluation at 90% held-out accuracy or more: its epoch, and the
                                      time since the start of the program (set-up and pre-training included,
                                      other runs left out); null if never
    *_real                            the classifiers' accuracy, distance to data and diversity of 2000 fresh
                                      real glyphs
    render_*, classifiers_*, pretrain_*, run_*, seconds, cpu_seconds    times of the phases and of everything
flow_grpo.train also writes its own metrics.jsonl and a final checkpoint into <out>/main and <out>/beta0.

The paper in miniature (its visual text rendering task, OCR accuracy 0.59 → 0.92):
    the prompt "7"                  the text an image must show ('A sign that says "Flow-GRPO"')
    the writer                      SD3.5-M: a conditional flow model with classifier-free guidance
    the mini-OCR reward             the OCR model; the reward is its probability that the sample shows the digit
    the held-out judge              the paper's check that the gain is real and not reward hacking: a second
                                    classifier (another architecture, seed and data) the training never sees,
                                    plus the distance of the samples to real glyphs

What happens (each step is a numbered banner below):
    1. The glyphs: digits 0–9 drawn with PIL's own font, each with its own stroke width, scale, rotation and
       shift, 16×16 grey levels, deterministic by seed.
    2. The classifiers: the mini-OCR reward (a small conv net) and the held-out judge (an MLP).
    3. The writer: an MLP over the 256 pixels that predicts the clean glyph; v follows from it.
    4. Pre-training with the rectified-flow loss, stopped early: a mediocre writer.
    5. GlyphModel: toy/run.py's ToyModel (the FlowModel interface) with digits for prompts and images for points.
    6. Measurements: accuracy of fixed-noise ODE samples under both classifiers, distance to the data, KL.
    7. The Config: flow_grpo.Config with laptop-sized values, each override explained.
    8. The picture (PIL only).
    9. run(): render, train the classifiers, pre-train, fine-tune with β > 0 and with β = 0, draw, write metrics.

Conventions are flow_grpo.py's (its section 0): x_t = (1 − t)·x₀ + t·ε, t = 1 is noise, t = 0 is data,
v = ε − x₀.
A latent is the image itself, pixels mapped from [0, 1] to [−1, 1]: D = (1, 16, 16).
Shape legend: N images · T denoising steps · S = 16 pixels a side · 10 digits.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Optional

# `python toy/glyphs.py` puts toy/ on sys.path, not the repository root where flow_grpo.py lives: add the root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import flow_grpo  # noqa: E402
from toy import run as toy  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# --- 1. The glyphs: digits drawn with PIL's own font, a random stroke, scale, rotation and shift each ---
# ----------------------------------------------------------------------------------------------------------------
# Each digit is drawn once, large, with PIL's built-in font (a template per digit and stroke width); every sample
# then gets its own affine map of a template, resampled at 2× and averaged down to S×S (anti-aliasing). The affine
# maps run batched in torch.nn.functional.grid_sample: ~35 µs of CPU a glyph, against ~170 µs for drawing and
# rotating each glyph with PIL.

SIZE = 16  # S: the images are S×S grey levels
DIGITS = [str(d) for d in range(10)]  # the prompts: the text to render
NULL_ID = len(DIGITS)  # the "empty prompt" id used for the unconditional branch of CFG
TEMPLATE = 64  # template side in pixels: 4× the output, so that strokes and rotations are resolved finely
GLYPH_HEIGHT = 40  # a template's digit height: 40/64·16 = 10 pixels tall in the output at scale 1
STROKE_WIDTHS = (0, 1, 2)  # template pixels added around each stroke (0, 1/4 and 1/2 output pixel); 3 fills the
#                            loops of 6, 8, 9
MAX_ANGLE = 15.0  # degrees, either way
SCALES = (0.85, 1.15)  # uniform; the digit is 8.5–11.5 pixels tall
MAX_SHIFT = 1.5  # output pixels, either way, in x and y


def _glyph_font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=48)  # Pillow >= 10.1: the built-in font, scalable
    except TypeError:
        return ImageFont.load_default()  # older Pillow: its bitmap font; templates scale it up below


@functools.lru_cache(maxsize=1)
def templates() -> Tensor:
    """(len(STROKE_WIDTHS), 10, TEMPLATE, TEMPLATE) in [0, 1]: every digit, centred, GLYPH_HEIGHT tall, at every
    stroke width (the strokes thickened by a max filter of side 2w + 1)."""
    from PIL import Image, ImageDraw, ImageFilter

    font = _glyph_font()
    out = torch.zeros(len(STROKE_WIDTHS), len(DIGITS), TEMPLATE, TEMPLATE)
    for d, text in enumerate(DIGITS):
        canvas = Image.new("L", (4 * TEMPLATE, 4 * TEMPLATE), 0)
        ImageDraw.Draw(canvas).text((TEMPLATE, TEMPLATE), text, fill=255, font=font)
        glyph = canvas.crop(canvas.getbbox())  # the ink's bounding box
        width = max(1, round(glyph.width * GLYPH_HEIGHT / glyph.height))
        glyph = glyph.resize((width, GLYPH_HEIGHT), Image.LANCZOS)
        base = Image.new("L", (TEMPLATE, TEMPLATE), 0)
        base.paste(glyph, ((TEMPLATE - width) // 2, (TEMPLATE - GLYPH_HEIGHT) // 2))
        for k, w in enumerate(STROKE_WIDTHS):
            image = base.filter(ImageFilter.MaxFilter(2 * w + 1)) if w else base
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # (TEMPLATE²,)
            out[k, d] = pixels.view(TEMPLATE, TEMPLATE).float() / 255
    return out


def render(n: int, seed: int, digits: Optional[Tensor] = None, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """n glyphs (n, 1, S, S) in [0, 1] (ink = 1) and their digits (n,); the same seed gives the same glyphs.
    `digits` (n,) fixes which digit each glyph shows (default: uniform at random)."""
    g = torch.Generator().manual_seed(seed)
    if digits is None:
        digits = torch.randint(0, len(DIGITS), (n,), generator=g)  # (n,)
    stroke = torch.randint(0, len(STROKE_WIDTHS), (n,), generator=g)  # (n,)
    angle = torch.deg2rad((2 * torch.rand(n, generator=g) - 1) * MAX_ANGLE)  # (n,)
    scale = SCALES[0] + (SCALES[1] - SCALES[0]) * torch.rand(n, generator=g)  # (n,)
    shift = (2 * torch.rand(n, 2, generator=g) - 1) * MAX_SHIFT * 2 / SIZE  # (n, 2) in grid_sample's [−1, 1] units
    # Each output pixel centre u (in grid_sample's [−1, 1] coordinates) reads the template at
    #     p = R(−θ)·(u − shift) / scale
    u = (torch.arange(2 * SIZE) + 0.5) / SIZE - 1  # (2S,) pixel centres of the 2× output grid
    uy, ux = torch.meshgrid(u, u, indexing="ij")  # (2S, 2S) each
    cos, sin = (angle.cos() / scale)[:, None, None], (angle.sin() / scale)[:, None, None]  # (n, 1, 1) each
    source = templates()
    images = []
    for rows in torch.arange(n).split(chunk):  # in chunks: a whole batch's grids would not stay in the cache
        x, y = ux - shift[rows, 0, None, None], uy - shift[rows, 1, None, None]  # (m, 2S, 2S) each
        grid = torch.stack([cos[rows] * x + sin[rows] * y, cos[rows] * y - sin[rows] * x], dim=-1)  # (m, 2S, 2S, 2)
        chosen = source[stroke[rows], digits[rows]][:, None]  # (m, 1, TEMPLATE, TEMPLATE)
        fine = F.grid_sample(chosen, grid, align_corners=False)  # (m, 1, 2S, 2S)
        images.append(F.avg_pool2d(fine, 2))  # (m, 1, S, S)
    return torch.cat(images), digits


def to_latent(images: Tensor) -> Tensor:
    """Images in [0, 1] → latents in [−1, 1], the scale of the N(0, I) noise (as SD3's VAE latents are)."""
    return 2 * images - 1


def to_image(latents: Tensor) -> Tensor:
    """Latents → images in [0, 1]; clamped, as a VAE decoder's output is (the classifiers never see other values)."""
    return ((latents + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# --- 2. The classifiers: the mini-OCR reward and the held-out judge ---
# ----------------------------------------------------------------------------------------------------------------
# Two classifiers of the rendered glyphs, as different as a laptop allows: another architecture, another seed,
# another set of training glyphs. The mini-OCR is the reward; the judge only ever measures. A pattern that
# exploits the mini-OCR's particular weights need not fool the judge: a gain the judge confirms is a gain in
# writing. (It is a check, not a proof: what fools one network often fools another; the distance to the real
# glyphs and the diversity in section 6 look at the samples themselves.)

CLASSIFIER_TRAIN = 10_000  # glyphs each classifier is trained on
CLASSIFIER_STEPS = 300  # Adam steps of batch 128 (~4 passes over its glyphs): 98.5–99.6% on fresh glyphs, seeds 0–4
CLASSIFIER_LR = 3e-3


def ocr_net() -> nn.Module:
    """The mini-OCR: two 4×4 convolutions of stride 2 (16 and 32 channels) and a linear read-out.
    (N, 1, S, S) → logits (N, 10). Strided convolutions rather than 3×3 ones with max-pooling: a training step
    took 13 ms instead of 23 ms on the (shared) CPU of these measurements, for the same ≥ 98.5% accuracy."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),  # (N, 16, S/2, S/2)
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),  # (N, 32, S/4, S/4)
        nn.Flatten(), nn.Linear(32 * (SIZE // 4) ** 2, len(DIGITS)),  # (N, 10)
    )


def judge_net() -> nn.Module:
    """The held-out judge: an MLP on the raw pixels, one hidden layer of 256. (N, 1, S, S) → logits (N, 10)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 256), nn.ReLU(), nn.Linear(256, len(DIGITS)))


def train_classifier(make_net, images: Tensor, digits: Tensor, seed: int) -> nn.Module:
    """A make_net() trained with cross-entropy on (images (n, 1, S, S), digits (n,)); returned frozen, in eval
    mode. Deterministic given the seed."""
    torch.manual_seed(seed)  # the initial weights
    net = make_net()
    g = torch.Generator().manual_seed(seed)  # the batches
    optimizer = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_LR)
    for _ in range(CLASSIFIER_STEPS):
        rows = torch.randint(0, len(images), (128,), generator=g)  # (128,)
        loss = F.cross_entropy(net(images[rows]), digits[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval().requires_grad_(False)


def parse_digits(prompts: list[str]) -> Tensor:
    """Prompts "0"…"9" → digit ids (N,); anything else is an error naming the prompt."""
    unknown = [p for p in prompts if p not in DIGITS]
    if unknown:
        raise ValueError(f"the glyph toy's prompts are the digits {DIGITS}, got {unknown[:5]}")
    return torch.tensor([DIGITS.index(p) for p in prompts])


class DigitReward:
    """The mini-OCR reward: r(image, prompt) = p_classifier(the prompted digit | image) ∈ [0, 1].

    A pure function of the images and prompts: the classifier is frozen and in eval mode (no dropout, no batch
    statistics), so a sample's reward does not depend on the rest of its batch or on earlier calls. Same
    signature as the SD3 rewards (images, prompts, metadata); the metadata is not read. The paper's OCR reward
    is 1 − edit distance / length of the read text; for a one-character text that is 0/1 correctness, and the
    probability is its smooth version (its expectation under the classifier)."""

    def __init__(self, classifier: nn.Module):
        self.classifier = classifier

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        probs = F.softmax(self.classifier(images.float()), dim=1)  # (N, 10)
        return probs[torch.arange(len(prompts)), parse_digits(prompts)]  # (N,)


# ----------------------------------------------------------------------------------------------------------------
# --- 3. The writer: an MLP over the pixels that predicts the clean glyph ---
# ----------------------------------------------------------------------------------------------------------------
#     x̂₀ = f_θ(x_t, t, c),    v_θ = (x_t − x̂₀) / max(t, T_MIN)        (x_t = (1 − t)·x₀ + t·ε and v = ε − x₀)
#
# Why predict x₀ and not v: v = ε − x₀ carries all 256 dimensions of the noise, which a 256-wide MLP has to pass
# through its hidden layers; the clean glyph lies near a low-dimensional set that it can learn. Predicting v
# directly (measured with this MLP: even after 1000 pre-training steps) left speckle noise over every sample.
# This is the argument and the fix of Li & He, "Back to Basics: Let Denoising Generative Models Denoise"
# (arXiv 2511.13720). x̂₀ = tanh(·) keeps the prediction inside the data's range (−1, 1): without it, the SDE's
# noise now and then carried a sample where the MLP extrapolates x̂₀ linearly, v pointed away from the data, and
# that trajectory grew to |x| ~ 1e8 within the 10 steps (measured), with log-probability ratios to match.
# T_MIN keeps the division finite as t → 0; it changes v only below t = 0.05, i.e. in the last of the 40
# evaluation steps (which then removes half of what is left of the noise) and never in the 10 training steps.

T_MIN = 0.05


class GlyphWriter(nn.Module):
    """v_θ(x, t, c): x (N, 1, S, S), t (N,) in [0, 1], prompt ids c (N,) in {0, …, 10} (10 = the null prompt)
    → v (N, 1, S, S)."""

    def __init__(self, hidden: int = 256, num_freqs: int = 6, embed_dim: int = 32):
        super().__init__()
        # Fourier features of t at π·2^k, k = 0…5, as toy/run.py's VelocityMLP
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs), persistent=False)  # (F,)
        self.embed = nn.Embedding(len(DIGITS) + 1, embed_dim)  # one vector per digit, plus the null prompt
        self.net = nn.Sequential(
            nn.Linear(SIZE * SIZE + 2 * num_freqs + embed_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, SIZE * SIZE),
        )

    def forward(self, x: Tensor, t: Tensor, prompt_id: Tensor) -> Tensor:
        angles = t.float()[:, None] * self.freqs  # (N, F)
        features = torch.cat([x.flatten(1), angles.sin(), angles.cos(), self.embed(prompt_id)], dim=1)  # (N, S²+2F+E)
        x0 = torch.tanh(self.net(features)).view_as(x)  # (N, 1, S, S) in (−1, 1), the range of the data
        # v = (x_t − x̂₀) / t
        return (x - x0) / t.clamp(min=T_MIN)[:, None, None, None]  # (N, 1, S, S)


# ----------------------------------------------------------------------------------------------------------------
# --- 4. Pre-training: the rectified-flow loss, stopped early ---
# ----------------------------------------------------------------------------------------------------------------
#     x_t = (1 − t)·x₀ + t·ε,   ε ~ N(0, I),  t ~ U(0, 1),   L = E ‖v_θ(x_t, t, c) − (ε − x₀)‖²
# with the prompt replaced by the null prompt with probability toy.PROMPT_DROPOUT (0.15): toy/run.py's
# rectified_flow_loss, here on glyphs.
# The run is cut short on purpose: after PRETRAIN_STEPS (about 3 passes over the glyphs) the writer is mediocre, as
# SD3.5-M is at rendering text (the paper: 59% OCR accuracy): its ODE samples are read right 52–59% of the time
# over seeds 0–4 at the guidance scale used (section 7 has the other scales).

PRETRAIN_GLYPHS = 20_000  # the writer's training set
PRETRAIN_STEPS = 500
PRETRAIN_BATCH = 128
PRETRAIN_LR = 2e-3  # Adam, decayed linearly to 0, as toy/run.py


def pretrain(images: Tensor, digits: Tensor, seed: int, steps: int = PRETRAIN_STEPS) -> GlyphWriter:
    """A GlyphWriter fitted to (images (n, 1, S, S), digits (n,)); deterministic given the seed."""
    torch.manual_seed(seed)  # the initial weights
    g = torch.Generator().manual_seed(seed)  # the batches, times, noise and dropped prompts
    net = GlyphWriter()
    optimizer = torch.optim.Adam(net.parameters(), lr=PRETRAIN_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    data = to_latent(images)  # (n, 1, S, S)
    for _ in range(steps):
        rows = torch.randint(0, len(data), (PRETRAIN_BATCH,), generator=g)  # (b,)
        loss = toy.rectified_flow_loss(net, data[rows], digits[rows], NULL_ID, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


# ----------------------------------------------------------------------------------------------------------------
# --- 5. GlyphModel: toy/run.py's ToyModel, with digits for prompts and images for points ---
# ----------------------------------------------------------------------------------------------------------------


class GlyphModel(toy.ToyModel):
    """The pre-trained writer, fine-tuned in full, with a frozen copy as the KL's reference policy. Everything but
    the prompts, the latent shape and decoding is ToyModel's: the uniform t-schedule, CFG in one forward (rows
    [unconditional; conditional]), the reference context, safetensors weights."""

    latent_shape = (1, SIZE, SIZE)  # D
    null_id = NULL_ID  # the prompt id of CFG's unconditional branch

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        return {"prompt_id": parse_digits(prompts)}  # (B,)

    def decode(self, x0: Tensor) -> Tensor:
        return to_image(x0)  # what the OCR reads: images in [0, 1]


# ----------------------------------------------------------------------------------------------------------------
# --- 6. Measurements on fixed noise: accuracy under both classifiers, distance to the data, diversity, KL ---
# ----------------------------------------------------------------------------------------------------------------

EVAL_PER_DIGIT = 50  # fixed-noise ODE samples per digit: 500 in all, standard error of an accuracy ≤ 2.2%
REFERENCE_PER_DIGIT = 500  # the distance to the data looks at 10 × 500 real glyphs (random digits: ~500 each)
TEST_GLYPHS = 2000  # fresh real glyphs: the classifiers' accuracy and the distance of real glyphs to the data


@torch.no_grad()
def sample_fixed(
    model: GlyphModel, num_steps: int, noise_level, seed: int, per_digit: int = EVAL_PER_DIGIT, sde_type: str = "sde"
) -> tuple[flow_grpo.Trajectory, Tensor]:
    """per_digit samples of every digit from noise fixed by `seed` (the same noise before and after
    fine-tuning), drawn by flow_grpo.rollout (noise_level 0: the deterministic ODE). Returns (trajectory with
    latents (N, T+1, 1, S, S), digit ids (N,)), N = 10·per_digit, digit-major."""
    g = torch.Generator().manual_seed(seed)
    prompt_id = torch.arange(len(DIGITS)).repeat_interleave(per_digit)  # (N,)
    cond = {"prompt_id": prompt_id}
    x1 = torch.randn((len(prompt_id), *model.latent_shape), generator=g)  # (N, 1, S, S)
    velocity = lambda x, t: model.velocity(x, t, cond)  # noqa: E731
    traj = flow_grpo.rollout(velocity, x1, model.schedule(num_steps), noise_level, g, sde_type=sde_type)
    return traj, prompt_id


def distance_to_data(images: Tensor, digits: Tensor, reference: Tensor, reference_digits: Tensor) -> Tensor:
    """(N,) RMS pixel distance from each image (N, 1, S, S) to the nearest reference glyph of ITS digit.
    Fresh real glyphs score 0.096–0.097 (seeds 0–4), the pre-trained writer's samples 0.167–0.182; samples that
    leave the data for patterns the mini-OCR likes score more."""
    flat, ref = images.flatten(1), reference.flatten(1)  # (N, S²), (M, S²)
    d2 = torch.cdist(flat, ref) ** 2 / flat.shape[1]  # (N, M) mean squared pixel difference
    d2 = d2.masked_fill(digits[:, None] != reference_digits[None, :], float("inf"))  # only glyphs of the same digit
    return d2.min(dim=1).values.sqrt()  # (N,)


def diversity(images: Tensor, digits: Tensor) -> float:
    """Mean RMS pixel distance between two different images of the same digit, averaged over the digits: how
    varied the writing is (a writer that found one glyph per digit the OCR likes scores low)."""
    per_digit = []
    for d in digits.unique():
        flat = images[digits == d].flatten(1)  # (n_d, S²)
        n = len(flat)
        rms = torch.cdist(flat, flat) / flat.shape[1] ** 0.5  # (n_d, n_d), zero on the diagonal
        per_digit.append(rms.sum() / (n * (n - 1)))  # mean over the n(n − 1) ordered pairs i ≠ j
    return torch.stack(per_digit).mean().item()


@torch.no_grad()
def measure(model: GlyphModel, cfg: flow_grpo.Config, judges: dict, with_kl: bool = False) -> dict:
    """The numbers of metrics.json for the model as it is now, on fixed-noise ODE samples (a = 0,
    cfg.eval_num_steps steps, how the model is used):
        reward              mean mini-OCR probability of the prompted digit (what training maximises)
        ocr_accuracy        fraction the mini-OCR reads as the prompted digit
        heldout_accuracy    fraction the held-out judge reads as the prompted digit (the headline number)
        distance_to_data    mean RMS distance to the nearest real glyph of the prompted digit
        diversity           mean RMS distance between two samples of the same digit
        images, prompt_id, heldout_correct   the samples (N, 1, S, S), their digits and the judge's verdicts (N,)
    and with_kl: kl_to_ref, toy/run.py's measure of the penalised KL (cfg.kl's form) on 100 fixed-noise SDE
    trajectories like the training ones (10 per digit, cfg.num_steps steps)."""
    ode, prompt_id = sample_fixed(model, cfg.eval_num_steps, 0.0, cfg.seed + 1)
    images = model.decode(ode.latents[:, -1])  # (N, 1, S, S)
    ocr_probs = F.softmax(judges["ocr"](images), dim=1)  # (N, 10)
    heldout_correct = judges["heldout"](images).argmax(1) == prompt_id  # (N,)
    out = {
        "images": images,
        "prompt_id": prompt_id,
        "heldout_correct": heldout_correct,
        "reward": ocr_probs[torch.arange(len(prompt_id)), prompt_id].mean().item(),
        "ocr_accuracy": (ocr_probs.argmax(1) == prompt_id).float().mean().item(),
        "heldout_accuracy": heldout_correct.float().mean().item(),
        "distance_to_data": distance_to_data(images, prompt_id, *judges["reference"]).mean().item(),
        "diversity": diversity(images, prompt_id),
    }
    if with_kl:
        levels, trained_steps = flow_grpo.sde_window(cfg, torch.Generator().manual_seed(cfg.seed + 2))
        sde, sde_prompt_id = sample_fixed(model, cfg.num_steps, levels, cfg.seed + 2, 10, cfg.sde_type)
        out["kl_to_ref"] = toy.kl_to_reference(model, sde, sde_prompt_id, trained_steps, cfg.sde_type, cfg.kl)
    return out


# ----------------------------------------------------------------------------------------------------------------
# --- 7. The Config: flow_grpo.Config with laptop-sized values ---
# ----------------------------------------------------------------------------------------------------------------
# The defaults of flow_grpo.Config are the paper's SD3.5-M settings. Every override below says why the glyphs
# differ; fields not named keep the paper's value: 10 sampling steps (40 for evaluation), noise level a = 0.7,
# train on the first 9 of the 10 steps, log-probs AVERAGED over the 256 pixels, advantages with the per-prompt mean
# and the epoch's global std clipped to ±5, AdamW β's, weight decay and grad-norm clip 1.

# β, the weight of the KL to the pre-trained writer, in flow_grpo's default "reference" form (|dt| times the exact
# per-step KL: with the 10 uniform steps here, β = 0.1 is 0.01 on the exact KL). Measured on seed 0, 80 epochs
# (before: held-out accuracy 0.54, distance to the data 0.178, diversity 0.29; real glyphs 0.097 and 0.32):
#     β       held-out   mini-OCR   90% held-out at   distance to data   diversity   kl_to_ref
#     0        0.98       1.00          epoch 21           0.180            0.05        0.021
#     0.03     1.00       1.00          epoch 21           0.137            0.08        0.0064
#     0.1      0.95       0.98          epoch 21           0.132            0.13        0.0046
#     0.3      0.98       0.99          epoch 41           0.130            0.19        0.0026
#     1        0.83       0.85          never              0.149            0.25        0.0011
# 0.1 is the largest of these β that still reaches 90% as fast as β = 0; a larger β keeps more of the writer's
# variety but learns slower. (The KL cannot keep all of it: a writer that is right more often is a narrower one.)
GLYPH_BETA = 0.1

# w: 2, not SD3's 4.5. Guidance alone makes the pre-trained writer better, and w picks how mediocre it starts.
# Held-out accuracy of its ODE samples over seeds 0–4:
#     w = 1: 0.29–0.39    1.5: 0.42–0.49    2: 0.52–0.59    3: 0.65–0.71    4.5: 0.75–0.81
# At 2 it is in the range the paper starts from (SD3.5-M: 59% OCR accuracy), with room to learn; at 4.5 guidance
# already costs diversity (0.20–0.26 against 0.27–0.29 at w = 2) and pushes the glyphs off the data (distance
# 0.174–0.195 against 0.167–0.182).
GUIDANCE_SCALE = 2.0


def glyph_config(args: argparse.Namespace, beta: float, out: str) -> flow_grpo.Config:
    return flow_grpo.Config(
        model="glyph-writer",  # a label only: the model is built in this file
        reward="mini_ocr",  # a label only: the reward is DigitReward
        prompts="digits",  # a label only: the prompts are DIGITS
        out=out,
        seed=args.seed,
        guidance_scale=args.guidance_scale,  # GUIDANCE_SCALE unless --guidance_scale (1: train without CFG)
        guard=args.guard,  # GRPO-Guard (flow_grpo.py section 5)
        # all 10 digits every epoch, G = 32 samples each (the paper: 48 prompts × 24): 320 rollouts per epoch.
        # Measured (seed 0, β = 0.1, the other settings as here): G = 16 costs ~3/4 of the CPU per epoch (41 s
        # against 55 s for 80 epochs) but first reaches 90% held-out accuracy after 56 epochs instead of 21.
        group_size=args.group_size,
        groups_per_epoch=len(DIGITS),
        # 4 batches (of 80 at G = 32) and one optimiser step per batch (the paper: 2 steps per epoch, with gradient
        # accumulation), as toy/run.py does: several PPO steps per sampled epoch for a small model
        batch_size=args.group_size * len(DIGITS) // 4,
        optimizer_steps_per_epoch=4,
        # 3e-3 instead of 1e-4: the log-prob is averaged over 256 pixels, not SD3's 65 536 latent elements, so an
        # update moves the per-element ratio more. Measured (seed 0, β = 0.1): ε = 1e-3 clips 23% of the samples
        # (mean over epochs) and first reaches 90% after 31 epochs; 3e-3 clips 12% and needs 21; 1e-2 clips 4%
        # and also needs 21. 3e-3 is the smallest of these that learns as fast as a loose clip.
        clip_range=args.clip_range,
        beta=beta,
        # 1e-3, Adam's usual rate for a small network trained in full (the paper's 3e-4 is for a LoRA on SD3):
        # at 3e-4 the held-out accuracy first reaches 90% after 46 epochs instead of 21 (seed 0, β = 0.1). Adam's
        # first step moves every weight by about lr (its moment estimates hold one gradient), which costs a few
        # points of accuracy in the first epoch (0.54 → 0.50 on seed 0) before the rise.
        lr=args.lr,
        ema=False,  # as toy/run.py: measure the current weights; an EMA every 8 steps only adds lag here
        epochs=args.epochs,
        # train's own evaluation (one ODE sample per digit: the training prompts are the whole set) runs every
        # eval_every epochs and calls on_eval, where run() measures the 500 fixed-noise samples of the curves
        eval_every=args.eval_every,
        eval_count=len(DIGITS),
        save_every=0,  # one checkpoint, at the end (<out>/<run>/checkpoints/)
        mixed_precision="no",  # float32 on the CPU
    )


# ----------------------------------------------------------------------------------------------------------------
# --- 8. The picture: samples per digit before / after (β > 0 and β = 0), accuracy and reward curves (PIL only) ---
# ----------------------------------------------------------------------------------------------------------------

CELL = 3  # screen pixels per glyph pixel
GRID_COLUMNS = 8  # samples shown per digit
FRAME = 2  # pixels of frame around each glyph (red where the held-out judge misreads it)
TILE = SIZE * CELL + 2 * FRAME
PANEL_W, GRID_H, CURVE_H = GRID_COLUMNS * TILE, len(DIGITS) * TILE, 250
MARGIN = 44
BLUE, ORANGE, GREY, RED, GREEN = (31, 119, 180), (230, 120, 20), (120, 120, 120), (214, 39, 40), (44, 160, 44)


def _grid_panel(image, draw, left: int, top: int, m: dict, title: str) -> None:
    """GRID_COLUMNS samples of every digit (one row per digit), framed red where the held-out judge misreads them."""
    from PIL import Image

    per_digit = len(m["images"]) // len(DIGITS)
    for d in range(len(DIGITS)):
        for c in range(GRID_COLUMNS):
            i = d * per_digit + c
            pixels = (m["images"][i, 0] * 255).round().to(torch.uint8)  # (S, S)
            glyph = Image.frombytes("L", (SIZE, SIZE), bytes(pixels.flatten().tolist()))
            glyph = glyph.resize((SIZE * CELL, SIZE * CELL), Image.NEAREST)
            x, y = left + c * TILE, top + d * TILE
            draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=(255, 255, 255) if m["heldout_correct"][i] else RED)
            image.paste(glyph, (x + FRAME, y + FRAME))
        draw.text((left - 8, top + d * TILE + TILE / 2), DIGITS[d], fill=(0, 0, 0), font=toy._font(15), anchor="rm")
    draw.text((left, top - 46), title, fill=(0, 0, 0), font=toy._font(17))
    subtitle = (
        f"held-out {100 * m['heldout_accuracy']:.0f}%, mini-OCR {100 * m['ocr_accuracy']:.0f}%, "
        f"to the data {m['distance_to_data']:.3f}, diversity {m['diversity']:.2f}"
    )
    draw.text((left, top - 22), subtitle, fill=(70, 70, 70), font=toy._font(13))


def _curve_panel(draw, left: int, top: int, run: dict, title: str) -> None:
    """Per epoch: the training reward (mean mini-OCR probability of the epoch's SDE samples) and, at every
    evaluation, the accuracy of the fixed-noise ODE samples under the mini-OCR and the held-out judge, and their
    diversity."""
    small = toy._font(12)
    epochs = len(run["reward_curve"])

    def to_px(epoch: float, value: float) -> tuple[float, float]:
        return left + epoch / max(epochs, 1) * PANEL_W, top + (1 - value) * CURVE_H

    for k in range(6):  # grid and y ticks at 0, 0.2, …, 1
        _, py = to_px(0, k / 5)
        draw.line([left, py, left + PANEL_W, py], fill=(228, 228, 228))
        draw.text((left - 6, py), f"{k / 5:.1f}", fill=(0, 0, 0), font=small, anchor="rm")
    step = max(1, round(epochs / 5 / 10) * 10) if epochs > 20 else max(1, epochs // 5)
    for epoch in range(0, epochs + 1, step):  # x ticks
        px, _ = to_px(epoch, 0)
        draw.line([px, top + CURVE_H, px, top + CURVE_H + 4], fill=(0, 0, 0))
        draw.text((px, top + CURVE_H + 6), str(epoch), fill=(0, 0, 0), font=small, anchor="mt")
    draw.text((left + PANEL_W / 2, top + CURVE_H + 22), "epoch", fill=(0, 0, 0), font=small, anchor="mt")
    _, py = to_px(0, 0.9)
    for x0 in range(left, left + PANEL_W, 10):  # dashed: the goal, 90% held-out accuracy
        draw.line([x0, py, min(x0 + 5, left + PANEL_W), py], fill=BLUE, width=1)
    draw.rectangle([left, top, left + PANEL_W, top + CURVE_H], outline=(0, 0, 0))
    # the reward of epoch e's samples is plotted at e + ½: they were drawn with the weights after e epochs
    reward = [to_px(e + 0.5, r) for e, r in enumerate(run["reward_curve"])]
    evals = run["eval_curve"]
    ocr = [to_px(e["epoch"], e["ocr_accuracy"]) for e in evals]
    heldout = [to_px(e["epoch"], e["heldout_accuracy"]) for e in evals]
    varied = [to_px(e["epoch"], e["diversity"]) for e in evals]
    for points, colour, width in ((varied, GREEN, 2), (reward, ORANGE, 2), (ocr, GREY, 2), (heldout, BLUE, 3)):
        if points:
            draw.line(points if len(points) > 1 else points * 2, fill=colour, width=width)
    for x, y in heldout:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=BLUE)
    draw.text((left, top - 46), title, fill=(0, 0, 0), font=toy._font(17))
    epoch = run["epoch_heldout_90"]
    reached = f"90% held-out after {epoch} epochs" if epoch is not None else "never 90% held-out"
    subtitle = f"{reached}; KL to the pre-trained writer {run['kl_to_ref']:.4f}"
    draw.text((left, top - 22), subtitle, fill=(70, 70, 70), font=toy._font(13))


def draw_picture(path: str, before: dict, runs: dict, stats: dict, args: argparse.Namespace) -> None:
    """glyphs.png: three sample grids (before | after β | after β = 0) over two curve panels and a legend."""
    from PIL import Image, ImageDraw

    width = 3 * PANEL_W + 4 * MARGIN
    grid_top = 100
    curve_top = grid_top + GRID_H + 80
    height = curve_top + CURVE_H + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title = f"Flow-GRPO teaches a flow model to write digits   (seed {args.seed}, {args.epochs} epochs)"
    draw.text((MARGIN, 12), title, fill=(0, 0, 0), font=toy._font(18))
    lefts = [MARGIN + k * (PANEL_W + MARGIN) for k in range(3)]
    _grid_panel(image, draw, lefts[0], grid_top, before, "before: the pre-trained writer")
    for k, (name, run) in enumerate(runs.items(), start=1):
        beta = run["beta"]
        _grid_panel(image, draw, lefts[k], grid_top, run["after"], f"after Flow-GRPO, β = {beta:g}")
        _curve_panel(draw, lefts[k], curve_top, run, f"β = {beta:g}: during training")
    font = toy._font(13)
    lines = [
        ("Grids: one row per prompted digit; every grid", (0, 0, 0)),
        ("starts from the same fixed noise (ODE, 40 steps).", (0, 0, 0)),
        ("Red frame: the held-out judge reads another digit.", RED),
        ("To the data: mean RMS distance to the nearest real", (0, 0, 0)),
        (f"glyph of the digit (real glyphs: {stats['distance_to_data_real']:.3f}).", (0, 0, 0)),
        ("", (0, 0, 0)),
        ("Curves:", (0, 0, 0)),
        ("held-out judge accuracy of the ODE samples", BLUE),
        ("mini-OCR accuracy of the same samples", GREY),
        ("reward: mini-OCR probability of the prompted", ORANGE),
        ("digit, mean over each epoch's SDE samples", ORANGE),
        ("diversity of the ODE samples (mean RMS distance", GREEN),
        (f"between two glyphs of a digit; real: {stats['diversity_real']:.2f})", GREEN),
        ("dashed: the 90% goal", BLUE),
    ]
    for i, (text, colour) in enumerate(lines):
        draw.text((lefts[0], curve_top - 40 + i * 21), text, fill=colour, font=font)
    # 128 colours lose nothing visible here (grey glyphs, a few plot colours) and halve the file (~100 kB)
    image.quantize(colors=128).save(path, optimize=True)


# ----------------------------------------------------------------------------------------------------------------
# --- 9. run(): render, train the classifiers, pre-train, fine-tune (β > 0, then β = 0), measure, draw ---
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Flow-GRPO teaches a flow model to write digits (see toy/glyphs.py).")
    p.add_argument("--beta", type=float, default=GLYPH_BETA, help="KL weight β of the main run")
    p.add_argument("--seed", type=int, default=0, help="seeds the glyphs, the classifiers, pre-training and training")
    p.add_argument("--epochs", type=int, default=80, help="Flow-GRPO epochs of each run (10·G rollouts each)")
    p.add_argument("--group_size", type=int, default=32, help="G: samples per digit and epoch")
    p.add_argument("--clip_range", type=float, default=3e-3, help="PPO clip range ε (section 7)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (section 7)")
    p.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE, help="CFG w of sampling and training (1: none)")
    p.add_argument("--guard", action="store_true", help="GRPO-Guard's ratio normalisation and 1/|dt| step weights")
    p.add_argument("--eval_every", type=int, default=5, help="measure the ODE samples every this many epochs")
    p.add_argument("--no_beta0", action="store_true", help="skip the β = 0 run beside the main one")
    p.add_argument("--out", default=os.path.join(ROOT, "toy", "out", "glyphs"), help="glyphs.png, metrics.json")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = p.parse_args(argv)
    if args.group_size < 2 or args.group_size % 2:
        p.error(f"--group_size must be even and >= 2 (10·G samples make 4 equal batches), got {args.group_size}")
    return args


def setup(seed: int, log=print) -> tuple[GlyphWriter, dict, dict]:
    """Everything Flow-GRPO starts from, deterministic given the seed: the glyphs, the two classifiers, the
    reference glyphs of the distance measure and the pre-trained writer. Returns (writer, judges, stats)."""
    clock = Clock()
    # a separate seed for every set of glyphs, so that no two sets share a glyph
    images, digits = render(PRETRAIN_GLYPHS, 10 * seed + 1)  # the writer's data; the mini-OCR's is its first part
    judge_images, judge_digits = render(CLASSIFIER_TRAIN, 10 * seed + 2)  # the judge's own data
    reference = render(REFERENCE_PER_DIGIT * len(DIGITS), 10 * seed + 3)  # for distance_to_data
    test_images, test_digits = render(TEST_GLYPHS, 10 * seed + 4)  # fresh glyphs, for the numbers below
    t1 = clock.read()
    judges = {
        "ocr": train_classifier(ocr_net, images[:CLASSIFIER_TRAIN], digits[:CLASSIFIER_TRAIN], 10 * seed + 5),
        "heldout": train_classifier(judge_net, judge_images, judge_digits, 10 * seed + 6),
        "reference": reference,
    }
    t2 = clock.read()
    writer = pretrain(images, digits, seed)
    t3 = clock.read()
    with torch.no_grad():
        stats = {
            "ocr_accuracy_real": (judges["ocr"](test_images).argmax(1) == test_digits).float().mean().item(),
            "heldout_accuracy_real": (judges["heldout"](test_images).argmax(1) == test_digits).float().mean().item(),
            "distance_to_data_real": distance_to_data(test_images, test_digits, *reference).mean().item(),
            "diversity_real": diversity(test_images, test_digits),
            **{f"render_{k}": t1[k] for k in t1},
            **{f"classifiers_{k}": t2[k] - t1[k] for k in t1},
            **{f"pretrain_{k}": t3[k] - t2[k] for k in t1},
        }
    log(
        f"glyphs {stats['render_seconds']:.1f}s | classifiers {stats['classifiers_seconds']:.1f}s: real glyphs "
        f"read right by the mini-OCR {stats['ocr_accuracy_real']:.3f}, by the held-out judge "
        f"{stats['heldout_accuracy_real']:.3f} | writer pre-trained {stats['pretrain_seconds']:.1f}s"
    )
    return writer, judges, stats


def _summary(m: dict) -> str:
    return (
        f"held-out accuracy {m['heldout_accuracy']:.3f} | mini-OCR accuracy {m['ocr_accuracy']:.3f} | "
        f"reward {m['reward']:.3f} | distance to data {m['distance_to_data']:.3f} | diversity {m['diversity']:.3f}"
    )


NUMBERS = ("heldout_accuracy", "ocr_accuracy", "reward", "distance_to_data", "diversity")


class Clock:
    """Seconds since it was started, on the wall and on the CPU (this process; one thread, see run). The machine
    these numbers were measured on was shared: its wall times are inflated, the CPU times are what an idle core
    would take."""

    def __init__(self):
        self.wall, self.cpu = time.time(), time.process_time()

    def read(self) -> dict[str, float]:
        return {"seconds": time.time() - self.wall, "cpu_seconds": time.process_time() - self.cpu}


def fine_tune(args, writer: GlyphWriter, judges: dict, beta: float, out: str, log, setup_time: dict) -> dict:
    """One Flow-GRPO run from the pre-trained writer (copied: the writer is left as it was) with flow_grpo.train.
    Returns its numbers and curves, plus its first and last measurements with their sample images as "before" and
    "after". Its times count from the start of the program, leaving out any other run before it: setup_time (the
    seconds and cpu_seconds that setup took) plus the time of this run so far."""
    run_clock = Clock()

    def since_start() -> dict[str, float]:
        return {k: setup_time[k] + v for k, v in run_clock.read().items()}

    cfg = glyph_config(args, beta, out)
    flow_grpo.plan_batches(cfg)  # raises now if the batch sizes do not fit
    shutil.rmtree(out, ignore_errors=True)  # train appends to metrics.jsonl: start this run's outputs from scratch
    model = GlyphModel(copy.deepcopy(writer), cfg.guidance_scale)
    before = measure(model, cfg, judges)
    evals = [{"epoch": 0, **since_start(), **{k: before[k] for k in NUMBERS}}]

    def on_eval(epoch: int, images: Tensor, rewards: Tensor, prompts: list) -> None:
        # called after epoch `epoch` (0-based): the model has been trained for epoch + 1 epochs
        m = measure(model, cfg, judges)
        evals.append({"epoch": epoch + 1, **since_start(), **{k: m[k] for k in NUMBERS}})
        log(f"  after {epoch + 1} epochs, fixed-noise ODE samples: {_summary(m)} | {evals[-1]['seconds']:.1f}s")

    prompts = [flow_grpo.Prompt(d) for d in DIGITS]
    # The SAME loop that fine-tunes SD3.5-M (flow_grpo.py section 9).
    history = flow_grpo.train(cfg, model, DigitReward(judges["ocr"]), prompts, log=log, on_eval=on_eval)
    after = measure(model, cfg, judges, with_kl=True)
    reached = [e for e in evals if e["heldout_accuracy"] >= 0.9]  # the first evaluation at 90% or more
    return {
        "beta": beta,
        **{f"{k}_before": before[k] for k in NUMBERS},
        **{f"{k}_after": after[k] for k in NUMBERS},
        "kl_to_ref": after["kl_to_ref"],
        "reward_curve": [m["reward/mean"] for m in history],
        "eval_curve": evals,
        "epoch_heldout_90": reached[0]["epoch"] if reached else None,
        "seconds_to_heldout_90": reached[0]["seconds"] if reached else None,
        "cpu_seconds_to_heldout_90": reached[0]["cpu_seconds"] if reached else None,
        **{f"run_{k}": v for k, v in run_clock.read().items()},
        "before": before,  # the measurements themselves, with the sample images (not written to metrics.json)
        "after": after,
    }


def run(argv: Optional[list[str]] = None) -> dict:
    """The whole demo for command-line arguments `argv` (None: sys.argv). Returns the metrics written to
    metrics.json."""
    args = parse_args(argv)
    # One thread, as toy/run.py (which measured why). Not re-measured for the glyphs: the machine these numbers
    # come from was shared, so that the CPU seconds of one thread are the times worth quoting.
    with toy.one_thread():
        return _run(args, (lambda s: None) if args.quiet else print)


def _run(args: argparse.Namespace, log) -> dict:
    clock = Clock()
    writer, judges, stats = setup(args.seed, log)
    setup_time = clock.read()
    os.makedirs(args.out, exist_ok=True)
    betas = {"main": args.beta} if args.no_beta0 else {"main": args.beta, "beta0": 0.0}
    runs = {}
    for name, beta in betas.items():
        log(f"--- Flow-GRPO with β = {beta:g} ---")
        runs[name] = fine_tune(args, writer, judges, beta, os.path.join(args.out, name), log, setup_time)
        r = runs[name]
        log(f"before: {_summary(r['before'])}")
        log(f"after:  {_summary(r['after'])} | KL to the pre-trained writer {r['kl_to_ref']:.4f}")
        if r["seconds_to_heldout_90"] is not None:
            log(
                f"held-out accuracy reached 90% after {r['epoch_heldout_90']} epochs: {r['seconds_to_heldout_90']:.0f}s"
                f" ({r['cpu_seconds_to_heldout_90']:.0f}s of CPU) of set-up and this run"
            )
    draw_picture(os.path.join(args.out, "glyphs.png"), runs["main"]["before"], runs, stats, args)
    plain = {name: {k: v for k, v in r.items() if k not in ("before", "after")} for name, r in runs.items()}
    metrics = {**plain["main"], "beta0": plain.get("beta0"), **stats, **clock.read(), "args": vars(args)}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    total = f"{metrics['seconds']:.0f}s ({metrics['cpu_seconds']:.0f}s of CPU)"
    log(f"wrote {os.path.join(args.out, 'glyphs.png')} and metrics.json | {total}")
    return metrics


def main() -> None:
    run()


if __name__ == "__main__":
    main()
