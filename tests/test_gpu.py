"""The checks that matter most, repeated where they run for real: on a CUDA GPU, the tiny model in bf16.

Skipped where torch.cuda.is_available() is False (marker `gpu`, conftest.py; `python -m pytest -m gpu` runs only
these).
The CPU suite checks the same code in float32; bf16 rounds every network output to 8 significant bits, so what
"the same" means here is written from bf16's unit roundoff u = 2⁻⁸ (round to nearest), not from one run."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from test_compile import EVERY_KIND_OF_CALL
from test_distributed import torchrun
from test_versions import KNOWN_NOISE
from test_sd3 import PROMPTS, perturb_lora, tiny_cfg

import flow_grpo as fg
import runfiles
import rewards

pytestmark = pytest.mark.gpu  # skipped where CUDA is absent (conftest.py)
DEVICE, BF16 = torch.device("cuda"), torch.bfloat16
U = 2.0**-8  # bf16 unit roundoff: 8 significant bits, round to nearest


def make_bf16_model(cfg) -> fg.SD3Model:
    torch.manual_seed(cfg.seed)
    return fg.SD3Model(fg.load_pipeline("tiny-random", BF16), cfg, DEVICE, BF16)


def test_first_training_ratio_is_exactly_one_in_bf16(tmp_path):
    # the stored log-probs come from the same bf16 forwards on the same batches: exactly 1, not "close to 1"
    cfg = tiny_cfg(tmp_path, lr=0.0, weight_decay=0.0, beta=0.04)
    model = make_bf16_model(cfg)
    perturb_lora(model)  # a non-trivial policy, so a KL to the reference exists
    gen = torch.Generator().manual_seed(0)
    samples = fg.sample_epoch(cfg, model, rewards.build_reward(cfg.reward), [fg.Prompt(p) for p in PROMPTS], gen, DEVICE)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.0, weight_decay=0.0)
    stats = fg.train_epoch(cfg, fg.plan_batches(cfg), model, samples, opt)
    assert stats["ratio"] == 1.0
    assert stats["approx_kl"] == 0.0 and stats["clipfrac"] == 0.0
    assert stats["kl_ref"] > 0


def test_rollout_reproduces_every_step_of_the_diffusers_pipeline_in_bf16(tmp_path):
    # eager (--compile off): the pipeline and our rollout both run the transformer under no_grad, but a compiled
    # velocity() runs in grad mode, another graph whose fused kernels may round bf16 differently; this test is about
    # the sampler's arithmetic (tests/test_compile.py compares compiled with eager)
    cfg = tiny_cfg(tmp_path, compile="off")
    model = make_bf16_model(cfg)
    perturb_lora(model)  # the pipeline runs the same transformer, adapter included
    steps, w = 10, cfg.guidance_scale
    x1 = torch.randn((len(PROMPTS), *model.latent_shape), generator=torch.Generator().manual_seed(3))
    states = [x1.to(DEVICE, BF16)]  # the pipeline's latents: bf16 before the first step and after every step

    def record(pipe, i, t, tensors):
        states.append(tensors["latents"].clone())
        return tensors

    model.pipe(
        PROMPTS, latents=states[0], num_inference_steps=steps, guidance_scale=w, height=cfg.resolution,
        width=cfg.resolution, output_type="latent", max_sequence_length=cfg.max_sequence_length,
        callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"],
    )  # fmt: skip
    assert len(states) == steps + 1
    cond, sigmas = model.encode(PROMPTS), model.schedule(steps).to(DEVICE)

    def velocity(x, t, guidance):  # v_u (w = 0), v_c (w = 1) or the guided v, from our model's CFG forward
        model.cfg = dataclasses.replace(cfg, guidance_scale=guidance)
        return model.velocity(x, t, cond)

    worst = 0.0
    for k in range(steps):
        # Step k of our rollout, started from the pipeline's own bf16 latent x_k: the transformer gets the same
        # bf16 input, batch and timestep, so it returns the same numbers. What remains are the pipeline's bf16
        # roundings (ours are float32): CFG d = v_c − v_u, e = w·d, ṽ = v_u + e (3 roundings), then the scheduler's
        # dt·ṽ (bf16: a 0-dim float32 dt does not promote a bf16 tensor) and the new latent x' = x + dt·ṽ cast to
        # bf16 (2 roundings). Each is at most u·|its result|, so per element
        #   |ours − pipeline| ≤ u·|x'| + |dt|·u·(2|v| + 2w·|v_c − v_u|)
        # to first order in u; the factor 1.02 covers the u² terms and float32's own 2⁻²⁴ relative rounding.
        # No growth factor over steps: each step restarts from the pipeline's latent, so errors cannot compound.
        x, dt = states[k].float(), sigmas[k + 1] - sigmas[k]
        ours = fg.rollout(lambda x_, t_: velocity(x_, t_, w), x, sigmas[k : k + 2], 0.0).latents[:, -1]
        t = sigmas[k].expand(len(x))
        with torch.no_grad():  # as in the rollout: the same kernels
            v, v_u, v_c = velocity(x, t, w), velocity(x, t, 0.0), velocity(x, t, 1.0)
        theirs = states[k + 1].float()
        bound = 1.02 * U * (theirs.abs() + dt.abs() * 2 * (v.abs() + w * (v_c - v_u).abs()))
        err = (ours - theirs).abs()
        assert (err <= bound).all(), f"step {k}: error / bound up to {(err / bound).max().item():.2f}"
        worst = max(worst, err.max().item())
    model.cfg = cfg
    assert worst > 0  # the pipeline really ran in bf16 (a float32 run would match ours far more closely)


def test_the_compiled_path_compiles_nothing_after_the_first_epoch_on_the_gpu(tmp_path, monkeypatch):
    """The GPU default (--compile auto: inductor, triton kernels) on the tiny model in bf16. One epoch runs every kind
    of call: sampling (Fast window: SDE and ODE steps), training (gradient checkpointing), the reference forward
    (adapters off), evaluation (EMA weights, a padded last batch). All the graphs SD3Model counts are compiled in it,
    none in the second epoch (tests/test_compile.py checks the same on the CPU with dynamo's eager backend)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_cache"))  # no kernels of other runs
    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_cfg(tmp_path, compile="auto", **EVERY_KIND_OF_CALL)
    model = make_bf16_model(cfg)
    assert model.compiled
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # as the reference (docs/FIDELITY.md)
    graphs = []  # after the batch-plan line, then after each epoch's line
    log = lambda line: graphs.append(counters["stats"]["unique_graphs"])  # noqa: E731
    try:
        history = fg.train(cfg, model, rewards.build_reward(cfg.reward), [fg.Prompt(p) for p in PROMPTS], DEVICE, log=log)
    finally:
        torch._dynamo.reset()
    # the tiny model's 2 blocks: a plain one (its input needs no grad) and the context_pre_only last one: 2 graphs with
    # adapters on, 2 with them off; the evaluation prompt is padded to the batch's 2 rows (the same run on the CPU
    # with dynamo's eager backend counts [0, 4, 4])
    assert model.graphs == 4
    assert graphs == [0, 4, 4]  # all compiled in the first epoch (none left to run eagerly), none in the second
    assert not counters["graph_break"]
    # unchanged weights (lr 0): every recomputed log-prob equals the sampled one in both epochs
    assert [(m["policy/ratio"], m["policy/approx_kl"]) for m in history] == [(1.0, 0.0), (1.0, 0.0)]


def test_the_tiny_command_line_trains_on_the_gpu(tmp_path, capfd):
    out = tmp_path / "run"
    code = fg.main(["--model", "tiny-random", "--reward", "jpeg_compressibility", "--out", str(out), "--epochs", "2",
                    "--eval_every", "1"])  # fmt: skip
    printed, errors = capfd.readouterr()  # file descriptors: library loggers keep the stderr they started with
    assert code == 0
    assert "on cuda" in printed and "bfloat16" in printed
    assert [n for n in KNOWN_NOISE if n in printed + errors] == []  # what a GPU run printed before (issue 16)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]
    numbers = [v for m in lines for v in m.values() if isinstance(v, float)]
    assert numbers and all(v == v and abs(v) != float("inf") for v in numbers)  # no NaN, no inf
    assert lines[0]["policy/clipfrac"] < 1  # updates happen (a clipped sample gives no gradient)
    lora = load_file(os.path.join(runfiles.latest_checkpoint(str(out)), "lora", "pytorch_lora_weights.safetensors"))
    b = [t for k, t in lora.items() if "lora_B" in k]
    assert b and all(torch.isfinite(t).all() for t in b)
    assert any(t.abs().max() > 0 for t in b)  # B starts at 0: training moved it
    assert sorted(p.name for p in out.glob("eval-epoch-*.png")) == ["eval-epoch-000000.png", "eval-epoch-000001.png"]


def test_torchrun_with_more_processes_than_gpus_stops_at_start_up(tmp_path):
    n = torch.cuda.device_count() + 1
    result = torchrun(n, "flow_grpo.py", "--model", "tiny-random", "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert f"torchrun started {n} processes on this machine but it has {n - 1} visible GPU(s)" in result.stderr
    assert f"--nproc_per_node {n - 1}" in result.stderr and "--cpu" in result.stderr
