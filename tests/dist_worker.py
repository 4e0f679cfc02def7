"""One process of a distributed test run, started by tests/test_distributed.py through torchrun:

    python -m torch.distributed.run --nproc_per_node R tests/dist_worker.py MODE OUT

MODE: "toy", "fast" (the toy with a Fast window of 1 step, drawn per batch) or "tiny" (train a few epochs, then write this rank's epoch-0 advantages and its weights before and
after training into OUT), "fail" (rank 1's reward returns NaN: the whole run must stop with that error instead of
hanging), "hang" and "stop" (the command line with --dist_timeout_s 10, and rank 1's reward never returns, or
rank 1 is stopped: rank 0 must end the run with the timeout message), "sigterm" (rank 1 alone gets SIGTERM: both
stop at the same batch, the last finished epoch saved).
Rank 0 trains into OUT/run; every other rank is given OUT/run-rank<r>, which must stay absent (only rank 0 writes).
Every mode runs on the CPU with gloo, also where GPUs exist (the tests compare CPU runs).
"""

import dataclasses
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flow_grpo as fg  # noqa: E402
import runfiles  # noqa: E402


# One trained step per trajectory (int(10 · 0.1) = 1) and one batch per process per optimiser step: each process
# then does ONE backward per optimiser step, so the 2-process gradient fl(g₀ + g₁)·½ equals the 1-process
# fl(g₀·½ + g₁·½) bit for bit (halving is exact in binary floating point; a + b = b + a). See test_distributed.py.
ONE_STEP = 0.1


def build(mode: str, out: str):
    """(cfg, model, reward_fn, prompts, device) for a small, fast run."""
    if mode in ("toy", "fast", "fail"):
        import argparse

        from toy import run as toy

        args = argparse.Namespace(out=out, seed=0, beta=toy.TOY_BETA, epochs=3, noise_level=0.7, sde_type="sde",
                                  fast_window=0, fast_window_range=5)  # fmt: skip
        cfg = toy.toy_config(args)
        # 64 samples in 4 batches of 16, 2 optimiser steps of 2 batches: one batch per process per step at R = 2
        cfg = dataclasses.replace(cfg, optimizer_steps_per_epoch=2, eval_every=0, save_every=0, timestep_fraction=ONE_STEP)
        if mode == "fast":  # one trained step too: a window of 1 placed among steps 1..4, per batch
            cfg = dataclasses.replace(cfg, fast_window=1, fast_window_start=1, fast_window_range=5)
        model = toy.ToyModel(toy.pretrained(0), cfg.guidance_scale)
        return cfg, model, toy.toy_reward, [fg.Prompt(p) for p in toy.PROMPTS], "cpu"
    import rewards

    cfg = fg.parse_config(["--model", "tiny-random", "--reward", "jpeg_compressibility", "--out", out])
    # β > 0 (the preset has 0): the reference forward (adapter disabled) must work through the DDP wrapper too
    # 16 samples in 4 batches of 4, 2 optimiser steps of 2 batches: one batch per process per step at R = 2
    cfg = dataclasses.replace(cfg, epochs=2, group_size=4, groups_per_epoch=4, batch_size=4, optimizer_steps_per_epoch=2, eval_every=0,
                              save_every=0, beta=0.04, timestep_fraction=ONE_STEP)  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = fg.SD3Model(fg.load_pipeline("tiny-random", torch.float32), cfg, torch.device("cpu"), torch.float32)
    return cfg, model, rewards.build_reward(cfg.reward), [fg.Prompt(p) for p in ["a red cube", "two cats", "a tree", "sea"]], "cpu"


def hang(out: str, mode: str = "hang") -> int:
    """The command line under torchrun, with rank 1's reward stuck forever (a rank that stops answering): "hang"
    sleeps in it, "stop" stops the process (SIGSTOP, as a debugger or a frozen node would), "sigterm" sends it
    SIGTERM once, while epoch 1 samples (a preemption reaching one process)."""
    import signal
    import time

    import rewards

    build_reward = rewards.build_reward

    def stuck_on_rank_1(*args, **kwargs):
        good, calls = build_reward(*args, **kwargs), []

        def reward(*a):  # the start-up check (calls 1-2) passes; then rank 1 stops answering while sampling
            calls.append(1)
            if fg.dist_rank_world()[0] == 1 and len(calls) == (5 if mode == "sigterm" else 3):
                if mode == "hang":
                    time.sleep(3600)
                os.kill(os.getpid(), signal.SIGTERM if mode == "sigterm" else signal.SIGSTOP)
            return good(*a)

        return reward

    rewards.build_reward = stuck_on_rank_1
    epochs = ["--epochs", "2", "--groups_per_epoch", "4", "--optimizer_steps_per_epoch", "2"] if mode == "sigterm" else [
        "--epochs", "1", "--groups_per_epoch", "2", "--optimizer_steps_per_epoch", "1"]  # fmt: skip
    return fg.main(["--model", "tiny-random", "--reward", "jpeg_compressibility", "--out", out, "--cpu", "--num_steps", "4",
                    "--dist_timeout_s", "10", "--group_size", "4", "--batch_size", "4", "--eval_every", "0",
                    "--save_every", "0", *epochs])  # fmt: skip


def main(mode: str, out: str) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    if mode in ("hang", "stop", "sigterm"):
        sys.exit(hang(os.path.join(out, "run"), mode))
    runfiles.init_distributed(cpu=True)
    rank, world = fg.dist_rank_world()
    run_dir = os.path.join(out, "run" if rank == 0 else f"run-rank{rank}")
    cfg, model, reward_fn, prompts, device = build(mode, run_dir)

    if mode == "fail":
        good = reward_fn

        def reward_fn(points, texts, meta):  # noqa: F811  rank 1's reward model "breaks"
            r = good(points, texts, meta)
            return r * float("nan") if rank == 1 else r

    # this rank's share of epoch 0, as train() will draw it
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + 0)
    epoch_prompts = fg.draw_prompts(prompts, cfg.groups_per_epoch, cfg.seed, 0)
    s = fg.sample_epoch(cfg, model, reward_fn, epoch_prompts, generator, device)
    before = {f"init{i}": p.detach().clone() for i, p in enumerate(model.trainable_parameters())}
    fg.train(cfg, model, reward_fn, prompts, device, log=lambda line: None)
    weights = {f"p{i}": p.detach().contiguous() for i, p in enumerate(model.trainable_parameters())}
    save_file(
        {"sample_ids": s.sample_ids, "advantages": s.advantages, "rewards": s.rewards, "batches": torch.tensor(s.batches),
         "windows": torch.tensor(s.trained_steps), **before, **weights},  # fmt: skip
        os.path.join(out, f"rank{rank}-of-{world}.safetensors"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
