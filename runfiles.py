"""The files a Flow-GRPO run reads and writes, checked: prompt sets, the lock on the output folder, metrics.jsonl,
the integrity of checkpoint files, the evaluation grid.

Plumbing, kept out of flow_grpo.py so that it reads as the method; flow_grpo.py imports what it needs from here
(what to save in a checkpoint and what a resumed run may change are decided there, in section 10). Every error
names the file (and line) and what to do. Importing this file is cheap: the standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Optional

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


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files: trainer_state.json lists the size and SHA-256 of every other file of its checkpoint
# ----------------------------------------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message names the file and what to do instead."""


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
