"""The run's plumbing, beside the method: the files a Flow-GRPO run reads and writes, checked. Prompt sets and the
held-out split, the lock on the output folder, metrics.jsonl, checkpoints (atomic writes, integrity, what a resumed
run may change, one history per folder, a full disk), stopping on SIGTERM/SIGINT with the last epoch saved, loading
the model's files, joining torchrun's process group and what a failing process leaves for it, the lines a run prints,
the evaluation grid.

flow_grpo.py holds every line that changes what is trained; this file holds what keeps a run's files whole and
honest, and train() calls it in a few lines whose names say what they guarantee. Every error names the file (and
line) and what to do. Importing this file is cheap: the standard library and torch (safetensors and PIL are imported
by the functions that need them).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

# ----------------------------------------------------------------------------------------------------------------
# Prompt sets
# ----------------------------------------------------------------------------------------------------------------

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
# shipped sets: name -> (training prompts, held-out test prompts), files in prompts/ (see prompts/README.md)
PROMPT_SETS = {
    "general": ("general.txt", "general_test.txt"),
    "ocr": ("ocr.jsonl", "ocr_test.jsonl"),
    "geneval": ("geneval.jsonl", "geneval_test.jsonl"),
}
# the reference's dataset/<name>/ folders: train.txt + test.txt (one prompt per line: pickscore, ocr), or
# train_metadata.jsonl + test_metadata.jsonl (one {"prompt": ..., <metadata>} object per line: geneval)
SPLIT_FILES = ("{}.txt", "{}_metadata.jsonl")


def prompt_file(spec: str, split: str = "train") -> str:
    """The file holding the `split` ("train" or "test") of a prompt set: a shipped set (PROMPT_SETS), a folder laid
    out as the reference's dataset/<name>/ (SPLIT_FILES), or a single file, which is its whole set either way."""
    if spec in PROMPT_SETS:
        return os.path.join(PROMPT_DIR, PROMPT_SETS[spec][split == "test"])
    if os.path.isdir(spec):
        for name in (f.format(split) for f in SPLIT_FILES):
            if os.path.isfile(os.path.join(spec, name)):
                return os.path.join(spec, name)
        raise FileNotFoundError(
            f"{spec} holds no {' or '.join(f.format(split) for f in SPLIT_FILES)} (the layout of the reference's "
            f"dataset/<name>/ folders); --eval_prompts can name another file or set"
        )
    if os.path.isfile(spec):
        return spec
    raise FileNotFoundError(f"prompts {spec!r}: no such file or folder (shipped sets: {', '.join(PROMPT_SETS)})")


def read_prompts(path: str) -> list[tuple[str, dict, str]]:
    """(prompt, metadata, "file:line") for every non-blank line of a .txt file (one prompt per line) or a .jsonl
    file (one {"prompt": ..., <metadata>...} object per line; the rest of the object is the metadata)."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not part of the prompt
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            text, meta = line.strip(), {}
            if path.endswith(".jsonl"):
                try:
                    meta = json.loads(line)
                    text = meta.pop("prompt")
                except (ValueError, KeyError, AttributeError, TypeError) as e:
                    raise ValueError(f'{where}: expected a JSON object with a "prompt" key ({type(e).__name__}: {e})') from None
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f'{where}: "prompt" must be a non-empty string, got {text!r}')
            rows.append((text, meta, where))
    if not rows:
        raise ValueError(f"{path} holds no prompts: write one prompt per line (.txt) or per JSON line (.jsonl)")
    return rows


@dataclass
class Prompt:
    text: str
    metadata: dict = field(default_factory=dict)
    source: str = ""  # "file:line" it was read from, for error messages


def load_prompts(spec: str, split: str = "train") -> list[Prompt]:
    """The `split` ("train" or "test") of a prompt set: a shipped set (general, ocr, geneval: prompts/), a folder
    laid out as the reference's dataset/<name>/ (train.txt, test.txt or *_metadata.jsonl), or one .txt file (one
    prompt per line) or .jsonl file (one {"prompt": ..., <metadata>...} object per line), its whole set."""
    return [Prompt(text, meta, source) for text, meta, source in read_prompts(prompt_file(spec, split))]


def eval_prompt_set(cfg) -> list[Prompt]:
    """The held-out prompts evaluation uses: --eval_prompts (a file: all of it; a set or folder: its test split), by
    default the test split of --prompts. Never the training prompts, unless --eval_prompts names them."""
    if not cfg.eval_every:
        return []
    if not cfg.eval_prompts and os.path.isfile(cfg.prompts):
        raise ValueError(
            f"--prompts {cfg.prompts} is a single file, so it has no held-out test split (and evaluating on training "
            f"prompts measures memorisation): pass --eval_prompts with a file of other prompts or a shipped set, or "
            f"--eval_every 0"
        )
    return load_prompts(cfg.eval_prompts or cfg.prompts, "test")


# ----------------------------------------------------------------------------------------------------------------
# The output folder: one run at a time, its metrics.jsonl
# ----------------------------------------------------------------------------------------------------------------

_LOCKS: dict[str, Any] = {}  # real path of an --out -> its open, locked .lock file, held until this process ends


def lock_out_folder(out: str) -> None:
    """One run per output folder: an exclusive flock on <out>/.lock, held until this process ends (calling again
    from the same process does nothing). The OS drops a flock when its process dies, however it dies (kill -9
    included), so a crashed run never leaves the folder locked; the file's text only says who holds it."""
    import fcntl
    import socket

    if os.path.exists(out) and not os.path.isdir(out):
        raise DiskError(f"--out {out} is a file, not a folder: choose a folder (it is created if missing)")
    if os.path.realpath(out) in _LOCKS:
        return
    try:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:  # a read-only file system, a folder of another user, a parent that is a file
        raise DiskError(f"--out {out}: cannot write there ({e.strerror}): choose a writable --out") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise FileExistsError(f"--out {out} is in use by another run ({holder}): let it finish, or choose another --out") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _LOCKS[os.path.realpath(out)] = f


def atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one


def claim_metrics(path: str, resumed_epoch: Optional[int], log: Callable[[str], None]) -> None:
    """Make <out>/metrics.jsonl this run's own. A resumed run drops the lines of epochs >= resumed_epoch (logged
    after the last checkpoint by a run that then crashed; they are about to be redone); where later checkpoints
    exist, the run starts a branch and they go aside with those lines (set_aside_later_epochs). A fresh run starts only
    where there is no checkpoint, so a file there is the log of a run that crashed before its first checkpoint,
    with nothing to resume: it is moved aside to metrics.<time>.jsonl, never appended to."""
    if resumed_epoch is not None:
        set_aside_later_epochs(os.path.dirname(path), resumed_epoch, log)
    if not os.path.exists(path):
        return
    if resumed_epoch is None:
        stem, ext = os.path.splitext(path)  # the file's own name: a folder above may hold ".jsonl" in its name
        aside = stem + time.strftime(".%Y%m%d-%H%M%S") + ext
        os.replace(path, aside)
        log(f"moved the metrics of an earlier run in this folder (it saved no checkpoint) to {aside}")
        return
    # a line cut short by a crash mid-write is dropped
    kept = [line.rstrip("\n") + "\n" for line in open(path) if (e := _epoch_of(line)) is not None and e < resumed_epoch]
    atomic_write_text(path, "".join(kept))


def append_metrics(path: str, m: dict) -> None:
    """One epoch's line of metrics.jsonl, strict JSON: a value that is not finite is written as null."""
    with open(path, "a") as f:
        f.write(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in m.items()}, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files: trainer_state.json lists the size and SHA-256 of every other file of its checkpoint
# ----------------------------------------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message names the file and what to do instead."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, gradient or sample: stop before it reaches the weights."""


class DiskError(RuntimeError):
    """A file of the run cannot be written (a full disk, a read-only or unwritable folder, a file where a folder
    belongs); the message names the folder and what was kept."""


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(folder: str) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `folder`, each fsync-ed first (on disk before the
    checkpoint folder is renamed into place, so the rename never exposes a half-written file)."""
    files = {}
    for sub, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(sub, name)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[os.path.relpath(path, folder)] = {"bytes": os.path.getsize(path), "sha256": sha256(path)}
    return files


def read_checkpoint(path: str) -> dict:
    """The trainer_state.json of the checkpoint folder `path`, once every file it lists is checked whole (size and
    SHA-256 recorded at save time). Raises CheckpointError naming the first missing or damaged file."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: missing")
    if not os.path.isfile(state):
        raise CheckpointError(f"{path}: not a checkpoint folder (no trainer_state.json; they are <out>/checkpoints/epoch-NNNNNN)")
    try:
        with open(state) as f:
            meta = json.load(f)
        missing = {"epoch", "step", "param_groups", "config", "files"} - set(meta)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{state}: damaged ({type(e).__name__}: {e})") from None
    if missing:
        raise CheckpointError(f"{state}: damaged (no {', '.join(sorted(missing))})")
    for name, want in sorted(meta["files"].items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing")
        if os.path.getsize(file) != want["bytes"]:
            raise CheckpointError(f"{file}: damaged ({os.path.getsize(file)} bytes, {want['bytes']} when saved: truncated?)")
        if sha256(file) != want["sha256"]:
            raise CheckpointError(f"{file}: damaged (its SHA-256 differs from the one recorded when it was saved)")
    return meta


def checkpoint_names(root: str) -> list[str]:
    """The epoch-NNNNNN folder names under `root` (<out>/checkpoints), oldest first."""
    return sorted(d for d in os.listdir(root) if d.startswith("epoch-")) if os.path.isdir(root) else []


def newest_intact_checkpoint(root: str) -> Optional[str]:
    """The newest epoch-* folder under `root` that read_checkpoint accepts, or None."""
    for name in checkpoint_names(root)[::-1]:
        with contextlib.suppress(CheckpointError):
            read_checkpoint(os.path.join(root, name))
            return os.path.join(root, name)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Loading the model: a diffusers pipeline from the hub or a folder, or the tiny one built in code
# ----------------------------------------------------------------------------------------------------------------

MODEL_ALIASES = {"sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium"}


class ModelLoadError(RuntimeError):
    """The model's weights could not be had; the message says how to get them."""


def load_pipeline(name: str, dtype: torch.dtype):
    """A diffusers StableDiffusion3Pipeline: "tiny-random" is built in code (tiny_sd3.py), anything else is a hub
    id (or alias) or a local diffusers folder given to StableDiffusion3Pipeline.from_pretrained."""
    import compat

    compat.quiet_libraries()  # before diffusers and transformers are imported: they warn at import
    if name == "tiny-random":
        from tiny_sd3 import tiny_sd3_pipeline

        return tiny_sd3_pipeline()  # float32; SD3Model casts the parts it uses
    from diffusers import StableDiffusion3Pipeline

    repo = MODEL_ALIASES.get(name, name)
    try:
        # the VAE in float32 from the file (SD3Model decodes in float32): no rounding through dtype, no cast later
        return StableDiffusion3Pipeline.from_pretrained(repo, dtype={"default": dtype, "vae": torch.float32})
    except Exception as e:  # offline, gated, wrong path: all surface as different exception types
        raise ModelLoadError(
            f"could not load the model '{repo}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).\n"
            f"  - a hub model: accept its licence on its hub page, log in (`hf auth login`), then fetch it with\n"
            f"    `hf download {repo}` on a machine with network access (it is cached for later runs);\n"
            f"  - or pass a local diffusers folder: --model /path/to/stable-diffusion-3.5-medium\n"
            f"  - to try the whole code path without weights: --model tiny-random"
        ) from e


# ----------------------------------------------------------------------------------------------------------------
# Joining torchrun's process group: one GPU per process, checked before any device is touched
# ----------------------------------------------------------------------------------------------------------------


def init_distributed(cpu: bool = False, timeout_s: float = 600.0) -> Optional[torch.device]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); returns this process's
    device, or None when running alone. One GPU per process (NCCL), or every process on the CPU (gloo) when there
    is no GPU or `cpu` is set. A collective that waits longer than `timeout_s` for a rank raises instead of hanging."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available() and not cpu:
        procs, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])), torch.cuda.device_count()
        if procs > gpus:  # checked before touching a device: `cuda:<rank>` would fail with "invalid device ordinal"
            raise ValueError(
                f"torchrun started {procs} processes on this machine but it has {gpus} visible GPU(s): run "
                f"torchrun --nproc_per_node {gpus} (one process per GPU), or add --cpu to run every process on the CPU"
            )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout)
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, safetensors only, checked, resumable; one run per output folder
# ----------------------------------------------------------------------------------------------------------------
# <out>/checkpoints/epoch-000010/
#     lora/                  the trained weights (SD3: pytorch_lora_weights.safetensors for load_lora_weights)
#     ema/                   the EMA weights, same format (if --ema)
#     trainer_state.safetensors   optimiser moments and EMA shadow tensors
#     trainer_state.json          epoch, optimiser step, optimiser hyper-parameters, the config, and the size and
#                                 SHA-256 of every other file (a damaged file is named before anything loads)
# <out>/checkpoints/latest   the name of the newest complete checkpoint
# <out>/.lock                locked (flock) by the run writing into <out>
# <out>/abandoned-<time>/    what a resume from an older checkpoint set aside (set_aside_later_epochs)
# What the numbers count: checkpoint epoch-N holds the state after N finished epochs (a resume runs epoch index N
# next); metrics.jsonl's "epoch", the progress line and eval-epoch-NNNNNN.png count from 0 (the epoch's index), so
# eval-epoch-000009.png and the line of epoch 9 show the weights saved as epoch-000010.
# A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced atomically,
# so a crash mid-save leaves the previous checkpoint and pointer untouched. The last KEEP checkpoints are kept.

KEEP_CHECKPOINTS = 2
# What a resumed run may change: how the optimiser steps, how long the run goes, what it saves, where things
# live and how they run (--compile: the same computation, compiled). Any other difference from the checkpoint's config (model, LoRA shape, group size, batch plan, sampler,
# noise level, seed, reward, prompts, evaluation set, ...) would continue a different experiment under the old
# one's name, so --resume refuses it and lists the differences.
CHANGEABLE_ON_RESUME = (
    "lr", "adam_beta1", "adam_beta2", "weight_decay", "adam_eps", "max_grad_norm",
    "epochs", "eval_every", "save_every", "gradient_checkpointing", "text_encoders_on_cpu", "reward_models",
    "dist_timeout_s", "report_to", "compile", "max_zero_adv_epochs",
)  # fmt: skip


def latest_checkpoint(out: str) -> Optional[str]:
    pointer = os.path.join(out, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    return os.path.join(out, "checkpoints", open(pointer).read().strip())


def set_aside_later_epochs(out: str, epoch: int, log: Callable[[str], None]) -> Optional[str]:
    """One history per folder. Resuming from checkpoint epoch-N while later checkpoints exist starts a branch: the
    abandoned branch's later checkpoints, its metrics.jsonl lines and its evaluation grids of epochs >= N are
    moved (never deleted) into <out>/abandoned-<time>/, and `latest` names epoch-N again, so pruning keeps the
    branch point until newer checkpoints of this branch exist. Returns that folder, or None (nothing is later)."""
    root = os.path.join(out, "checkpoints")
    later = [d for d in checkpoint_names(root) if int(d.split("-")[1]) > epoch]
    if not later:
        return None
    aside = os.path.join(out, time.strftime("abandoned-%Y%m%d-%H%M%S"))
    os.makedirs(os.path.join(aside, "checkpoints"))
    for name in later:
        os.replace(os.path.join(root, name), os.path.join(aside, "checkpoints", name))
    for name in os.listdir(out):  # eval-epoch-NNNNNN.png: NNNNNN is the epoch's index (the grid after it)
        if name.startswith("eval-epoch-") and name[11:17].isdigit() and int(name[11:17]) >= epoch:
            os.replace(os.path.join(out, name), os.path.join(aside, name))
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        early, late = [], []
        for line in open(metrics):
            (early if (e := _epoch_of(line)) is not None and e < epoch else late).append(line)
        atomic_write_text(os.path.join(aside, "metrics.jsonl"), "".join(late))
        atomic_write_text(metrics, "".join(early))
    atomic_write_text(os.path.join(root, "latest"), f"epoch-{epoch:06d}")
    log(f"resuming from epoch-{epoch:06d} starts a new branch: the abandoned one's later checkpoints "
        f"({', '.join(later)}), metrics lines and evaluation grids were moved to {aside}")
    return aside


def _epoch_of(line: str) -> Optional[int]:
    """The "epoch" of a metrics.jsonl line, or None for a line cut short by a crash mid-write."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return int(json.loads(line)["epoch"])
    return None


def compare_to_checkpoint(saved: dict, cfg) -> tuple[list[str], list[str]]:
    """(forbidden, allowed): the settings of cfg that differ from the checkpoint's config `saved`, as
    "--name old -> new", split by CHANGEABLE_ON_RESUME. A field the checkpoint lacks counts as its default."""
    forbidden, allowed = [], []
    for f in dataclasses.fields(cfg):
        old, new = saved.get(f.name, f.default), getattr(cfg, f.name)
        if old != new and f.name not in ("resume", "out"):  # these two name the run, they always may differ
            (allowed if f.name in CHANGEABLE_ON_RESUME else forbidden).append(f"--{f.name} {old!r} -> {new!r}")
    return forbidden, allowed


def check_out_folder(cfg) -> Optional[tuple[str, dict]]:
    """What --out and --resume allow, checked before anything is loaded or written. A fresh run refuses a folder
    holding a run's checkpoints (it would prune them) and returns None. --resume returns (checkpoint folder, its
    trainer_state) once the checkpoint is checked whole and its settings agree with cfg; a damaged file or a
    `latest` that points nowhere is named with the newest intact checkpoint and how to resume from it."""
    root = os.path.join(cfg.out, "checkpoints")
    names = checkpoint_names(root)
    if not cfg.resume:
        if names:
            raise FileExistsError(
                f"{cfg.out} already holds a run's checkpoints ({os.path.join(root, names[-1])}): pass --resume to "
                f"continue it, or choose another --out"
            )
        return None
    latest = cfg.resume is True or cfg.resume == "latest"  # True: Config built in code with the old bool flag
    pointer = os.path.join(root, "latest")
    name = open(pointer).read().strip() if latest and os.path.isfile(pointer) else ""
    if latest and not name and not names:
        raise FileNotFoundError(f"--resume: no checkpoint found under {root}")
    path = os.path.join(root, name) if latest else os.path.normpath(cfg.resume)
    if not latest and names and os.path.realpath(os.path.dirname(path)) != os.path.realpath(root):
        raise FileExistsError(
            f"--resume {path} is not a checkpoint of --out {cfg.out}, which holds a run of its own: continuing "
            f"another run there would mix the two; choose another --out"
        )
    try:
        if latest and not name:
            raise CheckpointError(f"{pointer}: missing or empty")
        meta = read_checkpoint(path)
    except CheckpointError as e:
        intact = newest_intact_checkpoint(os.path.dirname(path))
        how = f"the newest intact checkpoint is {intact}: resume from it with --resume {intact}" if intact else (
            "no intact checkpoint is left beside it: start a fresh run in another --out")
        named = f" ({pointer} names {name})" if latest and name else ""
        raise CheckpointError(f"cannot resume{named}: {e}\n  {how}") from None
    forbidden, _ = compare_to_checkpoint(meta["config"], cfg)
    if forbidden:
        raise CheckpointError(
            f"--resume {path}: these settings differ from the checkpoint's and cannot change in a resumed run:\n    "
            + "\n    ".join(forbidden) + f"\n  pass the checkpoint's values (its trainer_state.json lists them), or "
            f"start a fresh run in another --out. A resumed run may change --{', --'.join(CHANGEABLE_ON_RESUME)}."
        )
    if meta["epoch"] >= cfg.epochs:
        raise ValueError(f"--resume {path}: the checkpoint ends epoch {meta['epoch']} of --epochs {cfg.epochs}: "
                         f"nothing is left to train; pass a larger --epochs")  # fmt: skip
    return path, meta


def open_run(cfg, rank: int) -> Optional[tuple[str, dict]]:
    """Claim --out for this run and say where it starts: process 0 locks the folder (one run per output folder);
    every process checks it (check_out_folder). Returns the checkpoint to resume from, or None for a fresh run."""
    if rank == 0:
        lock_out_folder(cfg.out)
    return check_out_folder(cfg)


def resume_run(checkpoint, model, optimizer, ema, cfg, log: Callable[[str], None]) -> tuple[int, int]:
    """load_checkpoint, and one line saying where the run continues and what it changes: (next epoch, step)."""
    epoch, step = load_checkpoint(checkpoint, model, optimizer, ema, cfg)
    changed = compare_to_checkpoint(checkpoint[1]["config"], cfg)[1]
    log(f"resumed from {checkpoint[0]}: epoch {epoch}, optimiser step {step}" + "".join(f"; now {c}" for c in changed))
    return epoch, step


def save_checkpoint(out: str, epoch: int, step: int, model, optimizer, ema, cfg) -> str:
    from safetensors.torch import save_file

    weights = model.trainable_parameters() + (ema.shadow if ema is not None else [])
    if not all(bool(torch.isfinite(w).all()) for w in weights):  # never replace a good checkpoint with garbage
        raise DivergenceError(f"epoch {epoch}: the weights hold NaN/inf; checkpoint not written")

    root = os.path.join(out, "checkpoints")
    name = f"epoch-{epoch:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    opt = optimizer.state_dict()
    tensors = {}
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"optimizer.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    if ema is not None:
        for i, s in enumerate(ema.shadow):
            tensors[f"ema.{i}"] = s.cpu().contiguous()
    try:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(tmp)
        model.save_weights(os.path.join(tmp, "lora"))
        if ema is not None:
            with ema.swapped_in():
                model.save_weights(os.path.join(tmp, "ema"))
        save_file(tensors, os.path.join(tmp, "trainer_state.safetensors"))
        files = file_manifest(tmp)  # sizes and SHA-256 (each file fsync-ed): a damaged file is named on --resume
        meta = {"epoch": epoch, "step": step, "param_groups": opt["param_groups"], "config": dataclasses.asdict(cfg), "files": files}
        atomic_write_text(os.path.join(tmp, "trainer_state.json"), json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, "latest"), name)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint is never left behind
        code = write_errno(e)
        if code is None:
            raise
        size = sum(t.numel() * t.element_size() for t in list(tensors.values()) + weights)  # ≈ the files' sizes
        previous = latest_checkpoint(out)
        kept = (f"the previous checkpoint {previous} is intact" if previous and os.path.isdir(previous)
                else "no earlier checkpoint exists")  # fmt: skip
        free = shutil.disk_usage(root).free if os.path.isdir(root) else 0
        raise DiskError(
            f"cannot write checkpoint {final} ({os.strerror(code)}): it needs about {size / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB are free there; {kept}. Free space (or move --out), then continue with --resume"
        ) from None
    for old in checkpoint_names(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(os.path.join(root, old))
    return final


def write_failure(e: OSError, out: str) -> str:
    """The message for a write that failed mid-run (metrics.jsonl, a grid); re-raises any other OSError."""
    if write_errno(e) is None:
        raise e
    latest = latest_checkpoint(out)
    return (f"cannot write {e.filename or out} ({e.strerror}); the last checkpoint, {latest or 'none yet'}, is intact: "
            f"make room (or make the folder writable), then continue with --resume")  # fmt: skip


def write_errno(e: BaseException) -> Optional[int]:
    """The errno of a failed write (ENOSPC, EDQUOT, EROFS, EACCES, EIO), else None: an OSError's own, or the
    "(os error N)" that safetensors' writer (Rust) puts in its message."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        found = re.search(r"\(os error (\d+)\)", str(e))
        code = int(found.group(1)) if found else None
    return code if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO) else None


def load_checkpoint(checkpoint: tuple[str, dict], model, optimizer, ema, cfg) -> tuple[int, int]:
    """Restore weights, optimiser and EMA from a checkpoint check_out_folder accepted; returns (next epoch, step).
    The optimiser's hyper-parameters come from cfg, not from the checkpoint: a changed --lr takes effect."""
    from safetensors.torch import load_file

    path, meta = checkpoint
    try:
        model.load_weights(os.path.join(path, "lora"))
        tensors = load_file(os.path.join(path, "trainer_state.safetensors"))
    except Exception as e:  # checked whole, yet not this model's (written by other code, or edited by hand)
        raise CheckpointError(f"{path}: does not load into this model ({type(e).__name__}: {e})") from e
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        kind, i, *rest = key.split(".")
        if kind == "optimizer":
            state.setdefault(int(i), {})[rest[0]] = v
    groups = meta["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for g in optimizer.param_groups:  # load_state_dict restored the saved hyper-parameters: the command line's win
        g.update(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    if ema is not None:
        for i, s in enumerate(ema.shadow):
            s.copy_(tensors[f"ema.{i}"])
    return meta["epoch"], meta["step"]


# ----------------------------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT: at the next safe point, with the last finished epoch saved
# ----------------------------------------------------------------------------------------------------------------
# A cluster scheduler sends SIGTERM before it preempts a job (Slurm and Kubernetes then wait ~30 s before SIGKILL;
# torchrun passes it on to every worker and SIGKILLs them 30 s later); Ctrl-C sends SIGINT. Inside train() the
# handler only records the signal. The loops call stop_point() before every batch (sampling, training,
# evaluation): there the epoch in progress is dropped (what its optimiser steps changed is put back from a copy
# taken when it began: LoRA, AdamW moments, EMA), the last finished epoch is saved as a checkpoint unless it is one
# already, and StopRequested carries that to main(), which prints one line and exits with 128 + the signal's number.
# Under torchrun the processes agree at every stop point (an all-reduce of the flag), so all stop at the same batch,
# whichever of them got the signal. Before train() has begun there is nothing to save: the signal stops at once.


class StopRequested(BaseException):
    """SIGTERM or SIGINT stopped the run; `checkpoint` holds its last finished epoch (None: nothing was saved).
    A BaseException, like KeyboardInterrupt: an `except Exception` on the way (a reward check) must not swallow it."""

    def __init__(self, signum: int, checkpoint: Optional[str] = None, epoch: Optional[int] = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint, self.epoch = signum, checkpoint, epoch


_STOP: dict[str, Any] = {"signal": 0, "armed": False, "run": None}  # process-wide, like the signal handlers


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT stop the run gracefully (see above) while this is active; main thread only."""

    def handler(signum, frame):
        if signum == signal.SIGINT and _STOP["signal"] == signal.SIGINT:  # Ctrl-C twice: now, without saving
            print("second Ctrl-C: stopped at once; the last checkpoint is untouched", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        _STOP["signal"] = _STOP["signal"] or signum
        if _STOP["run"] is None:  # not training yet: nothing to save, stop where we are
            raise StopRequested(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _STOP.update(signal=0, armed=True, run=None)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _STOP.update(signal=0, armed=False, run=None)


class EpochUndo:
    """What a stop puts back and saves: the state when the epoch in progress began. train() makes one, and calls
    begin(epoch, step) at the start of every epoch; the copy is taken only while stop_on_signals is active."""

    def __init__(self, cfg, model, optimizer, ema, rank: int, device):
        self.cfg, self.model, self.optimizer, self.ema, self.rank, self.device = cfg, model, optimizer, ema, rank, device
        if _STOP["armed"]:
            _STOP["run"] = self  # from here on a signal waits for the next stop point

    def begin(self, epoch: int, step: int) -> None:
        if not _STOP["armed"]:
            return
        # a copy on the device (SD3.5-M: ~300 MB, LoRA + AdamW moments + EMA; a copy of that takes milliseconds)
        self.epoch, self.step = epoch, step
        self.weights = [p.detach().clone() for p in self.model.trainable_parameters()]
        opt = self.optimizer.state_dict()
        self.opt = {"state": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for i, st in opt["state"].items()},
                    "param_groups": copy.deepcopy(opt["param_groups"])}  # fmt: skip
        self.shadow = [s.clone() for s in self.ema.shadow] if self.ema is not None else []

    def stop(self, signum: int) -> StopRequested:
        with torch.no_grad():
            for p, w in zip(self.model.trainable_parameters(), self.weights):
                p.copy_(w)
            for s, c in zip(self.ema.shadow if self.ema is not None else [], self.shadow):
                s.copy_(c)
        self.optimizer.load_state_dict(self.opt)
        self.optimizer.zero_grad(set_to_none=True)
        path = os.path.join(self.cfg.out, "checkpoints", f"epoch-{self.epoch:06d}")
        if self.rank == 0 and latest_checkpoint(self.cfg.out) != path:
            save_checkpoint(self.cfg.out, self.epoch, self.step, self.model, self.optimizer, self.ema, self.cfg)
        if torch.distributed.is_initialized():  # nobody exits (and makes torchrun stop the others) before it is saved
            torch.distributed.barrier()
        return StopRequested(signum, path, self.epoch)


def stop_point() -> None:
    """Raise StopRequested, with the last finished epoch saved, if SIGTERM/SIGINT arrived (on any process)."""
    if not _STOP["armed"]:
        return
    signum = _STOP["signal"]
    run = _STOP["run"]
    if run is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        flag = torch.tensor([signum], device=run.device if torch.device(run.device).type == "cuda" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
    if signum:
        raise run.stop(signum) if run is not None else StopRequested(signum)


def resume_command(argv: list[str], world: int) -> str:
    """The command line that continues this run from its latest checkpoint: argv with --resume in place of any
    --resume [PATH] (under torchrun: its launcher options are not known here, only the number of processes)."""
    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        elif not a.startswith("--resume="):
            args.append(a)
    launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)}" if world > 1 else "python"
    return f"{launcher} {shlex.join(['flow_grpo.py', *args, '--resume'])}"


def stop_gracefully(run: Callable[[], int], argv: list[str]) -> int:
    """run() (the command line) with SIGTERM/SIGINT stopping it at a stop point: one line saying what was saved and
    the command that continues, and the exit code 128 + the signal's number, conventional for a death by signal."""
    with stop_on_signals():
        try:
            return run()
        except StopRequested as stop:
            dist = torch.distributed
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            line = (f"stopped by {stop}" + (f" in epoch {stop.epoch}: saved {stop.checkpoint} ({stop.epoch} finished epochs; the "
                    f"one in progress is redone); continue with: {resume_command(argv, world)}" if stop.checkpoint
                    else " before training began: nothing to save"))  # fmt: skip
            if rank == 0:
                print(line, file=sys.stderr)
                report_to_launcher(line)
            return 128 + stop.signum


# ----------------------------------------------------------------------------------------------------------------
# torchrun: what a failing process leaves for the launcher
# ----------------------------------------------------------------------------------------------------------------
# When a worker fails, torchrun prints its own summary last ("Root Cause (first observed failure)"), showing the
# failing worker's TORCHELASTIC_ERROR_FILE if it wrote one, else "To enable traceback see: ...". It then stops the
# other workers: SIGTERM, and SIGKILL only 30 s later (torch/distributed/elastic/multiprocessing/api.py, _close),
# which a stuck or stopped (SIGSTOP) worker waits out.


def report_to_launcher(message: str, since_s: float = 0.0) -> None:
    """Under torchrun: put `message` where its summary reads the cause of a failure. The summary names the worker
    whose failure has the earliest timestamp; since_s dates ours back to when the failure began (a peer that went
    silent since_s ago), ahead of the workers ended because of it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError), open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time() - since_s)}, f)


def end_stuck_run(message: str, timeout_s: float) -> None:
    """A peer stopped answering: print `message`, leave it for torchrun's summary, end the silent peer (it would
    ignore torchrun's SIGTERM and keep the run alive 30 s more) and exit 1 at once (os._exit: the clean-up of a
    process group that lost a member can hang)."""
    print(message, file=sys.stderr, flush=True)
    report_to_launcher(message, since_s=timeout_s)
    kill_local_peers()
    sys.stdout.flush()
    os._exit(1)


def kill_local_peers() -> int:
    """Under torchrun: SIGKILL the other workers of this run on this machine (the children of the same torchrun
    agent, with its TORCHELASTIC_RUN_ID), for a worker that stopped answering: SIGTERM would not end a stuck or
    stopped one, and torchrun would wait 30 s for it. Returns how many were ended."""
    run_id, parent, n = os.environ.get("TORCHELASTIC_RUN_ID"), os.getppid(), 0
    if run_id is None or not os.path.isdir("/proc"):
        return 0
    for pid in (int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid()):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])  # "pid (name) state ppid ..."
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            if ppid == parent and f"TORCHELASTIC_RUN_ID={run_id}".encode() in env:
                os.kill(pid, signal.SIGKILL)
                n += 1
        except (OSError, ValueError, IndexError):  # gone meanwhile, or another user's process
            continue
    return n


# ----------------------------------------------------------------------------------------------------------------
# What a run prints: the start-up lines, the progress line, the stop when nothing is learnt
# ----------------------------------------------------------------------------------------------------------------


def describe_run(cfg, model, device, world: int, dtype, prompts: list, eval_prompts: list) -> str:
    """The start-up lines: what runs where, the evaluation set (held out or not), and prompts longer than the text
    encoders read (once, instead of the tokenizers' warning per batch)."""
    import compat

    lines = [f"model {cfg.model} on {device} x {world} ({dtype}) | reward {cfg.reward} | beta {cfg.resolved_beta()} | "
             f"{len(prompts)} prompts from {cfg.prompts} | LoRA parameters {sum(p.numel() for p in model.params):,}"]
    if eval_prompts:
        also = sum(p.text in {q.text for q in prompts} for p in eval_prompts)
        lines.append(f"evaluation on {min(cfg.eval_count or len(eval_prompts), len(eval_prompts))} of {len(eval_prompts)} "
                     f"prompts from {eval_prompts[0].source.rsplit(':', 1)[0]}"
                     + (f" ({also} of them are training prompts too)" if also else " (held out from training)"))
    note = compat.prompt_length_note(model.pipe, [p.text for p in prompts + eval_prompts], cfg.max_sequence_length)
    return "\n".join(lines + ([note] if note else []))


def format_line(m: dict) -> str:
    """The fixed-format progress line, one per epoch."""
    line = f"epoch {m['epoch']:4d} | step {m['step']:5d} | reward {m['reward/mean']:+.5g} ± {m['reward/std']:.3g}"
    if m.get("policy/zero_adv_frac") == 1:  # no ratio, KL or clipping was measured: say so instead of printing 0
        line += " | no update: every advantage is 0 (each group scored all alike)"
    else:
        kl = m.get("policy/kl_ref", math.nan)
        line += (" | kl_ref " + (f"{kl:.3e}" if math.isfinite(kl) else "off (beta 0)") + f" | clipfrac {m.get('policy/clipfrac', 0):.3f}"
                 f" | approx_kl {m.get('policy/approx_kl', 0):.2e} | ratio {m.get('policy/ratio', 1):.4f}")  # fmt: skip
    if "eval/reward_mean" in m:
        line += f" | eval {m['eval/reward_mean']:+.5g}"
    return line + f" | {m['time/epoch_s']:.1f}s"


def nothing_learnt(epoch: int, idle: int, group_size: int) -> str:
    """Why a run stops after --max_zero_adv_epochs epochs in a row in which every advantage was 0."""
    return (f"epochs {epoch - idle + 1}-{epoch}: every advantage was 0 ({idle} epochs in a row: the reward was the same "
            f"for all {group_size} samples of every group), so nothing was learnt and the weights did not change. Check "
            f"the reward and the prompts: does the reward vary between images of one prompt? (OCR scores 0 until a "
            f"model renders legible text.) --max_zero_adv_epochs 0 never stops")


# ----------------------------------------------------------------------------------------------------------------
# The evaluation grid
# ----------------------------------------------------------------------------------------------------------------


# Fonts tried in this order when Pillow's own (Latin letters only: no accents, no €) lacks a character of the
# prompts; Pillow looks each name up in the system's font folders (Linux, macOS, Windows). DejaVu Sans (on most Linux
# systems) adds accents, Greek and Cyrillic; the Noto CJK, WenQuanYi, Droid fallback, Arial Unicode and Microsoft
# YaHei fonts add Chinese, Japanese and Korean.
CAPTION_FONTS = (
    "DejaVuSans.ttf", "NotoSans-Regular.ttf", "NotoSansCJK-Regular.ttc", "wqy-zenhei.ttc", "DroidSansFallbackFull.ttf",
    "Arial Unicode.ttf", "arialuni.ttf", "msyh.ttc",
)


def missing_glyphs(font, text: str) -> set[str]:
    """The characters of `text` that `font` (a Pillow FreeType font) has no glyph for. FreeType draws each of them
    as the font's "missing" glyph: the same bitmap as U+10FFFD, a private-use code point no font has."""

    def bitmap(ch: str) -> tuple:
        mask = font.getmask(ch)
        return mask.size, bytes(mask)

    box = bitmap("\U0010fffd")
    return {ch for ch in set(text) if not ch.isspace() and bitmap(ch) == box}


def caption_font(text: str, size: int = 16) -> tuple[Any, set[str]]:
    """(font, the characters of `text` it lacks): Pillow's default font if it has every character, else the first
    of CAPTION_FONTS on this system that has them all, else the one found that lacks the fewest."""
    from PIL import ImageFont

    best = ImageFont.load_default(size=size)
    missing = missing_glyphs(best, text)
    for name in CAPTION_FONTS:
        if not missing:
            break
        try:
            font = ImageFont.truetype(name, size)
        except OSError:  # not on this system
            continue
        lacks = missing_glyphs(font, text)
        if len(lacks) < len(missing):
            best, missing = font, lacks
    return best, missing


def reward_decimals(rewards: list[float]) -> int:
    """Decimals that show the spread of `rewards` (max − min) to two significant digits, 2 to 10 of them: rewards
    that differ by ~1e-5 (a random model's JPEG sizes on the kB/500 scale, ≈ −0.0032) get 6 decimals, where 4
    print every tile alike. 4 when they do not differ (one tile, or all equal)."""
    spread = max(rewards) - min(rewards)
    if not spread > 0:  # also NaN
        return 4
    return min(10, max(2, 1 - math.floor(math.log10(spread))))


def save_grid(path: str, images, prompts: list, rewards, epoch: int, columns: int = 4) -> None:
    """A PNG grid of evaluation images (a (n, 3, H, W) tensor in [0, 1]) under a title with the epoch and mean
    reward; each tile is captioned with its prompt's text (wrapped) and its reward, with the decimals that show how
    the rewards differ (reward_decimals). Tiles are at least 256 px wide (small images scaled up, pixels kept
    square) so that the 16 px captions stay readable; the font is one that has the prompts' characters
    (caption_font), and the title says how many it lacks (drawn as boxes) where no font found has them all."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    scale = max(1, math.ceil(256 / w))
    font, missing = caption_font("".join(p.text for p in prompts))
    tile_w, tile_h, decimals = w * scale, h * scale, reward_decimals(rewards.tolist())
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = []
    for p, r in zip(prompts, rewards.tolist()):
        lines = [""]
        for word in p.text.split():  # greedy wrap to the tile's width
            longer = f"{lines[-1]} {word}".strip()
            if lines[-1] and draw.textlength(longer, font=font) > tile_w - 8:
                lines.append(word)
            else:
                lines[-1] = longer
        if len(lines) > 4:  # at most 4 lines of prompt
            lines = lines[:3] + [lines[3] + " ..."]
        captions.append(lines + [f"reward {r:+.{decimals}f}"])
    title = [f"epoch {epoch}   mean reward {rewards.mean().item():+.{decimals}f}   ({n} evaluation prompts)"]
    if missing:
        title.append(f"boxes: {len(missing)} characters of the prompts are in no font found here "
                     "(runfiles.CAPTION_FONTS)")
    line_h = 19
    title_h = 11 + line_h * len(title)
    cap_h = line_h * max(len(c) for c in captions) + 6
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * tile_w, title_h + rows * (tile_h + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(title):
        draw.text((6, 6 + k * line_h), line, fill="black", font=font)
    for i in range(n):
        arr = (images[i].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        x, y = (i % columns) * tile_w, title_h + (i // columns) * (tile_h + cap_h)
        grid.paste(Image.fromarray(arr).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        for k, line in enumerate(captions[i]):
            draw.text((x + 4, y + tile_h + 3 + k * line_h), line, fill="black", font=font)
    tmp = path + ".tmp.png"
    grid.save(tmp)
    os.replace(tmp, path)
