"""The seed sweeps behind two README tables: GRPO-Guard against plain Flow-GRPO on both toys, and training the
glyph writer without classifier-free guidance (CFG distillation, what the reference's no-CFG recipes rely on).
Every number comes from toy/run.py and toy/glyphs.py themselves; this file only loops over seeds and settings,
re-measures each glyph model at both guidance scales, and tabulates.

    python toy/compare.py --seeds 0 1 2 3 4     # every run below, then the tables (8 glyph runs per seed, each
                                                # ~45 s of CPU on an idle core, and 2 runs of the 2D toy)
    python toy/compare.py --seeds 3 &  python toy/compare.py --seeds 4 &     # the work split between processes
    python toy/compare.py --table               # only the tables, from the runs already written

Each (run, seed) writes <out>/<run>-seed<S>.json and is skipped when that file exists. The runs:
    toy-plain, toy-guard          python toy/run.py --beta 0 [--guard]: the 2D toy where plain Flow-GRPO hacks
    glyph-b0-plain, glyph-b0-guard, glyph-b0-guard-eps1e-3, glyph-b0-guard-eps3e-4, glyph-b0-guard-refscaled,
    glyph-b0-plain-lr3.3e-4       python toy/glyphs.py --beta 0 --no_beta0 [--guard] [--clip_range ε] [--lr ...]
    glyph-plain, glyph-guard      the same at the default β = 0.1
    glyph-nocfg                   β = 0.1, sampled AND trained at guidance 1 (--guidance_scale 1)
Every glyph model (the pre-trained writer "before", each trained one "after") is measured at w = 1 and at w = 2
(the toy's CFG scale) on the same fixed-noise ODE samples, whatever w it was trained at.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import flow_grpo  # noqa: E402
from toy import glyphs  # noqa: E402
from toy import run as toy  # noqa: E402

TOY_RUNS = {"toy-plain": ["--beta", "0"], "toy-guard": ["--beta", "0", "--guard"]}
GLYPH_RUNS = {
    "glyph-b0-plain": ["--beta", "0"],
    "glyph-b0-guard": ["--beta", "0", "--guard"],
    "glyph-nocfg": ["--guidance_scale", "1"],
    "glyph-plain": [],
    "glyph-guard": ["--guard"],
    # the guard's log r̂ is s·(the part of log r that is not drift): s averages 0.34 over the 9 trained steps of
    # the glyphs' uniform 10-step grid at a = 0.7, so ε = 1e-3 clips r̂ about as often as 3e-3 clips plain r
    "glyph-b0-guard-eps1e-3": ["--beta", "0", "--guard", "--clip_range", "1e-3"],
    "glyph-b0-guard-eps3e-4": ["--beta", "0", "--guard", "--clip_range", "3e-4"],
    # the reference's GRPO-Guard configs (config/grpo_guard.py, general_ocr_sd3_rationorm) against its Flow-GRPO
    # ones: ε 2e-6 instead of 1e-4 (1/50) and lr 1e-4 instead of 3e-4 (1/3), β = 0; the same ratios here
    "glyph-b0-guard-refscaled": ["--beta", "0", "--guard", "--clip_range", "6e-5", "--lr", "3.3e-4"],
    "glyph-b0-plain-lr3.3e-4": ["--beta", "0", "--lr", "3.3e-4"],  # its control: the lower lr without the guard
}
SCALES = (1.0, glyphs.GUIDANCE_SCALE)  # every glyph model is measured at both


def epoch_means(out: str) -> dict[str, float]:
    """The means over epochs of train's policy/clipfrac and policy/ratio (the ratio the clip acts on: r̂ with the
    guard), from the metrics.jsonl flow_grpo.train wrote into `out`."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    return {k: sum(e[f"policy/{k}"] for e in epochs) / len(epochs) for k in ("clipfrac", "ratio")}


def toy_run(name: str, seed: int, out: str) -> dict:
    folder = os.path.join(out, "runs", f"{name}-seed{seed}")
    m = toy.run([*TOY_RUNS[name], "--seed", str(seed), "--out", folder, "--quiet"])
    keep = ("reward_before", "reward_after", "on_manifold_before", "on_manifold_after", "kl_to_ref")
    return {**{k: m[k] for k in keep}, **epoch_means(folder)}


def glyph_run(name: str, seed: int, out: str, writer, judges) -> dict:
    folder = os.path.join(out, "runs", f"{name}-seed{seed}")
    args = glyphs.parse_args([*GLYPH_RUNS[name], "--seed", str(seed), "--no_beta0", "--quiet", "--out", folder])
    r = glyphs.fine_tune(args, writer, judges, args.beta, folder, lambda s: None, {"seconds": 0.0, "cpu_seconds": 0.0})
    cfg = glyphs.glyph_config(args, args.beta, folder)
    model = glyphs.GlyphModel(copy.deepcopy(writer), args.guidance_scale)
    numbers = {}
    for when in ("before", "after"):
        if when == "after":  # the trained weights, from the run's final checkpoint
            model.load_weights(os.path.join(flow_grpo.latest_checkpoint(folder), "lora"))
        for w in SCALES:
            model.guidance_scale = w
            m = glyphs.measure(model, cfg, judges)
            numbers.update({f"{k}_{when}_w{w:g}": m[k] for k in glyphs.NUMBERS})
    extra = ("kl_to_ref", "epoch_heldout_90")
    return {**numbers, **{k: r[k] for k in extra}, **epoch_means(folder), "trained_w": args.guidance_scale}


def run_all(seeds: list[int], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    path = lambda name, seed: os.path.join(out, f"{name}-seed{seed}.json")  # noqa: E731
    with toy.one_thread():
        for seed in seeds:
            for name in TOY_RUNS:
                if not os.path.exists(path(name, seed)):
                    save(path(name, seed), toy_run(name, seed, out))
            todo = [name for name in GLYPH_RUNS if not os.path.exists(path(name, seed))]
            if todo:
                writer, judges, _ = glyphs.setup(seed, log=lambda s: None)
                for name in todo:
                    save(path(name, seed), glyph_run(name, seed, out, writer, judges))


def save(path: str, numbers: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(numbers, f, indent=1)
    os.replace(path + ".tmp", path)  # a run killed half-way leaves no file, so it is redone
    print(f"wrote {path}", flush=True)


def load(out: str) -> dict[str, dict[int, dict]]:
    """{run name: {seed: numbers}} from every file in `out`."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(glob.glob(os.path.join(out, "*-seed*.json"))):
        name, seed = os.path.basename(path)[: -len(".json")].rsplit("-seed", 1)
        with open(path) as f:
            numbers = json.load(f)
        folder = os.path.join(out, "runs", os.path.basename(path)[: -len(".json")])
        runs.setdefault(name, {})[int(seed)] = {**epoch_means(folder), **numbers}
    return runs


def cell(by_seed: dict[int, dict], key: str, fmt: str = "{:.2f}") -> str:
    """The first seed's value, with the range over all seeds in brackets, as in the README."""
    values = [by_seed[s][key] for s in sorted(by_seed)]
    if any(v is None for v in values):
        shown = ["never" if v is None else fmt.format(v) for v in values]
        return shown[0] if len(shown) == 1 else f"{shown[0]} ({', '.join(shown)})"
    first, lo, hi = (fmt.format(v) for v in (values[0], min(values), max(values)))
    return first if len(values) == 1 else f"{first} ({lo}–{hi})"


def table(title: str, runs: dict, names: list[str], columns: list[tuple[str, str, str]]) -> list[str]:
    """A markdown table: one row per run in `names` that has results, one column per (header, key, format); a key
    may name the run's training guidance as {w} (w1 or w2)."""
    names = [n for n in names if n in runs]
    if not names:
        return []
    lines = [title, "", "| run | seeds | " + " | ".join(c[0] for c in columns) + " |", "|---|---|" + "---|" * len(columns)]
    for n in names:
        r = runs[n]
        w = f"w{r[min(r)].get('trained_w', 0):g}"
        seeds = ", ".join(str(seed) for seed in sorted(r))
        lines.append(f"| {n} | {seeds} | " + " | ".join(cell(r, key.format(w=w), fmt) for _, key, fmt in columns) + " |")
    return lines + [""]


def tables(out: str) -> str:
    runs = load(out)
    toy_columns = [("reward after", "reward_after", "{:.3f}"), ("on its modes after", "on_manifold_after", "{:.1%}"),
                   ("KL to the pre-trained model", "kl_to_ref", "{:.3f}"), ("clipped", "clipfrac", "{:.3f}"),
                   ("mean ratio", "ratio", "{:.4f}")]  # fmt: skip
    glyph_columns = [
        ("held-out judge", "heldout_accuracy_after_{w}", "{:.2f}"), ("mini-OCR", "ocr_accuracy_after_{w}", "{:.2f}"),
        ("distance to data", "distance_to_data_after_{w}", "{:.3f}"), ("diversity", "diversity_after_{w}", "{:.2f}"),
        ("KL to the writer", "kl_to_ref", "{:.4f}"), ("90% at epoch", "epoch_heldout_90", "{:d}"),
        ("clipped", "clipfrac", "{:.3f}"), ("mean ratio", "ratio", "{:.4f}"),
    ]  # fmt: skip
    cfg_columns = [(f"held-out, w = {w:g} {when}", f"heldout_accuracy_{when}_w{w:g}", "{:.2f}")
                   for w in SCALES for when in ("before", "after")]  # fmt: skip
    cfg_columns += [("90% (its own w) at epoch", "epoch_heldout_90", "{:d}")]
    cfg_columns += [(f"diversity after, w = {w:g}", f"diversity_after_w{w:g}", "{:.2f}") for w in SCALES]
    lines = table("2D toy, β = 0, 60 epochs", runs, list(TOY_RUNS), toy_columns)
    guard_runs = [n for n in GLYPH_RUNS if n != "glyph-nocfg"]
    lines += table("glyph toy, 80 epochs, w = 2 (sampling, training and measuring)", runs, guard_runs, glyph_columns)
    lines += table("glyph toy, each sampler (w) before and after training", runs, ["glyph-nocfg", "glyph-plain"], cfg_columns)
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="GRPO-Guard and no-CFG training on the toys, over seeds (see the top).")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4], help="the seeds to run")
    p.add_argument("--table", action="store_true", help="run nothing; print the tables of the runs already written")
    p.add_argument("--out", default=os.path.join(ROOT, "toy", "out", "compare"), help="one JSON file per run and seed")
    args = p.parse_args(argv)
    if not args.table:
        run_all(args.seeds, args.out)
    print(tables(args.out))


if __name__ == "__main__":
    main()
