"""The sampling phase (flow_grpo.sample_epoch): Flow-GRPO-Fast's window drawn per sampling batch as the reference
draws it, and decoding + scoring overlapped with the next batch's denoising. On the toy: seconds, CPU only."""

import argparse
import dataclasses
import math
import threading
from collections import Counter

import pytest
import torch

import flow_grpo as fg
from toy import run as toy

PROMPTS = [fg.Prompt(p) for p in toy.PROMPTS]


def toy_cfg(**overrides) -> fg.Config:
    args = dict(out="unused", seed=0, beta=toy.TOY_BETA, epochs=1, noise_level=0.7, sde_type="sde", fast_window=0,
                fast_window_range=5)  # fmt: skip
    return dataclasses.replace(toy.toy_config(argparse.Namespace(**args)), **overrides)


class RecordingToy(toy.ToyModel):
    """The toy model, recording the t of every velocity call (each call is one batched forward)."""

    def __init__(self, *args, on_call=None):
        super().__init__(*args)
        self.ts, self.on_call = [], on_call

    def velocity(self, x, t, cond):
        self.ts.append(float(t[0]))
        if self.on_call is not None:
            self.on_call(len(self.ts))
        return super().velocity(x, t, cond)


def make_toy(cfg, on_call=None) -> RecordingToy:
    return RecordingToy(toy.pretrained(0), cfg.guidance_scale, on_call=on_call)


def test_window_start_is_uniform_over_the_reference_placements():
    # The reference (sd3_pipeline_with_logprob_fast.py): start = random.randint(lo, hi − size), both ends included,
    # for sde_window_range = (lo, hi). Here lo = 1, hi = 6, size 2: starts 1, 2, 3, 4, windows inside steps [1, 6).
    cfg = toy_cfg(fast_window=2, fast_window_start=1, fast_window_range=6)
    n, allowed = 4000, [1, 2, 3, 4]
    # one draw per batch seed, the seeds drawn as sample_epoch draws them
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(0))  # (n,)
    counts = Counter()
    for seed in seeds.tolist():
        levels, steps = fg.sde_window(cfg, torch.Generator().manual_seed(seed))
        assert steps == [steps[0], steps[0] + 1]
        assert [j for j, a in enumerate(levels) if a > 0] == steps  # SDE exactly inside the window, ODE elsewhere
        counts[steps[0]] += 1
    assert sorted(counts) == allowed  # every allowed placement occurs, none outside
    # each count is Binomial(n, p = 1/4): mean 1000, sd √(n·p·(1 − p)) = 27.4; a count more than 5 sd away has
    # probability 5.7e-7 (normal tail), so a uniform draw passes and a bias of 14% of p fails
    p = 1 / len(allowed)
    sd = math.sqrt(n * p * (1 - p))
    assert all(abs(c - n * p) <= 5 * sd for c in counts.values()), counts


@pytest.mark.parametrize("kwargs", [dict(fast_window_start=-1), dict(fast_window_start=4, fast_window_range=5)])
def test_the_window_range_must_hold_the_window(kwargs):
    with pytest.raises(ValueError, match="fast_window_start"):
        fg.plan_batches(fg.Config(fast_window=2, **kwargs))


def test_each_batch_draws_its_own_window_and_trains_on_it():
    cfg = toy_cfg(fast_window=2, fast_window_start=1, fast_window_range=6)
    model = make_toy(cfg)
    s = fg.sample_epoch(cfg, model, toy.toy_reward, PROMPTS, torch.Generator().manual_seed(0), "cpu")
    b, T = cfg.batch_size, cfg.num_steps
    assert len(s.trained_steps) == 4 and len({tuple(w) for w in s.trained_steps}) > 1  # distinct batches, windows
    for i, steps in enumerate(s.trained_steps):
        rows = slice(i * b, (i + 1) * b)
        assert (s.noise_levels[rows] == s.noise_levels[i * b]).all()  # one window per batch
        assert [j for j in range(T) if s.noise_levels[i * b, j] > 0] == steps and 1 <= steps[0] <= 4
        # a density exactly on the window's steps (an ODE step has none: NaN)
        assert [j for j in range(T) if torch.isfinite(s.log_probs[rows, j]).all()] == steps
    model.ts.clear()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr)
    fg.train_epoch(cfg, fg.plan_batches(cfg), model, s, opt)
    # training's forwards in order: batch by batch, its own window's steps, the reference forward (β > 0) then the
    # policy forward; a batch trained on another batch's window would call the network at other t
    assert model.ts == [float(s.sigmas[j]) for steps in s.trained_steps for j in steps for _ in range(2)]


def test_scoring_runs_while_the_next_batch_is_denoised():
    # The reward of batch 0 waits until the network is called for batch 1 (velocity call T + 1): without the overlap
    # it would wait forever, so it gives up after a minute and the test fails with that message.
    cfg = toy_cfg()
    batch_1_started = threading.Event()
    model = make_toy(cfg, on_call=lambda calls: calls == cfg.num_steps + 1 and batch_1_started.set())
    scored_in, calls = [], []

    def reward(points, texts, meta):
        calls.append(1)
        scored_in.append(threading.current_thread())
        if len(calls) == 1 and not batch_1_started.wait(timeout=60):
            raise AssertionError("batch 0 was scored before batch 1 was denoised: no overlap")
        return toy.toy_reward(points, texts, meta)

    s = fg.sample_epoch(cfg, model, reward, PROMPTS, torch.Generator().manual_seed(0), "cpu")
    assert len(calls) == 4 and threading.main_thread() not in scored_in
    # the same rewards as scoring the stored final samples again, in the main thread, batch by batch
    b, order = cfg.batch_size, s.sample_ids
    for i in range(4):
        rows = slice(i * b, (i + 1) * b)
        texts = [PROMPTS[int(k)].text for k in s.prompt_index[rows]]
        assert torch.equal(s.rewards[order[rows]], toy.toy_reward(s.latents[rows, -1], texts, [{}] * b))


def test_a_diverged_batch_is_never_scored_and_reward_errors_reach_the_caller():
    cfg = toy_cfg()
    model = make_toy(cfg)
    with torch.no_grad():
        model.trainable_parameters()[0].view(-1)[0] = float("nan")
    scored = []
    with pytest.raises(fg.DivergenceError, match="sampled latents hold NaN"):
        fg.sample_epoch(cfg, model, lambda *a: scored.append(1) or toy.toy_reward(*a), PROMPTS, torch.Generator(), "cpu")
    assert not scored  # checked in the worker, before decoding and scoring

    def nan_on_batch_2(points, texts, meta):
        scored.append(1)
        return toy.toy_reward(points, texts, meta) * (float("nan") if len(scored) == 2 else 1.0)

    with pytest.raises(fg.RewardError, match=r"returned NaN/inf for samples \[0, 1,"):
        fg.sample_epoch(cfg, make_toy(cfg), nan_on_batch_2, PROMPTS, torch.Generator(), "cpu")
    assert len(scored) == 2  # the first bad batch stops the phase; nothing is scored after it
