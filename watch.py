"""Watching a run: the curves picture and the optional trackers.

    <out>/curves.png        redrawn by the run (rank 0) after every evaluation, every checkpoint and at the end
    python watch.py RUN     draws a run, finished or still running, from RUN/metrics.jsonl into RUN/curves.png
    python watch.py RUN1 RUN2 ... -o runs.png      several runs overlaid, one colour each (say β = 0 against 0.04)
    --report_to tensorboard | wandb | tensorboard,wandb     the same scalars to a tracker (flow_grpo.py's flag)

The picture has one panel per quantity, one colour per run, epoch on every x-axis: the training reward (mean and
± one std of the epoch's single samples), the evaluation reward, the KL to the reference model, the clip fraction,
the zero-advantage fraction, the seconds per epoch, and each part of a weighted-sum reward. The title says what
the run is (from <out>/run.json, which the run writes at its start); README "Watching a run" reads the panels.

A tracker gets every key of metrics.jsonl under the same name, each epoch, at x = epoch (tensorboard's step; wandb's
"epoch" step metric), and the evaluation grid as an image. A resumed run continues the same curves: tensorboard
writes into the same <out>/tensorboard and drops what a crashed run logged past the checkpoint (purge_step);
wandb resumes the run id kept in <out>/run.json. wandb runs offline unless WANDB_MODE says otherwise (nothing
reaches its servers; `wandb sync <out>/wandb/offline-run-*` uploads later).

Importing this file is cheap: the standard library only. PIL is imported to draw, a tracker's package only when
--report_to asks for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import secrets
import sys
from typing import Any, Callable, Optional

from runfiles import atomic_write_text

# --report_to name -> the package that provides it (the one a missing-package error names)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}

# ----------------------------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------------------------


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a crash (or still being written) is left out."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def read_run(folder: str) -> dict:
    """{"label", "config", "beta", "rows"} of the run in `folder` (or of a metrics.jsonl named directly). The config
    comes from run.json (written at the run's start), else from its newest checkpoint, else it is unknown ({})."""
    if folder.endswith(".jsonl"):
        folder, path = os.path.dirname(folder) or ".", folder
    else:
        path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (a run folder holds metrics.jsonl from its first epoch on)")
    run = {"label": os.path.normpath(folder), "config": {}, "beta": None, "rows": read_metrics(path)}
    pointer = os.path.join(folder, "checkpoints", "latest")
    for meta in (os.path.join(folder, "run.json"), os.path.join(folder, "checkpoints", open(pointer).read().strip(),
                 "trainer_state.json") if os.path.isfile(pointer) else ""):  # fmt: skip
        if os.path.isfile(meta):
            saved = json.load(open(meta))
            run.update(config=saved["config"], beta=saved.get("beta", saved["config"].get("beta")))
            break
    return run


def _run_facts(run: dict) -> list[tuple[str, str]]:
    """(name, text) of what identifies a run: model, reward, β and the batch numbers (from its config)."""
    c = run["config"]
    if not c:
        return [("label", run["label"])]
    beta = "default" if run["beta"] is None else f"{run['beta']:g}"  # ASCII: the built-in font has no Greek
    return [
        ("model", c["model"]), ("reward", f"reward {c['reward']}"), ("beta", f"beta {beta}"),
        ("batch", f"{c['groups_per_epoch']} prompts x {c['group_size']} images per epoch"),
        ("steps", f"{c['optimizer_steps_per_epoch']} optimiser steps/epoch"), ("lr", f"lr {c['lr']:g}"),
        ("sampler", f"{c['sde_type'].upper()} noise level {c['noise_level']:g}"
         + (f", fast window {c['fast_window']}" if c.get("fast_window") else "")),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The picture
# ----------------------------------------------------------------------------------------------------------------

# (metrics key, panel title, y-axis label, what to look for, y range or None = fitted to the data)
PANELS = [
    ("reward/mean", "training reward", "reward (mean ± std)", "SDE samples of the epoch; should rise", None),
    ("eval/reward_mean", "evaluation reward", "reward", "ODE samples, fixed prompts and noise", None),
    ("policy/kl_ref", "KL to the reference model", "KL per element", "fast rise while reward rises: hacking", None),
    ("policy/clipfrac", "clip fraction", "fraction of samples", "near 1: learning rate too high", (0.0, 1.0)),
    ("policy/zero_adv_frac", "zero-advantage fraction", "fraction of samples", "near 1: groups all alike, saturated", (0.0, 1.0)),
    ("time/epoch_s", "time per epoch", "seconds", "sampling + reward + training + evaluation", None),
]  # fmt: skip
# Okabe–Ito colours (told apart with every common colour-vision deficiency), one per run
COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0)]
WIDTH, COLUMNS = 1500, 3  # the picture is WIDTH px wide, COLUMNS panels per row
HEADER_H, ROW_H = 124, 330  # its height is HEADER_H + ROW_H per row of panels
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 104, 26, 62, 54  # a panel's plot area inside its cell, px


def figure_size(n_panels: int) -> tuple[int, int]:
    return WIDTH, HEADER_H + ROW_H * math.ceil(n_panels / COLUMNS)


def panels_for(runs: list[dict]) -> list[tuple]:
    """PANELS, then one panel per part of a weighted-sum reward (keys reward/<name>) found in any run."""
    parts = sorted({k.split("/")[1] for r in runs for row in r["rows"] for k in row
                    if k.count("/") == 1 and k.startswith("reward/") and k not in ("reward/mean", "reward/std")})  # fmt: skip
    return PANELS + [(f"reward/{p}", f"reward part: {p}", "reward", "mean over the epoch's samples", None) for p in parts]


def nice_ticks(lo: float, hi: float, count: int = 5) -> tuple[float, float, float]:
    """(first tick, last tick, step): about `count` steps of 1, 2 or 5 × 10^k covering [lo, hi]."""
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, step


def tick_label(v: float, step: float) -> str:
    """A tick value with as many decimals as its step needs; scientific where that would be more than 7."""
    if abs(v) < step * 1e-6:
        return "0"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if decimals <= 7 and abs(v) < 1e6:
        return f"{v:.{decimals}f}"
    return f"{v:.{max(1, math.floor(math.log10(abs(v))) - math.floor(math.log10(step) + 1e-9))}e}"


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow >= 10.1 (requirements.txt): a scalable TrueType font


def _series(run: dict, key: str) -> list[tuple[int, Optional[float]]]:
    """(epoch, value) of every row holding `key`; None where the run logged a non-finite value. A run with β = 0
    computes no KL (it logs null; runs of older versions logged 0): none is drawn for it."""
    if key == "policy/kl_ref" and run["beta"] == 0:
        return []
    return [(row["epoch"], row[key]) for row in run["rows"] if key in row]


def _band(run: dict, key: str) -> list[tuple[int, float, float]]:
    """(epoch, mean − std, mean + std) of the training reward where both are finite; [] in the other panels."""
    std = dict(_series(run, "reward/std")) if key == "reward/mean" else {}
    return [(e, v - std[e], v + std[e]) for e, v in _series(run, key) if v is not None and std.get(e) is not None]


def draw_curves(path: str, runs: list[dict]) -> tuple[int, int]:
    """Draw `runs` (read_run's dicts; one run: the run's own picture; several: overlaid, one colour each) into the
    PNG `path` (written whole, then renamed: a viewer never sees half a picture). Returns its (width, height)."""
    from PIL import Image, ImageDraw

    panels = panels_for(runs)
    image = Image.new("RGB", figure_size(len(panels)), "white")
    shade = Image.new("RGBA", image.size, (0, 0, 0, 0))  # the ± std bands, blended in translucent
    draw, shade_draw = ImageDraw.Draw(image), ImageDraw.Draw(shade)
    big, mid, small = _font(21), _font(16), _font(14)
    # header: what the runs share (what they are, then how they sample and train), then a status line (one run)
    # or a legend with what differs (several runs)
    facts = [dict(_run_facts(r)) for r in runs]
    common = [(k, t) for k, t in _run_facts(runs[0]) if all(f.get(k) == t for f in facts)]
    what = [t for k, t in common if k in ("model", "reward", "beta", "label")]
    draw.text((16, 10), "Flow-GRPO   " + "  ·  ".join(what), fill="black", font=big)
    draw.text((16, 40), "  ·  ".join(t for k, t in common if t not in what), fill=(60, 60, 60), font=mid)
    if len(runs) == 1:
        draw.text((16, 66), _status(runs[0]), fill="black", font=mid)
        draw.text((16, 92), f"x-axis: epoch   ·   {runs[0]['label']}/metrics.jsonl", fill=(110, 110, 110), font=small)
    else:
        x, y = 16, 66
        for i, (r, f) in enumerate(zip(runs, facts)):
            text = r["label"] + "".join(f"   {t}" for k, t in f.items() if (k, t) not in common and k != "label")
            if x > 16 and x + 28 + draw.textlength(text, font=mid) > WIDTH:  # next legend line
                x, y = 16, y + 26
            draw.rectangle([x, y + 6, x + 22, y + 14], fill=COLOURS[i % len(COLOURS)])
            draw.text((x + 28, y), text, fill="black", font=mid)
            x += 60 + int(draw.textlength(text, font=mid))
    epochs = [e for r in runs for e, _ in _series(r, "epoch")] or [0]
    x_lo, x_hi, x_step = nice_ticks(min(epochs), max(max(epochs), min(epochs) + 1))
    if x_step < 1:  # epochs are whole numbers: no tick between two of them
        x_lo, x_hi, x_step = math.floor(x_lo), math.ceil(x_hi), 1
    for n, (key, title, y_label, hint, fixed) in enumerate(panels):
        left = (n % COLUMNS) * (WIDTH // COLUMNS)
        top = HEADER_H + (n // COLUMNS) * ROW_H
        x0, x1, y0, y1 = left + PLOT_LEFT, left + WIDTH // COLUMNS - PLOT_RIGHT, top + PLOT_TOP, top + ROW_H - PLOT_BOTTOM
        series = [_series(r, key) for r in runs]
        bands = [_band(r, key) for r in runs]
        values = [v for s in series for _, v in s if v is not None] + [v for b in bands for _, *ends in b for v in ends]
        last = f"   last {series[0][-1][1]:.4g}" if len(runs) == 1 and series[0] and series[0][-1][1] is not None else ""
        draw.text((left + 16, top + 8), title + last, fill="black", font=mid)
        draw.text((left + 16, top + 30), hint, fill=(110, 110, 110), font=small)
        lo, hi = fixed or (min(values, default=0.0), max(values, default=1.0))
        if hi - lo < 1e-12 * max(1.0, abs(hi)):  # a flat curve: [0, 1] if it is 0, else a small range around it
            lo, hi = (0.0, 1.0) if hi == 0 else (lo - abs(lo) * 0.05, hi + abs(hi) * 0.05)
        y_lo, y_hi, y_step = nice_ticks(lo, hi, 4)

        def px(e: float, v: float) -> tuple[float, float]:
            return x0 + (e - x_lo) / (x_hi - x_lo) * (x1 - x0), y1 - (v - y_lo) / (y_hi - y_lo) * (y1 - y0)

        for i in range(round((y_hi - y_lo) / y_step) + 1):  # y grid and tick labels
            v = y_lo + i * y_step
            draw.line([x0, px(0, v)[1], x1, px(0, v)[1]], fill=(228, 228, 228))
            draw.text((x0 - 6, px(0, v)[1]), tick_label(v, y_step), fill="black", font=small, anchor="rm")
        for i in range(round((x_hi - x_lo) / x_step) + 1):  # x ticks
            e = x_lo + i * x_step
            draw.line([px(e, 0)[0], y1, px(e, 0)[0], y1 + 4], fill="black")
            draw.text((px(e, 0)[0], y1 + 6), f"{e:g}", fill="black", font=small, anchor="mt")
        draw.text(((x0 + x1) / 2, y1 + 26), "epoch", fill=(60, 60, 60), font=small, anchor="mt")
        label = Image.new("RGBA", (int(draw.textlength(y_label, font=small)) + 4, 20), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((2, 2), y_label, fill=(60, 60, 60), font=small)
        label = label.rotate(90, expand=True)  # the y-axis label reads upwards, left of the tick labels
        image.paste(label, (left + 10, int((y0 + y1) / 2 - label.height / 2)), label)
        draw.rectangle([x0, y0, x1, y1], outline="black")
        if not values:
            draw.text(((x0 + x1) / 2, (y0 + y1) / 2), _missing(key, runs), fill=(110, 110, 110), font=mid, anchor="mm")
        elif key == "policy/kl_ref" and any(r["beta"] == 0 for r in runs):
            note = "not computed by runs with beta = 0"
            draw.text(((x0 + x1) / 2, y0 + 8), note, fill=(110, 110, 110), font=small, anchor="mt")
        for i, (s, band) in enumerate(zip(series, bands)):
            colour = COLOURS[i % len(COLOURS)]
            points = [px(e, v) for e, v in s if v is not None]
            if len(band) > 1:  # ± std: along the top edge, then back along the bottom one
                shade_draw.polygon([px(e, hi) for e, _, hi in band] + [px(e, lo) for e, lo, _ in band[::-1]], fill=colour + (50,))
            if len(points) > 1:
                draw.line(points, fill=colour, width=3, joint="curve")
            if len(points) < 12 or key.startswith("eval/"):  # few points (evaluations): each one marked
                for cx, cy in points:
                    draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
    image = Image.alpha_composite(image.convert("RGBA"), shade).convert("RGB")
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)
    return image.size


def _status(run: dict) -> str:
    """One line: how far the run is, the training reward from its first epoch to its last, the last evaluation."""
    rows, c = run["rows"], run["config"]
    if not rows:
        return "no epoch finished yet"
    line = f"epoch {rows[-1]['epoch'] + 1}" + (f" of {c['epochs']}" if c else "")
    line += f" done, optimiser step {rows[-1].get('step', 0)}"
    rewards = [r["reward/mean"] for r in rows if r.get("reward/mean") is not None]
    if rewards:
        line += f"   ·   training reward {rewards[0]:.4g} -> {rewards[-1]:.4g}"
    evals = [r for r in rows if r.get("eval/reward_mean") is not None]
    if evals:
        first, last = evals[0]["eval/reward_mean"], evals[-1]["eval/reward_mean"]
        line += f"   ·   evaluation {first:.4g} -> {last:.4g} (epoch {evals[-1]['epoch']})"
    seconds = [r["time/epoch_s"] for r in rows if r.get("time/epoch_s") is not None]
    return line + (f"   ·   {sum(seconds) / len(seconds):.3g} s/epoch" if seconds else "")


def _missing(key: str, runs: list[dict]) -> str:
    if key.startswith("eval/"):
        every = {r["config"].get("eval_every") for r in runs}
        return "no evaluation yet" + (f" (--eval_every {every.pop()})" if len(every) == 1 else "")
    if key == "policy/kl_ref" and all(r["beta"] == 0 for r in runs):
        return "not computed: beta = 0"
    return "not logged"


# ----------------------------------------------------------------------------------------------------------------
# The run's hook and the trackers
# ----------------------------------------------------------------------------------------------------------------


def check_report_to(spec: str) -> list[str]:
    """The trackers named by --report_to ("none", or names from TRACKERS joined by commas), each importable.
    Raises ValueError with one line naming the package to install; called before the model loads."""
    names = [] if spec.strip() in ("", "none") else [n.strip() for n in spec.split(",")]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"--report_to {spec}: unknown tracker {name!r}; choose none, {', '.join(TRACKERS)} (comma-separated)")
        try:
            importlib.import_module(TRACKERS[name])
        except ImportError:
            raise ValueError(f"--report_to {name} needs the package {TRACKERS[name]}: pip install {TRACKERS[name]}") from None
    return names


class RunWatch:
    """What flow_grpo.train calls on rank 0: built after the run claimed its folder, then after_epoch(m) after each
    metrics line. Writes <out>/run.json (the config, β and the wandb run id), feeds the trackers, redraws curves.png."""

    def __init__(self, cfg: Any, epoch0: int, log: Callable[[str], None] = print):
        self.cfg, self.log, self.out = cfg, log, cfg.out
        old = os.path.join(cfg.out, "run.json")
        # a resumed run (epoch0 > 0) continues its wandb run; a fresh one starts its own
        run_id = json.load(open(old)).get("wandb_id") if epoch0 and os.path.isfile(old) else None
        info = {"config": dataclasses.asdict(cfg), "beta": cfg.resolved_beta(), "wandb_id": run_id or secrets.token_hex(4)}
        atomic_write_text(old, json.dumps(info, indent=1))
        self.tensorboard = self.wandb = None
        names = check_report_to(cfg.report_to)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: what a crashed run logged at epochs >= epoch0 (past its last checkpoint) is dropped, as
            # claim_metrics drops those lines of metrics.jsonl; the resumed run logs them again
            self.tensorboard = SummaryWriter(os.path.join(cfg.out, "tensorboard"), purge_step=epoch0)
            log(f"tensorboard: tensorboard --logdir {os.path.join(cfg.out, 'tensorboard')}")
        if "wandb" in names:
            import wandb

            mode = os.environ.get("WANDB_MODE", "offline")  # offline unless asked: nothing leaves this machine
            self.wandb = wandb.init(
                project="flow_grpo", name=os.path.basename(os.path.normpath(cfg.out)), id=info["wandb_id"],
                resume="allow", dir=cfg.out, config=info["config"], mode=mode,
                settings=wandb.Settings(silent=True, console="off"),  # our own lines only; no stdout capture
            )  # fmt: skip
            # x = epoch in every chart (wandb's own step counter keeps counting across a resume)
            self.wandb.define_metric("epoch")
            self.wandb.define_metric("*", step_metric="epoch")
            folder = os.path.dirname(self.wandb.dir)  # run.dir is <the run's folder>/files
            log(f"wandb: {mode} run {info['wandb_id']} in {folder}" + (f" (upload it: wandb sync {folder})" if mode == "offline" else ""))

    def after_epoch(self, m: dict) -> None:
        """Log epoch m (a metrics.jsonl row) to the trackers, with the evaluation grid the run saved for it, and
        redraw curves.png after an evaluation, a checkpoint and the last epoch."""
        cfg, epoch = self.cfg, m["epoch"]
        # the grid flow_grpo.main's on_eval saves (runs without one, such as the toys', log no image)
        grid = os.path.join(self.out, f"eval-epoch-{epoch:06d}.png")
        grid = grid if "eval/reward_mean" in m and os.path.isfile(grid) else None
        # the epoch is the x-axis; what metrics.jsonl writes as null (not measured, or not finite) is not logged either
        scalars = {k: v for k, v in m.items() if k != "epoch" and not (isinstance(v, float) and not math.isfinite(v))}
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, global_step=epoch)
            if grid:
                import numpy as np
                from PIL import Image

                self.tensorboard.add_image("eval/grid", np.asarray(Image.open(grid).convert("RGB")), epoch, dataformats="HWC")
            self.tensorboard.flush()  # on disk each epoch: a crash loses nothing already printed
        if self.wandb is not None:
            import wandb

            self.wandb.log({"epoch": epoch, **scalars, **({"eval/grid": wandb.Image(grid)} if grid else {})})
        last = epoch == cfg.epochs - 1
        if "eval/reward_mean" in m or last or (cfg.save_every and (epoch + 1) % cfg.save_every == 0):
            try:
                draw_curves(os.path.join(self.out, "curves.png"), [read_run(self.out)])
            except Exception as e:  # a picture must never end a run of hours
                self.log(f"curves.png not drawn: {type(e).__name__}: {e}")
        if last:
            self.close()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tensorboard = self.wandb = None


# ----------------------------------------------------------------------------------------------------------------
# Command line: draw finished runs
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Draw Flow-GRPO runs from their metrics.jsonl: one run, or several overlaid.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (its --out) or a metrics.jsonl")
    parser.add_argument("-o", "--output", help="the PNG to write (default for one run: RUN/curves.png)")
    args = parser.parse_args(argv)
    if not args.output and len(args.runs) > 1:
        parser.error("several runs: name the picture with -o")
    try:
        runs = [read_run(r) for r in args.runs]
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = os.path.dirname(args.runs[0]) if args.runs[0].endswith(".jsonl") else args.runs[0]
    output = args.output or os.path.join(first, "curves.png")
    width, height = draw_curves(output, runs)
    epochs = sum(len(r["rows"]) for r in runs)
    print(f"wrote {output} ({width} x {height} px, {len(runs)} run{'s' * (len(runs) > 1)}, {epochs} epochs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
