"""Flow-GRPO in one file: online RL for flow-matching text-to-image models.

Flow-GRPO (Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", https://arxiv.org/abs/2505.05470)
fine-tunes Stable Diffusion 3.5 Medium with a reward model:

  1. the deterministic sampling ODE is rewritten as an SDE with the same marginals, so every denoising step
     becomes a Gaussian policy  π(x' | x, t, c) = N(mean, std² I)  whose log-probability we can compute;
  2. for each prompt a *group* of G images is sampled from different noise and scored by a reward model;
  3. rewards are normalised within the group (GRPO: no value network);
  4. a PPO-style clipped objective, plus β·KL to the frozen pre-trained model, is maximised on every step of
     the stored trajectories;
  5. training trajectories use few denoising steps (10), evaluation uses many (40, plain ODE).

Run it:
    python toy/run.py                                   # the method on a 2D toy, laptop CPU, < 1 minute
    python flow_grpo.py --model tiny-random --reward jpeg_compressibility   # the real SD3 path, tiny random model
    python flow_grpo.py --recipe pickscore                                   # the real thing (recipes.py), one GPU
    torchrun --nproc_per_node 8 flow_grpo.py --model sd3.5-medium --groups_per_epoch 16   # several GPUs

Reading order (each section is a numbered banner below):
    0. Conventions
    1. Config: the paper's SD3.5-M settings, one dataclass, the command line is generated from it
    2. The SDE step and its log-probability              (paper §4.1, eq. for the marginal-preserving SDE)
    3. Rollout: integrate a velocity model from t = 1 to t = 0
    4. Group-relative advantages                          (GRPO, paper §4)
    5. The clipped surrogate loss with the KL penalty     (paper §4, eq. for J_Flow-GRPO)
    6. Batch arithmetic: every derived size in one place
    7. The model interface the training loop talks to
    8. Many processes (torchrun): who samples what, how rewards are shared
    9. The training loop, shared by the toy and SD3.5-M
   10. SD3.5-M: LoRA, CFG velocity, VAE decode
   11. The command line: checks before the model loads, then train

Beside it: rewards.py (the reward functions, and score(), the one place that checks what they return); recipes.py
(the command line: flags generated from Config, --model presets, the reference's named configs, flag ranges); and,
changing nothing that is trained, runfiles.py (the run's plumbing: prompt files, the lock on --out, metrics.jsonl,
checkpoints and resume rules, stopping on a signal, loading the model's files, joining torchrun, the printed lines),
watch.py (the curves picture, the trackers) and compat.py (torch APIs that differ across the supported versions).

Importing this file is cheap: torch only (and runfiles.py, compat.py, watch.py, rewards.py: standard library, torch,
PIL). diffusers, transformers, peft and the reward models are imported inside the functions that need them, so the
toy and the tests of the math never pay for them.
"""

# ----------------------------------------------------------------------------------------------------------------
# --- 0. Conventions (stated once, used everywhere) ---
# ----------------------------------------------------------------------------------------------------------------
# * Rectified flow, SD3 direction:  x_t = (1 − t)·x₀ + t·ε.   t = 1 is pure noise, t = 0 is data.
#   The model predicts the velocity v = ε − x₀, so x₀ = x − t·v and ε = x + (1 − t)·v can be read off any x_t.
# * Sampling runs t from 1 down to 0, so every step has dt = t' − t < 0.
# * A "schedule" is the (T+1,) tensor of t values 1 = t₀ > t₁ > … > t_T = 0 (diffusers calls them `sigmas`;
#   the SD3 transformer is fed timestep = 1000·t).
# * Log-probabilities are per sample. By default they are the MEAN of the per-element Gaussian log-density over
#   all latent elements (C·H·W), as the reference implementation does; see sde_step for what that does to the
#   PPO ratio. reduce="sum" gives the exact log-density.
# * Shape legend:  B prompts (groups) · G group size · N = B·G samples · T denoising steps ·
#   D latent element shape (C, H, W) for SD3, (2,) for the toy · b batch size · n rows held by one process
#   (n = N alone; N/R for each of R processes under torchrun).
# * Batches: an epoch's N samples are shuffled ONCE into N/b batches when they are sampled, and training reuses
#   exactly those batches (same rows, same size), so a recomputed log-prob sees the batch it was sampled in.
# * The SDE step is always computed in float32, whatever dtype the network runs in.

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

import compat  # the torch versions supported: APIs newer than the lowest are looked up there; quiet libraries
# the run's plumbing (prompt files, the output folder, metrics.jsonl, checkpoints, the resume rules): runfiles.py
import runfiles
from runfiles import (
    CheckpointError, DiskError, DivergenceError, EpochUndo, Prompt, append_metrics, claim_metrics, eval_prompt_set,
    ModelLoadError, format_line, load_pipeline, load_prompts, open_run, resume_run, save_checkpoint, save_grid,
    stop_point,
)  # fmt: skip
from recipes import check_flags
from rewards import RewardError, score  # score(): a reward's values, checked (NaN, shape) before anything trains
from watch import RunWatch, check_report_to  # the curves picture and the optional trackers (standard library)

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------------------------
# --- 1. Config: the paper's SD3.5-Medium settings (notes table; paper §5 and the reference configs) ---
# ----------------------------------------------------------------------------------------------------------------
# Every field is a command-line flag (--group_size 16, --no-ema, ...). Sizes derived from them are computed in
# plan_batches (section 6), printed at start-up and checked.

# β (KL weight) of the reference's config for each reward (config/grpo.py; clipscore_sd3: 0.02); others: 0.04.
BETA_BY_REWARD = {"pickscore": 0.01, "ocr": 0.04, "geneval": 0.04, "clipscore": 0.02}
DEFAULT_BETA = 0.04


@dataclass
class Config:
    # --- what to train ---
    model: str = "sd3.5-medium"  # "sd3.5-medium", "tiny-random", a hub id or a local diffusers folder
    reward: str = "pickscore"  # a name from rewards.py, or a weighted sum "ocr=0.5,pickscore=0.5"
    prompts: str = "general"  # a shipped set (general, ocr, geneval), a folder like the reference's dataset/ocr, a file
    out: str = "runs/flow_grpo"  # run folder: metrics.jsonl, eval grids, checkpoints
    seed: int = 42  # seeds prompts, noise and LoRA init
    # --- sampling (paper: 10 steps to train, 40 to evaluate, CFG 4.5, a = 0.7) ---
    resolution: int = 512  # image side in pixels
    num_steps: int = 10  # denoising steps of the training trajectories (denoising reduction)
    eval_num_steps: int = 40  # denoising steps for evaluation (deterministic ODE)
    guidance_scale: float = 4.5  # classifier-free guidance in sampling, training forward and evaluation; 1 = none
    noise_level: float = 0.7  # a in σ_t = a·√(t/(1 − t))
    # --- GRPO batch (paper: G = 24, 48 groups per epoch on 32 GPUs; here sized for ONE GPU) ---
    group_size: int = 24  # G: images per prompt
    groups_per_epoch: int = 2  # B: prompts per epoch (2 × 24 = 48 images, about the paper's per-GPU share)
    batch_size: int = 8  # images per forward, for sampling AND training (keeps the first ratio exactly 1)
    optimizer_steps_per_epoch: int = 2  # gradient accumulation over the epoch's batches / this
    inner_epochs: int = 1  # passes over the sampled data per epoch
    global_std: bool = True  # normalise advantages by the std over all rewards of the epoch (SD3 configs)
    adv_clip: float = 5.0  # advantages are clipped to ±adv_clip
    clip_range: float = 1e-4  # PPO ε (small because the log-prob is averaged over latent elements)
    beta: Optional[float] = None  # KL weight; None: 0.01 for pickscore, 0.04 otherwise (paper)
    kl: str = "reference"  # "reference": the reference code's KL (= |dt| x exact, what β was tuned on); "exact"
    timestep_fraction: float = 0.99  # train on the first int(T·fraction) steps (9 of 10: the last is too sharp)
    log_prob_reduce: str = "mean"  # "mean" (reference) or "sum" over latent elements; see sde_step
    sde_type: str = "sde"  # "sde" (paper) or "cps" (coefficients-preserving sampling, later in the reference repo)
    fast_window: int = 0  # Flow-GRPO-Fast: SDE (and training) only on this many consecutive steps; 0 = every step
    fast_window_start: int = 0  # Fast: first step the window may start at
    fast_window_range: int = 5  # Fast: the window lies in steps [fast_window_start, this), drawn anew per batch
    guard: bool = False  # GRPO-Guard (arXiv 2510.22319): drift-corrected, std-rescaled ratio; step losses × 1/|dt|
    # --- optimiser (AdamW as in the paper) ---
    lr: float = 3e-4  # learning rate
    adam_beta1: float = 0.9  # AdamW β₁
    adam_beta2: float = 0.999  # AdamW β₂
    weight_decay: float = 1e-4  # AdamW weight decay
    adam_eps: float = 1e-8  # AdamW ε
    max_grad_norm: float = 1.0  # gradient-norm clip
    # --- LoRA and EMA ---
    lora_rank: int = 32  # LoRA r
    lora_alpha: int = 64  # LoRA α (scale α/r = 2)
    ema: bool = True  # keep an EMA of the LoRA weights, used for evaluation and saved beside them
    ema_decay: float = 0.9  # EMA decay, reached after a warm-up: min((1 + s)/(10 + s), ema_decay) at step s
    ema_every: int = 8  # EMA update after optimiser steps s with (s + 1) % ema_every == 0
    # --- run ---
    epochs: int = 100  # sampling + training rounds
    eval_every: int = 10  # evaluate (ODE, eval_num_steps) every this many epochs; 0 = never
    eval_prompts: str = ""  # held-out prompts: a file, or a set/folder (its test split); "" = test split of --prompts
    eval_count: int = 16  # evaluate on at most this many of them (a fixed seeded draw); 0 = all
    save_every: int = 10  # checkpoint every this many epochs (and at the end); 0 = only at the end
    max_zero_adv_epochs: int = 10  # stop (exit 1) after this many epochs in a row with every advantage 0; 0 = never
    resume: str = ""  # --resume: continue from the latest checkpoint in --out; --resume PATH: from that checkpoint
    mixed_precision: str = "bf16"  # "bf16", "fp16" or "no": dtype of the frozen weights on a GPU (CPU: float32)
    gradient_checkpointing: bool = False  # trade compute for activation memory in the transformer
    text_encoders_on_cpu: bool = False  # keep CLIP-L, CLIP-G and T5-XXL on the CPU (saves ~11 GB of GPU memory)
    reward_models: str = ""  # where reward models live: "geneval.detector_id=/m/m2f,pickscore.model_id=/m/ps"
    max_sequence_length: int = 128  # T5 tokens per prompt (the reference's 128; diffusers' default is 256)
    cpu: bool = False  # run on the CPU (float32) even where a GPU exists; under torchrun every process, with gloo
    dist_timeout_s: float = 600.0  # torchrun: a rank that does not answer for this long ends the run (not a hang)
    compile: str = "auto"  # torch.compile the transformer blocks: "on", "off", "auto" (on with CUDA, off on a CPU)
    allow_tf32: bool = True  # CUDA: float32 matmuls (LoRA branch, VAE, reward models) on TF32 cores, as the reference
    report_to: str = "none"  # also log to "tensorboard", "wandb" (offline unless WANDB_MODE) or "tensorboard,wandb"

    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        names = [part.split("=")[0].strip() for part in self.reward.split(",")]
        return min(BETA_BY_REWARD.get(n, DEFAULT_BETA) for n in names)


# ----------------------------------------------------------------------------------------------------------------
# --- 2. The SDE step and its log-probability (paper §4.1: ODE → SDE with the same marginals) ---
# ----------------------------------------------------------------------------------------------------------------
# The probability-flow ODE  dx = v dt  and the reverse-time SDE
#
#     dx = [ v + σ_t²/(2t)·(x + (1 − t)·v) ] dt + σ_t dw,        σ_t = a·√(t / (1 − t))
#
# have the same marginal p_t(x) for every choice of σ_t: the extra drift is (σ_t²/2)·(−score) with the score of
# the flow's marginal  ∇log p_t(x) = −(x + (1 − t)·v)/t , and it exactly cancels the spreading of the noise σ_t dw.
# `a` is the "noise level" (0.7 in the paper's SD3 runs). One Euler–Maruyama step from t to t' = t + dt (dt < 0):
#
#     x' = x + [ v + σ_t²/(2t)·(x + (1 − t)·v) ]·dt + σ_t·√(−dt)·ε,      ε ~ N(0, I)
#
# i.e. a Gaussian policy π(x' | x) = N(mean, std² I) with
#
#     mean = x·(1 + σ_t²·dt/(2t)) + v·(1 + σ_t²·(1 − t)/(2t))·dt
#     std  = σ_t·√(−dt)


def _per_sample(t: float | Tensor, like: Tensor) -> Tensor:
    """A float, or a (B,) tensor of per-sample times, as a float32 tensor that broadcasts against `like`."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        return t
    if t.shape != like.shape[:1]:
        raise ValueError(f"per-sample t must have shape ({like.shape[0]},) to match x, got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """log N(x; mean, std² I) per sample, (B,): the per-element log-density averaged ("mean") or summed ("sum")
    over all non-batch dimensions."""
    # log N(x; μ, s²) = −(x − μ)²/(2s²) − log s − log √(2π)        per element
    log_p = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI  # (B, *D)
    dims = tuple(range(1, log_p.ndim))
    if reduce == "mean":
        return log_p.mean(dim=dims)  # (B,)
    if reduce == "sum":
        return log_p.sum(dim=dims)  # (B,)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def sde_step(
    x: Tensor,
    v: Tensor,
    t: float | Tensor,
    t_next: float | Tensor,
    noise_level: float,
    prev_x: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduce: str = "mean",
    sde_type: str = "sde",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of the marginal-preserving SDE from t to t_next (< t), seen as a Gaussian policy.

    Args:
        x, v:        the current sample and the model's velocity at (x, t), shape (B, *D), any float dtype.
        t, t_next:   floats, or (B,) tensors of per-sample times.
        noise_level: a ≥ 0 in σ_t = a·√(t/(1 − t)). a = 0 is exactly the Euler ODE step x' = x + v·dt.
        prev_x:      if given, the x' whose log-probability is wanted (training); otherwise x' is sampled.
        generator:   for the noise ε when sampling.
        reduce:      "mean" (reference behaviour) or "sum" (exact log-density); see below.
        sde_type:    "sde" (the paper's SDE above) or "cps" (coefficients-preserving sampling, below).

    Returns (x_next, log_prob, mean, std), all float32:  x_next (B, *D), log_prob (B,), mean (B, *D),
    std broadcastable against x (a scalar or (B, 1, …, 1)).  For a = 0 the step is deterministic and has no
    density: log_prob is returned as NaN so that it can never be trained on by accident.

    On reduce="mean": the reference implementation (and ddpo-pytorch before it) averages the per-element
    log-density over the C·H·W latent elements instead of summing. The PPO ratio exp(logp_new − logp_old) then is
    the per-element *geometric mean* of the density ratios, the 1/(C·H·W) power of the true ratio. For SD3 at
    512 px (16·64·64 = 65 536 elements) the true ratio moves 65 536 times faster in log space, so a clip range
    like 1e-4 would be hit by any update; the maintainers report that summing with a rescaled clip range was
    unstable. At r = 1 (the first update of an epoch) the gradient direction of the unclipped objective is
    unchanged, only scaled by 1/(C·H·W), and approximately so while the ratios stay near 1; what
    changes is where clipping starts.
    """
    if not noise_level >= 0:  # also catches NaN
        raise ValueError(f"noise_level must be >= 0 (it scales the SDE's noise), got {noise_level}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if x.shape != v.shape:
        raise ValueError(f"x and v must have the same shape, got {tuple(x.shape)} and {tuple(v.shape)}")
    if prev_x is not None and prev_x.shape != x.shape:
        raise ValueError(f"prev_x must have the shape of x {tuple(x.shape)}, got {tuple(prev_x.shape)}")

    # bf16/fp16 overflow and lose the small differences the ratio is made of: do the step in float32.
    x, v = x.float(), v.float()
    t, t_next = _per_sample(t, x), _per_sample(t_next, x)
    dt = t_next - t  # < 0: we integrate from noise (t = 1) to data (t = 0)
    # checked here only where it is free: on a GPU, reading dt back would stall the hot loop once per step (the
    # loop checks its schedule once, in rollout)
    if dt.device.type == "cpu" and torch.any(dt >= 0):
        raise ValueError("t_next must be smaller than t: sampling runs from t = 1 (noise) to t = 0 (data)")

    nan = torch.full(x.shape[:1], float("nan"), device=x.device)  # (B,) the "log-prob" of a deterministic step
    if noise_level == 0:
        # x' = x + v·dt                         (the Euler ODE step, diffusers' FlowMatchEulerDiscreteScheduler)
        mean = x + v * dt
        return mean, nan, mean, torch.zeros_like(dt)

    if sde_type == "cps":
        mean, std = cps_mean_std(x, v, t, t_next, noise_level)
    elif sde_type == "sde":
        mean, std = sde_mean_std(x, v, t, t_next, noise_level)
    else:
        raise ValueError(f"sde_type must be 'sde' or 'cps', got {sde_type!r}")

    if prev_x is None:
        # x' = mean + std·ε
        # drawn where the generator lives (a CPU generator makes GPU runs reproduce CPU ones), then moved
        eps = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device).to(x.device)
        prev_x = mean + std * eps  # (B, *D)
    prev_x = prev_x.float()
    log_prob = gaussian_log_prob(prev_x, mean, std, reduce)  # (B,)
    # CPS's last step (t' = 0) has std 0: deterministic, no density (it is never trained: timestep_fraction)
    log_prob = torch.where(std.reshape(-1) > 0, log_prob, nan)
    return prev_x, log_prob, mean, std


def sde_mean_std(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
    """Mean and std of the paper's SDE step (equations at the top of this section)."""
    dt = t_next - t
    # σ_t = a·√(t/(1 − t)). At t = 1 this is infinite (the SDE's noise and its correcting drift both blow up).
    # Like the reference, we evaluate the 1/(1 − t) factor at t' instead when t = 1, which makes the first step
    # finite: its std is a·√(t/(1 − t'))·√(−dt) = a at t = 1, t' = 1 + dt (a fresh noise draw of scale a).
    # The price: near t = 1 the steps are not small compared to σ_t²·|dt| ≈ a²/j (step j of a uniform grid), so
    # there the marginal is only approximately preserved (the first step leaves variance ≈ 1 + a⁴/4 instead of
    # 1, whatever T); the drift pulls it back and at t = 0 the error shrinks with T (tests/test_math.py).
    t_for_denominator = torch.where(t >= 1, t_next, t)
    sigma = noise_level * torch.sqrt(t / (1 - t_for_denominator))  # σ_t

    # mean = x·(1 + σ²·dt/(2t)) + v·(1 + σ²·(1 − t)/(2t))·dt
    mean = x * (1 + sigma**2 * dt / (2 * t)) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt  # (B, *D)
    # std = σ_t·√(−dt)
    std = sigma * torch.sqrt(-dt)
    return mean, std


# CPS, coefficients-preserving sampling (a later sampler of the reference repository; sde_type="cps").
# Read both ends of the straight path off v:  x̂₀ = x − t·v  and  x̂₁ = x + (1 − t)·v.  Like DDIM with η > 0, move
# x̂₀ to t' and re-noise it with a mix of the predicted noise x̂₁ and fresh noise ε, choosing the coefficients so
# that the total noise scale is exactly t' (x_t' = (1 − t')·x₀ + t'·ε has noise coefficient t'):
#
#     std  = t'·sin(a·π/2)
#     mean = (1 − t')·x̂₀ + √(t'² − std²)·x̂₁            (√(t'² − std²)² + std² = t'²)
#
# If x̂₀ and x̂₁ were the true x₀ and ε, x' would have exactly the marginal at t' for ANY step size (tested with a
# point-mass target). With the model's x̂₀ = E[x₀ | x_t] (a posterior mean, less spread than x₀) it is not
# marginal-preserving: the noise it replaces per step does not shrink with dt, and on a Gaussian target the
# samples' variance stays ~30% short at a = 0.7 however many steps (tests/test_math.py); the SDE's error vanishes.
# What CPS buys is noise that never exceeds the scale the model was trained on. Its log-prob is the same exact Gaussian density (gaussian_log_prob). The
# reference keeps only −(x' − mean)² of it, dropping the −log std − log √(2π) constants (they cancel in the ratio
# and have no gradient: std does not depend on θ) and the 1/(2 std²) factor (a positive constant per step: the
# gradient of each step keeps its direction but is rescaled by 2 std², and so is the log-ratio the clip range is
# compared with). We keep the exact density, so "mean" and "sum" mean the same thing for both samplers.


def cps_mean_std(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
    """Mean and std of the coefficients-preserving step."""
    if noise_level > 1:
        raise ValueError(f"CPS needs 0 <= noise_level <= 1 (std = t'·sin(a·π/2)), got {noise_level}")
    x0_hat = x - t * v  # x̂₀ = x − t·v
    x1_hat = x + (1 - t) * v  # x̂₁ = x + (1 − t)·v
    # std = t'·sin(a·π/2)
    std = t_next * math.sin(noise_level * math.pi / 2)
    # mean = (1 − t')·x̂₀ + √(t'² − std²)·x̂₁
    mean = (1 - t_next) * x0_hat + torch.sqrt(t_next**2 - std**2) * x1_hat
    return mean, torch.as_tensor(std)


# ----------------------------------------------------------------------------------------------------------------
# --- 3. Rollout: integrate a velocity model from t = 1 to t = 0, keeping the whole trajectory ---
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    latents: Tensor  # (N, T+1, *D) float32: x at every t of the schedule; latents[:, 0] is the noise, [:, -1] the sample
    log_probs: Tensor  # (N, T) float32: log π(x_{j+1} | x_j) at sampling time (NaN for deterministic steps)
    sigmas: Tensor  # (T+1,) the schedule t₀ = 1 > … > t_T = 0
    noise_levels: Tensor  # (T,) the `a` used at each step (0 = ODE step, not trainable)
    means: Optional[Tensor] = None  # (N, T, *D) float32: each step's Gaussian mean (GRPO-Guard's μ_old), if kept


@torch.no_grad()
def rollout(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x1: Tensor,
    sigmas: Tensor,
    noise_level: float | Sequence[float],
    generator: Optional[torch.Generator] = None,
    reduce: str = "mean",
    sde_type: str = "sde",
    keep_means: bool = False,
) -> Trajectory:
    """Sample x₀ from noise x1 with sde_step over the schedule `sigmas` (T+1,), recording every latent (keep_means:
    every step's mean too, GRPO-Guard's μ_old; as much memory again as the latents, so only where it is needed).

    velocity(x, t) -> v takes x (N, *D) and per-sample times t (N,); whatever conditioning (prompt, CFG) it needs
    it closes over.  noise_level is one `a` for every step, or a length-T sequence (0 where the step is an ODE
    step: evaluation uses a = 0 everywhere; Flow-GRPO-Fast uses a > 0 only inside a window).
    """
    T = len(sigmas) - 1
    levels = [float(noise_level)] * T if isinstance(noise_level, (int, float)) else [float(a) for a in noise_level]
    if len(levels) != T:
        raise ValueError(f"need one noise level per step ({T}), got {len(levels)}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):  # once per rollout, not once per step
        raise ValueError(f"the schedule must decrease from t = 1 (noise) to t = 0 (data), got {sigmas.tolist()}")
    x = x1.float()
    latents, log_probs, means = [x], [], []
    for j in range(T):
        t = sigmas[j].expand(x.shape[0])  # (N,)
        v = velocity(x, t)
        x, log_prob, mean, _ = sde_step(x, v, sigmas[j], sigmas[j + 1], levels[j], None, generator, reduce, sde_type)
        latents.append(x)
        log_probs.append(log_prob)
        means += [mean] if keep_means else []
    return Trajectory(
        latents=torch.stack(latents, dim=1),  # (N, T+1, *D)
        log_probs=torch.stack(log_probs, dim=1),  # (N, T)
        sigmas=sigmas.float().cpu(),
        noise_levels=torch.tensor(levels),
        means=torch.stack(means, dim=1) if keep_means else None,  # (N, T, *D)
    )


# ----------------------------------------------------------------------------------------------------------------
# --- 4. Group-relative advantages (GRPO; paper §4) ---
# ----------------------------------------------------------------------------------------------------------------
# For the G samples of one prompt with rewards R₁…R_G:
#
#     A_i = (R_i − mean(R_group)) / (std + 1e-4)
#
# No value network: the group mean is the baseline. The SD3 configs of the reference take the std over ALL
# rewards of the epoch ("global std") and the mean per prompt, which keeps the advantages of a nearly constant
# group small instead of blowing its noise up to unit scale. Every step of a trajectory gets the same advantage.

ADV_EPS = 1e-4  # keeps A finite for a group with (near-)equal rewards; a constant group then gets exactly 0


def group_advantages(
    rewards: Tensor, group_ids: Tensor | Sequence, global_std: bool = False, clip: float = 5.0
) -> Tensor:
    """GRPO advantages (N,) from rewards (N,) and the group (prompt) of each sample: a (N,) integer tensor or a
    sequence of N hashable keys, e.g. the prompt strings."""
    # float64: in float32 the mean of a constant group can be off by one ulp δ, and δ/(|δ| + 1e-4) is not 0
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    if not torch.is_tensor(group_ids):
        index = {}
        group_ids = torch.tensor([index.setdefault(g, len(index)) for g in group_ids])
    if group_ids.shape != rewards.shape:
        raise ValueError(f"need one group id per reward: {tuple(group_ids.shape)} ids for {tuple(rewards.shape)} rewards")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; refusing to compute advantages from them")
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError(
            "every group needs at least 2 samples (a group of one always has advantage 0 and teaches nothing); "
            f"group sizes are {counts.tolist()}"
        )
    n_groups = len(counts)
    # mean(R_group) for every sample's group                                          (N,)
    group_sum = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, rewards)
    group_mean = (group_sum / counts)[inverse]
    if global_std:
        # std over every reward of the batch (population std, as numpy's np.std)
        std = rewards.std(unbiased=False)
    else:
        # std within the group (population std)                                       (N,)
        group_var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, (rewards - group_mean) ** 2) / counts
        std = group_var.sqrt()[inverse]
    # A = (R − mean) / (std + 1e-4), clipped to ±clip so that one outlier cannot dominate a step
    advantages = (rewards - group_mean) / (std + ADV_EPS)
    return advantages.clamp(-clip, clip).float()  # (N,)


# ----------------------------------------------------------------------------------------------------------------
# --- 5. The clipped surrogate loss with the KL penalty (paper §4, J_Flow-GRPO) ---
# ----------------------------------------------------------------------------------------------------------------
#     r = π_θ(x' | x) / π_old(x' | x) = exp(logp_new − logp_old)
#     L_clip = mean( max( −A·r, −A·clip(r, 1 − ε, 1 + ε) ) )                    (PPO, minimised)
#     L = L_clip + β·KL( π_θ(·|x) ‖ π_ref(·|x) )
#
# Both policies of one step are Gaussians with the SAME std s (it depends only on t and a), so their KL has a
# closed form in which only the mean difference is left (per latent element, then averaged over elements, like
# the log-prob; the summed KL is C·H·W times larger):
#
#     exact:      KL = (μ_θ − μ_ref)² / (2 s²),        s = σ_t·√(−dt)  (SDE)   or   s = t'·sin(a·π/2)  (CPS)
#
# With μ_θ − μ_ref = (v_θ − v_ref)·(1 + σ_t²(1 − t)/(2t))·dt this is the paper's closed form
#     KL = (|dt|/2)·(1/σ_t + σ_t(1 − t)/(2t))²·(v_θ − v_ref)².
# The reference code does not compute that. Its sde_step_with_logprob returns std_dev_t = σ_t WITHOUT the √(−dt)
# (train_sd3.py then divides by 2·std_dev_t²), so for the SDE it penalises
#
#     reference:  KL_ref = (μ_θ − μ_ref)² / (2 σ_t²)  =  |dt| · exact            (3.7x to 25x smaller per step on
#                                                                                 the 10-step SD3 schedule)
# and the paper's β values (0.04 OCR/GenEval, 0.01 PickScore) were tuned on that form, so it is our default
# (--kl reference). For CPS its std_dev_t IS the step's std, so there both forms are the exact KL. --kl exact
# gives the exact per-step KL; a run with it needs a β about |dt| times smaller for the same pull.
#
# Samples whose advantage is exactly 0 (every image of the group scored the same) teach the policy term nothing
# and would still be pulled by the KL; the reference drops them before training. Here they get weight 0 (`mask`),
# which keeps the batch shapes of sampling (and so the first ratio exactly 1), and the loss is the mean over
# the samples that are kept.

# GRPO-Guard (--guard; arXiv 2510.22319; the reference's scripts/train_sd3_GRPO_Guard.py, run there with ε = 2e-6).
# The stored action is x' = μ_old + s·ε, so with Δ = μ_θ − μ_old the log-ratio of a step (element means) is
#     log r = mean(ε·Δ)/s − mean(Δ²)/(2s²)
# Its second term is ≤ 0 whatever the advantage (the ratio drifts below 1, so a positive-advantage sample rarely
# reaches 1 + ε and is rarely clipped) and its spread ∝ 1/s differs by step. The guard removes the drift and
# rescales by s, so the clip range bounds mean(ε·Δ) alike at every step, and reweights each step's policy loss by
# 1/|dt| (for the SDE Δ ∝ |dt|·Δv, so steps with a small |dt| would otherwise weigh less):
#     log r̂ = s·(log r + mean(Δ²)/(2s²)) = mean(ε·Δ),     L = (1/|dt|)·max(−A·r̂, −A·clip(r̂, 1 − ε, 1 + ε))


def guard_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """GRPO-Guard's log r̂ per sample (B,): log-probs (B,) averaged over elements, step means (B, *D), std s."""
    # log r̂ = s·(log r + mean(Δ²)/(2s²)); the drift term is the Gaussians' KL (gaussian_kl)
    return std.reshape(-1) * (log_prob - old_log_prob + gaussian_kl(mean, old_mean, std))  # (B,)


KL_FORMS = ("reference", "exact")


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL( N(mean, std²I) ‖ N(ref_mean, std²I) ) per sample (B,), averaged over the latent elements."""
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean and ref_mean shapes differ: {tuple(mean.shape)} vs {tuple(ref_mean.shape)}")
    # KL = ‖μ_θ − μ_ref‖² / (2 s²)   per element, then the mean over elements
    return (((mean - ref_mean) ** 2) / (2 * std**2)).mean(dim=tuple(range(1, mean.ndim)))


def step_kl(
    mean: Tensor, ref_mean: Tensor, std: Tensor, t: float | Tensor, t_next: float | Tensor, form: str = "reference",
    sde_type: str = "sde",
) -> Tensor:
    """The penalised KL of one step per sample (B,): `form` "exact" or "reference" (= |dt|·exact for the SDE)."""
    if form not in KL_FORMS:
        raise ValueError(f"kl form must be one of {KL_FORMS}, got {form!r}")
    kl = gaussian_kl(mean, ref_mean, std)  # exact
    if form == "reference" and sde_type == "sde":
        kl = kl * (t - t_next)  # (μ_θ − μ_ref)²/(2σ_t²) = |dt|·(μ_θ − μ_ref)²/(2σ_t²|dt|)
    return kl


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    kl: Optional[Tensor] = None,
    beta: float = 0.0,
    mask: Optional[Tensor] = None,
    log_ratio: Optional[Tensor] = None,
    policy_weight: float | Tensor = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The Flow-GRPO loss of one step for a batch. log_prob, old_log_prob, advantages, kl (the per-sample KL to the
    reference, step_kl) and mask (True = train on this sample): (B,). The loss is the mean over the masked-in
    samples. GRPO-Guard passes its log r̂ (B,) as log_ratio and 1/|dt| as policy_weight. Returns (loss, info) with
    info = {ratio, clipfrac, approx_kl, kl_ref, policy_loss} as detached 0-dim tensors, means over the same
    samples; they stay on the device (reading one is a host-device sync)."""
    if not (log_prob.shape == old_log_prob.shape == advantages.shape) or log_prob.ndim != 1:
        raise ValueError(
            "log_prob, old_log_prob and advantages must all have shape (B,), got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if beta != 0 and kl is None:
        raise ValueError("beta > 0 needs the per-sample KL (step_kl)")
    # weights w_i: 1/(number kept) for the samples trained on, 0 for the others                            (B,)
    keep = torch.ones_like(log_prob) if mask is None else mask.to(log_prob.dtype)
    w = keep / keep.sum().clamp(min=1)
    # r = exp(logp_new − logp_old)                                                                          (B,)
    ratio = torch.exp(log_prob - old_log_prob if log_ratio is None else log_ratio)
    # max(−A·r, −A·clip(r, 1 − ε, 1 + ε)): the pessimistic bound; no gradient once r has left [1 − ε, 1 + ε]
    # in the direction the advantage pushes it
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy_loss = policy_weight * (w * torch.maximum(unclipped, clipped)).sum()
    kl_ref = (w * kl).sum() if kl is not None else torch.zeros((), device=log_prob.device)
    loss = policy_loss + beta * kl_ref

    with torch.no_grad():
        info = {
            "ratio": (w * ratio).sum(),
            # fraction of samples whose ratio left the trust region
            "clipfrac": (w * (torch.abs(ratio - 1) > clip_range).float()).sum(),
            # ½·E[(log r)²]: a low-variance estimate of KL(π_old ‖ π_θ) (http://joschu.net/blog/kl-approx.html)
            "approx_kl": (w * 0.5 * (log_prob - old_log_prob) ** 2).sum(),
            "kl_ref": kl_ref.detach(),
            "policy_loss": policy_loss.detach(),
        }
    return loss, info


# ----------------------------------------------------------------------------------------------------------------
# --- 6. Batch arithmetic: every derived size in one place, printed at start-up and checked ---
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BatchPlan:
    images_per_epoch: int  # N = B·G
    batches_per_epoch: int  # N / batch_size forwards per denoising step (sampling) and per trained step (training)
    accumulation: int  # batches whose gradients are summed into one optimiser step
    optimizer_steps_per_epoch: int  # inner_epochs · batches_per_epoch / accumulation
    n_trained: int  # denoising steps trained per trajectory (which ones: sde_window)
    forwards_per_epoch: int  # velocity calls per epoch: sampling + training (+ reference); CFG doubles their rows
    world_size: int  # processes sharing the work (torchrun); counts above are for all of them together

    def describe(self, cfg: Config) -> str:
        parts = [
            f"batch plan: {cfg.groups_per_epoch} groups x {cfg.group_size} images = {self.images_per_epoch} images/epoch",
            f"{self.batches_per_epoch} batches of {cfg.batch_size}"
            + (f" ({self.batches_per_epoch // self.world_size} per process x {self.world_size})" if self.world_size > 1 else ""),
            f"{self.accumulation} batches x {self.n_trained} steps accumulated per optimiser step",
            f"{self.optimizer_steps_per_epoch} optimiser steps/epoch",
            f"{self.n_trained} of {cfg.num_steps} steps trained"
            + (f" (Fast: a window per batch in steps {cfg.fast_window_start}..{cfg.fast_window_range - 1})" if cfg.fast_window else ""),
            f"{self.forwards_per_epoch} model calls/epoch",
        ]
        return " | ".join(parts)


def plan_batches(cfg: Config, world_size: Optional[int] = None) -> BatchPlan:
    """Derive and check every batch size for `world_size` processes (default: the current process group).
    Raises ValueError saying which numbers do not fit and how to fix them."""
    world = dist_rank_world()[1] if world_size is None else world_size
    check_flags(cfg)  # every number in its range, every choice one of its values (recipes.py)
    if cfg.noise_level <= 0:
        raise ValueError(f"--noise_level must be > 0 to train (a = 0 is the deterministic ODE), got {cfg.noise_level}")
    if cfg.sde_type == "sde" and cfg.noise_level >= math.sqrt(2):
        # the first step's mean is x·(1 − a²/2) + …: at a ≥ √2 it no longer points from the noise towards the data
        raise ValueError(f"--noise_level must be < √2 ≈ 1.414 for the SDE (its first step's mean is x·(1 − a²/2) + ...; "
                         f"the reference uses 0.7 to 0.9), got {cfg.noise_level}")  # fmt: skip
    n = cfg.groups_per_epoch * cfg.group_size
    if n % cfg.batch_size:
        raise ValueError(
            f"groups_per_epoch x group_size = {cfg.groups_per_epoch} x {cfg.group_size} = {n} images is not a "
            f"multiple of --batch_size {cfg.batch_size}; choose a batch size that divides {n}"
        )
    batches = n // cfg.batch_size
    if batches % cfg.optimizer_steps_per_epoch:
        raise ValueError(
            f"{batches} batches per epoch cannot be split into --optimizer_steps_per_epoch "
            f"{cfg.optimizer_steps_per_epoch} equal accumulation rounds; choose a divisor of {batches}"
        )
    if (batches // cfg.optimizer_steps_per_epoch) % world:
        # processes x per-process batches x batch size = groups x G, for every optimiser step
        raise ValueError(
            f"{world} processes cannot share an optimiser step of {batches // cfg.optimizer_steps_per_epoch} batches "
            f"of {cfg.batch_size} equally: need processes x batches-per-process x batch_size = groups_per_epoch x "
            f"group_size / optimizer_steps_per_epoch; change --groups_per_epoch, --batch_size or "
            f"--optimizer_steps_per_epoch (or the number of processes)"
        )
    if cfg.fast_window:
        if not (1 <= cfg.fast_window and 0 <= cfg.fast_window_start
                and cfg.fast_window_start + cfg.fast_window <= cfg.fast_window_range <= cfg.num_steps - 1):  # fmt: skip
            raise ValueError(
                f"Flow-GRPO-Fast needs 1 <= --fast_window ({cfg.fast_window}), 0 <= --fast_window_start "
                f"({cfg.fast_window_start}), fast_window_start + fast_window <= --fast_window_range "
                f"({cfg.fast_window_range}) <= num_steps - 1 ({cfg.num_steps - 1}; the last step is never trained)"
            )
        n_train = cfg.fast_window
    else:
        # int(T·fraction), as the reference: 0.99 of 10 steps trains steps 0..8 and skips the sharpest last step
        n_train = int(cfg.num_steps * cfg.timestep_fraction)
        if not 1 <= n_train <= cfg.num_steps:
            raise ValueError(
                f"--timestep_fraction {cfg.timestep_fraction} of {cfg.num_steps} steps trains {n_train} steps; need >= 1"
            )
    if cfg.sde_type == "cps" and (cfg.noise_level > 1 or (n_train > cfg.num_steps - 1 and not cfg.fast_window)):
        # CPS's last step (t' = 0) has std 0: no density to train on
        raise ValueError(
            f"CPS needs --noise_level <= 1 (got {cfg.noise_level}) and must not train the last step: "
            f"--timestep_fraction {cfg.timestep_fraction} trains {n_train} of {cfg.num_steps}; use 0.99"
        )
    if cfg.kl not in KL_FORMS:
        raise ValueError(f"--kl must be one of {', '.join(KL_FORMS)}, got {cfg.kl!r}")
    if cfg.guard and (cfg.sde_type, cfg.log_prob_reduce) != ("sde", "mean"):  # as verl-omni: its 1/|dt| is the SDE's
        raise ValueError("--guard needs --sde_type sde and --log_prob_reduce mean (its drift term is an element mean)")
    ref_factor = 2 if cfg.resolved_beta() > 0 else 1  # the reference forward for the KL
    forwards = batches * cfg.num_steps + cfg.inner_epochs * batches * n_train * ref_factor  # sampling + training
    return BatchPlan(
        images_per_epoch=n,
        batches_per_epoch=batches,
        accumulation=batches // cfg.optimizer_steps_per_epoch,
        optimizer_steps_per_epoch=cfg.inner_epochs * cfg.optimizer_steps_per_epoch,
        n_trained=n_train,
        forwards_per_epoch=forwards,
        world_size=world,
    )


# ----------------------------------------------------------------------------------------------------------------
# --- 7. The model interface the training loop talks to ---
# ----------------------------------------------------------------------------------------------------------------
# The loop below is written once. A model (the 2D toy in toy/run.py, SD3.5-M in section 10) plugs in by
# providing these methods; "cond" is a dict of batch-first tensors, one row per prompt.


class FlowModel:
    """What the training loop needs from a flow-matching model. Subclasses implement every method."""

    latent_shape: tuple[int, ...]  # D, the shape of one latent
    net: torch.nn.Module  # the module whose forward velocity() calls; under torchrun the loop wraps it in DDP

    def schedule(self, num_steps: int) -> Tensor:
        """The (num_steps + 1,) t-schedule from 1 to 0 that this model samples with."""
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Prompt conditioning, one row per prompt (computed once per prompt and shared by its group)."""
        raise NotImplementedError

    def velocity(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The guided velocity v(x, t | prompt) under the CURRENT weights: x (N, *D), t (N,), cond rows (N, ...)."""
        raise NotImplementedError

    def reference(self) -> contextlib.AbstractContextManager:
        """A context inside which velocity() is the frozen pre-trained model (the KL's reference policy)."""
        raise NotImplementedError

    def decode(self, x0: Tensor) -> Tensor:
        """Final latents (N, *D) to what the reward reads (images (N, 3, H, W) in [0, 1] for SD3)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def save_weights(self, folder: str) -> None:
        """Write the trained weights (SD3: a LoRA folder diffusers' load_lora_weights reads)."""
        raise NotImplementedError

    def load_weights(self, folder: str) -> None:
        raise NotImplementedError


def select(cond: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """Rows `index` of every tensor in cond."""
    return {k: v[index.to(v.device)] for k, v in cond.items()}


# ----------------------------------------------------------------------------------------------------------------
# --- 8. Many processes (torchrun + torch.distributed + DistributedDataParallel) ---
# ----------------------------------------------------------------------------------------------------------------
# `torchrun --nproc_per_node R flow_grpo.py ...` starts R copies of this script. Every copy draws the same prompts
# and the same per-batch noise seeds (shared seed), samples the batches m ≡ rank (mod R), all-gathers the rewards
# so that GRPO's group statistics see every sample of a group, trains on its own batches, and lets DDP average
# the gradients. Only rank 0 writes logs, images and checkpoints. A plain `python flow_grpo.py` is the R = 1 case
# of the same code. NCCL on GPUs, gloo on CPUs.


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed has been initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_by_id(values: Tensor, ids: Tensor, n: int, device) -> Tensor:
    """All processes' `values` (n_r,) for global sample ids `ids` (n_r,), assembled into one (n,) tensor."""
    import torch.distributed as dist

    world = dist_rank_world()[1]
    out = torch.empty(n, dtype=values.dtype)
    if world == 1:
        out[ids] = values
        return out
    # NCCL moves only GPU tensors; gloo only CPU ones
    dev = device if torch.device(device).type == "cuda" else "cpu"
    parts_v = [torch.empty_like(values, device=dev) for _ in range(world)]
    parts_i = [torch.empty_like(ids, device=dev) for _ in range(world)]
    dist.all_gather(parts_v, values.to(dev))
    dist.all_gather(parts_i, ids.to(dev))
    out[torch.cat(parts_i).cpu()] = torch.cat(parts_v).cpu()
    return out


def all_reduce_sum(x: Tensor, device) -> Tensor:
    import torch.distributed as dist

    dev = device if torch.device(device).type == "cuda" else "cpu"
    x = x.to(dev)
    dist.all_reduce(x)
    return x.cpu()


def wrap_ddp(model: FlowModel, device) -> None:
    """model.net in DistributedDataParallel: gradients averaged over processes on backward, every process starting
    from rank 0's weights. No buffers to sync on every forward: the frozen networks have none that change."""
    if not isinstance(model.net, torch.nn.parallel.DistributedDataParallel):
        device_ids = [device] if torch.device(device).type == "cuda" else None
        model.net = compat.ddp_without_buffer_sync(model.net, device_ids)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


# ----------------------------------------------------------------------------------------------------------------
# --- 9. The training loop (paper Algorithm: sample groups → rewards → advantages → clipped updates) ---
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Samples:
    """One epoch of sampled data: everything the training phase needs, batch-first. n = N rows in one process,
    N/R rows in each of R processes (rewards are kept whole: every process has all N)."""

    prompt_index: Tensor  # (n,) which of the epoch's B prompts each sample belongs to (its group)
    latents: Tensor  # (n, T+1, *D)
    log_probs: Tensor  # (n, T)
    sigmas: Tensor  # (T+1,)
    noise_levels: Tensor  # (n, T) the a of each row's steps (Fast: 0 outside its batch's window)
    trained_steps: list[list[int]]  # for each batch of `batches`: its SDE steps j that are trained
    rewards: Tensor  # (N,) all processes' rewards, in global sample order
    reward_seconds: float  # time the sampling phase waited for decoding and scoring (what denoising did not hide)
    reward_parts: dict[str, Tensor]  # name -> (N,) for a weighted-sum reward
    advantages: Tensor  # (n,)
    kept_per_batch: Tensor  # (N/b,) how many samples of each batch m have advantage ≠ 0 (all processes' batches)
    cond: dict[str, Tensor]  # the epoch's prompt conditioning, one row per prompt (B, ...)
    sample_ids: Tensor  # (n,) the global ids (0..N−1) of this process's rows
    batches: list[int]  # the batches m (of N/b) this process sampled, in row order
    means: Optional[Tensor] = None  # (n, T, *D) each step's mean at sampling time; kept only for --guard


class EMA:
    """Exponential moving average of the trainable weights, with a warm-up of its decay (the reference's ema.py):

        after optimiser step s (s = steps taken so far), if (s + 1) % every == 0:
            d = min((1 + s)/(10 + s), decay)                 (8/17 ≈ 0.47 at s = 7, reaching 0.9 from s = 80)
            w_ema ← d·w_ema + (1 − d)·w

    The warm-up lets the EMA forget the initial weights quickly instead of keeping 90% of them per update.
    The reference calls its EMA step once per training BATCH with the optimiser-step count, so with A batches per
    optimiser step it applies the same update A times to unchanged weights: an effective decay d^A that depends
    on how many batches each GPU holds. We apply it once per optimiser step, the decay the schedule states."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int = 1):
        self.params, self.decay, self.every = params, decay, every
        self.shadow = [p.detach().clone().float() for p in params]

    def decay_at(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Called after every optimiser step with the number of steps taken so far."""
        if (step + 1) % self.every:
            return
        d = self.decay_at(step)
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for evaluation and saving)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)


def draw_prompts(prompts: list[Prompt], k: int, seed: int, epoch: int) -> list[Prompt]:
    """The epoch's k prompts, drawn without replacement (cycling if the set is small) from a seeded RNG, so a
    resumed run or another process sees the same prompts for the same epoch."""
    rng = random.Random(seed * 100_003 + epoch)
    order: list[Prompt] = []
    while len(order) < k:
        order += rng.sample(prompts, len(prompts))
    return order[:k]


def sde_window(cfg: Config, generator: torch.Generator) -> tuple[list[float], list[int]]:
    """Which steps of one sampling batch's trajectories are stochastic, and which of them are trained.

    Flow-GRPO: every step is an SDE step; the first int(T·timestep_fraction) are trained.
    Flow-GRPO-Fast: only a window of `fast_window` consecutive steps is stochastic; the ODE runs elsewhere, and only
    the window is trained, so training costs fast_window instead of ~T forwards per trajectory. Its start is uniform
    over fast_window_start … fast_window_range − fast_window, as the reference's Fast pipeline draws it once per
    sampling batch (sd3_pipeline_with_logprob_fast.py, in the fork zhtmike/flow_grpo at 3d02fd9: start =
    random.randint(lo, hi − size) for sde_window_range = (lo, hi)). Returns ((T,) levels, steps)."""
    T, a = cfg.num_steps, cfg.noise_level
    if not cfg.fast_window:
        return [a] * T, list(range(int(T * cfg.timestep_fraction)))
    start = int(torch.randint(cfg.fast_window_start, cfg.fast_window_range - cfg.fast_window + 1, (1,), generator=generator))
    window = list(range(start, start + cfg.fast_window))
    return [a if j in window else 0.0 for j in range(T)], window


@torch.no_grad()
def sample_epoch(
    cfg: Config, model: FlowModel, reward_fn: Callable, prompts: list[Prompt], generator: torch.Generator, device
) -> Samples:
    """Phase 1 of an epoch: G trajectories for each of B prompts, their rewards and advantages.

    The N = B·G samples are shuffled once into N/b batches; batch m gets its own noise seed, so what a sample
    looks like does not depend on how many processes share the work. With R processes (torchrun), process r
    samples the batches m ≡ r (mod R); rewards are all-gathered so that every group's mean and std are computed
    over all its G samples, wherever they were drawn; each process keeps the rows of its own batches."""
    rank, world = dist_rank_world()
    B, G, b = len(prompts), cfg.group_size, cfg.batch_size
    N = B * G
    # the same draws on every process: sample order, one noise seed per batch
    order = torch.randperm(N, generator=generator)  # (N,) batch m holds samples order[m·b : (m+1)·b]
    batch_seeds = torch.randint(0, 2**62, (N // b,), generator=generator)  # (N/b,)
    my_batches = list(range(rank, N // b, world))
    # conditioning computed once per prompt and shared by the G samples of its group
    cond = model.encode([p.text for p in prompts])  # rows (B, ...)
    group_of = torch.arange(B).repeat_interleave(G)  # (N,): sample i belongs to prompt (group) i // G
    sigmas = model.schedule(cfg.num_steps).to(device)  # (T+1,)
    latents, log_probs, levels, windows, scored, waited, means = [], [], [], [], [], [], []  # waited: s spent waiting for rewards

    @torch.no_grad()  # grad mode is per thread: the worker's is on
    def finish(x0: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # one batch's rewards, in the worker
        # a NaN image can still get a finite reward (a JPEG size): never score or train on a diverged model's samples
        if not bool(torch.isfinite(x0).all()):
            raise DivergenceError("the sampled latents hold NaN/inf: the model diverged; --resume from an earlier checkpoint")
        return score(reward_fn, model.decode(x0), [prompts[i].text for i in idx], [prompts[i].metadata for i in idx])

    def collect(job) -> None:  # wait for a batch's rewards; its RewardError or DivergenceError is raised here
        t_wait = time.time()
        scored.append(job.result())  # (rewards (b,), {name: (b,)})
        waited.append(time.time() - t_wait)

    from tqdm import tqdm

    # Batch m is decoded and scored in a worker thread while batch m + 1 is denoised (the reference scores in a thread
    # pool too: scripts/train_sd3.py, executor.submit(reward_fn, ...)): on a GPU, the CPU's JPEG encoding and reward
    # code then run while the GPU denoises instead of leaving it idle. One worker: a reward sees one batch at a time.
    with ThreadPoolExecutor(max_workers=1) as pool:
        job = None
        for m in tqdm(my_batches, desc="sampling", leave=False, disable=rank != 0 or not sys.stderr.isatty()):
            stop_point()  # SIGTERM/SIGINT: the run stops here (runfiles.py), the last finished epoch saved
            ids = order[m * b : (m + 1) * b]  # (b,) global sample ids
            idx = group_of[ids]  # (b,) their prompts
            cond_b = select(cond, idx)
            noise = torch.Generator().manual_seed(int(batch_seeds[m]))
            # Fast: this batch's own window, from its own seed (the reference draws one per sampling batch)
            levels_m, steps = sde_window(cfg, noise)  # (T,) noise level per step, and the steps to train
            x1 = torch.randn((b, *model.latent_shape), generator=noise).to(device)  # (b, *D)
            velocity = lambda x, t: model.velocity(x, t, cond_b)  # noqa: E731
            traj = rollout(velocity, x1, sigmas, levels_m, noise, cfg.log_prob_reduce, cfg.sde_type, keep_means=cfg.guard)
            if job is not None:
                collect(job)
            job = pool.submit(finish, traj.latents[:, -1], idx)
            latents.append(traj.latents)
            log_probs.append(traj.log_probs)
            levels.append(traj.noise_levels.expand(b, -1))
            windows.append(steps)
            means += [traj.means] if cfg.guard else []  # μ_old, for GRPO-Guard only
        collect(job)
    rewards, parts = [r for r, _ in scored], [c for _, c in scored]
    my_ids = torch.cat([order[m * b : (m + 1) * b] for m in my_batches])  # (n,) n = N/R samples of this process
    # every process needs every reward: the group statistics span processes                 (N,) in sample order
    all_rewards = gather_by_id(torch.cat(rewards), my_ids, N, device)
    all_parts = {k: gather_by_id(torch.cat([p[k] for p in parts]), my_ids, N, device) for k in parts[0]}
    # A_i = (R_i − mean of its group) / (std + 1e-4), clipped; computed identically on every process
    advantages = group_advantages(all_rewards, group_of, cfg.global_std, cfg.adv_clip)  # (N,)
    return Samples(
        prompt_index=group_of[my_ids],  # (n,)
        latents=torch.cat(latents),  # (n, T+1, *D)
        log_probs=torch.cat(log_probs),  # (n, T)
        sigmas=sigmas,
        noise_levels=torch.cat(levels),  # (n, T)
        trained_steps=windows,
        rewards=all_rewards,
        reward_seconds=sum(waited),
        reward_parts=all_parts,
        advantages=advantages[my_ids],  # (n,)
        kept_per_batch=(advantages[order].reshape(N // b, b) != 0).sum(dim=1),  # (N/b,)
        cond=cond,
        sample_ids=my_ids,
        batches=my_batches,
        means=torch.cat(means) if means else None,  # (n, T, *D)
    )


TRAIN_INFO = ("ratio", "clipfrac", "approx_kl", "kl_ref", "policy_loss")  # grpo_loss's diagnostics, in this order


def train_epoch(
    cfg: Config,
    plan: BatchPlan,
    model: FlowModel,
    s: Samples,
    optimizer: torch.optim.Optimizer,
    on_optimizer_step: Callable[[], None] = lambda: None,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> dict[str, float]:
    """Phase 2 of an epoch: PPO-style clipped updates on every trained step of the stored trajectories.

    Training reuses the sampling batches (same rows, same batch size): a recomputed log-prob sees exactly the
    batch it was sampled in, so the first ratio is exactly 1 even for a network whose output depends on the batch
    (the reference's FAQ warns about that for SD3). Optimiser step k accumulates the gradients of batches
    [k·A, (k+1)·A) (A = plan.accumulation); with R processes each does its A/R of them and DDP averages.

    Samples with advantage exactly 0 get weight 0 (section 5). Every kept (sample, step) term of an optimiser step
    weighs the same, as if the others had been dropped: batch m's loss (a mean over its k_m kept samples) is
    scaled by R·k_m / (K·S), K the kept samples of the step's batches on all processes, S the trained steps (R:
    DDP averages over processes). A step with K = 0 is not taken.
    The diagnostics stay on the device; they and the divergence check are read once per optimiser step.
    Returns the epoch's mean diagnostics (averaged over processes)."""
    rank, world = dist_rank_world()
    params = model.trainable_parameters()
    beta = cfg.resolved_beta()
    b, acc, S = cfg.batch_size, plan.accumulation, plan.n_trained  # S steps in every batch (Fast: its own window)
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)  # disabled: every call is a pass-through
    device = s.latents.device
    ddp = getattr(model, "net", None) if world > 1 else None
    row_of = {m: i * b for i, m in enumerate(s.batches)}  # batch m → its first row in this process's tensors
    steps_of = dict(zip(s.batches, s.trained_steps))  # batch m → the steps it trains
    advantages, prompt_index = s.advantages.to(device), s.prompt_index.to(device)  # (n,), moved once
    sums = torch.zeros(len(TRAIN_INFO) + 1, dtype=torch.float64, device=device)  # Σ k_m·info per term, Σ k_m
    grad_norms = []
    from tqdm import tqdm

    for _ in range(cfg.inner_epochs):
        for k in tqdm(range(cfg.optimizer_steps_per_epoch), desc="training", leave=False, disable=rank != 0 or not sys.stderr.isatty()):
            kept = int(s.kept_per_batch[k * acc : (k + 1) * acc].sum())  # K, over every process's batches
            if kept == 0:  # every sample of this step has advantage 0: nothing to learn (every process agrees)
                continue
            mine = [m for m in range(k * acc, (k + 1) * acc) if m in row_of]
            loss_sum = torch.zeros((), device=device)
            for i, m in enumerate(mine):
                stop_point()
                rows = slice(row_of[m], row_of[m] + b)  # a view, no copy
                cond_b = select(s.cond, prompt_index[rows])
                adv = advantages[rows]  # (b,) the same advantage at every step of a trajectory
                k_m = int(s.kept_per_batch[m])
                for jj, j in enumerate(steps_of[m]):
                    # DDP all-reduces gradients on a backward; only the step's last one needs to (no_sync)
                    last = i == len(mine) - 1 and jj == S - 1
                    with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                        loss, info = train_step(cfg, model, s, rows, j, cond_b, adv, beta)
                        scaler.scale(loss * (world * k_m / (kept * S))).backward()
                    loss_sum = loss_sum + loss.detach() * k_m
                    sums += torch.stack([info[key] for key in TRAIN_INFO] + [loss.new_ones(())]).to(sums) * k_m
            scaler.unscale_(optimizer)  # fp16 only: undo the loss scale before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            # the one host-device sync of an optimiser step: stop before a non-finite update reaches the weights
            # (under fp16 an overflowing gradient is expected now and then: the scaler skips that step itself)
            loss_value, norm_value = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()
            if not math.isfinite(loss_value) or (not scaler.is_enabled() and not math.isfinite(norm_value)):
                raise DivergenceError(
                    f"optimiser step {k + 1} of this epoch: loss {loss_value}, gradient norm {norm_value}; no update "
                    f"was applied. Lower --lr (now {cfg.lr:g}) and --resume from the last checkpoint"
                )
            grad_norms.append(norm_value)
            scaler.step(optimizer)  # = optimizer.step(), skipped by fp16's scaler if a gradient overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            on_optimizer_step()
    stats = torch.cat([sums.cpu(), torch.tensor([sum(grad_norms), len(grad_norms)], dtype=torch.float64)])
    if world > 1:  # every process logs the same numbers: the means over all processes' batches
        stats = all_reduce_sum(stats, device)
        stats[-2:] /= world  # every process saw the same gradient norms
    # NaN (null in metrics.jsonl) where nothing was measured: no sample had an advantage ≠ 0
    out = {key: (stats[i] / stats[len(TRAIN_INFO)]).item() if stats[len(TRAIN_INFO)] > 0 else math.nan for i, key in enumerate(TRAIN_INFO)}
    out["grad_norm"] = (stats[-2] / stats[-1]).item() if stats[-1] > 0 else math.nan
    out["kl_ref"] = out["kl_ref"] if beta > 0 else math.nan  # β = 0: no KL computed, so none logged (null, not 0)
    return out


def train_step(
    cfg: Config, model: FlowModel, s: Samples, rows: slice, j: int, cond_b: dict, adv: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of denoising step j for the trajectories `rows` (a mean over those with advantage ≠ 0)."""
    x_j = s.latents[rows, j]  # (b, *D)
    x_next = s.latents[rows, j + 1]  # (b, *D) the action that was taken
    t, t_next = s.sigmas[j], s.sigmas[j + 1]
    a = float(s.noise_levels[rows.start, j])
    ref_mean = None
    if beta > 0:
        # reference policy: the same network with the trainable delta switched off
        with torch.no_grad(), model.reference():
            v_ref = model.velocity(x_j, t.expand(len(adv)), cond_b)
        _, _, ref_mean, _ = sde_step(x_j, v_ref, t, t_next, a, x_next, sde_type=cfg.sde_type)
    v = model.velocity(x_j, t.expand(len(adv)), cond_b)
    # log π_θ(x_{j+1} | x_j) under the current weights
    _, log_prob, mean, std = sde_step(x_j, v, t, t_next, a, x_next, reduce=cfg.log_prob_reduce, sde_type=cfg.sde_type)
    kl = None if ref_mean is None else step_kl(mean, ref_mean, std, t, t_next, cfg.kl, cfg.sde_type)  # (b,)
    old = s.log_probs[rows, j]  # (b,) log π_old, stored at sampling time
    # GRPO-Guard (section 5): the drift-corrected, std-rescaled log-ratio, and the step's policy term weighted 1/|dt|
    guard = (guard_log_ratio(log_prob, old, mean, s.means[rows, j], std), 1 / (t - t_next)) if cfg.guard else (None, 1.0)
    # fp16 only (the caller scales the loss): dL/dv is ~1e-8 (a log-prob averaged over 65 536 elements), below
    # fp16's smallest normal number, so the scaler multiplies the loss before backward
    return grpo_loss(log_prob, old, adv, cfg.clip_range, kl, beta, adv != 0, *guard)


@torch.no_grad()
def evaluate(cfg: Config, model: FlowModel, reward_fn: Callable, prompts: list[Prompt], device) -> tuple[Tensor, Tensor, dict]:
    """Deterministic evaluation: one ODE sample (a = 0) per prompt with eval_num_steps steps and fixed noise, so
    evaluations of different epochs differ only by the weights. Returns (rewards (n,), decoded samples, what
    score() logs beside the rewards {key: (n,)})."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    sigmas = model.schedule(cfg.eval_num_steps).to(device)
    cond = model.encode([p.text for p in prompts])
    rewards, outputs, parts = [], [], []
    for start in range(0, len(prompts), cfg.batch_size):
        stop_point()
        # every forward has batch_size rows, as in training (a compiled model then needs no graph for another shape):
        # the last batch is padded with copies of its last prompt, whose results are dropped
        n = min(cfg.batch_size, len(prompts) - start)
        idx = torch.arange(start, start + cfg.batch_size).clamp(max=len(prompts) - 1)  # (b,)
        cond_b = select(cond, idx)
        x1 = torch.randn((len(idx), *model.latent_shape), generator=generator).to(device)
        traj = rollout(lambda x, t: model.velocity(x, t, cond_b), x1, sigmas, 0.0, generator)
        decoded = model.decode(traj.latents[:n, -1])
        batch = [prompts[i] for i in idx[:n]]
        r, logged = score(reward_fn, decoded, [p.text for p in batch], [p.metadata for p in batch])
        rewards.append(r)
        parts.append(logged)
        outputs.append(decoded.cpu())
    return torch.cat(rewards), torch.cat(outputs), {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def train(
    cfg: Config,
    model: FlowModel,
    reward_fn: Callable,
    prompts: list[Prompt],
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    on_eval: Optional[Callable[[int, Tensor, Tensor, list[Prompt]], None]] = None,
    eval_prompts: Optional[list[Prompt]] = None,
) -> list[dict]:
    """Flow-GRPO. For each epoch: draw B prompts, sample G trajectories each with the SDE, score them, compute
    group advantages, then take clipped policy-gradient steps on the stored trajectories. Writes metrics.jsonl
    and checkpoints into cfg.out. Returns the per-epoch metrics. Evaluation uses `eval_prompts` (the command
    line passes held-out ones), or the training prompts if None (the toy: its 4 prompts are its whole world).

    Under torchrun (torch.distributed initialised) every process runs this same function: see section 8."""
    rank, world = dist_rank_world()
    plan = plan_batches(cfg, world)
    if not prompts:
        raise ValueError("the prompt list is empty: give --prompts a file with at least one prompt")
    resume = open_run(cfg, rank)  # --out locked for this run; the checkpoint to continue from (checked), or None
    if rank != 0:
        log = lambda line: None  # noqa: E731  only rank 0 prints, writes metrics, images and checkpoints
        on_eval = None
    log(plan.describe(cfg))
    if world > 1:
        wrap_ddp(model, device)  # DDP averages the gradients over processes on backward
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_eps
    )
    ema = EMA(params, cfg.ema_decay, cfg.ema_every) if cfg.ema else None
    undo = EpochUndo(cfg, model, optimizer, ema, rank, device)  # what a SIGTERM/SIGINT puts back and saves
    # loss scaling for fp16 networks on a GPU (bf16 has float32's exponent range and needs none)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16" and torch.device(device).type == "cuda")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    epoch0, step = resume_run(resume, model, optimizer, ema, cfg, log) if resume else (0, 0)
    if rank == 0:
        claim_metrics(metrics_path, epoch0 if resume else None, log)
        watch = RunWatch(cfg, epoch0, log)  # run.json, the trackers, curves.png (watch.py)
    pool = eval_prompts or prompts
    eval_set = draw_prompts(pool, min(cfg.eval_count or len(pool), len(pool)), cfg.seed, epoch=-1)
    state = {"step": step}

    def after_optimizer_step() -> None:
        state["step"] += 1
        if ema is not None:
            ema.step(state["step"])

    history, idle = [], 0  # idle: epochs in a row in which every advantage was 0
    for epoch in range(epoch0, cfg.epochs):
        t_start = time.time()
        undo.begin(epoch, state["step"])
        # one generator per epoch: a resumed run draws exactly the noise the uninterrupted run would have drawn
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        epoch_prompts = draw_prompts(prompts, cfg.groups_per_epoch, cfg.seed, epoch)
        samples = sample_epoch(cfg, model, reward_fn, epoch_prompts, generator, device)
        t_sampled = time.time()
        try:
            stats = train_epoch(cfg, plan, model, samples, optimizer, after_optimizer_step, scaler)
        except DivergenceError as e:
            raise DivergenceError(f"epoch {epoch}, {e}") from None
        t_trained = time.time()
        m: dict[str, Any] = {
            "epoch": epoch,
            "step": state["step"],
            "reward/mean": samples.rewards.mean().item(),
            "reward/std": samples.rewards.std(unbiased=False).item(),
            **{f"reward/{k}": v.nanmean().item() for k, v in samples.reward_parts.items()},
            **{f"policy/{k}": v for k, v in stats.items()},
            # samples whose group scored all alike (advantage exactly 0): not trained on (section 5)
            "policy/zero_adv_frac": 1 - samples.kept_per_batch.sum().item() / len(samples.rewards),
            "time/sampling_s": t_sampled - t_start - samples.reward_seconds,
            "time/reward_s": samples.reward_seconds,
            "time/training_s": t_trained - t_sampled,
        }
        last = epoch == cfg.epochs - 1
        if cfg.eval_every and (epoch % cfg.eval_every == 0 or last):
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                eval_rewards, eval_samples, eval_parts = evaluate(cfg, model, reward_fn, eval_set, device)
            m["eval/reward_mean"] = eval_rewards.mean().item()
            m.update({f"eval/{k}": v.nanmean().item() for k, v in eval_parts.items()})
            if on_eval is not None:
                on_eval(epoch, eval_samples, eval_rewards, eval_set)
        m["time/epoch_s"] = time.time() - t_start
        log(format_line(m))
        if rank == 0:
            append_metrics(metrics_path, m)
            watch.after_epoch(m)  # trackers; curves.png after an evaluation, a checkpoint and the last epoch
        history.append(m)
        if last or (cfg.save_every and (epoch + 1) % cfg.save_every == 0):
            if rank == 0:
                save_checkpoint(cfg.out, epoch + 1, state["step"], model, optimizer, ema, cfg)
            if world > 1:  # nobody runs ahead (or resumes) before the checkpoint exists
                import torch.distributed as dist

                dist.barrier()
        # every group scored all alike: no update. The same on every process (the advantages are computed on each).
        idle = idle + 1 if m["policy/zero_adv_frac"] == 1 else 0
        if cfg.max_zero_adv_epochs and idle >= cfg.max_zero_adv_epochs:
            raise RewardError(runfiles.nothing_learnt(epoch, idle, cfg.group_size))
    return history


# ----------------------------------------------------------------------------------------------------------------
# --- 10. SD3.5-Medium: LoRA, the CFG velocity, VAE decoding (the files load in runfiles.load_pipeline) ---
# ----------------------------------------------------------------------------------------------------------------

# The paper's LoRA targets: the image-stream and text-stream attention projections of every joint block.
LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]  # fmt: skip


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # cast only when needed: diffusers warns on every dtype cast after loading
    module.to(device) if next(module.parameters()).dtype == dtype else module.to(device, dtype=dtype)


class SD3Model(FlowModel):
    """Stable Diffusion 3(.5) behind the FlowModel interface: a LoRA adapter on the transformer is the policy;
    the same transformer with the adapter disabled is the reference; VAE and text encoders are frozen."""

    def __init__(self, pipe, cfg: Config, device: torch.device, dtype: torch.dtype):
        from peft import LoraConfig

        self.pipe, self.cfg, self.device, self.dtype = pipe, cfg, device, dtype
        self.transformer = pipe.transformer  # the model itself (adapters, saving)
        self.net = self.transformer  # what velocity() calls: the loop may wrap it in DDP
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, self.transformer):
            module.requires_grad_(False).eval()
        # frozen parts in the inference dtype; text encoders optionally on the CPU (T5-XXL alone is ~9.5 GB in bf16)
        self.text_device = torch.device("cpu") if cfg.text_encoders_on_cpu else device
        for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            _move(enc, self.text_device, dtype)
        _move(pipe.vae, device, torch.float32)  # float32 as the reference: rewards read the decoded pixels
        _move(self.transformer, device, dtype)
        # LoRA: W x + (α/r)·B A x with A, B trainable; "gaussian" init draws A ~ N(0, (1/r)²) and sets B = 0, so
        # training starts exactly at the pre-trained model (and the first KL is 0)
        self.transformer.add_adapter(
            LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
        compat.quiet_tokenizers(pipe)  # prompts longer than CLIP's 77 tokens: main() says so once
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()  # trainable weights in float32 (mixed precision: AdamW updates are tiny)
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.compiled = {"on": True, "off": False, "auto": device.type == "cuda"}.get(cfg.compile)
        if self.compiled is None:
            raise ValueError(f"--compile must be on, off or auto, got {cfg.compile!r}")
        self.compiled = self.compiled and compat.can_compile(device)  # if not, one line says why (not a traceback)
        if self.compiled:
            # Regional compilation: the blocks share ONE compiled code object (their class's forward), so a block
            # structure is traced once, not 24 times. Each guard miss adds a graph to it: block structure (SD3.5-M:
            # dual attention in 0-12, plain, the last one context_pre_only) × whether its input requires grad (not in
            # the first block) × adapters on/off (peft's flag is a python bool; off, nothing requires grad). Shapes are
            # static: every forward has batch_size rows (evaluate pads its last batch); grad mode is always on
            # (velocity). The limit is that count (SD3.5-M: 4 + 3 = 7): a surprise recompile runs eagerly, dynamo warns.
            blocks = self.transformer.transformer_blocks
            kinds = [(b.attn2 is not None, b.context_pre_only) for b in blocks]
            self.graphs = len({k + (i == 0,) for i, k in enumerate(kinds)}) + len(set(kinds))
            compat.compile_blocks(blocks, self.graphs)  # the limit: torch.compile's keyword, or 2.11's dynamo setting
        if device.type == "cuda":
            # TF32 for float32 matmuls, as the reference (train_sd3.py: allow_tf32, True by default): the LoRA branch
            # and its gradients, the VAE's attention, reward models. 11 significant bits, more than the bf16 sum the
            # LoRA output joins (bf16 weights); the SDE step and its log-prob are elementwise float32, untouched.
            torch.backends.cuda.matmul.fp32_precision = "tf32" if cfg.allow_tf32 else "ieee"
        down = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # VAE down-sampling factor (8 for SD3)
        if cfg.resolution % (down * self.transformer.config.patch_size):
            raise ValueError(f"--resolution {cfg.resolution} must be a multiple of {down * self.transformer.config.patch_size}")
        self.latent_shape = (self.transformer.config.in_channels, cfg.resolution // down, cfg.resolution // down)

    def schedule(self, num_steps: int) -> Tensor:
        # the model's own scheduler decides the t-grid (SD3: shift 3.0), exactly as StableDiffusion3Pipeline does
        self.pipe.scheduler.set_timesteps(num_steps)
        return self.pipe.scheduler.sigmas.detach().float().clone()  # (T+1,) from 1 to 0

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        # CLIP-L + CLIP-G + T5-XXL as the pipeline does; the negative prompt "" (the pipeline's default) only for CFG
        cfg_rows = self.cfg.guidance_scale != 1
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.text_device,
            do_classifier_free_guidance=cfg_rows, max_sequence_length=self.cfg.max_sequence_length,
        )  # fmt: skip
        cond = {"embeds": embeds, "pooled": pooled} | ({"neg_embeds": neg_embeds, "neg_pooled": neg_pooled} if cfg_rows else {})
        return {k: v.to(self.device) for k, v in cond.items()}  # (B, L, 4096 for SD3.5) and (B, 2048) pooled

    def velocity(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        w = self.cfg.guidance_scale
        # w = 1 is no guidance, v = v_uncond + 1·(v_cond − v_uncond) = v_cond: only the conditional rows run, half the
        # transformer's rows, in sampling, training and the reference forward. This is the reference's no-CFG recipe
        # (config/grpo.py *_fast_nocfg: sample.guidance_scale = 1, train.cfg = False; diffusers' pipeline runs CFG
        # only for guidance > 1). Its train.cfg = True at guidance 1 computes the same v from twice the rows; its
        # train.cfg = False at guidance > 1 would train v_cond while sampling with the guided v (not offered here).
        # Evaluation uses the same w: the reference's sample.eval_guidance_scale (config/base.py:50) equals
        # sample.guidance_scale in every SD3 config of its config/grpo.py.
        cfg_rows = w != 1
        grad = torch.is_grad_enabled()
        # Compiled: sampling and evaluation run in grad mode too (result detached), so they run the very graph the
        # training forward runs: a no-grad graph is fused differently, its log-probs can differ from training's in the
        # last bits and the first ratio would not be exactly 1. The price: the activations a backward would need are
        # written (and freed at once). No-grad calls bypass DDP, which expects a backward after a grad forward.
        with torch.enable_grad() if self.compiled else contextlib.nullcontext():
            # CFG in ONE forward: rows [unconditional; conditional] (2N, C, H, W); without CFG the conditional ones (N, ...)
            rows = 2 if cfg_rows else 1
            out = (self.net if grad else self.transformer)(
                hidden_states=torch.cat([x] * rows).to(self.dtype),
                timestep=torch.cat([t] * rows).to(self.device) * 1000,  # the transformer is fed 1000·t
                encoder_hidden_states=torch.cat([cond["neg_embeds"], cond["embeds"]]) if cfg_rows else cond["embeds"],
                pooled_projections=torch.cat([cond["neg_pooled"], cond["pooled"]]) if cfg_rows else cond["pooled"],
                return_dict=False,
            )[0]
        out = (out if grad else out.detach()).float()
        if not cfg_rows:
            return out  # v = v_cond                                                   (N, C, H, W)
        v_uncond, v_cond = out.chunk(2)  # (N, C, H, W) each
        # v = v_uncond + w·(v_cond − v_uncond)
        return v_uncond + w * (v_cond - v_uncond)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        # π_ref is the pre-trained model: the same transformer with its LoRA adapter switched off
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        vae = self.pipe.vae
        # undo SD3's latent normalisation z = (latent − shift)·scale, then decode to [−1, 1] pixels
        latents = x0 / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]  # (N, 3, H·8, W·8)
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.params

    def save_weights(self, folder: str) -> None:
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        # diffusers' LoRA format (+ the LoRA config, so load_lora_weights uses our α/r instead of assuming α = r)
        StableDiffusion3Pipeline.save_lora_weights(
            folder,
            transformer_lora_layers=get_peft_model_state_dict(self.transformer),
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
        )

    def load_weights(self, folder: str) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        result = set_peft_model_state_dict(self.transformer, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder} does not match this model's LoRA (unexpected keys {result.unexpected_keys[:3]})")


# ----------------------------------------------------------------------------------------------------------------
# --- 11. The command line: checks before the model loads, then train ---
# ----------------------------------------------------------------------------------------------------------------

def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    """The command line, generated from Config: every field is a flag with its default and comment; --model
    presets and the reference's named configs (--recipe) fill in defaults (recipes.py)."""
    import recipes

    return recipes.parse_config(Config, argv, description=__doc__.split("\n\n")[0])


def pick_device(cfg: Config) -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available() and not cfg.cpu:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[cfg.mixed_precision]
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32  # CPU: half precision is slow and inexact there


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(argv)
    # SIGTERM/SIGINT stop the run at its next safe point with the last finished epoch saved: one line saying what was
    # saved and how to continue, exit code 128 + the signal's number (runfiles.py)
    return runfiles.stop_gracefully(lambda: run_command_line(cfg), list(sys.argv[1:] if argv is None else argv))


def run_command_line(cfg: Config) -> int:
    """main() once the command line is parsed: exit 2 for what start-up checks refuse, 1 for a run that fails."""
    import rewards

    try:
        dist_device = runfiles.init_distributed(cfg.cpu, cfg.dist_timeout_s)  # None unless torchrun started several processes
        rank, world = dist_rank_world()
        # everything that can be checked is checked before the gigabytes of SD3.5-M load
        plan_batches(cfg, world)  # every number, and the batch arithmetic
        check_report_to(cfg.report_to)  # a tracker's package is missing: one line naming it
        open_run(cfg, rank)  # a second run into the same --out; a fresh run over old checkpoints; a bad --resume
        prompts, eval_prompts = load_prompts(cfg.prompts), eval_prompt_set(cfg)
        device, dtype = pick_device(cfg)
        device = dist_device or device
        reward_fn = rewards.build_reward(cfg.reward, device=device, **rewards.parse_model_options(cfg.reward_models))
        rewards.check_reward(reward_fn, cfg, prompts + eval_prompts)  # reward models load and answer; prompts suit them
        torch.manual_seed(cfg.seed)  # LoRA init
        model = SD3Model(load_pipeline(cfg.model, dtype), cfg, device, dtype)
    except (ValueError, FileNotFoundError, FileExistsError, ModelLoadError, CheckpointError, RewardError, DiskError) as e:
        print(f"error: {e}", file=sys.stderr)
        runfiles.report_to_launcher(f"error: {e}")
        return 2

    if rank == 0:  # what runs where, the evaluation set, prompts longer than the text encoders read
        print(runfiles.describe_run(cfg, model, device, world, dtype, prompts, eval_prompts))

    def on_eval(epoch: int, images: Tensor, rewards_: Tensor, shown: list[Prompt]) -> None:
        save_grid(os.path.join(cfg.out, f"eval-epoch-{epoch:06d}.png"), images, shown, rewards_, epoch)

    try:
        train(cfg, model, reward_fn, prompts, device, on_eval=on_eval, eval_prompts=eval_prompts)
    except (RewardError, DivergenceError, FileNotFoundError, CheckpointError, DiskError) as e:
        # under torchrun a non-zero exit of one process makes torchrun stop the others (no rank is left hanging)
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        runfiles.report_to_launcher(f"error (rank {rank}): {e}")  # torchrun's summary, printed last, shows it
        return 1
    except OSError as e:  # writing metrics.jsonl or a grid: a full disk, a folder made read-only meanwhile
        print(f"error: {runfiles.write_failure(e, cfg.out)}", file=sys.stderr)  # (re-raises any other OSError)
        return 1
    except RuntimeError as e:  # gloo raises "Timed out waiting ..."; NCCL's watchdog ends the process itself
        if world == 1 or "timed out" not in str(e).lower():
            raise
        runfiles.end_stuck_run(  # prints, tells torchrun, ends the silent process at once, exits 1
            f"error (rank {rank}): another process did not answer for --dist_timeout_s {cfg.dist_timeout_s:g} s "
            f"(stopped, crashed or stuck; raise the flag if a step legitimately takes that long): {e}", cfg.dist_timeout_s
        )
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
