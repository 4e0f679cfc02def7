"""Where the time goes: one Flow-GRPO epoch of each variant, split into sampling, reward and training.

    python bench.py                         # toy + tiny-random on the CPU (about a minute)
    python bench.py --targets sd3.5-medium --compile off,on  # SD3.5-Medium's real architecture, random weights, 512 px (GPU)
    python bench.py --flops --targets sd3.5-medium           # only the FLOP counts (meta device: any machine, seconds)
    python bench.py --activation_memory on  # SD3.5-M training activations per row, CPU, checkpointing on (or off)
    python bench.py --profile tiny-random   # where one epoch's time goes, by kind of work (torch profiler)
    python bench.py --targets sd3.5-medium --compile on --tf32 --sdpa_backend cudnn --fused_adamw   # GPU candidates

Variants: Flow-GRPO (SDE on every step), Flow-GRPO-Fast (SDE and training on a 2-step window inside the first 5
steps), and both again with the CPS sampler; each with the transformer blocks compiled or not (--compile). Each row
is one epoch after one warm-up epoch, timed with the training loop's own clocks (flow_grpo.train's time/* metrics).
Columns:
    warm-up s     how much longer the first epoch took than the timed one: compilation (cold: the compile caches
                  are off), allocator and kernel warm-up
    sampling s, reward s, training s, epoch s    the timed epoch's phases (flow_grpo's time/* metrics): reward s is
                  the time the sampling phase waited for VAE decode + reward model, i.e. what the overlap with the
                  next batch's denoising did not hide; epoch s is the whole epoch (time/epoch_s)
    reward busy s the decoding and scoring itself (the worker thread's time in model.decode and the reward)
    idle s        the epoch's time outside the denoising and the training (epoch − sampling − training): the wait
                  for rewards, advantages, logging; on a GPU, time the GPU has nothing queued from this epoch
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

--profile TARGET runs two epochs of one variant and profiles the second with the torch profiler: every op's own
(self) time, on the device where one runs (CPU time on a CPU, kernel time on a GPU), summed by kind of work:
attention, the frozen matmuls (and convolutions), the LoRA branch (its matmuls and the casts around them, from the
adapted layers' forward scopes; their backward through the autograd node each forward op created), norms and other
elementwise work, the SDE step and loss (float32), the optimiser (AdamW, zero_grad, the gradient-norm clip), decoding
+ reward (a worker thread, overlapped: bench's own clock), and the host gaps: the epoch's wall time in which the
main thread ran no op (CPU) or the GPU ran no kernel (one stream: kernels do not overlap). On a GPU, kernels no
profiled op launched (compiled code may launch its own; the worker thread's decoder) are a row of their own.
Compiled (--compile on) the blocks run as fused graphs: the LoRA scopes cannot be installed inside them, so the LoRA
branch is counted with the other matmuls and the fused elementwise kernels.
The GPU candidates of --tf32 (float32 matmuls in TF32), --sdpa_backend (one attention kernel) and --fused_adamw
(torch's fused AdamW kernel) apply to every epoch bench.py runs, so that a row with and without compares them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Optional
from unittest import mock  # mock.patch.object: bench's instruments around flow_grpo's calls, restored after

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


class Busy:
    """Seconds spent inside the callables it wraps, summed over threads (decoding and scoring run in a worker)."""

    def __init__(self):
        self.seconds, self.lock = 0.0, threading.Lock()

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds += time.perf_counter() - start

        return timed


def bench_epoch(cfg: fg.Config, model: fg.FlowModel, reward_fn, prompts, device, on_epoch=None) -> dict:
    """Time the second of two epochs (the first warms up: compilation, kernels, allocators). on_epoch(i) is called
    after epoch i's metrics line (the profiler starts and stops there)."""
    graphs, busy = [], []  # after the plan line and after each epoch: dynamo's graph count, seconds decoding + scoring
    reward = Busy()

    def log(line):  # train logs once before the first epoch, then once per epoch
        graphs.append(counters["stats"]["unique_graphs"])
        busy.append(reward.seconds)
        if on_epoch is not None and len(graphs) > 1:
            on_epoch(len(graphs) - 2)

    with tempfile.TemporaryDirectory() as out, mock.patch.object(fg, "score", reward.wrap(fg.score)), \
            mock.patch.object(model, "decode", reward.wrap(model.decode)):  # fmt: skip
        cfg = dataclasses.replace(cfg, out=out, epochs=2, eval_every=0, save_every=0, resume=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        first, m = fg.train(cfg, model, reward_fn, prompts, device, log=log)
    plan = fg.plan_batches(cfg)
    return {
        "warmup_s": first["time/epoch_s"] - m["time/epoch_s"],
        "sampling_s": m["time/sampling_s"],
        "reward_s": m["time/reward_s"],
        "reward_busy_s": busy[2] - busy[1],
        "training_s": m["time/training_s"],
        "idle_s": m["time/epoch_s"] - m["time/sampling_s"] - m["time/training_s"],
        "epoch_s": m["time/epoch_s"],
        "images_per_s": plan.images_per_epoch / m["time/epoch_s"],
        "model_calls": plan.forwards_per_epoch,
        "graphs": graphs[1] - graphs[0],
        "recompiles": graphs[2] - graphs[1],
        "breaks": sum(counters["graph_break"].values()),
        "peak_mem_gb": peak_memory_gb(device),
    }


# --profile: the kinds of work an epoch's op time is summed into, in the table's order
KINDS = ("attention", "frozen matmuls + convs", "LoRA branch", "norms/elementwise", "SDE step + loss (fp32)",
         "optimiser", "decode + reward", "host gaps")  # fmt: skip
# the scopes bench opens around flow_grpo's calls (record_function ranges), and the kind of work inside them
SCOPES = {"bench/decode+reward": "decode + reward", "bench/sde": "SDE step + loss (fp32)", "bench/optimiser": "optimiser",
          "bench/lora": "LoRA branch", "bench/frozen": "frozen matmuls + convs"}  # fmt: skip
ATTENTION_OPS = ("scaled_dot_product", "attention", "softmax", "flash", "fmha")  # CPU ops and GPU kernels
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "conv", "gemm")


def kind_of(event, backward_kind: dict) -> str:
    """The kind of work of one profiled op: the nearest enclosing bench scope; for a backward op, the kind of the
    forward op whose autograd node it evaluates; otherwise its name."""
    node = event
    while node is not None:
        if node.name in SCOPES:
            return SCOPES[node.name]
        if node.name.startswith("Optimizer."):  # torch's own scopes around AdamW.step and zero_grad
            return "optimiser"
        if node.name.startswith("autograd::engine::evaluate_function") and node.sequence_nr >= 0:
            found = backward_kind.get((node.fwd_thread, node.sequence_nr))
            if found is not None:
                return found
        node = node.cpu_parent
    name = event.name.lower()
    if any(k in name for k in ATTENTION_OPS):
        return "attention"
    return "frozen matmuls + convs" if any(k in name for k in MATMUL_OPS) else "norms/elementwise"


def kinds(events) -> dict:
    """{op: its kind of work} for the profiler's events, bench's scopes and torch's annotations left out."""
    ops = [e for e in events if not e.is_user_annotation]
    backward_kind = {}  # (thread, sequence number) of a forward op → its kind, for the ops of its backward
    for e in ops:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            backward_kind.setdefault((e.thread, e.sequence_nr), kind_of(e, {}))
    return {e: kind_of(e, backward_kind) for e in ops}


@contextlib.contextmanager
def scoped(model: fg.FlowModel):
    """Open bench's scopes around flow_grpo's calls: the SDE step and loss, the optimiser's gradient clip, decoding
    and scoring, and (eager only: hooks inside a compiled block would break its graph) every LoRA-adapted layer,
    with its frozen base layer as a scope of its own inside it."""

    def scope(name, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)

        return run

    hooks = []
    if isinstance(model, fg.SD3Model) and not model.compiled:
        for module in model.transformer.modules():
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):  # a peft LoRA layer
                for sub, name in ((module, "bench/lora"), (module.base_layer, "bench/frozen")):
                    ranges = []
                    hooks.append(sub.register_forward_pre_hook(
                        lambda m, a, ranges=ranges, name=name: ranges.append(torch.profiler.record_function(name).__enter__())))
                    hooks.append(sub.register_forward_hook(lambda m, a, out, ranges=ranges: ranges.pop().__exit__(None, None, None)))  # fmt: skip
    try:
        with contextlib.ExitStack() as stack:
            for fn in ("sde_step", "step_kl", "grpo_loss"):
                stack.enter_context(mock.patch.object(fg, fn, scope("bench/sde", getattr(fg, fn))))
            stack.enter_context(mock.patch.object(fg, "score", scope("bench/decode+reward", fg.score)))
            stack.enter_context(mock.patch.object(model, "decode", scope("bench/decode+reward", model.decode)))
            stack.enter_context(mock.patch.object(torch.nn.utils, "clip_grad_norm_", scope("bench/optimiser", torch.nn.utils.clip_grad_norm_)))
            yield
    finally:
        for h in hooks:
            h.remove()


def profile(target: str, variant: str, compile_: str) -> None:
    """Print where the second of two epochs spends its time, by kind of work (see the top of this file)."""
    base, make, reward_fn, prompts, device = toy_target() if target == "toy" else sd3_target(target)
    cfg = dataclasses.replace(base, **VARIANTS[variant], compile=compile_)
    model = make(cfg)
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    prof, wall = torch.profiler.profile(activities=activities), []

    def on_epoch(i: int) -> None:  # start after the warm-up epoch's line, stop after the profiled one's
        if cuda:
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter())
        prof.start() if i == 0 else prof.stop()

    with scoped(model):
        r = run_row(target, cfg, model, reward_fn, prompts, device, on_epoch)
    seconds = wall[1] - wall[0]
    total, ops = defaultdict(float), defaultdict(lambda: defaultdict(float))  # kind → seconds; kind → op → seconds
    kernels = 0.0  # GPU: every kernel's time, whether an op claims it or not
    for e, kind in kinds(prof.events()).items():  # self time: each microsecond is counted once, in the op that spent it
        if e.device_type != torch.autograd.DeviceType.CPU:  # a kernel: its time is in the op that launched it
            kernels += e.self_device_time_total / 1e6
            continue
        total[kind] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6
        ops[kind][e.name] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6
    if cuda:  # kernels no profiled op launched (compiled code may launch its own), so not sorted into a kind
        total["unclaimed kernels"] = kernels - sum(total.values())
    # The profiler records the thread that started it (and the GPU), not the worker thread that decodes and scores:
    # that row is bench's own clock around model.decode and the reward, the part the overlap hid included (on a
    # GPU the decoder's kernels are among the unclaimed ones)
    total["decode + reward"] = r["reward_busy_s"]
    # what ran no op: the main thread between its ops (CPU), or the GPU with no kernel running
    total["host gaps"] = seconds - (kernels if cuda else sum(v for k, v in total.items() if k != "decode + reward"))
    unit = "kernel" if cuda else "main thread's CPU"
    print(f"{target} {variant}, compile {'on' if getattr(model, 'compiled', False) else 'off'}: the profiled epoch took "
          f"{seconds:.2f} s (train's clocks: sampling {r['sampling_s']:.2f} s, waiting for rewards {r['reward_s']:.2f} "
          f"s, training {r['training_s']:.2f} s, idle {r['idle_s']:.2f} s); {unit} self time by kind of work, with its "
          f"largest ops:")
    for kind in KINDS + (("unclaimed kernels",) if cuda else ()):
        top = sorted(ops[kind].items(), key=lambda kv: -kv[1])[:3]
        names = ", ".join(f"{name.replace('autograd::engine::evaluate_function: ', '')} {v:.2f}" for name, v in top)
        print(f"  {kind:<24}{total[kind]:>9.3f} s{total[kind] / seconds:>7.1%}  {names}")
    print("  (shares of the profiled epoch's wall time; decode + reward runs in a worker thread, beside the main one)")


def run_row(target: str, cfg: fg.Config, model, reward_fn, prompts, device, on_epoch=None) -> dict:
    """bench_epoch from a clean compiler state: every row compiles from scratch and counts only its own graphs."""
    torch._dynamo.reset()
    counters.clear()
    threads = torch.get_num_threads()
    if target == "toy":
        torch.set_num_threads(1)  # as toy/run.py: tiny matrices run faster on one thread
    try:
        return bench_epoch(cfg, model, reward_fn, prompts, device, on_epoch)
    finally:
        torch.set_num_threads(threads)


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
    parser.add_argument("--profile", metavar="TARGET", help="profile one epoch of TARGET (its first --variants, first --compile)")
    parser.add_argument("--tf32", action="store_true", help="GPU candidate: float32 matmuls and convolutions in TF32")
    parser.add_argument("--sdpa_backend", choices=["flash", "efficient", "cudnn", "math"],
                        help="GPU candidate: run attention with this scaled_dot_product_attention backend only")  # fmt: skip
    parser.add_argument("--fused_adamw", action="store_true", help="GPU candidate: torch's fused AdamW kernel")
    args = parser.parse_args(argv)
    if args.activation_memory:
        activation_memory(args.activation_memory == "on")
        return 0
    with contextlib.ExitStack() as stack:  # the GPU candidates, for every epoch this process runs
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if args.sdpa_backend:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
            stack.enter_context(sdpa_kernel(getattr(SDPBackend, backend[args.sdpa_backend])))
        if args.fused_adamw:
            stack.enter_context(mock.patch.object(torch.optim, "AdamW", functools.partial(torch.optim.AdamW, fused=True)))
        return measure(args)


def measure(args) -> int:
    for flag, values, valid in [("--targets", args.targets, ("toy", "tiny-random", "sd3.5-medium")),
                                ("--profile", args.profile or "toy", ("toy", "tiny-random", "sd3.5-medium")),
                                ("--variants", args.variants, VARIANTS), ("--compile", args.compile, ("on", "off", "auto"))]:  # fmt: skip
        if set(values.split(",")) - set(valid):
            raise SystemExit(f"{flag}: unknown {sorted(set(values.split(',')) - set(valid))}; choose from {', '.join(valid)}")
    torch.compiler.config.force_disable_caches = True  # warm-up = the cold compile, not a read from an earlier run's cache
    if args.profile:
        profile(args.profile, args.variants.split(",")[0], args.compile.split(",")[0])
        return 0
    header = f"{'target':<14}{'variant':<16}{'compile':>8}{'warm-up s':>10}{'sampling s':>11}{'reward s':>9}" \
             f"{'reward busy s':>14}{'training s':>11}{'idle s':>7}{'epoch s':>9}{'img/s':>8}{'samp TFLOP/s':>13}{'MFU':>6}{'train TFLOP/s':>14}" \
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
                model = make(cfg)
                r = run_row(target, cfg, model, reward_fn, prompts, device)
                sampling_flops, training_flops = epoch_flops(f, cfg)
                tflops = sampling_flops / r["sampling_s"] / 1e12, training_flops / r["training_s"] / 1e12
                mfu = [f"{x / peak:>6.0%}" if peak else f"{'n/a':>6}" for x in tflops]
                compiled = getattr(model, "compiled", False)
                graphs = f"{r['graphs']}/{model.graphs}" if compiled else "-"
                print(
                    f"{target:<14}{variant:<16}{('on' if compiled else 'off'):>8}{r['warmup_s']:>10.2f}"
                    f"{r['sampling_s']:>11.2f}{r['reward_s']:>9.2f}{r['reward_busy_s']:>14.2f}{r['training_s']:>11.2f}"
                    f"{r['idle_s']:>7.2f}{r['epoch_s']:>9.2f}"
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
