"""GRPO-Guard (--guard, flow_grpo.py section 5) against expressions written out here, with torch.distributions'
Gaussian density for every log-probability; and the guard switched off is exactly today's loss.

The guard as the reference's scripts/train_sd3_GRPO_Guard.py computes it (and verl-omni's GRPOGuardLoss; arXiv
2510.22319): with μ_θ, μ_old the step's mean under the current and the sampling weights, s the step's std and
log r = log π_θ − log π_old (element means),
    b = mean((μ_θ − μ_old)²) / (2s²),     r̂ = exp(s·(log r + b)),     L = (1/|dt|)·mean max(−A·r̂, −A·clip(r̂)).
"""

import argparse

import pytest
import torch
from torch.distributions import Normal

import flow_grpo as fg
from toy import glyphs
from toy import run as toy

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def log_prob(x, mean, std):
    """log N(x; mean, std²) averaged over the non-batch dimensions, by torch.distributions."""
    return Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).mean(dim=1)  # (B,)


def guard_loss_by_hand(lp, old_lp, mean, old_mean, std, adv, eps, dt, keep):
    """The guard's policy loss, written out from the formulas above (no flow_grpo helper)."""
    b = ((mean - old_mean) ** 2).flatten(1).mean(dim=1) / (2 * std.reshape(-1) ** 2)  # (B,) the drift term
    r_hat = torch.exp(std.reshape(-1) * (lp - old_lp + b))  # (B,)
    per = torch.maximum(-adv * r_hat, -adv * r_hat.clamp(1 - eps, 1 + eps))  # (B,)
    return per[keep].mean() / abs(dt)


@pytest.mark.parametrize("per_sample_std", [False, True])
def test_guard_log_ratio_is_the_drift_corrected_rescaled_log_ratio(per_sample_std):
    B, D = 4, (2, 8, 8)
    g = gen(0)
    std = torch.tensor([0.05, 0.2, 0.5, 1.1], dtype=torch.float64).view(B, 1, 1, 1) if per_sample_std else torch.tensor(0.3, dtype=torch.float64)
    old_mean = torch.randn(B, *D, generator=g, dtype=torch.float64)
    eps = torch.randn(B, *D, generator=g, dtype=torch.float64)
    x_next = old_mean + std * eps  # the stored action
    delta = 0.1 * torch.randn(B, *D, generator=g, dtype=torch.float64)  # μ_θ − μ_old after some updates
    mean = old_mean + delta
    lp, old_lp = log_prob(x_next, mean, std), log_prob(x_next, old_mean, std)

    got = fg.guard_log_ratio(lp, old_lp, mean, old_mean, std)
    s = std.reshape(-1)
    # s·(log r + mean(Δ²)/(2s²)), term by term
    expected = s * (lp - old_lp + (delta**2).flatten(1).mean(dim=1) / (2 * s**2))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # and the closed form it reduces to for x' = μ_old + s·ε: mean(ε·Δ), free of s
    torch.testing.assert_close(got, (eps * delta).flatten(1).mean(dim=1), rtol=1e-9, atol=1e-12)


def test_guard_removes_the_drift_and_the_step_dependence_of_the_plain_ratio():
    # The same noise ε and mean shift Δ at two steps with different std s: the plain log-ratio is
    # mean(ε·Δ)/s − mean(Δ²)/(2s²): it scales with 1/s and drifts below 0 by the second term; the guard's is the same
    # at both steps. Over M draws of ε (D = 256 elements each) the plain mean sits at −b, the guard's at 0.
    M, D = 4000, 256
    g = gen(1)
    delta = 0.02 * torch.randn(1, D, generator=g, dtype=torch.float64).expand(M, D)
    eps = torch.randn(M, D, generator=g, dtype=torch.float64)
    old_mean = torch.zeros(M, D, dtype=torch.float64)
    guarded, plain = [], []
    for s in (0.05, 0.5):
        std = torch.tensor(s, dtype=torch.float64)
        x_next = old_mean + std * eps
        lp, old_lp = log_prob(x_next, old_mean + delta, std), log_prob(x_next, old_mean, std)
        plain.append(lp - old_lp)
        guarded.append(fg.guard_log_ratio(lp, old_lp, old_mean + delta, old_mean, std))
        b = (delta[0] ** 2).mean() / (2 * s**2)
        se = (lp - old_lp).std() / M**0.5
        assert abs((lp - old_lp).mean() + b) < 5 * se  # E[log r] = −b: the ratio is left-shifted
        assert b > 10 * se  # ... by far more than the noise of that estimate (so the check above can fail)
    torch.testing.assert_close(guarded[0], guarded[1], rtol=1e-9, atol=1e-12)
    assert abs(guarded[0].mean()) < 5 * guarded[0].std() / M**0.5
    assert plain[0].std() > 9 * plain[1].std()  # 1/s: 10× apart


def test_grpo_loss_with_the_guard_matches_the_hand_expression_value_and_gradient():
    # some ratios inside the clip range and some outside it in either direction, a masked (zero-advantage) sample
    B, D, clip, dt = 6, (3, 4), 0.02, -0.08
    g = gen(2)
    std = torch.tensor(0.3)
    old_mean = torch.randn(B, *D, generator=g)
    x_next = old_mean + std * torch.randn(B, *D, generator=g)
    delta = torch.tensor([0.01, 0.3, -0.3, 0.05, 0.3, -0.02]).view(B, 1, 1) * torch.randn(B, *D, generator=g)
    adv = torch.tensor([1.0, 1.0, -1.0, -0.5, 0.0, 2.0])
    keep = adv != 0

    def loss_and_grad(by_hand: bool):
        mean = (old_mean + delta).requires_grad_(True)
        lp, old_lp = log_prob(x_next, mean, std), log_prob(x_next, old_mean, std)
        if by_hand:
            loss = guard_loss_by_hand(lp, old_lp, mean, old_mean, std, adv, clip, dt, keep)
            info = None
        else:
            log_ratio = fg.guard_log_ratio(lp, old_lp, mean, old_mean, std)
            loss, info = fg.grpo_loss(lp, old_lp, adv, clip, mask=keep, log_ratio=log_ratio, policy_weight=1 / abs(dt))
        loss.backward()
        return loss.detach(), mean.grad, info

    loss, grad, info = loss_and_grad(False)
    loss_ref, grad_ref, _ = loss_and_grad(True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-8)
    assert (grad[~keep] == 0).all()
    # the clip acts on r̂: the reported fraction is that of |r̂ − 1| > ε over the kept samples
    with torch.no_grad():
        lp, old_lp = log_prob(x_next, old_mean + delta, std), log_prob(x_next, old_mean, std)
        r_hat = fg.guard_log_ratio(lp, old_lp, old_mean + delta, old_mean, std).exp()
    assert 0 < info["clipfrac"].item() < 1
    assert info["clipfrac"].item() == pytest.approx(((r_hat - 1).abs() > clip)[keep].float().mean().item())
    # 1/|dt| multiplies the policy term only: with β > 0 the KL term is added unweighted
    kl = torch.rand(B, generator=g)
    lp = log_prob(x_next, old_mean + delta, std)
    a, _ = fg.grpo_loss(lp, old_lp, adv, clip, kl, 0.5, keep, torch.zeros(B), policy_weight=12.5)
    z, _ = fg.grpo_loss(lp, old_lp, adv, clip, kl, 0.5, keep, torch.zeros(B), policy_weight=1.0)
    torch.testing.assert_close(a - z, 11.5 * (-adv[keep]).mean(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Through the loop: sample_epoch stores μ_old, train_step wires the guard in, and leaves today's loss alone when off
# ---------------------------------------------------------------------------------------------------------------


def toy_epoch(guard: bool, beta: float):
    args = argparse.Namespace(out="unused", seed=0, beta=beta, epochs=1, noise_level=0.7, sde_type="sde",
                              fast_window=0, fast_window_range=5, guard=guard)  # fmt: skip
    cfg = toy.toy_config(args)
    torch.manual_seed(0)
    model = toy.ToyModel(toy.VelocityMLP(), cfg.guidance_scale)  # random weights: the math does not need a good model
    prompts = [fg.Prompt(p) for p in toy.PROMPTS]
    samples = fg.sample_epoch(cfg, model, toy.toy_reward, prompts, gen(3), "cpu")
    return cfg, model, samples


@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_train_step_with_the_guard_against_the_hand_expression(beta):
    cfg, model, s = toy_epoch(True, beta)
    rows, j = slice(0, cfg.batch_size), 3
    cond_b = fg.select(s.cond, s.prompt_index[rows])
    adv = s.advantages[rows]
    x_j, x_next = s.latents[rows, j], s.latents[rows, j + 1]
    t, t_next = s.sigmas[j], s.sigmas[j + 1]
    assert s.means.shape == (len(s.latents), cfg.num_steps, 2)

    # on-policy: μ_θ is μ_old to the bit (the stored mean is the one sampling computed), so r̂ = 1 exactly
    _, info = fg.train_step(cfg, model, s, rows, j, cond_b, adv, beta)
    assert info["ratio"].item() == 1.0 and info["approx_kl"].item() == 0.0

    with torch.no_grad():  # some updates later
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen(4)))
    loss, _ = fg.train_step(cfg, model, s, rows, j, cond_b, adv, beta)
    v = model.velocity(x_j, t.expand(len(adv)), cond_b)
    _, _, mean, std = fg.sde_step(x_j, v, t, t_next, cfg.noise_level, x_next)
    lp = log_prob(x_next, mean, std.reshape(1, 1))
    expected = guard_loss_by_hand(lp, s.log_probs[rows, j], mean, s.means[rows, j], std.reshape(1), adv, cfg.clip_range,
                                  float(t_next - t), adv != 0)  # fmt: skip
    if beta > 0:
        with model.reference():
            v_ref = model.velocity(x_j, t.expand(len(adv)), cond_b)
        _, _, ref_mean, _ = fg.sde_step(x_j, v_ref, t, t_next, cfg.noise_level, x_next)
        # the reference form of the KL, |dt|·(μ_θ − μ_ref)²/(2 s²), element mean, over the kept samples
        kl = (t - t_next) * ((mean - ref_mean) ** 2).mean(dim=1) / (2 * std**2)
        expected = expected + beta * kl[adv != 0].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_guard_off_is_todays_loss_exactly():
    cfg, model, s = toy_epoch(False, 3.0)
    assert s.means is None  # μ_old costs as much memory as the latents: not kept unless --guard
    rows, j, beta = slice(16, 32), 5, 3.0
    cond_b = fg.select(s.cond, s.prompt_index[rows])
    adv = s.advantages[rows]
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen(5)))
    loss, info = fg.train_step(cfg, model, s, rows, j, cond_b, adv, beta)
    # today's call, written out: the same network calls, then grpo_loss without the guard's arguments
    x_j, x_next, t, t_next = s.latents[rows, j], s.latents[rows, j + 1], s.sigmas[j], s.sigmas[j + 1]
    with torch.no_grad(), model.reference():
        v_ref = model.velocity(x_j, t.expand(len(adv)), cond_b)
    _, _, ref_mean, _ = fg.sde_step(x_j, v_ref, t, t_next, cfg.noise_level, x_next)
    v = model.velocity(x_j, t.expand(len(adv)), cond_b)
    _, lp, mean, std = fg.sde_step(x_j, v, t, t_next, cfg.noise_level, x_next)
    kl = fg.step_kl(mean, ref_mean, std, t, t_next, cfg.kl)
    today, today_info = fg.grpo_loss(lp, s.log_probs[rows, j], adv, cfg.clip_range, kl, beta, mask=adv != 0)
    assert torch.equal(loss, today)
    assert all(torch.equal(info[k], today_info[k]) for k in info)
    # and the gradients, bit for bit
    params = model.trainable_parameters()
    g1 = torch.autograd.grad(loss, params)
    g2 = torch.autograd.grad(today, params)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


def test_guard_flags_reach_the_config():
    assert fg.parse_config(["--guard"]).guard and not fg.Config().guard
    assert toy.toy_config(toy.parse_args(["--guard"])).guard
    args = glyphs.parse_args(["--guard", "--guidance_scale", "1"])
    cfg = glyphs.glyph_config(args, 0.1, "unused")
    assert cfg.guard and cfg.guidance_scale == 1.0
    assert glyphs.glyph_config(glyphs.parse_args([]), 0.1, "unused").guidance_scale == glyphs.GUIDANCE_SCALE


@pytest.mark.parametrize("kwargs", [{"sde_type": "cps"}, {"log_prob_reduce": "sum"}])
def test_guard_is_refused_where_its_formulas_do_not_hold(kwargs):
    fg.plan_batches(fg.Config(**kwargs))  # fine without the guard
    with pytest.raises(ValueError, match="--guard needs"):
        fg.plan_batches(fg.Config(guard=True, **kwargs))
