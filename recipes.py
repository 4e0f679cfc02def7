"""The command line: flags generated from flow_grpo.Config, the --model presets, and the reference implementation's
named SD3.5-M configs, one `--recipe NAME` each.

Every value below was read from the authors' repository yifan123/flow_grpo, file config/grpo.py at commit 54809b5
(the newest one stored; it holds the Fast no-CFG configs), or from config/base.py at the same commit where a config
leaves a value at the base's default. The line of each value is named next to it ("grpo.py:181" is line 181 of
config/grpo.py). Each recipe lists the values that define the method, also where they equal flow_grpo.Config's
defaults; the others (optimiser, LoRA, advantage clip, EMA schedule) are the defaults, which already are the
reference's (docs/FIDELITY.md).

    python flow_grpo.py --recipe geneval-fast-nocfg                  # the reference's geneval_sd3_fast_nocfg
    python flow_grpo.py --recipe geneval-fast-nocfg --beta 0.01      # any explicit flag still wins

Precedence: explicit flags > --recipe > the --model preset (PRESETS, below) > Config's defaults. A recipe's
values that equal Config's defaults (the paper's) do not override a preset: `--model tiny-random --recipe
geneval-fast-nocfg` keeps the laptop preset's 32 px and batch, and takes the recipe's sampler, guidance and loss.

What a recipe does NOT take from the reference, and why:
  * the batch across GPUs. The reference's configs are written for 32 GPUs: 48 groups per epoch (64 for
    pickscore_sd3_fast_nocfg) in sampling batches of 9 per GPU. Here --groups_per_epoch keeps its one-GPU default
    (2) and --batch_size its default (8, which divides 2 x 24; the reference's 9 does not), except where the
    group size is 18 and 9 divides 2 x 18. Set --groups_per_epoch for more GPUs (README, torchrun).
  * the prompts. The reference trains on its dataset/<name> folders; a recipe names this project's shipped set
    for the same task (geneval, ocr; general for the pickscore data). `--prompts dataset/pickscore` reads the
    reference's own folder if you have it.
  * the reward names map one to one: the reference's "geneval", "ocr", "pickscore", "jpeg_compressibility" are the
    rewards of the same names in rewards.py (its "clipscore" too, but clipscore_sd3 is skipped, below).

Configs of config/grpo.py that are NOT offered, and why:
  * compressibility: the base the others build on; alone it samples one image per prompt (no groups).
  * clipscore_sd3: sets sample.same_latent = True (grpo.py:276): every image of a group starts from the same
    initial noise, so a group differs only by the SDE's noise. This code draws independent noise per image.
  * pickscore_sd3_fast: uses sample.mini_num_image_per_prompt and sample.train_num_steps, which
    scripts/train_sd3_fast.py (commit 74db691) never reads; with its sample.train_batch_size = 1 on 32 GPUs that
    script's DistributedKRepeatSampler asserts that 24 divides 32 and stops.
  * general_ocr_sd3_4gpu, pickscore_sd3_4gpu: the paper's recipes at a group size of 16 (--recipe ocr
    --group_size 16 is the same method).
  * general_ocr_sd3_1gpu, pickscore_sd3_1gpu, geneval_sd3_1gpu, seedscore_sd3_1gpu: sample.solver = 'dpm2' and
    sample.deterministic, a sampler this code does not have (and the "seedscore" reward).
  * the FLUX, Kontext, Wan2.1, Qwen-Image(-Edit) and BAGEL configs: other models; this code trains SD3 pipelines.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional, Sequence


# the paper's three SD3.5-M configs (scripts/train_sd3.py): CFG 4.5 in sampling and in the training forward
_PAPER = dict(
    num_steps=10,  # grpo.py:99, 141, 221
    eval_num_steps=40,  # grpo.py:100, 142, 222
    guidance_scale=4.5,  # grpo.py:101, 143, 223 (train.cfg = True: base.py:95)
    resolution=512,  # grpo.py:103, 145, 225
    group_size=24,  # grpo.py:105, 147, 227 (num_image_per_prompt)
    timestep_fraction=0.99,  # grpo.py:113, 155, 235
    noise_level=0.7,  # base.py:61 (none of the three sets it)
    sde_type="sde",  # the default of sd3_sde_with_logprob (none of the three sets sample.sde_type)
    clip_range=1e-4,  # base.py:99 (train.clip_range)
    global_std=True,  # grpo.py:117, 157, 237
    ema=True,  # grpo.py:120, 159, 239
)

# Flow-GRPO-Fast without CFG (scripts/train_sd3_fast.py): guidance 1 in sampling, evaluation and training (one
# transformer row per image, flow_grpo.SD3Model.velocity), CPS, an SDE window of 3 steps inside the first 5 of 10
_FAST_NOCFG = dict(
    num_steps=10,  # grpo.py:179, 339
    eval_num_steps=40,  # grpo.py:180, 340
    guidance_scale=1.0,  # grpo.py:181, 341; eval_guidance_scale = 1 (grpo.py:182, 342); train.cfg = False (183, 343)
    resolution=512,  # grpo.py:185, 345
    clip_range=1e-5,  # grpo.py:194, 354
    beta=0.0,  # grpo.py:195, 355
    global_std=True,  # grpo.py:196, 356
    noise_level=0.8,  # grpo.py:197, 357
    fast_window=3,  # grpo.py:198, 358 (sample.sde_window_size)
    fast_window_start=0,  # grpo.py:199, 359: sample.sde_window_range = (0, num_steps // 2) ...
    fast_window_range=5,  # ... = (0, 5): the window's 3 steps start at 0, 1 or 2
    sde_type="cps",  # grpo.py:200, 360
    ema=True,  # grpo.py:201, 361
)

RECIPES: dict[str, dict] = {
    # general_ocr_sd3 (grpo.py:92): dataset/ocr (95), reward {"ocr": 1.0} (126), β 0.04 (115)
    "ocr": dict(_PAPER, reward="ocr", prompts="ocr", beta=0.04),
    # geneval_sd3 (grpo.py:134): dataset/geneval (137), reward {"geneval": 1.0} (164), β 0.04 (156)
    "geneval": dict(_PAPER, reward="geneval", prompts="geneval", beta=0.04),
    # pickscore_sd3 (grpo.py:214): dataset/pickscore (217), reward {"pickscore": 1.0} (244), β 0.01 (236)
    "pickscore": dict(_PAPER, reward="pickscore", prompts="general", beta=0.01),
    # geneval_sd3_fast_nocfg (grpo.py:172): dataset/geneval (175), G = 24 (187), reward {"geneval": 1.0} (206)
    "geneval-fast-nocfg": dict(_FAST_NOCFG, reward="geneval", prompts="geneval", group_size=24),
    # pickscore_sd3_fast_nocfg (grpo.py:332): dataset/pickscore (335), G = 18 (347), batch 9 (346; 9 divides
    # 2 x 18), reward {"pickscore": 1.0} (366)
    "pickscore-fast-nocfg": dict(_FAST_NOCFG, reward="pickscore", prompts="general", group_size=18, batch_size=9),
}

# one line each for --help
DESCRIPTIONS = {
    "ocr": "general_ocr_sd3: the paper's OCR run (CFG 4.5, SDE a = 0.7, beta 0.04)",
    "geneval": "geneval_sd3: the paper's GenEval run (CFG 4.5, SDE a = 0.7, beta 0.04)",
    "pickscore": "pickscore_sd3: the paper's PickScore run (CFG 4.5, SDE a = 0.7, beta 0.01)",
    "geneval-fast-nocfg": "geneval_sd3_fast_nocfg: no CFG (guidance 1), CPS a = 0.8, a 3-step SDE window in the "
    "first 5 of 10, clip range 1e-5, beta 0",
    "pickscore-fast-nocfg": "pickscore_sd3_fast_nocfg: as geneval-fast-nocfg with PickScore and G = 18",
}


# --model tiny-random is a laptop demo of the real path: the paper's sizes would take hours on a CPU even for a
# 2 MB model, so it gets its own defaults (any flag given on the command line still wins).
PRESETS = {
    "tiny-random": dict(
        resolution=32,  # the tiny VAE: 32 px images, 4x16x16 latents
        # 32 images/epoch in 8 batches of 4, one optimiser step each: more, smaller PPO steps per epoch (measured over
        # seeds 0-4: the training reward rose in every seed, against 2 of 5 with 2 steps of 16)
        group_size=8, groups_per_epoch=4, batch_size=4, optimizer_steps_per_epoch=8, epochs=10,
        eval_num_steps=20, eval_every=5, eval_count=4, save_every=5,
        # A random model's JPEG sizes differ by a few bytes between samples, so the signal per epoch is weak: larger
        # steps (lr 3e-2 instead of 3e-4, clip range 1e-2 instead of 1e-4) make the rise visible in 10 epochs.
        lr=3e-2, clip_range=1e-2,
        # The JPEG reward on the reference's scale (kB/500): a random 32 px model's samples differ by ~1e-5, below
        # GRPO's 1e-4 std epsilon, so the advantages are ~0.2 and the gradients of a log-prob averaged over 1024
        # latent elements fall below AdamW's ε = 1e-8, which then damps every update (measured: the reward stays
        # flat). ε = 1e-15 lets Adam normalise them as it does at SD3.5-M's scale.
        adam_eps=1e-15,
        # β = 0: the KL to a RANDOM reference guards nothing, and it pulls the LoRA back (measured here: with
        # β = 0.01 the reward stays flat over the 10 epochs). The KL code path is the same; only its weight is 0.
        beta=0.0,
        ema_every=1,  # 20 optimiser steps in all: the paper's every-8-steps EMA would barely move
        max_sequence_length=32,  # the tiny tokenizers spell prompts letter by letter
        out="runs/tiny-random",
    ),
}


def parse_config(config: type, argv: Optional[Sequence[str]] = None, description: str = ""):
    """A `config` (flow_grpo.Config) from the command line: every field is a flag with its default and the comment
    after it as its help; explicit flags > --recipe > the --model preset > the dataclass defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = _field_comments(config)
    for f in dataclasses.fields(config):
        kind = {"Optional[float]": float}.get(str(f.type), None) or {"int": int, "float": float, "str": str}.get(str(f.type))
        if f.name == "resume":  # --resume alone means the latest checkpoint, --resume PATH that one
            parser.add_argument("--resume", nargs="?", const="latest", default="", metavar="PATH", help=comments[f.name])
        elif str(f.type) == "bool":
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=comments.get(f.name))
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=comments.get(f.name))
    listed = "; ".join(f"{name}: {text}" for name, text in DESCRIPTIONS.items())
    parser.add_argument("--recipe", choices=list(RECIPES), help=f"a config of the reference (recipes.py): {listed}")
    known, defaults = parser.parse_known_args(argv)[0], {f.name: f.default for f in dataclasses.fields(config)}
    # flags given > --recipe > the --model preset > the defaults (set_defaults never overrides a given flag); a
    # recipe's values equal to the defaults (the paper's) leave a preset's (tiny-random: 32 px) in place
    recipe = {k: v for k, v in RECIPES.get(known.recipe, {}).items() if v != defaults[k]}
    parser.set_defaults(**{**PRESETS.get(known.model, {}), **recipe})
    return config(**{k: v for k, v in vars(parser.parse_args(argv)).items() if k != "recipe"})


def _field_comments(config: type) -> dict[str, str]:
    """The '# ...' comment after each field of the dataclass `config`, used as its --help text."""
    import inspect

    out = {}
    for line in inspect.getsource(config).splitlines():
        if ":" in line and "#" in line and "=" in line:
            name = line.split(":")[0].strip()
            out[name] = line.split("#", 1)[1].strip().replace("%", "%%")
    return out


def check_flags(cfg) -> None:
    """Every flag of a Config in its range and every choice one of its values: a ValueError naming the flag and the
    rule. What the numbers mean together (batch arithmetic, the sampler's limits) flow_grpo.plan_batches checks."""
    if cfg.group_size < 2:
        raise ValueError(f"--group_size must be >= 2: GRPO compares samples within a group (got {cfg.group_size})")

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"--{name} must be {rule}, got {getattr(cfg, name)}")

    for f in dataclasses.fields(cfg):  # a NaN flag would pass every comparison below (they are all False)
        value = getattr(cfg, f.name)
        need(not isinstance(value, float) or math.isfinite(value), f.name, "a finite number")
    for name in ("groups_per_epoch", "batch_size", "optimizer_steps_per_epoch", "inner_epochs", "num_steps", "epochs",
                 "eval_num_steps", "resolution", "lora_rank", "ema_every", "max_sequence_length"):  # fmt: skip
        need(getattr(cfg, name) >= 1, name, ">= 1")
    for name in ("eval_every", "save_every", "eval_count", "fast_window", "lr", "weight_decay", "max_zero_adv_epochs"):
        need(getattr(cfg, name) >= 0, name, ">= 0")
    for name in ("clip_range", "adv_clip", "max_grad_norm", "lora_alpha", "adam_eps"):
        need(getattr(cfg, name) > 0, name, "> 0")
    for name in ("ema_decay", "adam_beta1", "adam_beta2"):
        need(0 <= getattr(cfg, name) < 1, name, "in [0, 1)")
    need(cfg.beta is None or cfg.beta >= 0, "beta", ">= 0")
    # random.Random(seed) draws the prompts and seeds by |seed| (so -1 would repeat 1's prompts with other noise)
    need(0 <= cfg.seed < 2**32, "seed", "in [0, 2^32)")
    # v = v_u + w·(v_c − v_u): w = 1 is the conditional model alone (no CFG); below 1 the prompt is weakened, 0 drops it
    need(cfg.guidance_scale >= 1, "guidance_scale", ">= 1 (1: no CFG, the prompt alone; 0 would ignore the prompt)")
    need(0 < cfg.timestep_fraction <= 1, "timestep_fraction", "in (0, 1]: the fraction of --num_steps trained (0.99: 9 of 10)")
    if cfg.sde_type not in ("sde", "cps"):
        raise ValueError(f"--sde_type must be 'sde' or 'cps', got {cfg.sde_type!r}")
    if cfg.mixed_precision not in ("bf16", "fp16", "no"):
        raise ValueError(f"--mixed_precision must be bf16, fp16 or no, got {cfg.mixed_precision!r}")
    if cfg.log_prob_reduce not in ("mean", "sum"):
        raise ValueError(f"--log_prob_reduce must be mean or sum, got {cfg.log_prob_reduce!r}")
