"""Where the time goes: one Flow-GRPO epoch of each variant, split into sampling, reward and training.

    python bench.py                         # toy + tiny-random on the CPU (about a minute)
    python bench.py --targets sd3.5-medium  # SD3.5-Medium's real architecture, random weights, 512 px (GPU)
    python bench.py --activation_memory on  # SD3.5-M training activations per row, CPU, checkpointing on (or off)

Variants: Flow-GRPO (SDE on every step), Flow-GRPO-Fast (SDE and training on a 2-step window inside the first 5
steps), and both again with the CPS sampler. Each row is one epoch after one warm-up epoch, timed with the training
loop's own clocks (flow_grpo.train's time/* metrics). "model calls" counts the batched velocity forwards of the
epoch (flow_grpo.plan_batches), "img/s" is sampled images per second of the whole epoch, and "peak mem" is the
peak GPU memory allocated (CUDA) or the process's peak resident memory so far (CPU; it only grows).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time

import torch

import flow_grpo as fg

VARIANTS = {
    "flow-grpo": dict(),
    "flow-grpo-fast": dict(fast_window=2, fast_window_range=5),
    "cps": dict(sde_type="cps"),
    "cps-fast": dict(sde_type="cps", fast_window=2, fast_window_range=5),
}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bench_epoch(cfg: fg.Config, model: fg.FlowModel, reward_fn, prompts, device) -> dict:
    """Time the second of two epochs (the first warms up kernels and allocators)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(cfg, out=out, epochs=2, eval_every=0, save_every=0, resume=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        m = fg.train(cfg, model, reward_fn, prompts, device, log=lambda s: None)[-1]
    plan = fg.plan_batches(cfg)
    seconds = m["time/sampling_s"] + m["time/reward_s"] + m["time/training_s"]
    return {
        "sampling_s": m["time/sampling_s"],
        "reward_s": m["time/reward_s"],
        "training_s": m["time/training_s"],
        "epoch_s": seconds,
        "images_per_s": plan.images_per_epoch / seconds,
        "model_calls": plan.forwards_per_epoch,
        "peak_mem_gb": peak_memory_gb(device),
    }


def toy_target():
    from toy import run as toy

    args = argparse.Namespace(out="", seed=0, beta=toy.TOY_BETA, epochs=2, noise_level=0.7, sde_type="sde",
                              fast_window=0, fast_window_range=5)  # fmt: skip
    cfg = toy.toy_config(args)

    def make():
        return toy.ToyModel(toy.pretrained(0), cfg.guidance_scale)

    return cfg, make, toy.toy_reward, [fg.Prompt(p) for p in toy.PROMPTS], torch.device("cpu")


def sd3_target(name: str):
    import rewards

    if name == "tiny-random":
        cfg = fg.parse_config(["--model", "tiny-random", "--reward", "jpeg_compressibility"])
        device, dtype = torch.device("cpu"), torch.float32
        pipe_fn = lambda: fg.load_pipeline("tiny-random", dtype)  # noqa: E731
    else:  # SD3.5-Medium's architecture with random weights: the paper's per-GPU settings
        if not torch.cuda.is_available():
            raise SystemExit("--targets sd3.5-medium needs a CUDA GPU (its transformer alone is 2.2 B parameters)")
        from tiny_sd3 import random_sd35_medium_pipeline

        cfg = fg.parse_config(["--model", "sd3.5-medium", "--reward", "jpeg_compressibility", "--gradient_checkpointing"])
        device, dtype = torch.device("cuda"), torch.bfloat16
        pipe_fn = lambda: random_sd35_medium_pipeline().to(dtype=dtype)  # noqa: E731

    def make(variant_cfg):
        torch.manual_seed(0)
        return fg.SD3Model(pipe_fn(), variant_cfg, device, dtype)

    return cfg, make, rewards.build_reward("jpeg_compressibility"), fg.load_prompts("general"), device


def activation_memory(checkpointing: bool) -> None:
    """Peak memory of ONE training forward + backward row of SD3.5-Medium's transformer (LoRA on, float32) at
    512 px, from the process's peak resident memory before and after. Runs on the CPU in about a minute and
    needs ~17 GB of RAM without checkpointing. One CFG image is 2 rows; bf16 on a GPU roughly halves it."""
    from tiny_sd3 import random_sd35_medium_pipeline

    flags = ["--model", "sd3.5-medium"] + (["--gradient_checkpointing"] if checkpointing else [])
    model = fg.SD3Model(random_sd35_medium_pipeline(), fg.parse_config(flags), torch.device("cpu"), torch.float32)
    cond = model.encode(["a photo of a cat"])
    x = torch.randn(1, *model.latent_shape)  # (1, 16, 64, 64)
    inputs = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=cond["embeds"],
                  pooled_projections=cond["pooled"], return_dict=False)  # fmt: skip
    with torch.no_grad():  # warm-up, so the baseline includes the allocator's pools
        model.transformer(**inputs)
    before = peak_memory_gb(torch.device("cpu"))
    model.transformer(**inputs)[0].pow(2).mean().backward()
    tokens = f"{x.shape[-1] * x.shape[-2] // 4} image + {cond['embeds'].shape[1]} text tokens"
    print(f"gradient checkpointing {'on ' if checkpointing else 'off'} | {tokens} | one row forward + backward: "
          f"{peak_memory_gb(torch.device('cpu')) - before:.2f} GB (float32, CPU)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="toy,tiny-random", help="comma list of toy, tiny-random, sd3.5-medium")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--activation_memory", choices=["on", "off"],
                        help="measure SD3.5-M activations on the CPU with gradient checkpointing on/off (one per process: the peak only grows)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.activation_memory:
        activation_memory(args.activation_memory == "on")
        return 0
    header = f"{'target':<14}{'variant':<16}{'sampling s':>11}{'reward s':>10}{'training s':>11}{'epoch s':>9}" \
             f"{'img/s':>8}{'model calls':>12}{'peak mem GB':>12}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for target in args.targets.split(","):
        for variant in args.variants.split(","):
            if target == "toy":
                base, make, reward_fn, prompts, device = toy_target()
                cfg = dataclasses.replace(base, **VARIANTS[variant])
                model = make()
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # as toy/run.py: tiny matrices run faster on one thread
            else:
                base, make, reward_fn, prompts, device = sd3_target(target)
                cfg = dataclasses.replace(base, **VARIANTS[variant])
                model = make(cfg)
                threads = torch.get_num_threads()
            try:
                r = bench_epoch(cfg, model, reward_fn, prompts, device)
            finally:
                torch.set_num_threads(threads)
            print(
                f"{target:<14}{variant:<16}{r['sampling_s']:>11.2f}{r['reward_s']:>10.2f}{r['training_s']:>11.2f}"
                f"{r['epoch_s']:>9.2f}{r['images_per_s']:>8.1f}{r['model_calls']:>12d}{r['peak_mem_gb']:>12.2f}",
                flush=True,
            )
            del model
    print(f"\n{torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
