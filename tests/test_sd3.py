"""The real SD3 path of flow_grpo.py, run on the tiny random SD3 pipeline (tiny_sd3.py; no download).

Independent references: diffusers' own StableDiffusion3Pipeline.__call__ (sampling) and load_lora_weights
(checkpoints); the optimiser state of an uninterrupted run (resume)."""

import dataclasses
import json
import os

import pytest
import torch

import flow_grpo as fg
import recipes
import runfiles
import rewards

CPU, F32 = torch.device("cpu"), torch.float32


def tiny_cfg(tmp_path, **kw) -> fg.Config:
    """The tiny-random preset with a few test-sized changes."""
    base = dict(recipes.PRESETS["tiny-random"], model="tiny-random", reward="jpeg_compressibility", out=str(tmp_path / "run"))
    base.update(group_size=4, groups_per_epoch=2, batch_size=4, optimizer_steps_per_epoch=2, epochs=2, eval_every=0,
                save_every=0, ema=False)
    base.update(kw)
    return fg.Config(**base)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny pipeline saved as a diffusers folder, so tests load it through from_pretrained like real weights."""
    from tiny_sd3 import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline().save_pretrained(path)
    return str(path)


def make_model(cfg, model_dir=None) -> fg.SD3Model:
    torch.manual_seed(cfg.seed)
    return fg.SD3Model(fg.load_pipeline(model_dir or cfg.model, F32), cfg, CPU, F32)


def perturb_lora(model, seed=0, scale=0.3):
    """Give the (zero-initialised) LoRA B matrices random values, so the adapter changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


PROMPTS = ["a red cube on a table", "two cats"]


def pipeline_images(pipe, cfg, x1, steps, prompts=PROMPTS):
    return pipe(
        prompts, latents=x1, num_inference_steps=steps, guidance_scale=cfg.guidance_scale, height=cfg.resolution,
        width=cfg.resolution, output_type="pt", max_sequence_length=cfg.max_sequence_length,
    ).images


def our_images(model, x1, steps, prompts=PROMPTS, noise_level=0.0):
    cond = model.encode(prompts)
    traj = fg.rollout(lambda x, t: model.velocity(x, t, cond), x1, model.schedule(steps), noise_level)
    return model.decode(traj.latents[:, -1])


@pytest.mark.parametrize("trained, guidance", [(False, 4.5), (True, 4.5), (True, 1.0)])
def test_ode_rollout_reproduces_the_diffusers_pipeline(tmp_path, tiny_dir, trained, guidance):
    # guidance 1: the pipeline runs no CFG (do_classifier_free_guidance is guidance > 1), nor do we
    cfg = tiny_cfg(tmp_path, guidance_scale=guidance)
    model = make_model(cfg, tiny_dir)
    if trained:  # the pipeline runs the same transformer, adapter included
        perturb_lora(model)
    x1 = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(3))
    for steps in (10, 40):
        ours = our_images(model, x1, steps)
        theirs = pipeline_images(model.pipe, cfg, x1, steps)
        assert ours.shape == theirs.shape == (2, 3, cfg.resolution, cfg.resolution)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    if trained:  # and the reference context really is the model without the adapter
        with model.reference():
            ref = our_images(model, x1, 10)
        assert (ref - our_images(model, x1, 10)).abs().max() > 1e-3


def test_first_training_ratio_is_exactly_one(tmp_path):
    cfg = tiny_cfg(tmp_path, lr=0.0, weight_decay=0.0, groups_per_epoch=2, group_size=4, batch_size=4, beta=0.04)
    model = make_model(cfg)
    perturb_lora(model)  # a non-trivial policy, so a KL to the reference exists
    reward_fn = rewards.build_reward(cfg.reward)
    gen = torch.Generator().manual_seed(0)
    samples = fg.sample_epoch(cfg, model, reward_fn, [fg.Prompt(p) for p in PROMPTS], gen, CPU)
    assert samples.latents.shape == (8, cfg.num_steps + 1, *model.latent_shape)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.0, weight_decay=0.0)
    stats = fg.train_epoch(cfg, fg.plan_batches(cfg), model, samples, opt)
    # unchanged weights: every recomputed log-prob equals the stored one, in shuffled batches of the same size
    assert stats["ratio"] == 1.0
    assert stats["approx_kl"] == 0.0 and stats["clipfrac"] == 0.0
    assert stats["kl_ref"] > 0


def count_transformer_rows(model) -> list[int]:
    """The batch rows of every transformer call from now on (a forward pre-hook on the tiny model's transformer)."""
    rows = []
    model.transformer.register_forward_pre_hook(lambda m, args, kw: rows.append(len(kw["hidden_states"])), with_kwargs=True)
    return rows


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_guidance_one_runs_half_the_transformer_rows(tmp_path, guidance):
    """Sampling, the training forward and the reference forward (β > 0) each run one row per image at guidance 1
    (no CFG: v = v_cond), two with CFG; the same calls either way, so exactly half the rows in all."""
    cfg = tiny_cfg(tmp_path, guidance_scale=guidance, beta=0.04, eval_every=1, eval_count=2, lr=0.0, weight_decay=0.0,
                   epochs=1, num_steps=4, eval_num_steps=2)
    model = make_model(cfg)
    rows = count_transformer_rows(model)
    fg.train(cfg, model, rewards.build_reward(cfg.reward), [fg.Prompt(p) for p in PROMPTS], log=lambda s: None)
    b, T, S = cfg.batch_size, cfg.num_steps, int(cfg.num_steps * cfg.timestep_fraction)
    batches = cfg.groups_per_epoch * cfg.group_size // b
    calls = cfg.epochs * (batches * T + batches * S * 2 + cfg.eval_num_steps)  # sampling, policy + reference, eval
    per_image = 1 if guidance == 1 else 2
    assert rows == [per_image * b] * calls
    if guidance == 1:  # the negative prompt is not even encoded
        assert sorted(model.encode(PROMPTS)) == ["embeds", "pooled"]


def test_guidance_one_velocity_is_the_conditional_velocity(tmp_path):
    # v = v_u + 1·(v_c − v_u) is v_c: the cond-only forward against the conditional half of the CFG forward (same
    # weights, same rows; the CFG batch holds the unconditional rows too, so the transformer sees a batch of 2N
    # instead of N, and float32 matmuls over another batch size may round differently: ≤ a few ulp of |v|)
    cfg = tiny_cfg(tmp_path, guidance_scale=1.0)
    model = make_model(cfg)
    perturb_lora(model)
    x, t = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(4)), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v = model.velocity(x, t, model.encode(PROMPTS))
        model.cfg = dataclasses.replace(cfg, guidance_scale=2.0)
        cond = model.encode(PROMPTS)
        out = model.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]) * 1000, return_dict=False,
                                encoder_hidden_states=torch.cat([cond["neg_embeds"], cond["embeds"]]),
                                pooled_projections=torch.cat([cond["neg_pooled"], cond["pooled"]]))[0]  # fmt: skip
    torch.testing.assert_close(v, out[2:], rtol=0, atol=16 * torch.finfo(F32).eps * out.abs().max().item())


def test_cfg_training_forward_sends_gradient_through_both_halves(tmp_path):
    """The reference's train.cfg = True forward lets the gradient flow through the unconditional half too (a July
    2025 version detached it). With v = v_u + w·(v_c − v_u), the transformer's output rows receive ∂L/∂v_u = (1 − w)·g
    and ∂L/∂v_c = w·g for the upstream gradient g = ∂L/∂v: both non-zero, in that ratio."""
    cfg = tiny_cfg(tmp_path)  # guidance 4.5
    model = make_model(cfg)
    perturb_lora(model)
    grads = []
    model.transformer.register_forward_hook(lambda m, args, out: [out[0].register_hook(grads.append), None][1])
    x, t = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(5)), torch.tensor([0.8, 0.5])
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    (model.velocity(x, t, model.encode(PROMPTS)) * g).sum().backward()
    (grad_out,) = grads
    w = cfg.guidance_scale
    # one float32 rounding each (g − w·g and w·g): 2 ulp
    torch.testing.assert_close(grad_out[:2], (1 - w) * g, rtol=2 * torch.finfo(F32).eps, atol=0)
    torch.testing.assert_close(grad_out[2:], w * g, rtol=2 * torch.finfo(F32).eps, atol=0)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.trainable_parameters())


def test_lora_checkpoint_loads_into_a_fresh_diffusers_pipeline(tmp_path, tiny_dir):
    cfg = tiny_cfg(tmp_path, epochs=2, ema=True, ema_every=1)
    model = make_model(cfg, tiny_dir)
    fg.train(cfg, model, rewards.build_reward(cfg.reward), [fg.Prompt(p) for p in PROMPTS], log=lambda s: None)
    ckpt = runfiles.latest_checkpoint(cfg.out)
    assert sorted(os.listdir(ckpt)) == ["ema", "lora", "trainer_state.json", "trainer_state.safetensors"]
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for _, _, fs in os.walk(ckpt) for f in fs)  # no pickle
    x1 = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(5))
    trained = pipeline_images(model.pipe, cfg, x1, 10)

    from diffusers import StableDiffusion3Pipeline

    fresh = StableDiffusion3Pipeline.from_pretrained(tiny_dir)
    base = pipeline_images(fresh, cfg, x1, 10)
    fresh.load_lora_weights(os.path.join(ckpt, "lora"))
    reloaded = pipeline_images(fresh, cfg, x1, 10)
    assert (trained - base).abs().max() > 1e-4  # training changed the images ...
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)  # ... and the checkpoint reproduces them
    fresh.unload_lora_weights()
    fresh.load_lora_weights(os.path.join(ckpt, "ema"))
    ema_images = pipeline_images(fresh, cfg, x1, 10)  # the EMA weights load too, and are a different model
    assert (ema_images - reloaded).abs().max() > 1e-6


def test_resume_continues_where_the_run_stopped(tmp_path):
    prompts = [fg.Prompt(p) for p in PROMPTS]
    reward_fn = rewards.build_reward("jpeg_compressibility")
    quiet = lambda s: None  # noqa: E731

    # an uninterrupted 3-epoch run
    full_cfg = tiny_cfg(tmp_path / "full", epochs=3, ema=True, ema_every=1)
    full = make_model(full_cfg)
    full_hist = fg.train(full_cfg, full, reward_fn, prompts, log=quiet)

    # the same run stopped after 2 epochs, then resumed in a new process-like setting (fresh model)
    cut_cfg = tiny_cfg(tmp_path / "cut", epochs=2, ema=True, ema_every=1)
    fg.train(cut_cfg, make_model(cut_cfg), reward_fn, prompts, log=quiet)
    saved = json.load(open(os.path.join(runfiles.latest_checkpoint(cut_cfg.out), "trainer_state.json")))
    assert saved["epoch"] == 2 and saved["step"] == 2 * cut_cfg.optimizer_steps_per_epoch
    resumed_cfg = dataclasses.replace(cut_cfg, epochs=3, resume=True)
    resumed = make_model(dataclasses.replace(resumed_cfg, seed=123))  # different LoRA init: the checkpoint wins
    hist = fg.train(resumed_cfg, resumed, reward_fn, prompts, log=quiet)

    assert [m["epoch"] for m in hist] == [2]
    assert hist[0]["step"] == full_hist[-1]["step"] == 3 * cut_cfg.optimizer_steps_per_epoch
    assert hist[0]["reward/mean"] == pytest.approx(full_hist[-1]["reward/mean"], abs=1e-5)
    for a, b in zip(resumed.trainable_parameters(), full.trainable_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    lines = open(os.path.join(resumed_cfg.out, "metrics.jsonl")).read().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]  # appended, not overwritten


def test_resume_after_a_crash_past_the_checkpoint_forgets_the_lost_epochs(tmp_path):
    prompts = [fg.Prompt(p) for p in PROMPTS]
    reward_fn = rewards.build_reward("jpeg_compressibility")
    cfg = tiny_cfg(tmp_path, epochs=2, save_every=1)
    fg.train(cfg, make_model(cfg), reward_fn, prompts, log=lambda s: None)
    # a crash after epoch 2 was logged but before its checkpoint: remove that checkpoint, keep the log line
    root = os.path.join(cfg.out, "checkpoints")
    import shutil

    shutil.rmtree(os.path.join(root, "epoch-000002"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("epoch-000001")
    resumed = dataclasses.replace(cfg, resume=True)
    hist = fg.train(resumed, make_model(resumed), reward_fn, prompts, log=lambda s: None)
    assert [m["epoch"] for m in hist] == [1]
    lines = open(os.path.join(cfg.out, "metrics.jsonl")).read().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]  # epoch 1 once, from the resumed run


def test_a_fresh_run_never_overwrites_an_existing_run(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1)
    prompts = [fg.Prompt(p) for p in PROMPTS]
    fg.train(cfg, make_model(cfg), rewards.build_reward(cfg.reward), prompts, log=lambda s: None)
    ckpt = runfiles.latest_checkpoint(cfg.out)
    before = sorted(os.listdir(ckpt))
    with pytest.raises(FileExistsError, match="pass --resume"):
        fg.train(cfg, make_model(cfg), rewards.build_reward(cfg.reward), prompts, log=lambda s: None)
    assert runfiles.latest_checkpoint(cfg.out) == ckpt and sorted(os.listdir(ckpt)) == before
    assert len(open(os.path.join(cfg.out, "metrics.jsonl")).readlines()) == 1
    code = fg.main(["--model", "tiny-random", "--out", cfg.out])  # the command line says so before loading
    assert code == 2


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        fg.train(cfg, make_model(cfg), rewards.build_reward(cfg.reward), [fg.Prompt("x y")], log=lambda s: None)


def test_one_optimiser_step_moves_each_trajectory_with_its_advantage(tmp_path):
    # What a reward curve of the random 2 MB model cannot show reliably (its JPEG rewards differ by a few bytes; over
    # 10 epochs the training reward rose by 0.009-0.034 kB on seeds 0-4 but by 0.003, inside the noise, on seed 42),
    # one policy-gradient step must show on every seed: the log-probs of the stored trajectories move WITH their
    # advantages, i.e. the surrogate Σ_i A_i·(log π_new − log π_old) over the trained steps increases. Normalised by
    # Σ|A_i|·|Δ log π_i| it measured 0.13-0.21 on seeds 0-4 and 42 (one step, 32 samples); a flipped sign anywhere
    # in the loss, the advantages or the log-prob makes it negative.
    cfg = fg.parse_config(["--model", "tiny-random", "--reward", "jpeg_compressibility", "--out", str(tmp_path),
                           "--batch_size", "16", "--optimizer_steps_per_epoch", "1"])  # fmt: skip
    model = make_model(cfg)
    prompts = fg.draw_prompts(fg.load_prompts(cfg.prompts), cfg.groups_per_epoch, cfg.seed, 0)
    s = fg.sample_epoch(cfg, model, rewards.build_reward(cfg.reward), prompts, torch.Generator().manual_seed(0), CPU)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    fg.train_epoch(cfg, fg.plan_batches(cfg), model, s, opt)
    b, new = cfg.batch_size, torch.full_like(s.log_probs, float("nan"))  # (N, T) log π_new of the stored actions
    with torch.no_grad():
        for i in range(len(s.batches)):
            rows = slice(i * b, (i + 1) * b)  # the sampling batches, as training saw them
            cond = fg.select(s.cond, s.prompt_index[rows])
            for j in s.trained_steps[i]:
                x, x_next = s.latents[rows, j], s.latents[rows, j + 1]
                v = model.velocity(x, s.sigmas[j].expand(b), cond)
                new[rows, j] = fg.sde_step(x, v, s.sigmas[j], s.sigmas[j + 1], float(s.noise_levels[i * b, j]), x_next)[1]
    moved = (new - s.log_probs)[:, s.trained_steps[0]]  # (N, S): every batch trains the same steps (no Fast window)
    adv = s.advantages[:, None]  # (N, 1)
    assert (adv * moved).sum() / (adv.abs() * moved.abs()).sum() > 0.05


def test_nan_reward_stops_before_any_update(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = make_model(cfg)
    before = [p.detach().clone() for p in model.trainable_parameters()]

    def nan_reward(images, prompts, metadata):
        r = torch.zeros(len(prompts))
        r[1] = float("nan")
        return r

    with pytest.raises(fg.RewardError, match="NaN"):
        fg.train(cfg, model, nan_reward, [fg.Prompt(p) for p in PROMPTS], log=lambda s: None)
    wrong_shape = lambda images, prompts, metadata: torch.zeros(len(prompts), 2)  # noqa: E731
    with pytest.raises(fg.RewardError, match="shape"):
        fg.train(cfg, model, wrong_shape, [fg.Prompt(p) for p in PROMPTS], log=lambda s: None)
    for a, b in zip(before, model.trainable_parameters()):
        assert torch.equal(a, b)


# --- the command line's clear errors (exit code 2, one message, no stack trace) ---


def run_main(args, capsys):
    code = fg.main(args)
    return code, capsys.readouterr().err


def test_cli_unknown_reward(tmp_path, capsys):
    code, err = run_main(["--model", "tiny-random", "--reward", "aesthetics", "--out", str(tmp_path)], capsys)
    assert code == 2 and "aesthetics" in err and "jpeg_compressibility" in err


def test_cli_empty_prompt_file(tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    code, err = run_main(["--model", "tiny-random", "--prompts", str(empty), "--out", str(tmp_path)], capsys)
    assert code == 2 and "holds no prompts" in err


def test_cli_impossible_batch_arithmetic(tmp_path, capsys):
    code, err = run_main(["--model", "tiny-random", "--group_size", "5", "--batch_size", "8", "--out", str(tmp_path)], capsys)
    assert code == 2 and "not a multiple of --batch_size 8" in err


def test_cli_missing_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network from a test
    missing = str(tmp_path / "no-such-model")
    code, err = run_main(["--model", missing, "--reward", "jpeg_compressibility", "--out", str(tmp_path)], capsys)
    assert code == 2 and f"could not load the model '{missing}'" in err and "hf download" in err
    assert "Traceback" not in err


def test_prompt_files(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a sign that says \\"OPEN\\"", "text": "OPEN"}\n\n{"prompt": "two cats"}\n')
    ps = fg.load_prompts(str(jsonl))
    assert [p.text for p in ps] == ['a sign that says "OPEN"', "two cats"] and ps[0].metadata == {"text": "OPEN"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        fg.load_prompts(str(bad))
    for name in runfiles.PROMPT_SETS:  # the shipped sets load
        assert len(fg.load_prompts(name)) >= 20
