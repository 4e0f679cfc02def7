"""Tests of the math in flow_grpo.py (sections 2-6), each against an independent reference.

References used, in order:
  * the Gaussian density of `torch.distributions.Normal` and hand-computed numbers for the SDE step;
  * diffusers' own `FlowMatchEulerDiscreteScheduler.step` for the a = 0 (ODE) step;
  * closed-form marginals of a 2D Gaussian and a 2D Gaussian-mixture target for the SDE's marginal preservation
    (the exact velocity E[ε − x₀ | x_t] is derived below and itself checked against the autograd score of a
    `torch.distributions` mixture);
  * numpy-style population statistics for the advantages, autograd + `torch.distributions.kl_divergence` for the loss;
  * hand arithmetic for the batch plan.

Conventions as in flow_grpo.py: x_t = (1 − t)·x₀ + t·ε, t = 1 is noise, sampling runs t: 1 → 0, v = ε − x₀.
"""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

import flow_grpo as fg

# Small 2D tensors: one thread avoids oversubscribing the 2 CPU cores when other jobs share them.
torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =====================================================================================================================
# Reference velocities: the exact flow of a Gaussian and of a Gaussian-mixture target (2D)
# =====================================================================================================================
# For x₀ ~ N(μ, Σ), ε ~ N(0, I) and x_t = (1 − t)x₀ + tε:
#   x_t ~ N(m_t, C_t),  m_t = (1 − t)μ,  C_t = (1 − t)²Σ + t²I,  Cov(x₀, x_t) = (1 − t)Σ,  Cov(ε, x_t) = tI, so
#   E[x₀ | x_t] = μ + (1 − t)Σ C_t⁻¹ (x − m_t),   E[ε | x_t] = t C_t⁻¹ (x − m_t),   v = E[ε | x_t] − E[x₀ | x_t].
# For a mixture Σ_k w_k N(μ_k, Σ_k): v = Σ_k P(k | x_t) v_k(x, t), with P(k | x_t) ∝ w_k N(x; m_{k,t}, C_{k,t}),
# because E[ε − x₀ | x_t] = Σ_k P(k | x_t) E[ε − x₀ | x_t, k].
# The helpers take the per-sample t (N,) that rollout passes; it is constant across the batch, so the 2×2 algebra is
# done once in float64 and v becomes an affine map of x (cheap for 10⁵ samples).


def _scalar_t(t):
    assert torch.all(t == t[0]), "reference velocities expect one t for the whole batch"
    return float(t[0])


def _component(x, t, mu, Sig, with_density=True):
    """For one Gaussian component at time t (float): (log N(x; m_t, C_t) or None, v_k(x, t)), x (N, 2)."""
    mu, Sig = mu.double(), Sig.double()
    C = (1 - t) ** 2 * Sig + t**2 * torch.eye(2, dtype=torch.float64)  # C_t
    C_inv = torch.linalg.inv(C)
    m = (1 - t) * mu  # m_t
    # v = E[ε|x] − E[x₀|x] = t C⁻¹(x − m) − μ − (1 − t)Σ C⁻¹(x − m) = K x − (K m + μ)
    K = t * C_inv - (1 - t) * Sig @ C_inv
    v = torch.addmm((-(K @ m) - mu).to(x.dtype), x, K.T.to(x.dtype))  # (N, 2)
    if not with_density:
        return None, v
    d = x - m.to(x.dtype)  # (N, 2)
    q = d @ C_inv.to(x.dtype)  # C⁻¹ symmetric: rows are (C⁻¹ d)ᵀ
    log_density = -0.5 * (q * d).sum(1) - 0.5 * torch.logdet(C).item() - math.log(2 * math.pi)  # (N,)
    return log_density, v


def gaussian_velocity(mu, Sig):
    return lambda x, t: _component(x, _scalar_t(t), mu, Sig, with_density=False)[1]


def mixture_velocity(weights, mus, Sigs):
    """Two components: P(1 | x_t) = sigmoid(log w₁N₁ − log w₂N₂), v = v₂ + P(1 | x_t)·(v₁ − v₂)."""
    assert len(weights) == len(mus) == len(Sigs) == 2

    def v(x, t):
        t = _scalar_t(t)
        (l1, v1), (l2, v2) = (_component(x, t, m, S) for m, S in zip(mus, Sigs))
        p1 = torch.sigmoid(l1 - l2 + math.log(weights[0] / weights[1]))  # (N,)
        return torch.addcmul(v2, p1[:, None], v1 - v2)  # (N, 2)

    return v


GAUSS_MU = torch.tensor([1.0, -0.5])
GAUSS_SIG = torch.tensor([[0.3, 0.1], [0.1, 0.2]])

MIX_W = (0.3, 0.7)
MIX_MU = (torch.tensor([-1.5, 0.0]), torch.tensor([1.5, 0.5]))
MIX_SIG = (torch.tensor([[0.2, 0.05], [0.05, 0.3]]), torch.tensor([[0.3, -0.1], [-0.1, 0.2]]))


def mixture_moments():
    mean = sum(w * m for w, m in zip(MIX_W, MIX_MU))
    second = sum(w * (S + torch.outer(m, m)) for w, m, S in zip(MIX_W, MIX_MU, MIX_SIG))
    return mean, second - torch.outer(mean, mean)


def mixture_fraction_nearer_first():
    """P(x nearer μ₁ than μ₂) for x from the mixture, in closed form: the set is the half-plane
    (x − (μ₁+μ₂)/2)·(μ₁ − μ₂) > 0, and under component k that projection is N((μ_k − mid)·d, dᵀΣ_k d)."""
    d = MIX_MU[0] - MIX_MU[1]
    mid = (MIX_MU[0] + MIX_MU[1]) / 2
    z = [(m - mid) @ d / torch.sqrt(d @ S @ d) for m, S in zip(MIX_MU, MIX_SIG)]
    return sum(w * Normal(0.0, 1.0).cdf(zk).item() for w, zk in zip(MIX_W, z))


def test_reference_velocity_matches_autograd_score_of_the_marginal():
    """Check the derivation above: with score = ∇log p_t (autograd of torch.distributions' mixture density of x_t),
    the flow's velocity is v = −(x + t·score)/(1 − t)  (from score = −(x + (1 − t)v)/t)."""
    from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

    x = torch.randn(64, 2, generator=gen(0), dtype=torch.float64)
    for t_val in (0.05, 0.3, 0.7, 0.95):
        t = torch.full((64,), t_val, dtype=torch.float64)
        mus = [m.double() for m in MIX_MU]
        Sigs = [S.double() for S in MIX_SIG]
        comps = MultivariateNormal(
            torch.stack([(1 - t_val) * m for m in mus]),
            torch.stack([(1 - t_val) ** 2 * S + t_val**2 * torch.eye(2, dtype=torch.float64) for S in Sigs]),
        )
        p_t = MixtureSameFamily(Categorical(torch.tensor(MIX_W, dtype=torch.float64)), comps)
        xr = x.clone().requires_grad_(True)
        score = torch.autograd.grad(p_t.log_prob(xr).sum(), xr)[0]
        expected = -(x + t_val * score) / (1 - t_val)
        torch.testing.assert_close(mixture_velocity(MIX_W, mus, Sigs)(x, t), expected, rtol=1e-9, atol=1e-9)
        # and the single Gaussian is the one-component mixture
        g = MultivariateNormal((1 - t_val) * mus[0], (1 - t_val) ** 2 * Sigs[0] + t_val**2 * torch.eye(2).double())
        xr = x.clone().requires_grad_(True)
        score = torch.autograd.grad(g.log_prob(xr).sum(), xr)[0]
        torch.testing.assert_close(
            gaussian_velocity(mus[0], Sigs[0])(x, t), -(x + t_val * score) / (1 - t_val), rtol=1e-9, atol=1e-9
        )


# =====================================================================================================================
# 1. sde_step: mean/std by hand, log-prob against torch.distributions.Normal
# =====================================================================================================================


def test_sde_step_mean_and_std_hand_computed():
    # t = 0.5, t' = 0.4, a = 0.5:  σ² = a²·t/(1 − t) = 0.25, dt = −0.1
    #   mean = x(1 + σ²dt/(2t)) + v(1 + σ²(1 − t)/(2t))dt = 0.975·x − 0.1125·v = 0.975 − 0.225 = 0.75  (x = 1, v = 2)
    #   (SDE form: x + [v + σ²/(2t)(x + (1 − t)v)]dt = 1 + [2 + 0.25·(1 + 1)]·(−0.1) = 0.75)
    #   std  = σ√(−dt) = 0.5·√0.1
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    _, _, mean, std = fg.sde_step(x, v, 0.5, 0.4, 0.5, prev_x=x)
    assert mean.item() == pytest.approx(0.75, abs=1e-6)
    assert std.item() == pytest.approx(0.5 * math.sqrt(0.1), abs=1e-7)
    # t = 1 (reference substitution: the 1/(1 − t) factor at t' = 0.9): σ² = 0.49/0.1 = 4.9, dt = −0.1
    #   mean = 1·(1 + 4.9·(−0.1)/2) + 2·(1 + 0)·(−0.1) = 0.755 − 0.2 = 0.555;   std = √(4.9·0.1) = a = 0.7
    _, _, mean, std = fg.sde_step(x, v, 1.0, 0.9, 0.7, prev_x=x)
    assert mean.item() == pytest.approx(0.555, abs=1e-6)
    assert std.item() == pytest.approx(0.7, abs=1e-6)


def test_sde_step_mean_equals_sde_drift_form_per_sample_t():
    """The code's 'mean = x·(…) + v·(…)·dt' against the notes' other form x + [v + σ²/(2t)(x + (1 − t)v)]dt."""
    g = gen(1)
    x, v = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t, tn, a = torch.tensor([0.95, 0.6, 0.2]), torch.tensor([0.9, 0.45, 0.0]), 0.8
    _, _, mean, std = fg.sde_step(x, v, t, tn, a, prev_x=x)
    tb, dtb = t.view(-1, 1, 1, 1), (tn - t).view(-1, 1, 1, 1)
    sig2 = a**2 * tb / (1 - tb)
    torch.testing.assert_close(mean, x + (v + sig2 / (2 * tb) * (x + (1 - tb) * v)) * dtb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, torch.sqrt(sig2 * -dtb), rtol=1e-6, atol=0)


@pytest.mark.parametrize("per_sample", [False, True])
def test_sde_step_log_prob_is_the_normal_density(per_sample):
    g = gen(2)
    B, D = 3, (2, 4, 5)
    x, v, prev_x = (torch.randn(B, *D, generator=g) for _ in range(3))
    if per_sample:  # includes a t = 1 sample (the substituted first step)
        t, tn = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.9, 0.6, 0.05])
    else:
        t, tn = 0.7, 0.6
    _, lp_sum, mean, std = fg.sde_step(x, v, t, tn, 0.7, prev_x=prev_x, reduce="sum")
    _, lp_mean, mean2, std2 = fg.sde_step(x, v, t, tn, 0.7, prev_x=prev_x, reduce="mean")
    assert lp_sum.shape == lp_mean.shape == (B,)
    expected = Normal(mean, std.expand_as(mean)).log_prob(prev_x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(lp_sum, expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(lp_mean, expected / math.prod(D), rtol=1e-6, atol=1e-6)
    assert torch.equal(mean, mean2) and torch.equal(std, std2)
    if per_sample:
        assert std.shape == (B, 1, 1, 1)
        assert std[0].item() == pytest.approx(0.7, abs=1e-6)  # the t = 1 step: std = a
        assert len(set(std.flatten().tolist())) == 3  # each sample got its own std


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_sampled_step_recomputes_to_the_same_log_prob(reduce):
    g = gen(3)
    x, v = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t, tn = torch.tensor([1.0, 0.8, 0.5, 0.2]), torch.tensor([0.9, 0.7, 0.3, 0.1])
    x_next, lp, mean, std = fg.sde_step(x, v, t, tn, 0.7, generator=gen(4), reduce=reduce)
    x_again, lp_again, _, _ = fg.sde_step(x, v, t, tn, 0.7, prev_x=x_next, reduce=reduce)
    assert torch.equal(x_again, x_next)
    assert torch.equal(lp_again, lp)
    # the same generator seed gives the same sample
    assert torch.equal(fg.sde_step(x, v, t, tn, 0.7, generator=gen(4), reduce=reduce)[0], x_next)


def test_sampled_noise_has_the_step_std():
    """x' = mean + std·ε with ε ~ N(0, I) and std = σ_t·√(−dt), σ_t = a·√(t/(1 − t)) (1 − t taken at t' when t = 1):
    the residuals standardised by that std, written out here, have mean 0 and variance 1. A step whose noise were
    σ_t·ε (without √(−dt)) would leave variance 1/|dt| = 10 or 5 here."""
    x = torch.randn(4, 8, 64, 64, generator=gen(5))
    v = torch.randn(4, 8, 64, 64, generator=gen(6))
    t, t_next, a = torch.tensor([1.0, 0.8, 0.5, 0.2]), torch.tensor([0.9, 0.6, 0.4, 0.0]), 0.7
    x_next, _, mean, std = fg.sde_step(x, v, t, t_next, a, generator=gen(7))
    expected = a * torch.sqrt(t / (1 - torch.where(t == 1, t_next, t))) * torch.sqrt(t - t_next)  # (4,)
    torch.testing.assert_close(std.flatten(), expected, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    z = ((x_next - mean) / expected[:, None, None, None]).flatten(1)  # (4, 32768)
    n = z.shape[1]
    assert z.mean(1).abs().max() < 5 / math.sqrt(n)
    assert (z.var(1) - 1).abs().max() < 5 * math.sqrt(2 / n)


def test_sde_step_computes_in_float32_from_bf16_inputs():
    x = torch.randn(2, 4, 8, 8, generator=gen(8)).bfloat16()
    v = torch.randn(2, 4, 8, 8, generator=gen(9)).bfloat16()
    x_next, lp, mean, std = fg.sde_step(x, v, 0.6, 0.5, 0.7, generator=gen(10))
    assert x_next.dtype == lp.dtype == mean.dtype == torch.float32
    ref = fg.sde_step(x.float(), v.float(), 0.6, 0.5, 0.7, generator=gen(10))
    assert torch.equal(x_next, ref[0]) and torch.equal(lp, ref[1])


def test_noise_level_zero_is_the_euler_step_without_density():
    x, v = torch.randn(3, 5, generator=gen(11)), torch.randn(3, 5, generator=gen(12))
    x_next, lp, mean, std = fg.sde_step(x, v, 0.7, 0.4, 0.0, generator=gen(13))
    assert torch.equal(x_next, x + v * (torch.tensor(0.4) - torch.tensor(0.7)))
    assert torch.isnan(lp).all() and lp.shape == (3,)
    assert torch.all(std == 0)


# =====================================================================================================================
# 2. a = 0 reproduces diffusers' FlowMatchEulerDiscreteScheduler (SD3: shift = 3) over whole schedules
# =====================================================================================================================


@pytest.mark.parametrize("num_steps", [10, 40])
def test_ode_step_matches_diffusers_scheduler(num_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas  # (T+1,), 1 → 0, shifted
    assert len(sigmas) == num_steps + 1 and sigmas[0] == 1 and sigmas[-1] == 0
    torch.testing.assert_close(scheduler.timesteps, sigmas[:-1] * 1000)  # the notes' timestep = 1000·t

    g = gen(14)
    W = torch.randn(4, 4, generator=g) * 0.5  # a fixed random linear velocity field over channels
    bias = torch.randn(4, 1, 1, generator=g)

    def velocity(x, t):  # x (N, 4, 8, 8), t (N,)
        return torch.einsum("oc,nchw->nohw", W, x) + t.view(-1, 1, 1, 1) * bias

    x1 = torch.randn(2, 4, 8, 8, generator=g)
    x_ours, x_theirs = x1.clone(), x1.clone()
    for j, timestep in enumerate(scheduler.timesteps):
        t = sigmas[j].expand(2)
        theirs = scheduler.step(velocity(x_theirs, t), timestep, x_theirs).prev_sample
        ours = fg.sde_step(x_ours, velocity(x_ours, t), sigmas[j], sigmas[j + 1], 0.0)[0]
        # same input state: the single step agrees; then both trajectories agree at every step
        one = fg.sde_step(x_theirs, velocity(x_theirs, t), sigmas[j], sigmas[j + 1], 0.0)[0]
        torch.testing.assert_close(one, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        x_ours, x_theirs = ours, theirs
    # and rollout with a = 0 walks exactly the same path
    traj = fg.rollout(velocity, x1, sigmas, 0.0)
    torch.testing.assert_close(traj.latents[:, -1], x_theirs, rtol=0, atol=1e-5)
    assert torch.isnan(traj.log_probs).all()


# =====================================================================================================================
# 3. Marginal preservation: SDE and ODE samples have the target's moments
# =====================================================================================================================


def moment_errors(x, mean_true, cov_true):
    """Errors of the sample mean / covariance (entries 00, 11, 01) and their Monte-Carlo standard errors,
    estimated from the samples themselves (valid for any distribution, not just Gaussians)."""
    n = x.shape[0]
    m = x.mean(0)
    d = x - m
    prods = torch.stack([d[:, 0] ** 2, d[:, 1] ** 2, d[:, 0] * d[:, 1]], dim=1)  # (n, 3)
    cov = prods.mean(0)
    cov_true = torch.stack([cov_true[0, 0], cov_true[1, 1], cov_true[0, 1]])
    return (m - mean_true).abs(), d.std(0) / math.sqrt(n), (cov - cov_true).abs(), prods.std(0) / math.sqrt(n)


def sample(velocity, n, T, a, seed=0):
    g = gen(seed)
    x1 = torch.randn(n, 2, generator=g)
    return fg.rollout(velocity, x1, torch.linspace(1, 0, T + 1), a, generator=g).latents[:, -1]


K_SE = 5.0  # tolerance in standard errors (deterministic seeds; 5 SE leaves room for the small discretisation bias)


# The ODE's Euler error falls only as 1/T (covariance error 0.075 at T = 10, 0.005 at T = 160, 0.0013 at T = 640 for
# this target), so its "matches the target" check needs 640 steps; the SDE's settles by 160 (see the exact-moment test
# below). rollout keeps every latent, (n, T+1, 2), so the 640-step run uses fewer samples to stay small.
@pytest.mark.parametrize("a,T_fine,n", [(0.7, 160, 100_000), (1.0, 160, 100_000), (0.0, 640, 25_000)])
def test_gaussian_target_marginal_and_convergence(a, T_fine, n):
    vel = gaussian_velocity(GAUSS_MU, GAUSS_SIG)
    cov_err = {}
    for T in (10, T_fine):
        x = sample(vel, n, T, a)
        em, sem, ec, sec = moment_errors(x, GAUSS_MU, GAUSS_SIG)
        cov_err[T] = ec.max().item()
        assert (em < K_SE * sem).all(), f"a={a} T={T}: mean error {em} vs SE {sem}"
        if T == T_fine:
            assert (ec < K_SE * sec).all(), f"a={a} T={T}: cov error {ec} vs SE {sec}"
    # more steps, closer to the target (measured: a=0.7 0.022 → 0.0013, a=1 0.0067 → 0.0018, ODE 0.075 → 0.003)
    assert cov_err[10] > 2 * cov_err[T_fine], cov_err


def test_gaussian_target_power_check_missing_drift_correction_is_caught():
    """The tolerance above is tight enough to see a wrong SDE: the same noise WITHOUT the σ²/(2t)·(x + (1 − t)v)
    correction (x' = x + v·dt + std·ε) inflates the covariance by far more than K_SE standard errors."""
    vel = gaussian_velocity(GAUSS_MU, GAUSS_SIG)
    g = gen(0)
    x = torch.randn(20_000, 2, generator=g)
    sig = torch.linspace(1, 0, 41)
    for j in range(40):
        v = vel(x, sig[j].expand(len(x)))
        _, _, _, std = fg.sde_step(x, v, sig[j], sig[j + 1], 0.7, prev_x=x)
        x = x + v * (sig[j + 1] - sig[j]) + std * torch.randn(x.shape, generator=g)
    _, _, ec, sec = moment_errors(x, GAUSS_MU, GAUSS_SIG)
    assert (ec > 20 * sec).any()


def test_gaussian_target_exact_moments_of_the_discretised_chain():
    """Noise-free version of the convergence check. For a linear v the step is affine, x' = A x + b + std·ε, so the
    mean and covariance of the chain propagate exactly: m' = A m + b, P' = A P Aᵀ + std² I. A, b and std are read off
    sde_step itself (evaluated at x = 0, e₁, e₂), and the result is compared with the true marginal at t = 0."""

    def final_cov_error(T, a):
        sig = torch.linspace(1, 0, T + 1)
        basis = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        m, P = torch.zeros(2), torch.eye(2)  # x₁ = ε ~ N(0, I)
        for j in range(T):
            v = gaussian_velocity(GAUSS_MU, GAUSS_SIG)(basis, sig[j].expand(3))
            _, _, mean, std = fg.sde_step(basis, v, sig[j], sig[j + 1], a, prev_x=basis)
            b, A = mean[0], (mean[1:] - mean[0]).T
            m, P = A @ m + b, A @ P @ A.T + std**2 * torch.eye(2)
        assert (m - GAUSS_MU).abs().max() < 1e-5  # the mean is exact for any step count
        return (P - GAUSS_SIG).abs().max().item()

    # Measured (a = 0 / 0.7 / 1): T=10 0.075/0.023/0.0066, T=40 0.021/0.0025/0.0012, T=160 0.0053/0.0014/0.0002.
    # The SDE's error does not go to 0 like the ODE's: on a uniform grid the j-th step near t = 1 injects noise
    # σ²|dt| ≈ a²/j whatever T is (the first one a², via the t = 1 substitution), so Euler–Maruyama is coarse there
    # for every T; later steps contract that error away, leaving a slowly shrinking floor (a = 0.7: 1.4e-3 at T = 640).
    for a in (0.0, 0.7, 1.0):
        errs = [final_cov_error(T, a) for T in (10, 40, 160)]
        assert errs[0] > errs[1] > errs[2], (a, errs)
        assert errs[2] < 6e-3, (a, errs)
    # the ODE (Euler) is first order: 4× the steps, about ¼ the error
    e40, e160 = final_cov_error(40, 0.0), final_cov_error(160, 0.0)
    assert 3.0 < e40 / e160 < 5.0


def test_first_sde_step_from_pure_noise_inflates_the_variance_like_the_reference():
    """Documents a property of the reference's t = 1 substitution (not of the continuous SDE): from x ~ N(0, I) at t = 1
    the first step is x' = (1 − a²/2 + dt)·x − μ·dt + a·ε for the Gaussian target (v(x, 1) = x − μ), so its variance is
    (1 − a²/2 + dt)² + a² ≈ 1 + a⁴/4 whatever the step size, while the marginal at t' = 1 + dt has (1 + dt)² + dt²Σ."""
    n, a, dt = 200_000, 1.0, -0.01
    x = torch.randn(n, 2, generator=gen(20))
    v = gaussian_velocity(GAUSS_MU, GAUSS_SIG)(x, torch.ones(n))
    x_next = fg.sde_step(x, v, 1.0, 1.0 + dt, a, generator=gen(21))[0]
    predicted = (1 - a**2 / 2 + dt) ** 2 + a**2  # 1.2401
    var = x_next.var(0)
    assert (var - predicted).abs().max() < 5 * predicted * math.sqrt(2 / n)


def test_mixture_target_marginal_and_weights():
    mean_true, cov_true = mixture_moments()
    frac_true = mixture_fraction_nearer_first()  # ≈ 0.3, minus the tails across the bisector
    vel = mixture_velocity(MIX_W, MIX_MU, MIX_SIG)
    n = 40_000
    frac_se = math.sqrt(frac_true * (1 - frac_true) / n)
    d = MIX_MU[0] - MIX_MU[1]
    mid = (MIX_MU[0] + MIX_MU[1]) / 2
    cov_err = {}
    for a, T in ((0.7, 160), (1.0, 160), (0.0, 10), (0.0, 160)):
        x = sample(vel, n, T, a, seed=1)
        em, sem, ec, sec = moment_errors(x, mean_true, cov_true)
        cov_err[a, T] = ec.max().item()
        if T == 10:
            continue
        assert (em < K_SE * sem).all(), f"a={a} T={T}: mean error {em} vs SE {sem}"
        assert (ec < K_SE * sec).all(), f"a={a} T={T}: cov error {ec} vs SE {sec}"
        frac = (((x - mid) @ d) > 0).float().mean().item()
        assert abs(frac - frac_true) < K_SE * frac_se, (a, T, frac, frac_true)
    # few ODE steps are visibly wrong for the bimodal target; many are not (measured 0.35 at T = 10, 0.024 at 160)
    assert cov_err[0.0, 10] > 5 * cov_err[0.0, 160], cov_err


# =====================================================================================================================
# 4. Recomputing stored transitions gives the sampling log-probs back exactly (first ratio = 1)
# =====================================================================================================================


class TinyVelocity(torch.nn.Module):
    """A small MLP v(x, t) on flattened latents of any shape D."""

    def __init__(self, dim):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, dim))

    def forward(self, x, t):
        h = torch.cat([x.flatten(1), t.view(-1, 1).to(x.dtype)], dim=1)
        return self.net(h).view_as(x)


@pytest.mark.parametrize("shape,reduce", [((2,), "mean"), ((2, 4, 4), "mean"), ((2, 4, 4), "sum")])
def test_recomputed_log_probs_equal_sampling_log_probs(shape, reduce):
    torch.manual_seed(0)
    model = TinyVelocity(math.prod(shape))
    T = 6
    sigmas = torch.linspace(1, 0, T + 1)
    levels = [0.7, 0.7, 0.0, 0.7, 0.7, 0.0]  # two ODE steps (Flow-GRPO-Fast-like window)
    x1 = torch.randn(8, *shape, generator=gen(30))
    traj = fg.rollout(model, x1, sigmas, levels, generator=gen(31), reduce=reduce)
    assert traj.latents.shape == (8, T + 1, *shape) and traj.log_probs.shape == (8, T)
    assert torch.equal(traj.latents[:, 0], x1)
    assert torch.equal(torch.isnan(traj.log_probs), torch.tensor(levels).eq(0).expand(8, T))
    adv = torch.randn(8, generator=gen(32))
    for j in range(T):
        x, t = traj.latents[:, j], sigmas[j].expand(8)
        v = model(x, t)  # with autograd on, as in training
        x_next, lp, _, _ = fg.sde_step(x, v, sigmas[j], sigmas[j + 1], levels[j], prev_x=traj.latents[:, j + 1],
                                       reduce=reduce)
        if levels[j] == 0:  # an ODE step: deterministic, the stored latent is the Euler step
            torch.testing.assert_close(x + v.detach() * (sigmas[j + 1] - sigmas[j]), traj.latents[:, j + 1],
                                       rtol=0, atol=0)
            continue
        assert torch.equal(lp.detach(), traj.log_probs[:, j])
        loss, info = fg.grpo_loss(lp, traj.log_probs[:, j], adv, clip_range=1e-4)
        assert info["ratio"] == 1.0 and info["clipfrac"] == 0.0 and info["approx_kl"] == 0.0
        loss.backward()  # the gradient reaches the model
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        model.zero_grad()


def test_rollout_checks_its_schedule_once():
    # the per-step check in sde_step is skipped for device tensors (it would stall a GPU every step); rollout checks
    # the whole schedule up front instead
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="must decrease"):
        fg.rollout(lambda x, t: x, x, torch.tensor([1.0, 0.5, 0.6, 0.0]), 0.7)


def test_rollout_rejects_wrong_number_of_noise_levels():
    with pytest.raises(ValueError, match="one noise level per step"):
        fg.rollout(lambda x, t: x, torch.zeros(2, 2), torch.linspace(1, 0, 5), [0.7, 0.7])


# =====================================================================================================================
# 5. group_advantages against numpy-style population statistics
# =====================================================================================================================


def _reference_advantages(rewards, ids, global_std):
    """A plain per-group loop in numpy (float64, np.std = population std)."""
    r = rewards.double().numpy()
    ids = np.asarray(ids)
    out = np.empty_like(r)
    for g in np.unique(ids):
        grp = r[ids == g]
        out[ids == g] = (grp - grp.mean()) / ((np.std(r) if global_std else np.std(grp)) + 1e-4)
    return torch.from_numpy(out).float()


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_against_reference_loop(global_std):
    G, B = 6, 4
    ids = [i % B for i in range(G * B)]  # interleaved, as samples of different prompts arrive mixed
    rewards = torch.randn(G * B, generator=gen(40)) * 0.5 + torch.arange(G * B) % B  # groups differ in mean
    adv = fg.group_advantages(rewards, torch.tensor(ids), global_std=global_std, clip=100.0)
    torch.testing.assert_close(adv, _reference_advantages(rewards, ids, global_std), rtol=1e-5, atol=1e-5)
    ids_t = torch.tensor(ids)
    std_all = float(np.std(rewards.numpy()))  # ≈ 1.2: includes the spread BETWEEN group means
    for g in range(B):
        a = adv[ids_t == g]
        assert abs(a.mean().item()) < 1e-5  # zero mean per group
        std_r = float(np.std(rewards[ids_t == g].numpy()))
        # per-group: unit population std up to the 1e-4 epsilon; global: the group's spread over the std of ALL
        expected = std_r / ((std_all if global_std else std_r) + 1e-4)
        assert a.std(unbiased=False).item() == pytest.approx(expected, rel=1e-5)
        if global_std:
            assert expected < 0.8  # the two variants really differ on this data


def test_group_advantages_string_ids_equal_integer_ids():
    prompts = ["a cat", "a dog", "a cat", "a red car", "a dog", "a red car", "a cat", "a dog"]
    ints = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1])
    rewards = torch.randn(8, generator=gen(41))
    for gs in (False, True):
        assert torch.equal(fg.group_advantages(rewards, prompts, gs), fg.group_advantages(rewards, ints, gs))


# Constant groups must give exactly 0 (notes §3, and the ADV_EPS comment). 1.0 and 0.5 sum exactly in float32;
# 0.1 over 7 samples and 123.456 over 24 do not, so the group mean is off by an ulp δ, the per-group std is then |δ|,
# and A = δ/(|δ| + 1e-4) is not 0 (123.456, G = 24: |A| ≈ 0.23).
@pytest.mark.parametrize("value,G", [(1.0, 24), (0.5, 3), (0.0, 5), (0.1, 7), (0.7, 24), (123.456, 24)])
@pytest.mark.parametrize("global_std", [False, True])
def test_constant_group_gets_exactly_zero(value, G, global_std):
    rewards = torch.cat([torch.full((G,), value), torch.randn(G, generator=gen(42))])
    ids = [0] * G + [1] * G
    adv = fg.group_advantages(rewards, ids, global_std=global_std)
    assert not torch.isnan(adv).any()
    assert torch.equal(adv[:G], torch.zeros(G)), adv[:G]
    # a batch where EVERY reward is the same (global std 0)
    adv_all = fg.group_advantages(torch.full((2 * G,), value), ids, global_std=global_std)
    assert torch.equal(adv_all, torch.zeros(2 * G)), adv_all


def test_group_advantages_are_clipped():
    # one outlier in a group of 30: unclipped A = 29/√29·(1 − ~0) = √29 ≈ 5.39 > 5
    rewards = torch.zeros(30)
    rewards[0] = 1.0
    ids = [0] * 30
    unclipped = fg.group_advantages(rewards, ids, clip=100.0)
    assert unclipped[0].item() == pytest.approx(math.sqrt(29), rel=1e-3)
    adv = fg.group_advantages(rewards, ids)  # default clip 5
    assert adv[0].item() == 5.0
    assert torch.equal(adv[1:], unclipped[1:])
    # the others have A ≈ −1/√29 ≈ −0.19: a clip of 0.1 bounds both signs
    adv = fg.group_advantages(rewards, ids, clip=0.1)
    assert torch.equal(adv, torch.tensor([0.1] + [-0.1] * 29))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        fg.group_advantages(torch.tensor([1.0, 2.0, 3.0]), [0, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        fg.group_advantages(torch.tensor([1.0, float("nan"), 3.0, 4.0]), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="NaN or inf"):
        fg.group_advantages(torch.tensor([1.0, float("inf"), 3.0, 4.0]), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="one group id per reward"):
        fg.group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), [0, 0, 1])
    with pytest.raises(ValueError, match="one group id per reward"):
        fg.group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        fg.group_advantages(torch.ones(2, 2), [0, 0, 1, 1])


# =====================================================================================================================
# 6. grpo_loss: gradients, clipping, KL against torch.distributions
# =====================================================================================================================


def test_grpo_loss_gradient_at_ratio_one_is_minus_advantage_over_batch():
    B = 5
    adv = torch.randn(B, generator=gen(50))
    old = torch.randn(B, generator=gen(51))
    lp = old.clone().requires_grad_(True)
    loss, info = fg.grpo_loss(lp, old, adv, clip_range=0.2)
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / B, rtol=1e-6, atol=1e-7)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert info["ratio"].item() == 1.0 and info["clipfrac"].item() == 0.0 and info["kl_ref"].item() == 0.0
    assert all(v.ndim == 0 and not v.requires_grad for v in info.values())  # device tensors, read by the caller


def test_grpo_loss_clipping_blocks_only_the_pushed_direction():
    eps, B = 0.2, 6
    # (A, log ratio):  A>0 r>1+ε  blocked | A<0 r<1−ε  blocked | A>0 r<1−ε  live | A<0 r>1+ε  live | two inside
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.7, -0.3])
    log_ratio = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.1, -0.1])
    old = torch.randn(B, generator=gen(52))
    lp = (old + log_ratio).requires_grad_(True)
    loss, info = fg.grpo_loss(lp, old, adv, clip_range=eps)
    loss.backward()
    r = log_ratio.exp()
    # d/dlogp of −A·r/B is −A·r/B where the unclipped term is the max; 0 where the clipped constant is
    expected = torch.tensor([0.0, 0.0, -r[2] * 1.0 / B, r[3] / B, -0.7 * r[4] / B, 0.3 * r[5] / B])
    torch.testing.assert_close(lp.grad, expected, rtol=1e-6, atol=1e-8)
    assert lp.grad[2] != 0 and lp.grad[3] != 0
    # the value: max(−A r, −A clip(r)) per sample
    per = torch.maximum(-adv * r, -adv * r.clamp(1 - eps, 1 + eps))
    assert loss.item() == pytest.approx(per.mean().item(), abs=1e-6)
    # clipfrac: the reference's definition, the fraction with |r − 1| > ε (both blocked and live ones)
    assert info["clipfrac"].item() == pytest.approx(4 / 6)
    assert info["ratio"].item() == pytest.approx(r.mean().item(), rel=1e-6)
    assert info["approx_kl"].item() == pytest.approx((0.5 * log_ratio**2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("per_sample_std", [False, True])
def test_exact_kl_is_the_gaussian_kl_and_enters_the_loss_with_beta(per_sample_std):
    B, D = 3, (2, 4, 4)
    g = gen(53)
    mean = torch.randn(B, *D, generator=g).requires_grad_(True)
    ref_mean = torch.randn(B, *D, generator=g)
    std = torch.tensor([0.3, 0.5, 0.9]).view(B, 1, 1, 1) if per_sample_std else torch.tensor(0.4)
    lp = torch.zeros(B)
    adv = torch.randn(B, generator=g)
    beta = 0.04

    kl = fg.step_kl(mean, ref_mean, std, 0.5, 0.4, form="exact")  # (B,)
    s = std.expand_as(ref_mean)
    expected = kl_divergence(Normal(mean.detach(), s), Normal(ref_mean, s)).mean(dim=(1, 2, 3))  # per sample
    torch.testing.assert_close(kl.detach(), expected, rtol=1e-5, atol=0)
    # the same means: no KL, the loss is the policy loss
    loss0, info0 = fg.grpo_loss(lp, lp, adv, 1e-4, fg.step_kl(ref_mean, ref_mean, std, 0.5, 0.4, "exact"), beta)
    assert info0["kl_ref"].item() == 0.0 and loss0.item() == info0["policy_loss"].item()

    loss, info = fg.grpo_loss(lp, lp, adv, 1e-4, kl, beta)
    assert info["kl_ref"].item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(info["policy_loss"].item() + beta * expected.mean().item(), rel=1e-6)
    loss.backward()
    # ∂/∂μ of β·mean((μ − μ_ref)²/(2s²)) = β(μ − μ_ref)/(s²·numel)
    torch.testing.assert_close(mean.grad, beta * (mean.detach() - ref_mean) / (s**2 * mean.numel()),
                               rtol=1e-5, atol=1e-9)


def test_reference_kl_divides_by_sigma_t_squared_on_every_step_of_the_sd3_schedule():
    # the reference's KL, written here from its definition: mean over elements of (μ_θ − μ_ref)² / (2 σ_t²) with
    # σ_t = a·√(t/(1 − t)), where at t = 1 the (1 − t) uses the first t below 1 (the schedule's t₁)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    ts = sched.sigmas.float()  # (11,) from 1 to 0
    a, g = 0.7, gen(54)
    x = torch.randn(2, 4, 8, 8, generator=g)
    v, v_ref = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for j in range(10 - 1):  # every trained step (timestep_fraction 0.99: steps 0..8)
        t, t_next = ts[j].item(), ts[j + 1].item()
        _, _, mean, std = fg.sde_step(x, v, t, t_next, a, prev_x=x)
        _, _, ref_mean, _ = fg.sde_step(x, v_ref, t, t_next, a, prev_x=x)
        sigma = a * math.sqrt(t / (1 - (ts[1].item() if t == 1 else t)))
        by_hand = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * sigma**2)
        reference = fg.step_kl(mean, ref_mean, std, t, t_next, "reference")
        exact = fg.step_kl(mean, ref_mean, std, t, t_next, "exact")
        # float32: a handful of roundings of numbers of the same sign, so a few ulps (2^-23 ≈ 1.2e-7 each)
        torch.testing.assert_close(reference, by_hand.float(), rtol=1e-5, atol=0)
        torch.testing.assert_close(reference / exact, torch.full((2,), t - t_next), rtol=1e-5, atol=0)  # |dt|
    # CPS: the reference's std_dev_t is the step's own std, so its KL is the exact one
    _, _, mean, std = fg.sde_step(x, v, 0.5, 0.4, a, prev_x=x, sde_type="cps")
    _, _, ref_mean, _ = fg.sde_step(x, v_ref, 0.5, 0.4, a, prev_x=x, sde_type="cps")
    torch.testing.assert_close(fg.step_kl(mean, ref_mean, std, 0.5, 0.4, "reference", "cps"),
                               fg.step_kl(mean, ref_mean, std, 0.5, 0.4, "exact", "cps"), rtol=0, atol=0)


def test_masked_samples_give_the_gradient_of_the_batch_without_them():
    # a batch of 6 where samples 1, 4 (a constant group: advantage exactly 0) are masked out equals the batch of the
    # other 4, policy term AND KL term; float32 sums of 4 vs 6 terms of which 2 are exact zeros: equal to ~1 ulp
    g = gen(55)
    B, D = 6, (3, 4)
    lp = torch.randn(B, generator=g)
    old = lp + 0.05 * torch.randn(B, generator=g)
    adv = torch.randn(B, generator=g)
    adv[[1, 4]] = 0.0
    mean, ref_mean = torch.randn(B, *D, generator=g), torch.randn(B, *D, generator=g)
    keep = adv != 0

    def grads(rows, mask):
        lp_ = lp[rows].clone().requires_grad_(True)
        mean_ = mean[rows].clone().requires_grad_(True)
        kl = fg.step_kl(mean_, ref_mean[rows], torch.tensor(0.3), 0.5, 0.4)
        loss, _ = fg.grpo_loss(lp_, old[rows], adv[rows], 0.2, kl, beta=0.5, mask=mask)
        loss.backward()
        return loss, lp_.grad, mean_.grad

    loss_all, g_lp, g_mean = grads(torch.arange(B), keep)
    loss_kept, g_lp_kept, g_mean_kept = grads(keep.nonzero().flatten(), None)
    torch.testing.assert_close(loss_all, loss_kept, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_lp[keep], g_lp_kept, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_mean[keep], g_mean_kept, rtol=1e-6, atol=1e-8)
    assert (g_lp[~keep] == 0).all() and (g_mean[~keep] == 0).all()  # not pulled by the KL either


def test_grpo_loss_bad_input():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="must all have shape"):
        fg.grpo_loss(z, torch.zeros(4), z, 0.2)
    with pytest.raises(ValueError, match="must all have shape"):
        fg.grpo_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), 0.2)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        fg.grpo_loss(z, z, z, 0.0)
    with pytest.raises(ValueError, match="needs the per-sample KL"):
        fg.grpo_loss(z, z, z, 0.2, beta=0.1)
    with pytest.raises(ValueError, match="shapes differ"):
        fg.step_kl(torch.zeros(3, 2), torch.zeros(3, 3), torch.tensor(1.0), 0.5, 0.4)
    with pytest.raises(ValueError, match="kl form"):
        fg.step_kl(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor(1.0), 0.5, 0.4, form="paper")


# =====================================================================================================================
# 7. Bad input to sde_step, and the batch arithmetic
# =====================================================================================================================


def test_sde_step_bad_input():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        fg.sde_step(x, x, 0.5, 0.4, -0.1)
    with pytest.raises(ValueError, match="x and v must have the same shape"):
        fg.sde_step(x, torch.zeros(3, 3), 0.5, 0.4, 0.7)
    with pytest.raises(ValueError, match="prev_x must have the shape of x"):
        fg.sde_step(x, x, 0.5, 0.4, 0.7, prev_x=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="t_next must be smaller than t"):
        fg.sde_step(x, x, 0.5, 0.5, 0.7)
    with pytest.raises(ValueError, match="t_next must be smaller than t"):
        fg.sde_step(x, x, 0.4, 0.5, 0.0)
    with pytest.raises(ValueError, match="t_next must be smaller than t"):  # one sample of a per-sample batch
        fg.sde_step(x, x, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.4, 0.6, 0.4]), 0.7)
    with pytest.raises(ValueError, match=r"per-sample t must have shape \(3,\)"):
        fg.sde_step(x, x, torch.tensor([0.5, 0.5]), 0.4, 0.7)
    with pytest.raises(ValueError, match=r"per-sample t must have shape \(3,\)"):
        fg.sde_step(x, x, 0.5, torch.full((3, 1), 0.4), 0.7)
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'sum'"):
        fg.sde_step(x, x, 0.5, 0.4, 0.7, reduce="max")
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'sum'"):
        fg.gaussian_log_prob(x, x, torch.tensor(1.0), reduce="none")


def test_sde_step_rejects_bad_reduce_for_ode_steps_too():
    """A typo in --log_prob_reduce should fail on the first call, not only once a stochastic step is taken
    (evaluation runs a = 0 everywhere and would accept it silently)."""
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'sum'"):
        fg.sde_step(x, x, 0.5, 0.4, 0.0, reduce="max")


def test_plan_batches_default_config():
    cfg = fg.Config()
    plan = fg.plan_batches(cfg)
    assert plan.images_per_epoch == 48  # 2 groups × 24
    assert plan.batches_per_epoch == 6  # 48 / 8
    assert plan.accumulation == 3  # 6 batches / 2 optimiser steps
    assert plan.optimizer_steps_per_epoch == 2
    assert plan.n_trained == 9  # int(10 · 0.99) = 9: steps 0..8
    levels, steps = fg.sde_window(cfg, torch.Generator().manual_seed(0))
    assert steps == list(range(9)) and levels == [0.7] * 10  # every step stochastic, the last one not trained
    # sampling 6 batches × 10 steps + training 6 batches × 9 steps × (policy + reference forward, β = 0.01)
    assert plan.forwards_per_epoch == 6 * 10 + 6 * 9 * 2
    assert "48 images/epoch" in plan.describe(cfg)


def test_fast_window_is_a_random_window_inside_the_range():
    cfg = fg.Config(fast_window=2, fast_window_range=5)
    plan = fg.plan_batches(cfg)
    assert plan.n_trained == 2
    # sampling still runs all 10 steps; training runs 2 instead of 9 per trajectory (policy + reference)
    assert plan.forwards_per_epoch == 6 * 10 + 6 * 2 * 2
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        levels, steps = fg.sde_window(cfg, g)
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and 0 <= steps[0] and steps[-1] < 5
        assert [j for j, a in enumerate(levels) if a > 0] == steps  # SDE exactly inside the window, ODE elsewhere
        starts.add(steps[0])
    assert starts == {0, 1, 2, 3}  # every placement inside the range occurs


@pytest.mark.parametrize("kwargs", [dict(fast_window=3, fast_window_range=2), dict(fast_window=2, fast_window_range=10)])
def test_fast_window_must_fit(kwargs):
    with pytest.raises(ValueError, match="Flow-GRPO-Fast needs"):
        fg.plan_batches(fg.Config(**kwargs))


def test_plan_batches_small_valid_config():
    cfg = fg.Config(group_size=4, groups_per_epoch=3, batch_size=2, optimizer_steps_per_epoch=3, inner_epochs=2,
                    num_steps=5, timestep_fraction=0.6, beta=0.0)
    plan = fg.plan_batches(cfg)
    assert (plan.images_per_epoch, plan.batches_per_epoch, plan.accumulation) == (12, 6, 2)
    assert plan.optimizer_steps_per_epoch == 6  # 2 inner epochs × 3
    assert plan.n_trained == 3  # int(5 · 0.6) = 3
    assert fg.sde_window(cfg, torch.Generator())[1] == [0, 1, 2]
    assert plan.forwards_per_epoch == 6 * 5 + 2 * 6 * 3 * 1  # no reference forward when β = 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(groups_per_epoch=2, group_size=3, batch_size=4), "not a multiple of --batch_size"),
        (dict(groups_per_epoch=2, group_size=4, batch_size=4, optimizer_steps_per_epoch=3), "cannot be split"),
        (dict(group_size=1, batch_size=1), "group_size must be >= 2"),
        (dict(num_steps=10, timestep_fraction=0.05), "timestep_fraction"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(noise_level=0.0), "noise_level must be > 0"),
    ],
)
def test_plan_batches_rejects_impossible_arithmetic(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fg.plan_batches(fg.Config(**kwargs))


# =====================================================================================================================
# 8. CPS, the coefficients-preserving sampler (sde_type="cps")
# =====================================================================================================================


def test_cps_step_hand_computed():
    # x = 1, v = 2, t = 0.5 → t' = 0.4, a = 0.5:  x̂₀ = 1 − 0.5·2 = 0,  x̂₁ = 1 + 0.5·2 = 2
    # std = 0.4·sin(π/4) = 0.2828…,  mean = 0.6·0 + √(0.16 − 0.08)·2 = 2·√0.08
    x, v = torch.ones(1, 1), 2 * torch.ones(1, 1)
    _, _, mean, std = fg.sde_step(x, v, 0.5, 0.4, 0.5, sde_type="cps")
    assert std.item() == pytest.approx(0.4 * math.sin(math.pi / 4), rel=1e-6)
    assert mean.item() == pytest.approx(2 * math.sqrt(0.08), rel=1e-6)
    # the total noise coefficient is t': (√(t'² − std²))² + std² = t'²
    assert (math.sqrt(0.16 - std.item() ** 2)) ** 2 + std.item() ** 2 == pytest.approx(0.16)


@pytest.mark.parametrize("per_sample", [False, True])
def test_cps_log_prob_is_the_normal_density(per_sample):
    g = gen(3)
    x, v, x_next = (torch.randn(4, 3, 5, generator=g) for _ in range(3))
    t = torch.tensor([1.0, 0.8, 0.5, 0.2]) if per_sample else 0.6
    t_next = t - 0.1
    _, lp_sum, mean, std = fg.sde_step(x, v, t, t_next, 0.7, prev_x=x_next, reduce="sum", sde_type="cps")
    _, lp_mean, _, _ = fg.sde_step(x, v, t, t_next, 0.7, prev_x=x_next, reduce="mean", sde_type="cps")
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).sum(dim=(1, 2))
    torch.testing.assert_close(lp_sum, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_mean, ref / 15, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sde_type="cps", timestep_fraction=1.0), "must not train the last step"),
        (dict(sde_type="cps", noise_level=1.5), "CPS needs --noise_level <= 1"),
        (dict(mixed_precision="fp8"), "--mixed_precision must be"),
        (dict(log_prob_reduce="max"), "--log_prob_reduce must be"),
    ],
)
def test_plan_rejects_configs_that_would_train_on_garbage(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fg.plan_batches(fg.Config(**kwargs))


def test_cps_last_step_is_deterministic_and_a_above_one_is_rejected():
    x = torch.randn(3, 2)
    _, lp, mean, std = fg.sde_step(x, x, 0.1, 0.0, 0.7, sde_type="cps")
    assert torch.isnan(lp).all() and float(std) == 0.0
    with pytest.raises(ValueError, match="CPS needs 0 <= noise_level <= 1"):
        fg.sde_step(x, x, 0.5, 0.4, 1.5, sde_type="cps")
    with pytest.raises(ValueError, match="sde_type must be"):
        fg.sde_step(x, x, 0.5, 0.4, 0.5, sde_type="ddim")


@pytest.mark.parametrize("a", [0.7, 1.0])
def test_cps_keeps_the_exact_marginal_when_x0_is_known(a):
    """CPS's defining property: if x̂₀ and x̂₁ are the true x₀ and ε, every step lands exactly on the marginal
    x_t' = (1 − t')·x₀ + t'·ε, for any step size. That is the case for a point-mass target x₀ = μ, whose exact
    velocity is v = (x − μ)/t. Checked at EVERY step of a coarse 10-step schedule (the SDE is only right as T → ∞)."""
    mu = torch.tensor([1.0, -0.5])
    vel = lambda x, t: (x - mu) / t.view(-1, 1)  # noqa: E731  v = ε − x₀ with ε = (x − (1 − t)μ)/t
    g = gen(0)
    n = 100_000
    sig = torch.linspace(1, 0, 11)
    traj = fg.rollout(vel, torch.randn(n, 2, generator=g), sig, a, generator=g, sde_type="cps")
    for j in range(1, 10):  # the marginal at t_j: N((1 − t)μ, t²I)
        t = float(sig[j])
        em, sem, ec, sec = moment_errors(traj.latents[:, j], (1 - t) * mu, t**2 * torch.eye(2))
        assert (em < K_SE * sem).all() and (ec < K_SE * sec).all(), (j, em, sem, ec, sec)
    torch.testing.assert_close(traj.latents[:, -1], mu.expand(n, 2), atol=1e-5, rtol=0)  # t = 0: exactly x₀


def test_cps_is_not_marginal_preserving_for_a_spread_target():
    """With the posterior MEAN x̂₀ = E[x₀ | x_t] instead of x₀, re-noising a fixed fraction sin(a·π/2) of the noise
    every step shrinks the spread, and the bias does not vanish with more steps (the SDE's does): measured on the
    Gaussian target, variance error of x₀[0] ≈ −0.13 (T = 10), −0.10 (40), −0.09 (160) at a = 0.7, vs the SDE's
    −0.024, −0.004, 0.000. The mean stays right. Pinned here so the documentation of CPS stays honest."""
    vel = gaussian_velocity(GAUSS_MU, GAUSS_SIG)
    var_err = {}
    for sde_type in ("cps", "sde"):
        g = gen(0)
        x1 = torch.randn(50_000, 2, generator=g)
        x = fg.rollout(vel, x1, torch.linspace(1, 0, 161), 0.7, generator=g, sde_type=sde_type).latents[:, -1]
        em, sem, ec, sec = moment_errors(x, GAUSS_MU, GAUSS_SIG)
        assert (em < K_SE * sem).all(), (sde_type, em, sem)
        var_err[sde_type] = (x[:, 0].var() - GAUSS_SIG[0, 0]).item()
    assert var_err["cps"] < -0.05 and abs(var_err["sde"]) < 0.01, var_err


# =====================================================================================================================
# 9. EMA of the trainable weights
# =====================================================================================================================


def test_ema_warm_up_against_a_hand_computed_sequence():
    # a scalar weight that equals the step count after each optimiser step; every = 2: updates after steps s with
    # (s + 1) % 2 == 0, i.e. s = 1, 3, 5, with d = min((1 + s)/(10 + s), 0.35) = 2/11, 4/13, 0.35 (6/15 capped)
    p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = fg.EMA([p], decay=0.35, every=2)
    expected = 0.0
    for s in range(1, 7):
        with torch.no_grad():
            p.fill_(float(s))
        ema.step(s)
        if s == 1:
            expected = 2 / 11 * 0.0 + 9 / 11 * 1.0
        elif s == 3:
            expected = 4 / 13 * expected + 9 / 13 * 3.0
        elif s == 5:
            expected = 0.35 * expected + 0.65 * 5.0
        assert ema.shadow[0].item() == pytest.approx(expected, rel=1e-6), s
    paper = fg.EMA([p], decay=0.9, every=8)  # the paper's setting: first update after step 7, with d = 8/17
    assert paper.decay_at(7) == pytest.approx(8 / 17) and paper.decay_at(79) < 0.9 and paper.decay_at(80) == 0.9


def test_ema_swap_puts_the_average_in_and_the_trained_weights_back():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = fg.EMA([p], decay=0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 0.0]))
    ema.step(100)  # d = 0.9: w_ema ← 0.9·(1, 2) + 0.1·(3, 0)
    torch.testing.assert_close(ema.shadow[0], torch.tensor([1.2, 1.8]))
    with ema.swapped_in():
        torch.testing.assert_close(p.detach(), torch.tensor([1.2, 1.8]))
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 0.0]))  # the trained weights come back
