"""The compiled path (--compile on: torch.compile of each transformer block, flow_grpo.py section 10), on the tiny
SD3 model. Independent references: the same weights run eagerly, and in float64 (for the float32 error bound).

Marked slow: compiling costs about a minute on a CPU (measured on a 2-core machine, empty compile cache,
OMP_NUM_THREADS=1: 51 s for the first test, 14 s for the second; up to twice that while other jobs share the cores).
`python -m pytest -q` runs them; `-m "not slow"` leaves them out."""

import pytest
import torch
from torch._dynamo.utils import counters

import flow_grpo as fg
import rewards
from test_sd3 import PROMPTS, make_model, perturb_lora, tiny_cfg

U = torch.finfo(torch.float32).eps / 2  # float32 unit roundoff, 2⁻²⁴


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch, tmp_path_factory):
    """Each test starts with no compiled graphs and zeroed counters (dynamo's caches are process-wide), and with an
    inductor cache of its own: the default one is shared by every process of the machine, and a kernel generated
    by another run (seen: one under another ATEN_CPU_CAPABILITY, at the same time) must not be reused here."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor_cache")))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def rel_err(a, ref) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.slow
def test_compiled_velocities_and_log_probs_match_eager_and_training_reproduces_sampling(tmp_path):
    """Inductor (the compiler of the GPU path; here it generates C++): the compiled transformer computes the same
    function as eager to float32 accuracy, and training's forward recomputes sampling's log-probs bit for bit."""
    models = {name: make_model(tiny_cfg(tmp_path, batch_size=2, compile=c)) for name, c in
              [("eager", "off"), ("compiled", "on"), ("float64", "off")]}  # fmt: skip
    for m in models.values():
        perturb_lora(m)  # the same LoRA values in each
    models["float64"].pipe.to(torch.float64)
    models["float64"].dtype = torch.float64
    conds = {k: m.encode(PROMPTS) for k, m in models.items()}
    velocity = {k: (lambda x, t, k=k: models[k].velocity(x, t, conds[k])) for k in models}
    compiled, a, T = models["compiled"], 0.7, 4
    sigmas = compiled.schedule(T)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x, t = torch.randn((2, *compiled.latent_shape), generator=g), torch.rand(2, generator=g)
        with torch.no_grad():
            v = {k: f(x, t) for k, f in velocity.items()}
        # The float32 bound: eager's own error against the float64 evaluation of the same weights. The compiled
        # model must be as accurate (measured ratio of the two relative errors 0.98-1.02 over 5 seeds, also with
        # ATEN_CPU_CAPABILITY=default; both ~9e-7 here).
        assert rel_err(v["compiled"], v["float64"]) <= 1.5 * rel_err(v["eager"], v["float64"])

        traj = {k: fg.rollout(f, x, sigmas, a, torch.Generator().manual_seed(seed)) for k, f in velocity.items()}
        # the same bound on 4 SDE steps with the same noise (measured ratio 0.95-1.05 over 5 seeds; errors ~2.5e-7)
        err = {k: rel_err(traj[k].latents, traj["float64"].latents) for k in ("eager", "compiled")}
        assert err["compiled"] <= 1.5 * err["eager"]
        # A sampled step's log-prob is the mean of −ε²/2 − log std − log √(2π) over elements, ε = (x' − mean)/std:
        # v enters only through the float32 rounding of x' = mean + std·ε and of x' − mean, each at most
        # u·max(|x'|, |mean|), so |Δε| ≤ 2u·(X + S·E)/s per run and |Δ log-prob| ≤ 2·E·|Δε| between two runs,
        # with X = max|x|, E = max|ε| (the rollout's own draws), s, S = min and max std. Measured: ≤ 2.4e-7.
        g = torch.Generator().manual_seed(seed)
        E = max(torch.randn(x.shape, generator=g).abs().max().item() for _ in range(T))
        std = torch.stack([fg.sde_mean_std(x, x, sigmas[j], sigmas[j + 1], a)[1] for j in range(T)])  # (T,)
        X = max(tr.latents.abs().max().item() for tr in traj.values())
        bound = 2 * E * 2 * U * (X + std.max().item() * E) / std.min().item()
        assert (traj["compiled"].log_probs - traj["eager"].log_probs).abs().max() <= bound

        # Training (train_step: grad mode) recomputes each step's log-prob on the stored trajectory. It runs the same
        # compiled graph as sampling did (velocity() keeps grad mode on for both), so every first ratio is exactly 1.
        c = traj["compiled"]
        for j in range(T):
            v_j = compiled.velocity(c.latents[:, j], sigmas[j].expand(2), conds["compiled"])
            assert v_j.requires_grad
            log_prob = fg.sde_step(c.latents[:, j], v_j, sigmas[j], sigmas[j + 1], a, c.latents[:, j + 1])[1]
            assert torch.equal(log_prob.detach(), c.log_probs[:, j])
    # the tiny model's two block structures (plain; the last one context_pre_only), adapters on, one batch size
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def dual_attention_model(cfg) -> fg.SD3Model:
    """The tiny model with three blocks: dual attention in block 0, a plain block 1 and the context_pre_only block 2,
    SD3.5-Medium's three block structures (24 blocks: dual attention in 0-12, plain 13-22, the last)."""
    from diffusers import SD3Transformer2DModel
    from tiny_sd3 import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel(**dict(config, num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm")).eval()
    torch.manual_seed(cfg.seed)  # the LoRA init, as make_model
    return fg.SD3Model(pipe, cfg, torch.device("cpu"), torch.float32)


# an epoch of 2 prompts × 2 images with every kind of call (also tests/test_gpu.py): β > 0 (reference forwards),
# lr 0 (unchanged weights), Fast window, evaluation with EMA, gradient checkpointing
EVERY_KIND_OF_CALL = dict(
    beta=0.04, lr=0.0, weight_decay=0.0, group_size=2, groups_per_epoch=2, batch_size=2, num_steps=3, fast_window=1,
    fast_window_range=2, eval_every=1, eval_count=1, eval_num_steps=2, ema=True, ema_every=1, gradient_checkpointing=True,
    seed=0,  # seed 0: the two sampling batches of each epoch draw different Fast windows
)  # fmt: skip


@pytest.mark.slow
def test_after_the_first_epoch_nothing_is_compiled_again(tmp_path, monkeypatch):
    """One epoch runs every kind of call: sampling (Fast windows: SDE and ODE steps), training (grad, gradient
    checkpointing), the reference forward (adapters off), evaluation (EMA weights, a padded last batch). The second
    epoch must compile nothing. Guards and recompiles are dynamo's decisions, whatever the backend, so this test
    uses backend="eager" (dynamo captures and guards each graph, then runs it without generating code): seconds
    instead of minutes. The generated code is tested above."""
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager", **kw))
    cfg = tiny_cfg(tmp_path, compile="on", **EVERY_KIND_OF_CALL)
    sde_window, windows = fg.sde_window, []  # the windows the sampling batches draw

    def recorded(*args):
        levels, steps = sde_window(*args)
        windows.append(steps)
        return levels, steps

    monkeypatch.setattr(fg, "sde_window", recorded)
    model = dual_attention_model(cfg)
    graphs = []  # after the batch-plan line, then after each epoch's line
    log = lambda line: graphs.append(counters["stats"]["unique_graphs"])  # noqa: E731
    history = fg.train(cfg, model, rewards.build_reward(cfg.reward), [fg.Prompt(p) for p in PROMPTS], log=log)
    # 3 structures, the first block's input not requiring grad: 3 graphs with adapters on, 3 with them off; the
    # one evaluation prompt is padded to the batch's 2 rows, so evaluation needs no graph of its own
    assert model.graphs == 6
    assert graphs == [0, 6, 6]  # all compiled in the first epoch (none left to run eagerly), none in the second
    assert not counters["graph_break"]
    assert windows[:2] == [[1], [0]] and windows[2:] == [[0], [1]]  # seed 0: each epoch's two batches differ
    # unchanged weights (lr 0): every recomputed log-prob equals the sampled one in both epochs
    assert [(m["policy/ratio"], m["policy/approx_kl"]) for m in history] == [(1.0, 0.0), (1.0, 0.0)]


def test_compile_flag(tmp_path):
    assert not make_model(tiny_cfg(tmp_path, compile="auto")).compiled  # auto: off on a CPU
    with pytest.raises(ValueError, match="--compile must be on, off or auto"):
        make_model(tiny_cfg(tmp_path, compile="yes"))
