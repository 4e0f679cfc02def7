"""Flow-GRPO on a 2D toy: the SAME training loop as SD3.5-M, on a laptop CPU in about 12 seconds.

    python toy/run.py                 # β = 3, 60 epochs: writes toy/out/toy.png and toy/out/metrics.json
    python toy/run.py --beta 0        # no KL to the pre-trained model: watch the samples leave the data modes

What you should see (seed 0, one CPU core, ~12 s):
    default     reward 0.333 → 0.553 (0.568 is the most a model can earn on its data), samples on their modes
                97% → 95%, kl_to_ref 0.005
    --beta 0    reward 0.333 → 0.965: every sample has left the data for the reward's peak (0% on their modes),
                kl_to_ref 0.46. That is reward hacking, and the KL term is what prevents it.
    --fast_window 2 / --sde_type cps: the faster variants (flow_grpo.py explains them; README has their numbers)

What happens (each step is a numbered banner below):
    1. The data: 8 small Gaussians on a ring; 4 "prompts", each owning 2 OPPOSITE modes, so that a prompt's
       samples have a real choice to make (half go one way, half the other).
    2. The reward: a Gaussian bump centred just OUTSIDE the ring. Within every prompt it prefers one of the two
       modes, and it pays even more for leaving the data, so reward hacking is measurable (on_manifold below).
    3. The model: a small MLP velocity field v(x, t, prompt) with classifier-free guidance, as in SD3.
    4. Pre-training with the rectified-flow loss (a few seconds, deterministic given --seed).
    5. ToyModel: the flow_grpo.FlowModel interface, so that flow_grpo.train (the loop SD3 uses) can drive it.
    6. Measurements: reward and on-manifold fraction of fixed-noise ODE samples, KL to the pre-trained model.
    7. The toy's Config: flow_grpo.Config with toy-sized values, each override explained.
    8. The picture (PIL only).
    9. run(): pre-train, measure, flow_grpo.train, measure, draw, write metrics.json.

metrics.json (one run; the ODE samples are 256 per prompt from fixed noise, 40 steps, the same before and after):
    reward_before, reward_after   mean reward of the ODE samples before / after fine-tuning
    reward_best_on_manifold       mean over prompts of the reward at the prompt's better mode (0.568)
    on_manifold_before, _after    fraction of the ODE samples within 3·MODE_STD = 0.3 of one of their prompt's modes
    kl_to_ref, kl_to_ref_before   the penalised KL (--kl reference: |dt|·‖μ_θ − μ_ref‖²/(2 std²)) per step and
                                  coordinate, averaged over the 9 trained steps
                                  of 1024 fixed-noise SDE trajectories (10 steps, a = --noise_level) of the model:
                                  the quantity the loss penalises (policy/kl_ref), measured after training
    reward_curve                  per epoch, the mean reward of its 64 SDE training samples (train's reward/mean)
    seconds, pretrain_seconds     wall time of the whole run / of pre-training (0 if pre-trained earlier in-process)
    args                          the command-line arguments
flow_grpo.train also writes its own per-epoch metrics.jsonl and a final checkpoint into --out.

Conventions are flow_grpo.py's (its section 0): x_t = (1 − t)·x₀ + t·ε, t = 1 is noise, t = 0 is data, v = ε − x₀.
Shape legend: N samples · T denoising steps · P = 4 prompts · K = 8 data modes; a latent is a 2D point, D = (2,).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from typing import Optional

# `python toy/run.py` puts toy/ on sys.path, not the repository root where flow_grpo.py lives: add the root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import flow_grpo  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# --- 1. The data: 8 Gaussians on a ring, 4 prompts with 2 opposite modes each ---
# ----------------------------------------------------------------------------------------------------------------

RING_RADIUS = 2.0  # data scale comparable to the N(0, I) noise at t = 1, as for a normalised image latent
NUM_MODES = 8  # K
MODE_STD = 0.1  # small next to the 1.5 gap between neighbouring modes: modes are clearly separated
MODE_ANGLES = torch.arange(NUM_MODES) * (2 * math.pi / NUM_MODES)  # (K,) mode k sits at angle k·45°
MODES = RING_RADIUS * torch.stack([MODE_ANGLES.cos(), MODE_ANGLES.sin()], dim=1)  # (K, 2)

# Prompt p owns modes p and p + 4, on opposite sides of the ring.
PROMPTS = ["east or west", "northeast or southwest", "north or south", "northwest or southeast"]
NUM_PROMPTS = len(PROMPTS)  # P
NULL_ID = NUM_PROMPTS  # the "empty prompt" id used for the unconditional branch of CFG
PROMPT_MODES = torch.tensor([[p, p + NUM_PROMPTS] for p in range(NUM_PROMPTS)])  # (P, 2) mode indices

# A sample is "on the manifold" if it lies within 3·MODE_STD of one of ITS prompt's two modes. A 2D Gaussian puts
# 1 − exp(−3²/2) = 98.9% of its mass inside that radius, so a perfect model scores ~0.99. Landing on another
# prompt's mode counts as off: that too is a way to hack a reward (ignore the prompt).
ON_MANIFOLD_RADIUS = 3 * MODE_STD


def sample_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n training points x₀ (n, 2) and their prompt ids (n,): a uniformly chosen mode plus N(0, MODE_STD²) noise."""
    mode = torch.randint(0, NUM_MODES, (n,), generator=generator)  # (n,)
    x0 = MODES[mode] + MODE_STD * torch.randn(n, 2, generator=generator)  # (n, 2)
    return x0, mode % NUM_PROMPTS  # mode k belongs to prompt k mod 4


# ----------------------------------------------------------------------------------------------------------------
# --- 2. The reward: a Gaussian bump just outside the ring, so that leaving the data pays ---
# ----------------------------------------------------------------------------------------------------------------
#     r(x) = exp(−‖x − c‖² / (2 s²)),    c = REWARD_DISTANCE·u,  u = (cos 22.5°, sin 22.5°)
#
# It is highest at c, OFF the ring, so a model free to leave the data modes can gain by moving there: that is the
# toy's reward hacking, and on_manifold (section 6) measures it. On the ring it prefers one mode of every prompt:
# u = 22.5° lies between two mode directions, so no prompt's two modes score equally (the preferred ones are E, NE,
# N and SE). The best a model that stays on its modes can reach is reward_best_on_manifold(); 1 is the hacked optimum.
# It ignores the prompt, like an aesthetic score would.

REWARD_ANGLE = math.radians(22.5)
REWARD_DIRECTION = torch.tensor([math.cos(REWARD_ANGLE), math.sin(REWARD_ANGLE)])  # u, (2,)
REWARD_DISTANCE = 3.0  # c lies 1.0 beyond the ring: clearly off the data, inside the picture
REWARD_WIDTH = 2.0  # s: wide enough that even the modes far from c get a usable reward gradient
REWARD_CENTRE = REWARD_DISTANCE * REWARD_DIRECTION  # c, (2,)


def toy_reward(points: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
    """r(x) = exp(−‖x − c‖²/(2s²)) for points (N, 2) → (N,). Same signature as the SD3 rewards
    (images, prompts, metadata); the toy's reward reads neither the prompt nor the metadata."""
    squared_distance = ((points.float() - REWARD_CENTRE) ** 2).sum(dim=1)  # (N,)
    return torch.exp(-squared_distance / (2 * REWARD_WIDTH**2))  # (N,)


def reward_best_on_manifold() -> float:
    """Mean over prompts of the reward of the prompt's better mode centre: the most a model can earn on its data."""
    return toy_reward(MODES, [], [])[PROMPT_MODES].max(dim=1).values.mean().item()


# ----------------------------------------------------------------------------------------------------------------
# --- 3. The model: an MLP velocity field v(x, t, prompt) ---
# ----------------------------------------------------------------------------------------------------------------


class VelocityMLP(nn.Module):
    """v_θ(x, t, c): x (N, 2), t (N,) in [0, 1], prompt ids c (N,) in {0, …, P} (P = the null prompt) → (N, 2)."""

    def __init__(self, hidden: int = 128, num_freqs: int = 6, embed_dim: int = 16):
        super().__init__()
        # Fourier features of t at frequencies π·2^k, k = 0…5: the coarsest is monotone over [0, 1], the finest
        # resolves changes over ~1/16 of the time axis; a bare scalar t makes an MLP learn the t-dependence slowly.
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs), persistent=False)  # (F,)
        # one learned vector per prompt, plus one for the null prompt (index P) that CFG's unconditional branch uses
        self.embed = nn.Embedding(NUM_PROMPTS + 1, embed_dim)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * num_freqs + embed_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: Tensor, t: Tensor, prompt_id: Tensor) -> Tensor:
        angles = t.float()[:, None] * self.freqs  # (N, F)
        features = torch.cat([x, angles.sin(), angles.cos(), self.embed(prompt_id)], dim=1)  # (N, 2 + 2F + E)
        return self.net(features)  # (N, 2)


# ----------------------------------------------------------------------------------------------------------------
# --- 4. Pre-training: the rectified-flow (flow-matching) loss ---
# ----------------------------------------------------------------------------------------------------------------
#     x_t = (1 − t)·x₀ + t·ε,   ε ~ N(0, I),  t ~ U(0, 1)
#     L = E ‖v_θ(x_t, t, c) − (ε − x₀)‖²
# with the prompt c replaced by the null prompt with probability PROMPT_DROPOUT, so that the same network also
# learns the unconditional velocity that classifier-free guidance needs (SD3 was trained the same way).

PRETRAIN_STEPS = 1500  # ~4 s on one CPU core; the ODE samples then land on their modes ~97% of the time
PRETRAIN_BATCH = 256
PRETRAIN_LR = 2e-3  # Adam, decayed linearly to 0: a tiny model on an easy target tolerates a large step
PROMPT_DROPOUT = 0.15  # within the usual 0.1–0.2 for CFG training


def rectified_flow_loss(net: nn.Module, x0: Tensor, prompt_id: Tensor, null_id: int, generator: torch.Generator) -> Tensor:
    """The loss above for one batch of data x₀ (n, *D) with prompt ids (n,): draws the dropped prompts, ε and t
    from `generator` (in that order) and returns the mean over the batch and the latent elements."""
    n = len(x0)
    drop = torch.rand(n, generator=generator) < PROMPT_DROPOUT  # (n,)
    prompt_id = torch.where(drop, torch.full_like(prompt_id, null_id), prompt_id)
    eps = torch.randn(x0.shape, generator=generator)  # (n, *D)
    t = torch.rand(n, generator=generator)  # (n,)
    t_ = t.view(n, *[1] * (x0.ndim - 1))  # (n, 1, …) broadcasts against x₀
    # x_t = (1 − t)·x₀ + t·ε
    x_t = (1 - t_) * x0 + t_ * eps  # (n, *D)
    # L = ‖v_θ(x_t, t, c) − (ε − x₀)‖²
    return ((net(x_t, t, prompt_id) - (eps - x0)) ** 2).mean()


def pretrain(seed: int, steps: int = PRETRAIN_STEPS, batch_size: int = PRETRAIN_BATCH) -> VelocityMLP:
    """A VelocityMLP fitted to the ring data; deterministic given the seed."""
    torch.manual_seed(seed)  # the initial weights
    generator = torch.Generator().manual_seed(seed)  # the data, times and noise
    net = VelocityMLP()
    optimizer = torch.optim.Adam(net.parameters(), lr=PRETRAIN_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    for _ in range(steps):
        x0, prompt_id = sample_data(batch_size, generator)  # (n, 2), (n,)
        loss = rectified_flow_loss(net, x0, prompt_id, NULL_ID, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


# Pre-trained weights by seed, kept in memory only (never on disk), so that several runs in one process (the tests:
# β > 0 and β = 0 on the same seed) pre-train once. pretrain is deterministic, so this changes no result.
_PRETRAINED: dict[int, dict[str, Tensor]] = {}


def pretrained(seed: int) -> VelocityMLP:
    """A fresh copy of the pre-trained VelocityMLP for this seed."""
    if seed not in _PRETRAINED:
        _PRETRAINED[seed] = pretrain(seed).state_dict()
    net = VelocityMLP()
    net.load_state_dict(_PRETRAINED[seed])
    return net.eval()


# ----------------------------------------------------------------------------------------------------------------
# --- 5. ToyModel: the FlowModel interface that flow_grpo.train drives (SD3's is in flow_grpo.py section 10) ---
# ----------------------------------------------------------------------------------------------------------------


class ToyModel(flow_grpo.FlowModel):
    """The pre-trained MLP, fine-tuned in full (no LoRA: at 40k parameters there is no memory to save), with a
    frozen copy of it as the KL's reference policy (SD3 gets the same by disabling its LoRA adapter)."""

    latent_shape = (2,)  # D
    null_id = NULL_ID  # the prompt id of CFG's unconditional branch

    def __init__(self, net: VelocityMLP, guidance_scale: float):
        self.net = net  # θ, trained
        self.ref_net = copy.deepcopy(net).requires_grad_(False)  # θ_ref, frozen
        self.guidance_scale = guidance_scale
        self._use_reference = False

    def schedule(self, num_steps: int) -> Tensor:
        # Plain uniform steps t_j = 1 − j/T. SD3 shifts them toward t = 1 (shift 3) because a 512 px image keeps
        # recognisable structure up to high noise levels; a 2D point has no "resolution", and uniform steps give
        # the mode choice (made around t ≈ 0.5–0.9 here) several steps.
        return torch.linspace(1, 0, num_steps + 1)  # (T+1,)

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        unknown = [p for p in prompts if p not in PROMPTS]
        if unknown:
            raise ValueError(f"the toy knows the prompts {PROMPTS}, got {unknown}")
        return {"prompt_id": torch.tensor([PROMPTS.index(p) for p in prompts])}  # (B,)

    def velocity(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        net = self.ref_net if self._use_reference else self.net
        prompt_id = cond["prompt_id"]  # (N,)
        null_id = torch.full_like(prompt_id, self.null_id)
        # ONE forward for both branches, as the SD3 pipeline does: rows [unconditional; conditional]
        v = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null_id, prompt_id]))  # (2N, 2)
        v_uncond, v_cond = v.chunk(2)  # (N, 2) each
        # classifier-free guidance:  v = v_uncond + w·(v_cond − v_uncond)
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)  # (N, 2)

    @contextlib.contextmanager
    def reference(self):
        previous, self._use_reference = self._use_reference, True
        try:
            yield
        finally:
            self._use_reference = previous

    def decode(self, x0: Tensor) -> Tensor:
        return x0  # the reward reads the 2D points themselves

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def save_weights(self, folder: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in flow_grpo.unwrap(self.net).state_dict().items()}
        save_file(tensors, os.path.join(folder, "model.safetensors"))

    def load_weights(self, folder: str) -> None:
        from safetensors.torch import load_file

        flow_grpo.unwrap(self.net).load_state_dict(load_file(os.path.join(folder, "model.safetensors")))


# ----------------------------------------------------------------------------------------------------------------
# --- 6. Measurements: reward, on-manifold fraction, KL to the pre-trained model ---
# ----------------------------------------------------------------------------------------------------------------

EVAL_PER_PROMPT = 256  # fixed-noise samples per prompt: the standard error of reward_before/after is ≈ 0.01


@torch.no_grad()
def sample_fixed(
    model: ToyModel, num_steps: int, noise_level: float | list[float], seed: int, sde_type: str = "sde"
) -> tuple[flow_grpo.Trajectory, Tensor]:
    """EVAL_PER_PROMPT samples of every prompt from noise fixed by `seed` (the same noise before and after
    fine-tuning), drawn by flow_grpo.rollout: noise_level 0 is the deterministic ODE. Returns (trajectory with
    latents (N, T+1, 2), prompt ids (N,)) with N = P·EVAL_PER_PROMPT."""
    generator = torch.Generator().manual_seed(seed)
    prompt_id = torch.arange(NUM_PROMPTS).repeat_interleave(EVAL_PER_PROMPT)  # (N,)
    cond = {"prompt_id": prompt_id}
    x1 = torch.randn(len(prompt_id), 2, generator=generator)  # (N, 2)
    velocity = lambda x, t: model.velocity(x, t, cond)  # noqa: E731
    traj = flow_grpo.rollout(velocity, x1, model.schedule(num_steps), noise_level, generator, sde_type=sde_type)
    return traj, prompt_id


def on_manifold(points: Tensor, prompt_id: Tensor) -> Tensor:
    """(N,) bool: is each point (N, 2) within ON_MANIFOLD_RADIUS of one of its prompt's two modes?"""
    own_modes = MODES[PROMPT_MODES[prompt_id]]  # (N, 2 modes, 2)
    distance = (points[:, None, :] - own_modes).norm(dim=-1).min(dim=1).values  # (N,)
    return distance < ON_MANIFOLD_RADIUS


@torch.no_grad()
def kl_to_reference(
    model: ToyModel, traj: flow_grpo.Trajectory, prompt_id: Tensor, steps: list[int], sde_type: str = "sde",
    form: str = "reference",
) -> float:
    """How far the current model is from the pre-trained one: the KL that the training loss penalises and
    flow_grpo.train logs as policy/kl_ref (flow_grpo.step_kl, `form` as --kl), here on fixed-noise SDE
    trajectories `traj` of the current model: the mean over the trained steps j and the N samples of

        exact:      ‖μ_θ − μ_ref‖² / (2 std²)   (mean over the 2 coordinates);    reference: |dt| times that

    with μ_θ, μ_ref the means of the step Gaussians of the current and the reference model at the visited x_j,
    both computed by flow_grpo.sde_step. 0 for the pre-trained model; the exact form is the trajectory KL
    KL(p_θ(x_0:T) ‖ p_ref(x_0:T)) divided by 2·len(steps) (a sum over steps and coordinates of the same terms)."""
    cond = {"prompt_id": prompt_id}
    kls = []
    for j in steps:
        x_j, x_next = traj.latents[:, j], traj.latents[:, j + 1]  # (N, 2) each
        t = traj.sigmas[j].expand(len(x_j))  # (N,)
        t_j, t_next, a = traj.sigmas[j], traj.sigmas[j + 1], float(traj.noise_levels[j])
        v = model.velocity(x_j, t, cond)  # (N, 2)
        _, _, mean, std = flow_grpo.sde_step(x_j, v, t_j, t_next, a, x_next, sde_type=sde_type)
        with model.reference():
            v_ref = model.velocity(x_j, t, cond)  # (N, 2)
        _, _, ref_mean, _ = flow_grpo.sde_step(x_j, v_ref, t_j, t_next, a, x_next, sde_type=sde_type)
        # the training loss's own KL formula                                                      (N,) -> scalar
        kls.append(flow_grpo.step_kl(mean, ref_mean, std, t_j, t_next, form, sde_type).mean().item())
    return sum(kls) / len(kls)


def measure(model: ToyModel, cfg: flow_grpo.Config) -> dict:
    """The numbers of metrics.json for the model as it is now:
    reward, on_manifold: over ODE samples (a = 0, cfg.eval_num_steps steps: how the model is used), fixed noise;
    kl_to_ref: on SDE trajectories like the training ones (cfg.num_steps steps, the noise levels and trained steps
    of flow_grpo.sde_window), fixed noise."""
    ode, prompt_id = sample_fixed(model, cfg.eval_num_steps, 0.0, cfg.seed + 1)
    points = ode.latents[:, -1]  # (N, 2)
    levels, trained_steps = flow_grpo.sde_window(cfg, torch.Generator().manual_seed(cfg.seed + 2))
    sde, sde_prompt_id = sample_fixed(model, cfg.num_steps, levels, cfg.seed + 2, cfg.sde_type)
    return {
        "points": points,
        "prompt_id": prompt_id,
        "reward": toy_reward(points, [], []).mean().item(),
        "on_manifold": on_manifold(points, prompt_id).float().mean().item(),
        "kl_to_ref": kl_to_reference(model, sde, sde_prompt_id, trained_steps, cfg.sde_type, cfg.kl),
    }


# ----------------------------------------------------------------------------------------------------------------
# --- 7. The toy's Config: flow_grpo.Config with toy-sized values ---
# ----------------------------------------------------------------------------------------------------------------
# The defaults of flow_grpo.Config are the paper's SD3.5-M settings. Every override below says why the toy differs;
# fields not named keep the paper's value: 10 sampling steps (40 for evaluation), noise level a = 0.7, train on
# the first 9 of the 10 steps, log-probs AVERAGED over latent elements (here over the 2 coordinates), advantages
# with the per-prompt mean and the epoch's global std clipped to ±5, AdamW β's, weight decay and grad-norm clip 1.

# β, the weight of the KL to the pre-trained model. The paper's 0.01–0.04 balance another reward scale and a KL
# averaged over 65 536 latent elements; what matters is the outcome. The KL penalised by default is the reference
# code's (flow_grpo.step_kl): |dt| times the exact per-step KL for the SDE, with |dt| = 0.1 on every step of the
# toy's uniform 10-step grid, so β = 3 here is β = 0.3 on the exact KL. Measured at 60 epochs, seeds 0–4 (reward
# from 0.30–0.35 before, 97% on their modes before, 0.57 the most reachable on the data):
#     β = 0     reward 0.80–1.00, 0% on their modes: every sample moved to the reward's peak; kl_to_ref 0.32–0.48
#     β = 3     reward 0.50–0.55, 92–95% on their modes;                                      kl_to_ref 0.004–0.006
#     β = 10    reward 0.40–0.46 (about half the gain), 92–96% on their modes;                kl_to_ref 0.001–0.002
TOY_BETA = 3.0
# For CPS the reference's KL IS the exact one (its std_dev_t is the step's own std): the same β pulls 1/|dt| = 10
# times harder there, so the toy's CPS runs take β = 0.3, the same pull as β = 3 on the SDE.
TOY_BETA_CPS = 0.3


def toy_config(args: argparse.Namespace) -> flow_grpo.Config:
    return flow_grpo.Config(
        model="toy-2d",  # a label only: the model is built in this file, not loaded
        reward="toy_bump",  # a label only: the reward is toy_reward
        prompts="toy",  # a label only: the prompts are PROMPTS
        out=args.out,
        seed=args.seed,
        noise_level=args.noise_level,
        sde_type=args.sde_type,
        fast_window=args.fast_window,
        fast_window_range=args.fast_window_range,
        guard=getattr(args, "guard", False),  # --guard; a caller's own Namespace may leave it out (off)
        # 1.5, not SD3's 4.5. Guidance pushes samples away from what the unconditional model also produces, here the
        # neighbouring modes of the other prompts: it squeezes every mode along the ring (the streaks in toy.png;
        # tangential std 0.10 at w = 1, 0.03 at 1.5, 0.015 at 2) and at 4.5 throws ~20% of the ODE samples off their
        # modes. w = 1 leaves ~7% between modes (the small MLP blurs them); 1.5 keeps ~97% on them.
        guidance_scale=1.5,
        # 16 samples per prompt and all 4 prompts every epoch (the paper: 24 per prompt, 48 prompts out of many):
        # enough samples for both modes of a prompt to show up in most groups, 64 rollouts/epoch in milliseconds.
        group_size=16,
        groups_per_epoch=NUM_PROMPTS,
        # 4 batches of 16 and one optimiser step per batch (the paper: 2 per epoch with accumulation): a small
        # model on cheap data learns faster from several PPO steps per sample than from one averaged step.
        batch_size=16,
        optimizer_steps_per_epoch=4,
        # The standard PPO ε. The paper's 1e-4 is for a log-prob averaged over 65 536 latent elements, whose
        # per-element ratio barely moves; here it is averaged over 2 elements and 1e-4 would clip every update.
        clip_range=0.2,
        # β: 3 by default, 0.3 with CPS (the paper: 0.01–0.04); see TOY_BETA.
        beta=args.beta if args.beta is not None else TOY_BETA_CPS if args.sde_type == "cps" else TOY_BETA,
        # 1e-3: Adam's usual rate for a small MLP trained in full; 3e-4 is the paper's rate for a LoRA on SD3.
        lr=1e-3,
        ema=False,  # the toy evaluates the current weights; EMA (decay 0.9 every 8 steps) only adds lag here
        epochs=args.epochs,
        # train's evaluation, printed on the epoch line: _run passes EVAL_PER_PROMPT copies of each prompt as the
        # evaluation set, all of them used (eval_count 0), so "eval" is the mean reward of 1024 fixed-noise ODE
        # samples with 40 steps, the quantity of reward_before/after (another draw of the noise). Every 20 epochs
        # (and after the last): one evaluation costs about as much as 6 epochs of training.
        eval_every=20,
        eval_count=0,
        save_every=0,  # one checkpoint, at the end (toy/out/checkpoints/), to exercise save_weights
        mixed_precision="no",  # float32 on the CPU
    )


# ----------------------------------------------------------------------------------------------------------------
# --- 8. The picture: reward landscape, samples before / after, reward curve (PIL only) ---
# ----------------------------------------------------------------------------------------------------------------

VIEW = 3.6  # the sample panels show the square [−VIEW, VIEW]²: the ring (radius 2) and the reward peak (3)
PANEL = 360  # panel side in pixels
MARGIN = 40  # pixels around and between panels
TITLE_H = 86  # pixels above the panels: the figure title and each panel's two-line title
LEGEND_H = 64  # pixels below the panels
PROMPT_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]  # one per prompt, dark on pale
# the reward's colour map, pale (0) to orange (1): anchors at reward 0, 0.25, 0.5, 0.75, 1
HEAT_ANCHORS = torch.tensor(
    [[247, 251, 255], [222, 235, 247], [255, 247, 188], [254, 210, 120], [250, 150, 60]], dtype=torch.float32
)


def _font(size: int):
    from PIL import ImageFont

    for path in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/DejaVuSans.ttf",
        "/Library/Fonts/Arial.ttf",
    ):
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def _heat_colours(values: Tensor) -> Tensor:
    """Values in [0, 1], any shape S → (S, 3) uint8, by linear interpolation between HEAT_ANCHORS."""
    position = values.clamp(0, 1) * (len(HEAT_ANCHORS) - 1)  # (S,) in [0, 4]
    low = position.floor().long().clamp(max=len(HEAT_ANCHORS) - 2)  # (S,) anchor below
    frac = (position - low).unsqueeze(-1)  # (S, 1)
    return (HEAT_ANCHORS[low] * (1 - frac) + HEAT_ANCHORS[low + 1] * frac).round().to(torch.uint8)  # (S, 3)


def _to_pixels(points: Tensor, left: int, top: int) -> Tensor:
    """Points (N, 2) in [−VIEW, VIEW]² → pixel (column, row) (N, 2) of a panel at (left, top); y points up.
    Points outside the view are drawn on its border."""
    unit = (points.clamp(-VIEW, VIEW) + VIEW) / (2 * VIEW)  # (N, 2) in [0, 1]
    return torch.stack([left + unit[:, 0] * PANEL, top + (1 - unit[:, 1]) * PANEL], dim=1)  # (N, 2)


def _scatter_panel(image, draw, left: int, top: int, points: Tensor, prompt_id: Tensor, title: str, subtitle: str):
    from PIL import Image

    # reward landscape at every pixel centre
    coords = (torch.arange(PANEL) + 0.5) / PANEL * 2 * VIEW - VIEW  # (PANEL,)
    y, x = torch.meshgrid(coords.flip(0), coords, indexing="ij")  # (PANEL, PANEL) each; row 0 is the top (y = VIEW)
    reward = toy_reward(torch.stack([x.flatten(), y.flatten()], dim=1), [], [])  # (PANEL²,)
    rgb = _heat_colours(reward)  # (PANEL², 3)
    image.paste(Image.frombytes("RGB", (PANEL, PANEL), bytes(rgb.flatten().tolist())), (left, top))
    draw.rectangle([left, top, left + PANEL, top + PANEL], outline=(0, 0, 0))
    # the data modes, as circles of the on-manifold radius
    radius_px = ON_MANIFOLD_RADIUS / (2 * VIEW) * PANEL
    for cx, cy in _to_pixels(MODES, left, top).tolist():
        draw.ellipse([cx - radius_px, cy - radius_px, cx + radius_px, cy + radius_px], outline=(60, 60, 60), width=2)
    # the samples, coloured by prompt
    for (cx, cy), p in zip(_to_pixels(points, left, top).tolist(), prompt_id.tolist()):
        draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=PROMPT_COLOURS[p])
    # the reward's peak, on top of the samples (a hacked model piles them there)
    px, py = _to_pixels(REWARD_CENTRE[None], left, top)[0].tolist()
    draw.line([px - 7, py - 7, px + 7, py + 7], fill=(0, 0, 0), width=3)
    draw.line([px - 7, py + 7, px + 7, py - 7], fill=(0, 0, 0), width=3)
    draw.text((left, top - 44), title, fill=(0, 0, 0), font=_font(17))
    draw.text((left, top - 22), subtitle, fill=(70, 70, 70), font=_font(14))


def _curve_panel(draw, left: int, top: int, curve: list[float], title: str, subtitle: str):
    small = _font(12)
    y_max = 1.0  # the reward's maximum (at its peak): the panel spans every possible value
    n = len(curve)

    def to_px(epoch: float, value: float) -> tuple[float, float]:
        return left + epoch / max(n - 1, 1) * PANEL, top + (1 - value / y_max) * PANEL

    # grid and y ticks
    for k in range(5):
        value = y_max * k / 4
        _, py = to_px(0, value)
        draw.line([left, py, left + PANEL, py], fill=(225, 225, 225))
        draw.text((left - 6, py), f"{value:.2f}", fill=(0, 0, 0), font=small, anchor="rm")
    # x ticks: about 5 round epochs
    step = max(1, round(n / 5 / 10) * 10) if n > 20 else max(1, n // 5)
    for epoch in range(0, n, step):
        px, _ = to_px(epoch, 0)
        draw.line([px, top + PANEL, px, top + PANEL + 4], fill=(0, 0, 0))
        draw.text((px, top + PANEL + 6), str(epoch), fill=(0, 0, 0), font=small, anchor="mt")
    draw.text((left + PANEL / 2, top + PANEL + 22), "epoch", fill=(0, 0, 0), font=small, anchor="mt")
    draw.rectangle([left, top, left + PANEL, top + PANEL], outline=(0, 0, 0))
    # dashed line: the best reward a model can reach without leaving its prompt's modes
    best = reward_best_on_manifold()
    _, py = to_px(0, best)
    for x0 in range(left, left + PANEL, 12):
        draw.line([x0, py, min(x0 + 6, left + PANEL), py], fill=(44, 130, 44), width=2)
    label = "best reward ON the data modes; above = off the data"
    draw.text((left + 6, py - 4), label, fill=(44, 130, 44), font=small, anchor="lb")
    # the curve: mean reward of each epoch's 64 SDE training samples
    if n:
        points = [to_px(e, v) for e, v in enumerate(curve)]
        draw.line(points if n > 1 else points * 2, fill=(0, 0, 0), width=2)
    draw.text((left, top - 44), title, fill=(0, 0, 0), font=_font(17))
    draw.text((left, top - 22), subtitle, fill=(70, 70, 70), font=_font(14))


def draw_picture(path: str, before: dict, after: dict, curve: list[float], args: argparse.Namespace) -> None:
    """toy.png: [samples before | samples after | reward over epochs] with a legend underneath."""
    from PIL import Image, ImageDraw

    width = 3 * PANEL + 4 * MARGIN
    height = TITLE_H + PANEL + LEGEND_H
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    settings = f"β = {args.beta:g}, {args.epochs} epochs, noise level a = {args.noise_level:g}, seed {args.seed}"
    draw.text((MARGIN, 10), f"Flow-GRPO on a 2D toy   ({settings})", fill=(0, 0, 0), font=_font(18))
    top = TITLE_H
    lefts = [MARGIN, 2 * MARGIN + PANEL, 3 * MARGIN + 2 * PANEL + 10]
    for left, m, name in ((lefts[0], before, "before fine-tuning (pre-trained)"), (lefts[1], after, "after Flow-GRPO")):
        subtitle = f"ODE samples: reward {m['reward']:.3f}, {100 * m['on_manifold']:.0f}% on their modes"
        _scatter_panel(image, draw, left, top, m["points"], m["prompt_id"], name, subtitle)
    note = f"KL to the pre-trained model: {after['kl_to_ref']:.3f}"
    draw.text((lefts[1] + 8, top + PANEL - 8), note, fill=(0, 0, 0), font=_font(13), anchor="lb")
    _curve_panel(draw, lefts[2], top, curve, "reward during training", "mean of each epoch's 64 SDE samples")
    # legend: prompt colours, data modes, reward peak, colour scale
    font = _font(13)
    y = top + PANEL + 14
    x = MARGIN
    for colour, text in zip(PROMPT_COLOURS, PROMPTS):
        draw.ellipse([x, y + 3, x + 10, y + 13], fill=colour)
        draw.text((x + 15, y), f'"{text}"', fill=(0, 0, 0), font=font)
        x += 28 + int(draw.textlength(f'"{text}"', font=font))
    y += 24
    x = MARGIN
    draw.ellipse([x, y, x + 14, y + 14], outline=(60, 60, 60), width=2)
    legend = "data modes (a sample counts as on its modes inside these circles)"
    draw.text((x + 20, y), legend, fill=(0, 0, 0), font=font)
    x += 40 + int(draw.textlength(legend, font=font))
    draw.line([x, y, x + 12, y + 12], fill=(0, 0, 0), width=3)
    draw.line([x, y + 12, x + 12, y], fill=(0, 0, 0), width=3)
    draw.text((x + 20, y), "reward peak", fill=(0, 0, 0), font=font)
    x += 40 + int(draw.textlength("reward peak", font=font))
    draw.text((x, y), "reward 0", fill=(0, 0, 0), font=font)
    x += 6 + int(draw.textlength("reward 0", font=font))
    bar = _heat_colours(torch.linspace(0, 1, 120))  # (120, 3)
    for i, colour in enumerate(bar.tolist()):
        draw.line([x + i, y, x + i, y + 14], fill=tuple(colour))
    draw.rectangle([x, y, x + 120, y + 14], outline=(0, 0, 0))
    draw.text((x + 126, y), "1", fill=(0, 0, 0), font=font)
    image.save(path)


# ----------------------------------------------------------------------------------------------------------------
# --- 9. run(): pre-train, measure, fine-tune with flow_grpo.train, measure, draw ---
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Flow-GRPO on a 2D toy (see the top of toy/run.py).")
    p.add_argument("--beta", type=float, default=None, help="KL weight β (0: no pull toward the pre-trained model); "
                   f"default {TOY_BETA:g}, {TOY_BETA_CPS:g} with --sde_type cps")
    p.add_argument("--seed", type=int, default=0, help="seeds pre-training, sampling and training")
    p.add_argument("--epochs", type=int, default=60, help="Flow-GRPO epochs (64 rollouts each)")
    p.add_argument("--noise_level", type=float, default=0.7, help="a in σ_t = a·√(t/(1 − t)) (paper: 0.7)")
    p.add_argument("--sde_type", default="sde", choices=["sde", "cps"], help="the paper's SDE or the CPS sampler")
    p.add_argument("--fast_window", type=int, default=0, help="Flow-GRPO-Fast: SDE/training window size (0: off)")
    p.add_argument("--fast_window_range", type=int, default=5, help="Fast: the window lies in the first this-many steps")
    p.add_argument("--guard", action="store_true", help="GRPO-Guard's ratio normalisation and 1/|dt| step weights")
    p.add_argument("--out", default=os.path.join(ROOT, "toy", "out"), help="folder for toy.png and metrics.json")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p.parse_args(argv)


@contextlib.contextmanager
def one_thread():
    """Run the body on one torch thread, then restore the previous count. The MLP's matrices are so small that
    thread synchronisation costs more than it saves (on a loaded 2-core machine, 2 threads made pre-training ~20x
    slower than 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _epoch_logger(log):
    """(on_eval, log) for flow_grpo.train, fitting its epoch line to the toy. The line ends with the epoch's time
    at 0.1 s resolution, made for SD3's minutes-long epochs: a toy epoch takes ~50 ms and would read 0.0s, so that
    field is dropped (the last line gives the mean). An evaluated epoch's line also gets the fraction of its
    evaluation samples on their own prompt's modes, the reward-hacking signal (on_eval runs just before it)."""
    evaluated = {}

    def on_eval(epoch: int, points: Tensor, rewards: Tensor, prompts: list) -> None:
        prompt_id = torch.tensor([PROMPTS.index(p.text) for p in prompts])  # (N,)
        evaluated["on_manifold"] = on_manifold(points, prompt_id).float().mean().item()

    def epoch_log(line: str) -> None:
        if line.startswith("epoch "):
            line = line.rsplit(" | ", 1)[0]  # drop "| 0.0s"
            if "on_manifold" in evaluated:
                line += f" | on manifold {evaluated.pop('on_manifold'):.3f}"
        log(line)

    return on_eval, epoch_log


def run(argv: Optional[list[str]] = None) -> dict:
    """The whole toy for command-line arguments `argv` (None: sys.argv). Returns the metrics written to
    metrics.json."""
    args = parse_args(argv)
    with one_thread():
        return _run(args, (lambda s: None) if args.quiet else print)


def _run(args: argparse.Namespace, log) -> dict:
    t_start = time.time()
    cfg = toy_config(args)
    args = argparse.Namespace(**{**vars(args), "beta": cfg.beta})  # the β in effect, for the picture and metrics
    flow_grpo.plan_batches(cfg)  # raises now, not after pre-training, if the batch sizes do not fit
    # train appends to metrics.jsonl and adds checkpoints: start this run's outputs from scratch
    os.makedirs(cfg.out, exist_ok=True)
    shutil.rmtree(os.path.join(cfg.out, "checkpoints"), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(cfg.out, "metrics.jsonl"))

    model = ToyModel(pretrained(args.seed), cfg.guidance_scale)
    t_pretrained = time.time()
    before = measure(model, cfg)
    log(
        f"pre-trained in {t_pretrained - t_start:.1f}s | {len(before['points'])} fixed-noise ODE samples: reward"
        f" {before['reward']:+.4f} | on manifold {before['on_manifold']:.3f} | best reward on the manifold"
        f" {reward_best_on_manifold():+.4f}"
    )

    # The SAME loop that fine-tunes SD3.5-M (flow_grpo.py section 9).
    prompts = [flow_grpo.Prompt(text) for text in PROMPTS]
    eval_prompts = [p for p in prompts for _ in range(EVAL_PER_PROMPT)]  # see eval_every in toy_config
    on_eval, epoch_log = _epoch_logger(log)
    history = flow_grpo.train(cfg, model, toy_reward, prompts, log=epoch_log, on_eval=on_eval,
                              eval_prompts=eval_prompts)

    after = measure(model, cfg)
    seconds = time.time() - t_start
    metrics = {
        "reward_before": before["reward"],
        "reward_after": after["reward"],
        "reward_best_on_manifold": reward_best_on_manifold(),
        "on_manifold_before": before["on_manifold"],
        "on_manifold_after": after["on_manifold"],
        "kl_to_ref": after["kl_to_ref"],
        "kl_to_ref_before": before["kl_to_ref"],
        "reward_curve": [m["reward/mean"] for m in history],
        "seconds": seconds,
        "pretrain_seconds": t_pretrained - t_start,
        "args": vars(args),
    }
    draw_picture(os.path.join(cfg.out, "toy.png"), before, after, metrics["reward_curve"], args)
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    # sampling, reward and training; the evaluations left out
    epoch_s = [m["time/sampling_s"] + m["time/reward_s"] + m["time/training_s"] for m in history]
    train_ms = 1000 * sum(epoch_s) / len(epoch_s)
    log(
        f"after {cfg.epochs} epochs: ODE reward {before['reward']:+.4f} -> {after['reward']:+.4f}"
        f" | on manifold {before['on_manifold']:.3f} -> {after['on_manifold']:.3f}"
        f" | kl_to_ref {after['kl_to_ref']:.4f} | {train_ms:.0f} ms per epoch, {seconds:.1f}s in all"
    )
    return metrics


def main() -> None:
    run()


if __name__ == "__main__":
    main()
