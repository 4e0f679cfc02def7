"""Watching a run (watch.py): the curves picture the run draws, the command drawing finished runs, and the trackers
(--report_to tensorboard / wandb), read back with their own readers.

One tiny-random run (2 epochs, an evaluation each, a checkpoint each), crashed past its last checkpoint and resumed,
feeds the run-level tests; the drawing tests use metrics written here. The tracker tests skip where the package is
missing, except under CI (CI=true), which installs both (.ci/run): there a missing tracker fails."""

import dataclasses
import glob
import json
import os
import shutil
import struct
import sys

import pytest
import torch

import flow_grpo as fg
import rewards
import watch
from test_robustness import no_model_load
from test_sd3 import PROMPTS, make_model, run_main, tiny_cfg

QUIET = lambda line: None  # noqa: E731
CI = os.environ.get("CI", "").lower() in ("true", "1")


def installed(package: str) -> bool:
    try:
        __import__(package)
        return True
    except ImportError:
        if CI:
            pytest.fail(f"CI installs {package} (.ci/run) to test --report_to {package}")
        return False


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 2-epoch tiny-random run reporting to every installed tracker, evaluated and checkpointed every epoch, with
    the evaluation grid saved as flow_grpo.main saves it; then a crash after epoch 1 was logged but before its
    checkpoint, and a resume that redoes epoch 1. Returns (cfg, curves.png's bytes as they were during epoch 1)."""
    trackers = [name for name in ("tensorboard", "wandb") if installed(name)]
    # 4 denoising steps (3 trained), 4 to evaluate: what is tested is the logging, not the samples
    cfg = tiny_cfg(tmp_path_factory.mktemp("watch"), epochs=2, eval_every=1, save_every=1, num_steps=4, eval_num_steps=4,
                   report_to=",".join(trackers) or "none")
    prompts = [fg.Prompt(p) for p in PROMPTS]
    seen = {}

    def on_eval(epoch, images, rewards_, shown):
        fg.save_grid(os.path.join(cfg.out, f"eval-epoch-{epoch:06d}.png"), images, shown, rewards_, epoch)
        path = os.path.join(cfg.out, "curves.png")
        seen.setdefault(epoch, open(path, "rb").read() if os.path.exists(path) else None)

    env = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")  # never reach wandb's servers
    try:
        fg.train(cfg, make_model(cfg), rewards.build_reward(cfg.reward), prompts, log=QUIET, on_eval=on_eval)
        root = os.path.join(cfg.out, "checkpoints")
        shutil.rmtree(os.path.join(root, "epoch-000002"))  # the crash: epoch 1 logged, its checkpoint lost
        with open(os.path.join(root, "latest"), "w") as f:
            f.write("epoch-000001")
        resumed = dataclasses.replace(cfg, resume=True)
        fg.train(resumed, make_model(resumed), rewards.build_reward(cfg.reward), prompts, log=QUIET, on_eval=on_eval)
    finally:
        for k, v in env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return cfg, seen[1]


def metrics_rows(cfg):
    return [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]


# --- the run's own picture ---


def test_the_run_draws_its_curves_and_redraws_them_after_the_next_evaluation(tracked_run):
    from PIL import Image

    cfg, during_epoch_1 = tracked_run
    path = os.path.join(cfg.out, "curves.png")
    assert during_epoch_1 is not None  # drawn after epoch 0's evaluation, before epoch 1's
    assert open(path, "rb").read() != during_epoch_1  # redrawn after epoch 1's
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes whole
        assert image.size == watch.figure_size(len(watch.PANELS)) == (1500, 124 + 2 * 330)
    saved = json.load(open(os.path.join(cfg.out, "run.json")))
    assert saved["config"]["group_size"] == cfg.group_size and saved["beta"] == cfg.resolved_beta()


# --- the trackers, read back with their own readers ---


def test_tensorboard_holds_every_scalar_of_metrics_jsonl_once_per_epoch(tracked_run):
    if not installed("tensorboard"):
        pytest.skip("tensorboard is not installed: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _ = tracked_run
    events = EventAccumulator(os.path.join(cfg.out, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()  # purges what the crashed run logged past its checkpoint (the writer's purge_step)
    rows = metrics_rows(cfg)
    # the epoch is tensorboard's step; a null (not measured: the KL at β = 0) is not logged
    keys = {k for row in rows for k, v in row.items() if v is not None} - {"epoch"}
    assert keys <= set(events.Tags()["scalars"]) and "eval/reward_mean" in keys
    for key in keys:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        # tensorboard stores float32: each value is the metrics.jsonl value rounded to float32, exactly
        want = [(row["epoch"], torch.tensor(row[key], dtype=torch.float32).item()) for row in rows if row.get(key) is not None]
        assert logged == want, key
    assert [e.step for e in events.Images("eval/grid")] == [0, 1]


def read_wandb_history(run_folder: str) -> list[dict]:
    """The history rows of an offline wandb run, from its run-<id>.wandb file: records in LevelDB's log format (32 kB
    blocks; each chunk a 7-byte header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last), after wandb's
    7-byte file header; each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = open(glob.glob(os.path.join(run_folder, "run-*.wandb"))[0], "rb").read()
    assert data[:4] == b":W&B"
    pos, block, chunk, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(chunk)
            chunk = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_every_scalar_and_a_resumed_run_continues_its_id(tracked_run):
    if not installed("wandb"):
        pytest.skip("wandb is not installed: pip install wandb")
    from PIL import Image

    cfg, _ = tracked_run
    run_id = json.load(open(os.path.join(cfg.out, "run.json")))["wandb_id"]
    folders = sorted(glob.glob(os.path.join(cfg.out, "wandb", "offline-run-*")))
    assert len(folders) == 2 and all(f.endswith(f"-{run_id}") for f in folders)  # the resumed run: the same id
    first, resumed = (read_wandb_history(f) for f in folders)
    assert [r["epoch"] for r in first] == [0, 1] and [r["epoch"] for r in resumed] == [1]
    rows = metrics_rows(cfg)
    for logged, row in ((first[0], rows[0]), (resumed[0], rows[1])):  # epoch 1 as the resumed run redid it
        for key, value in row.items():
            assert logged.get(key) == value, key  # JSON both ways: the very same float; a null is not logged
        # the evaluation grid, as an image file of the run (its fields flattened to keys by read_wandb_history)
        assert logged["eval/grid/_type"] == "image-file"
        grid = Image.open(os.path.join(cfg.out, f"eval-epoch-{row['epoch']:06d}.png"))
        assert (logged["eval/grid/width"], logged["eval/grid/height"]) == grid.size


def test_report_to_a_missing_package_stops_before_the_model_loads_with_one_line(tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError, as if not installed
    code, err = run_main(["--model", "tiny-random", "--report_to", "wandb", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err == "error: --report_to wandb needs the package wandb: pip install wandb\n"
    code, err = run_main(["--model", "tiny-random", "--report_to", "mlflow", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown tracker 'mlflow'" in err and err.count("\n") == 1


# --- drawing finished runs ---


def fake_run(folder, beta, epochs=11, parts=()):
    """A run folder with run.json and a metrics.jsonl whose clip fraction goes 0 -> 1 across the epochs."""
    cfg = tiny_cfg(folder, beta=beta, epochs=epochs, reward=",".join(f"{p}=1" for p in parts) or "jpeg_compressibility")
    os.makedirs(cfg.out)
    json.dump({"config": dataclasses.asdict(cfg), "beta": beta, "wandb_id": "x"}, open(os.path.join(cfg.out, "run.json"), "w"))
    with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as f:
        for e in range(epochs):
            row = {"epoch": e, "step": 2 * e, "reward/mean": 0.1 * e + beta, "reward/std": 0.05, "policy/kl_ref": beta * e,
                   "policy/clipfrac": e / (epochs - 1), "policy/zero_adv_frac": 0.1, "time/epoch_s": 3.0}
            row.update({f"reward/{p}": 0.2 * e for p in parts})
            row.update({"eval/reward_mean": 0.1 * e} if e % 5 == 0 else {})
            f.write(json.dumps(row) + "\n")
    return cfg.out


def test_finished_runs_are_drawn_overlaid_each_value_where_it_belongs(tmp_path, capsys):
    from PIL import Image

    a, b = fake_run(tmp_path / "a", 0.0), fake_run(tmp_path / "b", 0.04, parts=("ocr", "pickscore"))
    out = str(tmp_path / "both.png")
    assert watch.main([a, b, "-o", out]) == 0
    assert "2 runs" in capsys.readouterr().out
    image = Image.open(out).convert("RGB")
    assert image.size == watch.figure_size(len(watch.PANELS) + 2)  # + a panel per reward part: ocr, pickscore
    # the clip-fraction panel (the 4th: row 1, column 0) spans epochs 0..10 and fractions 0..1 exactly, so run a's
    # curve starts at the plot's bottom-left corner and ends at its top-right one (value 0 at the bottom, 1 at the top)
    x0, x1 = watch.PLOT_LEFT, watch.WIDTH // watch.COLUMNS - watch.PLOT_RIGHT
    y0, y1 = watch.HEADER_H + watch.ROW_H + watch.PLOT_TOP, watch.HEADER_H + 2 * watch.ROW_H - watch.PLOT_BOTTOM
    for corner in ((x0 + 2, y1 - 2), (x1 - 2, y0 + 2)):
        assert watch.COLOURS[1] in {image.getpixel((corner[0] + dx, corner[1] + dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    colours = {c for _, c in image.getcolors(1 << 20)}
    assert watch.COLOURS[0] in colours and watch.COLOURS[1] in colours  # each run drawn in its own colour


@pytest.mark.tesseract  # skipped where the program is missing, unless CI=true (conftest.py)
def test_the_curves_are_legible_at_native_size(tmp_path):
    import pytesseract
    from PIL import Image

    run = fake_run(tmp_path / "a", 0.04)
    assert watch.main([run]) == 0
    # read back by Tesseract, an independent reader, at the picture's own size (spaces normalised away; it does
    # not read the upward y-axis labels)
    read = "".join(pytesseract.image_to_string(Image.open(os.path.join(run, "curves.png"))).lower().split())
    for text in ("rewardjpeg_compressibility", "beta0.04", "epoch11of11done", "trainingreward", "evaluationreward",
                 "kltothereferencemodel", "clipfraction", "zero-advantagefraction", "timeperepoch"):  # fmt: skip
        assert text in read, (text, read)


def test_ticks_cover_the_data_in_round_steps_and_their_labels_differ():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        centre, width = (torch.randn(2, generator=g) * torch.tensor([3.0, 3.0])).tolist()
        lo = centre * 10 ** torch.randint(-6, 6, (1,), generator=g).item()
        hi = lo + 10 ** width
        first, last, step = watch.nice_ticks(lo, hi, 4)
        # covers [lo, hi] to within a millionth of a step (nice_ticks absorbs float rounding): far below a pixel
        assert first <= lo + 1e-6 * step and last >= hi - 1e-6 * step
        assert 2 <= round((last - first) / step) <= 9
        mantissa = step / 10 ** torch.tensor(step).log10().floor().item()
        assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6
        labels = [watch.tick_label(first + i * step, step) for i in range(round((last - first) / step) + 1)]
        assert len(set(labels)) == len(labels), labels  # no two ticks read alike
        for text, i in zip(labels, range(len(labels))):  # and each reads as its value, to within half a step
            assert abs(float(text) - (first + i * step)) < step / 2, (text, first + i * step)
