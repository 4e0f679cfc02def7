"""Where the time goes: one Flow-GRPO epoch of each variant, split into sampling, reward and training.

    python bench.py                         # toy + tiny-random on the CPU (about a minute)
    python bench.py --targets sd3.5-medium --compile off,on  # SD3.5-Medium's real architecture, random weights, 512 px (GPU)
    python bench.py --flops --targets sd3.5-medium           # only the FLOP counts (meta device: any machine, seconds)
    python bench.py --activation_memory on  # SD3.5-M training activations per row, CPU, checkpointing on (or off)

Variants: Flow-GRPO (SDE on every step), Flow-GRPO-Fast (SDE and training on a 2-step window inside the first 5
steps), and both again with the CPS sampler; each with the transformer blocks compiled or not (--compile). Each row
is one epoch after one warm-up epoch, timed with the training loop's own clocks (flow_grpo.train's time/* metrics).
Columns:
    warm-up s     how much longer the first epoch took than the timed one: compilation (cold: the compile caches
                  are off), allocator and kernel warm-up
    sampling s, reward s, training s, epoch s    the timed epoch's phases (reward = VAE decode + reward model)
    img/s         sampled images per second of the whole epoch
    TFLOP/s, MFU  model FLOPs of the phase's transformer calls (counted once per target with
                  torch.utils.flop_counter on the meta device: matmuls, convolutions and attention; a forward that
                  gradient checkpointing recomputes is not counted, as MFU is defined) per second of the phase, and
                  that as a fraction of the GPU's dense bf16 peak (PEAK_BF16_TFLOPS, named in the output; n/a on a CPU)
    model calls   the batched velocity forwards of the epoch (flow_grpo.plan_batches)
    graphs        graphs compiled in the warm-up epoch / the number flow_grpo.SD3Model allows (-: not compiled)
    recompiles    graphs compiled during the timed epoch (0: nothing was recompiled after the warm-up)
    breaks        dynamo graph breaks (0: each block is one graph)
    peak mem GB   peak GPU memory allocated (CUDA) or the process's peak resident memory so far (CPU; it only grows)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import sys
import tempfile
from typing import Optional

import torch
from torch._dynamo.utils import counters

import flow_grpo as fg

VARIANTS = {
    "flow-grpo": dict(),
    "flow-grpo-fast": dict(fast_window=2, fast_window_range=5),
    "cps": dict(sde_type="cps"),
    "cps-fast": dict(sde_type="cps", fast_window=2, fast_window_range=5),
}


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; the first name found in the device
# name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312, "L40S": 362}


def peak_tflops(device: torch.device) -> tuple[str, Optional[float]]:
    """(device name, its dense bf16 peak in TFLOP/s or None if unknown or a CPU)."""
    if device.type != "cuda":
        return "CPU", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def count_flops(model: fg.FlowModel, cfg: fg.Config, prompt: str, device) -> dict[str, float]:
    """FLOPs of each kind of call an epoch makes, for ONE batch of cfg.batch_size images (with CFG, twice the rows):
    the policy forward, the reference forward (adapters off), the policy forward's backward, and the decode."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    b = cfg.batch_size
    cond = model.encode([prompt] * b)
    x, t = torch.randn((b, *model.latent_shape), device=device), torch.full((b,), 0.5, device=device)  # (b, *D), (b,)
    with torch.no_grad():
        out = {"forward": flops(lambda: model.velocity(x, t, cond)), "decode": flops(lambda: model.decode(x))}
        with model.reference():
            out["reference"] = flops(lambda: model.velocity(x, t, cond))
    v = model.velocity(x, t, cond)
    out["backward"] = flops(lambda: v.square().mean().backward())  # through the whole network, to every input
    return out


def epoch_flops(f: dict[str, float], cfg: fg.Config) -> tuple[float, float]:
    """Model FLOPs of an epoch's sampling phase and training phase (one process)."""
    plan = fg.plan_batches(cfg, 1)
    sampling = plan.batches_per_epoch * cfg.num_steps * f["forward"]
    step = f["forward"] + f["backward"] + (f["reference"] if cfg.resolved_beta() > 0 else 0.0)
    return sampling, cfg.inner_epochs * plan.batches_per_epoch * plan.n_trained * step


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bench_epoch(cfg: fg.Config, model: fg.FlowModel, reward_fn, prompts, device) -> dict:
    """Time the second of two epochs (the first warms up: compilation, kernels, allocators)."""
    graphs = []  # dynamo's count of compiled graphs at the start, after the first epoch, after the second
    log = lambda line: graphs.append(counters["stats"]["unique_graphs"])  # noqa: E731  train logs once, then per epoch
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(cfg, out=out, epochs=2, eval_every=0, save_every=0, resume=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        first, m = fg.train(cfg, model, reward_fn, prompts, device, log=log)
    plan = fg.plan_batches(cfg)
    seconds = m["time/sampling_s"] + m["time/reward_s"] + m["time/training_s"]
    first_seconds = first["time/sampling_s"] + first["time/reward_s"] + first["time/training_s"]
    return {
        "warmup_s": first_seconds - seconds,
        "sampling_s": m["time/sampling_s"],
        "reward_s": m["time/reward_s"],
        "training_s": m["time/training_s"],
        "epoch_s": seconds,
        "images_per_s": plan.images_per_epoch / seconds,
        "model_calls": plan.forwards_per_epoch,
        "graphs": graphs[1] - graphs[0],
        "recompiles": graphs[2] - graphs[1],
        "breaks": sum(counters["graph_break"].values()),
        "peak_mem_gb": peak_memory_gb(device),
    }


def toy_target():
    from toy import run as toy

    args = argparse.Namespace(out="", seed=0, beta=toy.TOY_BETA, epochs=2, noise_level=0.7, sde_type="sde",
                              fast_window=0, fast_window_range=5)  # fmt: skip
    cfg = toy.toy_config(args)

    def make(variant_cfg, on=None):  # the toy has no meta-device path: its FLOPs are counted on the CPU
        return toy.ToyModel(toy.pretrained(0), variant_cfg.guidance_scale)

    return cfg, make, toy.toy_reward, [fg.Prompt(p) for p in toy.PROMPTS], torch.device("cpu")


def sd3_target(name: str):
    import rewards

    if name == "tiny-random":
        cfg = fg.parse_config(["--model", "tiny-random", "--reward", "jpeg_compressibility"])
        device, dtype = torch.device("cpu"), torch.float32
        pipe_fn = lambda: fg.load_pipeline("tiny-random", dtype)  # noqa: E731
    else:  # SD3.5-Medium's architecture with random weights: the paper's per-GPU settings
        from tiny_sd3 import random_sd35_medium_pipeline

        cfg = fg.parse_config(["--model", "sd3.5-medium", "--reward", "jpeg_compressibility", "--gradient_checkpointing"])
        device, dtype = torch.device("cuda"), torch.bfloat16
        pipe_fn = lambda: random_sd35_medium_pipeline().to(dtype=dtype)  # noqa: E731

    def make(variant_cfg, on=None):
        """The model on the target's device, or on `on` (the meta device: shapes only, for counting FLOPs)."""
        if on is None and device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--targets {name} needs a CUDA GPU (its transformer alone is 2.2 B parameters)")
        torch.manual_seed(0)
        with on or contextlib.nullcontext():
            return fg.SD3Model(pipe_fn(), variant_cfg, on or device, dtype)

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
    parser.add_argument("--compile", default="auto", help="comma list of on, off, auto (flow_grpo's --compile; the toy has no compiled path)")
    parser.add_argument("--flops", action="store_true", help="only count the FLOPs of each target's calls (meta device)")
    parser.add_argument("--activation_memory", choices=["on", "off"],
                        help="measure SD3.5-M activations on the CPU with gradient checkpointing on/off (one per process: the peak only grows)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.activation_memory:
        activation_memory(args.activation_memory == "on")
        return 0
    for flag, values, valid in [("--targets", args.targets, ("toy", "tiny-random", "sd3.5-medium")),
                                ("--variants", args.variants, VARIANTS), ("--compile", args.compile, ("on", "off", "auto"))]:  # fmt: skip
        if set(values.split(",")) - set(valid):
            raise SystemExit(f"{flag}: unknown {sorted(set(values.split(',')) - set(valid))}; choose from {', '.join(valid)}")
    torch.compiler.config.force_disable_caches = True  # warm-up = the cold compile, not a read from an earlier run's cache
    header = f"{'target':<14}{'variant':<16}{'compile':>8}{'warm-up s':>10}{'sampling s':>11}{'reward s':>9}" \
             f"{'training s':>11}{'epoch s':>9}{'img/s':>8}{'samp TFLOP/s':>13}{'MFU':>6}{'train TFLOP/s':>14}" \
             f"{'MFU':>6}{'model calls':>12}{'graphs':>8}{'recompiles':>11}{'breaks':>7}{'peak mem GB':>12}"  # fmt: skip
    targets = {}
    for target in args.targets.split(","):  # FLOPs first: seconds on the meta device, before minutes of epochs
        base, make, reward_fn, prompts, device = toy_target() if target == "toy" else sd3_target(target)
        # model FLOPs: no recomputation by gradient checkpointing (MFU's definition), nothing compiled
        flop_cfg = dataclasses.replace(base, compile="off", gradient_checkpointing=False)
        flop_model = make(flop_cfg, None if target == "toy" else torch.device("meta"))
        f = count_flops(flop_model, flop_cfg, prompts[0].text, "cpu" if target == "toy" else "meta")
        targets[target] = base, make, reward_fn, prompts, device, f
        b = base.batch_size
        tf = {k: f"{v / 1e12:.4g}" for k, v in f.items()}
        print(f"{target}: TFLOP for one batch of {b} images ({2 * b} CFG rows): policy forward {tf['forward']}, "
              f"reference forward {tf['reference']}, the policy forward's backward {tf['backward']}, decode "
              f"{tf['decode']}", flush=True)  # fmt: skip
    if args.flops:
        return 0
    print("\n" + header + "\n" + "-" * len(header), flush=True)
    for target, (base, make, reward_fn, prompts, device, f) in targets.items():
        peak = peak_tflops(device)[1]
        for variant in args.variants.split(","):
            for compile_ in ["off"] if target == "toy" else args.compile.split(","):
                cfg = dataclasses.replace(base, **VARIANTS[variant], compile=compile_)
                torch._dynamo.reset()  # every row compiles from scratch, and counts only its own graphs
                counters.clear()
                model = make(cfg)
                threads = torch.get_num_threads()
                if target == "toy":
                    torch.set_num_threads(1)  # as toy/run.py: tiny matrices run faster on one thread
                try:
                    r = bench_epoch(cfg, model, reward_fn, prompts, device)
                finally:
                    torch.set_num_threads(threads)
                sampling_flops, training_flops = epoch_flops(f, cfg)
                tflops = sampling_flops / r["sampling_s"] / 1e12, training_flops / r["training_s"] / 1e12
                mfu = [f"{x / peak:>6.0%}" if peak else f"{'n/a':>6}" for x in tflops]
                compiled = getattr(model, "compiled", False)
                graphs = f"{r['graphs']}/{model.graphs}" if compiled else "-"
                print(
                    f"{target:<14}{variant:<16}{('on' if compiled else 'off'):>8}{r['warmup_s']:>10.2f}"
                    f"{r['sampling_s']:>11.2f}{r['reward_s']:>9.2f}{r['training_s']:>11.2f}{r['epoch_s']:>9.2f}"
                    f"{r['images_per_s']:>8.1f}{tflops[0]:>13.3g}{mfu[0]}{tflops[1]:>14.3g}{mfu[1]}"
                    f"{r['model_calls']:>12d}{graphs:>8}{r['recompiles']:>11d}{r['breaks']:>7d}{r['peak_mem_gb']:>12.2f}",
                    flush=True,
                )
                del model
    name, peak = peak_tflops(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"\n{torch.__version__}, {torch.get_num_threads()} CPU threads, {name if torch.cuda.is_available() else 'no GPU'}; "
          + (f"MFU against {peak:g} TFLOP/s, the dense bf16 peak of {name}" if peak else "MFU n/a (no known bf16 peak)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
