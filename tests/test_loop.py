"""The training loop that joins the formulas (flow_grpo.train_epoch, train_step, train), against hand computations.

The formulas (sde_step, grpo_loss, step_kl, EMA, ...) are tested one by one in test_math.py; these tests check how
the loop wires them: which samples an optimiser step averages over, with which weights, how the gradient is
clipped, and when the EMA is updated. The model is a linear velocity field v = W·x + c on 2D points, so that the
gradient of every (sample, step) term has a closed form (no autograd on the hand side), computed in float64:

    log π(x' | x) = mean_d [ −(x' − μ)²_d / (2s²) ] − log s − log √(2π),   μ = α·x + β·v   (sde_mean_std)
    ∂ log π / ∂μ_d = (x' − μ)_d / (s²·D),      ∂μ_d / ∂W_de = β·x_e,   ∂μ_d / ∂c_d = β          (D = 2)

At unchanged weights (lr 0) every ratio is 1, where the clipped surrogate's gradient is −A·∇ log π, and the
reference-form KL |dt|·mean_d (μ − μ_ref)²/(2s²) has gradient |dt|·(μ − μ_ref)/(s²·D) with respect to μ. An optimiser
step k averages its kept terms (advantage ≠ 0) over K kept samples × S trained steps:

    g_k = (1/(K·S)) Σ_{batches m of step k} Σ_{i ∈ m, A_i ≠ 0} Σ_j [ −A_i·∇ log π_ij + β_KL·∇ KL_ij ]

One group's rewards are all equal (its advantages are exactly 0): those samples must not count, neither in the
terms nor in K.
"""

import contextlib
import copy
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import flow_grpo as fg
import runfiles

PROMPTS = ["left", "right", "up", "constant"]  # the last group's rewards are all equal
TARGETS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, 1.0)}
U = torch.finfo(torch.float32).eps / 2  # float32 unit roundoff


class LinearFlow(fg.FlowModel):
    """v(x, t, prompt) = W·x + c: the policy; a frozen copy of its initial weights is the KL's reference."""

    latent_shape = (2,)

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.net = torch.nn.Linear(2, 2)
        self.ref_net = copy.deepcopy(self.net).requires_grad_(False)
        with torch.no_grad():  # the policy starts away from the reference, so the KL and its gradient are not 0
            for p in self.net.parameters():
                p.add_(0.3 * torch.randn(p.shape))
        self._ref = False

    def schedule(self, num_steps):
        return torch.linspace(1, 0, num_steps + 1)

    def encode(self, prompts):
        return {"prompt_id": torch.tensor([PROMPTS.index(p) for p in prompts])}

    def velocity(self, x, t, cond):
        return (self.ref_net if self._ref else self.net)(x)

    @contextlib.contextmanager
    def reference(self):
        self._ref = True
        try:
            yield
        finally:
            self._ref = False

    def decode(self, x0):
        return x0

    def trainable_parameters(self):
        return list(self.net.parameters())

    def save_weights(self, folder):
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, os.path.join(folder, "w.safetensors"))

    def load_weights(self, folder):
        self.net.load_state_dict(load_file(os.path.join(folder, "w.safetensors")))


def reward(points, prompts, metadata):
    """Minus the squared distance to the prompt's target; 0.5 for every sample of the "constant" prompt."""
    r = [0.5 if p == "constant" else -((x - torch.tensor(TARGETS[p])) ** 2).sum().item() for x, p in zip(points, prompts)]
    return torch.tensor(r)


def loop_cfg(tmp_path, **kw) -> fg.Config:
    base = dict(
        model="linear", reward="toy", prompts="toy", out=str(tmp_path / "run"), group_size=8, groups_per_epoch=4,
        batch_size=8, optimizer_steps_per_epoch=2, num_steps=4, beta=0.5, clip_range=0.2, lr=0.0, weight_decay=0.0,
        ema=False, epochs=1, eval_every=0, save_every=0, mixed_precision="no",
    )  # fmt: skip
    return fg.Config(**dict(base, **kw))


class RecordingSGD(torch.optim.SGD):
    """SGD that records the gradient each step applies (after clipping); with lr 0 the weights never change."""

    def __init__(self, params, lr=0.0):
        super().__init__(params, lr=lr)
        self.applied = []

    def step(self, closure=None):
        self.applied.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def hand_gradients(cfg: fg.Config, model: LinearFlow, s: fg.Samples) -> list[tuple[torch.Tensor, ...]]:
    """Per optimiser step: (g_W, g_c, bound_W, bound_c), float64, from the closed form in the module docstring.

    bound: the float32 loop sums n (sample, step) terms, each a product of float32 quantities computed in ≤ 10
    operations; summing n terms in any order errs by ≤ n·u·Σ|terms| (γ_n), each term by ≤ 10·u·|term|, and the
    one cancellation, x' − μ = s·ε, errs by ≤ u·(|x'| + |α·x| + |β·v|) absolutely. So |loop − exact| ≤
    (n + 10)·u·Σ M with M the term's magnitude written with |x'| + |α·x| + |β·v| (≥ |x' − μ|) in place of x' − μ
    and |μ| + |μ_ref| in place of μ − μ_ref."""
    W, c = (p.detach().double() for p in model.net.parameters())
    W_ref, c_ref = (p.detach().double() for p in model.ref_net.parameters())
    b, acc, D = cfg.batch_size, len(s.batches) // cfg.optimizer_steps_per_epoch, 2
    out = []
    for k in range(cfg.optimizer_steps_per_epoch):
        batches = range(k * acc, (k + 1) * acc)
        K = sum(int((s.advantages[m * b : (m + 1) * b] != 0).sum()) for m in batches)
        gW, mW = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
        gc, mc = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        n_terms = 0
        for m in batches:
            rows = slice(m * b, (m + 1) * b)
            A = s.advantages[rows].double()  # (b,)
            keep = A != 0
            steps = s.trained_steps[s.batches.index(m)]  # this batch's trained steps (all of them: no Fast window)
            S = len(steps)
            for j in steps:
                x, x_next = s.latents[rows, j].double(), s.latents[rows, j + 1].double()  # (b, 2)
                t, t_next, a = s.sigmas[j], s.sigmas[j + 1], float(s.noise_levels[rows.start, j])
                alpha = fg.sde_mean_std(torch.ones(1, 1), torch.zeros(1, 1), t, t_next, a)[0].double()  # μ = α·x + β·v
                beta, std = (z.double() for z in fg.sde_mean_std(torch.zeros(1, 1), torch.ones(1, 1), t, t_next, a))
                v, v_ref = x @ W.T + c, x @ W_ref.T + c_ref  # (b, 2)
                mu, mu_ref = alpha * x + beta * v, alpha * x + beta * v_ref
                dt = float(t - t_next)
                # ∂(term)/∂μ for each kept sample: [−A·(x' − μ) + β_KL·|dt|·(μ − μ_ref)] / (s²·D·K·S)        (b, 2)
                scale = keep[:, None] / (std**2 * D * K * S)
                g_mu = scale * (-A[:, None] * (x_next - mu) + cfg.beta * dt * (mu - mu_ref))
                m_mu = scale * (A.abs()[:, None] * (x_next.abs() + (alpha * x).abs() + (beta * v).abs())
                                + cfg.beta * dt * (mu.abs() + mu_ref.abs()))  # fmt: skip
                gW += (beta * g_mu).T @ x  # Σ_i ∂μ_d/∂W_de · g_μ,d = β·g_μ,d·x_e
                gc += (beta * g_mu).sum(0)
                mW += (beta.abs() * m_mu).T @ x.abs()
                mc += (beta.abs() * m_mu).sum(0)
                n_terms += int(keep.sum())
        out.append((gW, gc, (n_terms + 10) * U * mW, (n_terms + 10) * U * mc))
    return out


@pytest.fixture
def epoch(tmp_path):
    cfg = loop_cfg(tmp_path)
    model = LinearFlow()
    s = fg.sample_epoch(cfg, model, reward, [fg.Prompt(p) for p in PROMPTS], torch.Generator().manual_seed(0), "cpu")
    assert int((s.advantages == 0).sum()) == cfg.group_size  # exactly the constant group is masked ...
    assert (s.kept_per_batch < cfg.batch_size).any()  # ... and some batch holds fewer kept samples than rows
    return cfg, model, s


def run_epoch(cfg, model, s) -> list[list[torch.Tensor]]:
    opt = RecordingSGD(model.trainable_parameters())
    fg.train_epoch(cfg, fg.plan_batches(cfg), model, s, opt)
    return opt.applied


def test_optimiser_step_applies_the_mean_gradient_over_kept_samples_and_trained_steps(epoch):
    """The absolute scale of an accumulated gradient (1/(K·S)), the zero-advantage mask in the policy and KL terms,
    and the per-batch kept count k_m: the gradient each optimiser step applies equals the hand-computed mean."""
    cfg, model, s = epoch
    cfg.max_grad_norm = 1e9  # no clipping here (next test)
    applied = run_epoch(cfg, model, s)
    hand = hand_gradients(cfg, model, s)
    assert len(applied) == len(hand) == cfg.optimizer_steps_per_epoch
    for (gW, gc), (hW, hc, bW, bc) in zip(applied, hand):
        assert ((gW.double() - hW).abs() <= bW).all(), f"W: error / bound up to {((gW.double() - hW).abs() / bW).max():.3g}"
        assert ((gc.double() - hc).abs() <= bc).all(), f"c: error / bound up to {((gc.double() - hc).abs() / bc).max():.3g}"
        assert hW.abs().max() > 100 * bW.max()  # the bound is far below the gradient itself


def test_the_gradient_norm_is_clipped_to_max_grad_norm(epoch):
    """clip_grad_norm_: when the norm exceeds max_grad_norm, the applied gradient is g·max_grad_norm/(‖g‖ + 1e-6)."""
    cfg, model, s = epoch
    hand = hand_gradients(cfg, model, s)
    norms = [torch.cat([hW.flatten(), hc]).norm().item() for hW, hc, _, _ in hand]
    cfg.max_grad_norm = 0.5 * min(norms)  # must engage on every optimiser step
    applied = run_epoch(cfg, model, s)
    for (gW, gc), (hW, hc, bW, bc), norm in zip(applied, hand, norms):
        coef = cfg.max_grad_norm / (norm + 1e-6)
        # the coefficient's relative error is at most ‖bound‖/‖g‖ (the norm's), plus 4u for the division and scaling
        rel = torch.cat([bW.flatten(), bc]).norm().item() / norm + 4 * U
        assert ((gW.double() - coef * hW).abs() <= coef * (bW + rel * hW.abs())).all()
        assert ((gc.double() - coef * hc).abs() <= coef * (bc + rel * hc.abs())).all()
        assert torch.cat([gW.flatten(), gc]).norm().item() == pytest.approx(cfg.max_grad_norm, rel=1e-5)


def test_ema_after_k_optimiser_steps_through_train_follows_the_hand_sequence(tmp_path):
    """EMA wiring in train(): after optimiser step s (s = steps taken so far), if (s + 1) % every == 0,
    shadow ← d·shadow + (1 − d)·w with d = min((1 + s)/(10 + s), decay). The weights after every step are recorded
    (an optimiser step post-hook) and the sequence is replayed by hand against the EMA the checkpoint holds."""
    cfg = loop_cfg(tmp_path, lr=0.05, ema=True, ema_every=2, ema_decay=0.9, epochs=3)
    model = LinearFlow()
    shadow = [p.detach().double().clone() for p in model.trainable_parameters()]  # the EMA starts at the weights
    after_step = []
    hook = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: after_step.append([p.detach().double().clone() for p in model.trainable_parameters()])
    )
    try:
        history = fg.train(cfg, model, reward, [fg.Prompt(p) for p in PROMPTS], log=lambda line: None)
    finally:
        hook.remove()
    assert history[-1]["step"] == len(after_step) == cfg.epochs * cfg.optimizer_steps_per_epoch
    updates = 0
    for s, weights in enumerate(after_step, start=1):
        if (s + 1) % cfg.ema_every == 0:
            d = min((1 + s) / (10 + s), cfg.ema_decay)
            shadow = [d * sh + (1 - d) * w for sh, w in zip(shadow, weights)]
            updates += 1
    assert updates == 3
    state = load_file(os.path.join(runfiles.latest_checkpoint(cfg.out), "trainer_state.safetensors"))
    ema = [state[f"ema.{i}"].double() for i in range(len(shadow))]
    for e, h, w in zip(ema, shadow, after_step[-1]):
        # each update rounds twice (d·shadow, then + (1 − d)·w) in float32, relative to max |w| over the run
        scale = max(x.abs().max().item() for ws in after_step for x in ws)
        assert (e - h).abs().max() <= 3 * updates * U * scale
        assert (h - w).abs().max() > 1e-3  # the EMA is not simply the last weights
