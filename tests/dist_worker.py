"""One process of a distributed test run, started by tests/test_distributed.py through torchrun:

    python -m torch.distributed.run --nproc_per_node R tests/dist_worker.py MODE OUT

MODE: "toy" or "tiny" (train a few epochs, then write this rank's epoch-0 advantages and final weights into OUT),
"fail" (rank 1's reward returns NaN: the whole run must stop with that error instead of hanging).
Rank 0 trains into OUT/run; every other rank is given OUT/run-rank<r>, which must stay absent (only rank 0 writes).
"""

import dataclasses
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flow_grpo as fg  # noqa: E402


def build(mode: str, out: str):
    """(cfg, model, reward_fn, prompts, device) for a small, fast run."""
    if mode in ("toy", "fail"):
        import argparse

        from toy import run as toy

        args = argparse.Namespace(out=out, seed=0, beta=toy.TOY_BETA, epochs=3, noise_level=0.7, sde_type="sde",
                                  fast_window=0, fast_window_range=5)  # fmt: skip
        cfg = toy.toy_config(args)
        # 64 samples in 4 batches of 16, 2 optimiser steps of 2 batches: one batch per process per step at R = 2
        cfg = dataclasses.replace(cfg, optimizer_steps_per_epoch=2, eval_every=0, save_every=0)
        model = toy.ToyModel(toy.pretrained(0), cfg.guidance_scale)
        return cfg, model, toy.toy_reward, [fg.Prompt(p) for p in toy.PROMPTS], "cpu"
    import rewards

    cfg = fg.parse_config(["--model", "tiny-random", "--reward", "jpeg_compressibility", "--out", out])
    # β > 0 (the preset has 0): the reference forward (adapter disabled) must work through the DDP wrapper too
    cfg = dataclasses.replace(cfg, epochs=2, group_size=4, groups_per_epoch=4, batch_size=4, eval_every=0, save_every=0, beta=0.04)
    torch.manual_seed(cfg.seed)
    model = fg.SD3Model(fg.load_pipeline("tiny-random", torch.float32), cfg, torch.device("cpu"), torch.float32)
    return cfg, model, rewards.build_reward(cfg.reward), [fg.Prompt(p) for p in ["a red cube", "two cats", "a tree", "sea"]], "cpu"


def main(mode: str, out: str) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    fg.init_distributed()
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
    fg.train(cfg, model, reward_fn, prompts, device, log=lambda line: None)
    weights = {f"p{i}": p.detach().contiguous() for i, p in enumerate(model.trainable_parameters())}
    save_file(
        {"sample_ids": s.sample_ids, "advantages": s.advantages, "rewards": s.rewards, **weights},
        os.path.join(out, f"rank{rank}-of-{world}.safetensors"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
