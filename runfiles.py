"""The run's plumbing, beside the method: the files a Flow-GRPO run reads and writes, checked. Prompt sets and the
held-out split, the lock on the output folder, metrics.jsonl, checkpoints (atomic writes, integrity, what a resumed
run may change), the evaluation grid.

flow_grpo.py holds every line that changes what is trained; this file holds what keeps a run's files whole and
honest, and train() calls it in a few lines whose names say what they guarantee. Every error names the file (and
line) and what to do. Importing this file is cheap: the standard library and torch (safetensors and PIL are imported
by the functions that need them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

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

    os.makedirs(out, exist_ok=True)
    if os.path.realpath(out) in _LOCKS:
        return
    f = open(os.path.join(out, ".lock"), "a+")
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
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one


def claim_metrics(path: str, resumed_epoch: Optional[int], log: Callable[[str], None]) -> None:
    """Make <out>/metrics.jsonl this run's own. A resumed run drops the lines of epochs >= resumed_epoch (logged
    after the last checkpoint by a run that then crashed; they are about to be redone). A fresh run starts only
    where there is no checkpoint, so a file there is the log of a run that crashed before its first checkpoint,
    with nothing to resume: it is moved aside to metrics.<time>.jsonl, never appended to."""
    if not os.path.exists(path):
        return
    if resumed_epoch is None:
        aside = path.replace(".jsonl", time.strftime(".%Y%m%d-%H%M%S.jsonl"))
        os.replace(path, aside)
        log(f"moved the metrics of an earlier run in this folder (it saved no checkpoint) to {aside}")
        return
    kept = []
    for line in open(path):
        with contextlib.suppress(ValueError, KeyError):  # a line cut short by a crash mid-write is dropped
            if json.loads(line)["epoch"] < resumed_epoch:
                kept.append(line.rstrip("\n") + "\n")
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


def newest_intact_checkpoint(root: str) -> Optional[str]:
    """The newest epoch-* folder under `root` that read_checkpoint accepts, or None."""
    for name in sorted((d for d in os.listdir(root) if d.startswith("epoch-")) if os.path.isdir(root) else [])[::-1]:
        with contextlib.suppress(CheckpointError):
            read_checkpoint(os.path.join(root, name))
            return os.path.join(root, name)
    return None


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
# A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced atomically,
# so a crash mid-save leaves the previous checkpoint and pointer untouched. The last KEEP checkpoints are kept.

KEEP_CHECKPOINTS = 2
# What a resumed run may change: how the optimiser steps, how long the run goes, what it saves and where things
# live. Any other difference from the checkpoint's config (model, LoRA shape, group size, batch plan, sampler,
# noise level, seed, reward, prompts, evaluation set, ...) would continue a different experiment under the old
# one's name, so --resume refuses it and lists the differences.
CHANGEABLE_ON_RESUME = (
    "lr", "adam_beta1", "adam_beta2", "weight_decay", "adam_eps", "max_grad_norm",
    "epochs", "eval_every", "save_every", "gradient_checkpointing", "text_encoders_on_cpu", "reward_models",
    "dist_timeout_s", "report_to",
)  # fmt: skip


def latest_checkpoint(out: str) -> Optional[str]:
    pointer = os.path.join(out, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    return os.path.join(out, "checkpoints", open(pointer).read().strip())


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
    names = sorted(d for d in os.listdir(root) if d.startswith("epoch-")) if os.path.isdir(root) else []
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
    os.makedirs(root, exist_ok=True)
    name = f"epoch-{epoch:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
    os.makedirs(tmp)
    model.save_weights(os.path.join(tmp, "lora"))
    if ema is not None:
        with ema.swapped_in():
            model.save_weights(os.path.join(tmp, "ema"))
    opt = optimizer.state_dict()
    tensors = {}
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"optimizer.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    if ema is not None:
        for i, s in enumerate(ema.shadow):
            tensors[f"ema.{i}"] = s.cpu().contiguous()
    save_file(tensors, os.path.join(tmp, "trainer_state.safetensors"))
    files = file_manifest(tmp)  # sizes and SHA-256 (each file fsync-ed): a damaged file is named on --resume
    meta = {"epoch": epoch, "step": step, "param_groups": opt["param_groups"], "config": dataclasses.asdict(cfg), "files": files}
    atomic_write_text(os.path.join(tmp, "trainer_state.json"), json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(root, "latest"), name)
    for old in sorted(d for d in os.listdir(root) if d.startswith("epoch-"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(os.path.join(root, old))
    return final


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
# The evaluation grid
# ----------------------------------------------------------------------------------------------------------------


def save_grid(path: str, images, prompts: list, rewards, epoch: int, columns: int = 4) -> None:
    """A PNG grid of evaluation images (a (n, 3, H, W) tensor in [0, 1]) under a title with the epoch and mean
    reward; each tile is captioned with its prompt's text (wrapped) and its reward. Tiles are at least 256 px wide
    (small images scaled up, pixels kept square) so that the 16 px captions stay readable."""
    from PIL import Image, ImageDraw, ImageFont

    n, _, h, w = images.shape
    scale = max(1, math.ceil(256 / w))
    tile_w, tile_h, font = w * scale, h * scale, ImageFont.load_default(size=16)
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
        captions.append(lines + [f"reward {r:+.4f}"])
    line_h, title_h = 19, 30
    cap_h = line_h * max(len(c) for c in captions) + 6
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * tile_w, title_h + rows * (tile_h + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), f"epoch {epoch}   mean reward {rewards.mean().item():+.4f}   ({n} evaluation prompts)", fill="black", font=font)
    for i in range(n):
        arr = (images[i].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        x, y = (i % columns) * tile_w, title_h + (i // columns) * (tile_h + cap_h)
        grid.paste(Image.fromarray(arr).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        for k, line in enumerate(captions[i]):
            draw.text((x + 4, y + tile_h + 3 + k * line_h), line, fill="black", font=font)
    tmp = path + ".tmp.png"
    grid.save(tmp)
    os.replace(tmp, path)
