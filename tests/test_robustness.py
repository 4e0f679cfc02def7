"""Never silently training on garbage: one run per output folder, --resume with changed flags, damaged
checkpoints, failing before the big model loads, start-up validation, held-out evaluation prompts, the eval grid.

Runs use the tiny random SD3 pipeline (tiny_sd3.py) through the helpers of test_sd3.py; nothing is downloaded
(the reward-model test points the hub at a closed local port)."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

import flow_grpo as fg
import runfiles
import rewards
import runfiles
from test_sd3 import PROMPTS, make_model, run_main, tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda line: None  # noqa: E731


def run(cfg, model=None, **kw):
    prompts = [fg.Prompt(p) for p in PROMPTS]
    return fg.train(cfg, model or make_model(cfg), rewards.build_reward(cfg.reward), prompts, log=QUIET, **kw)


def lora_of(path, cfg):
    """The LoRA weights stored in checkpoint folder `path`, in trainable_parameters() order."""
    model = make_model(cfg)
    model.load_weights(os.path.join(path, "lora"))
    return [p.detach().clone() for p in model.trainable_parameters()]


def no_model_load(monkeypatch):
    """Make loading SD3 an error: what is checked must be checked before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the SD3 pipeline was loaded before the failing check")

    monkeypatch.setattr(fg, "load_pipeline", refuse)


# --- 4. one run per output folder ---


def test_a_second_run_into_a_used_out_refuses_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    out = str(tmp_path / "run")
    holder = "import sys, time; sys.path.insert(0, sys.argv[1]); import runfiles; runfiles.lock_out_folder(sys.argv[2]); print('locked', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", holder, ROOT, out], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        code, err = run_main(["--model", "tiny-random", "--reward", "jpeg_compressibility", "--out", out], capsys)
        assert code == 2 and "in use by another run" in err and f"pid {proc.pid} on {socket.gethostname()}" in err
        assert os.listdir(out) == [".lock"]  # refused before writing anything
    finally:
        proc.kill()  # SIGKILL: no clean-up code of the holder runs
        proc.wait()
    runfiles.lock_out_folder(out)  # the OS released the dead process's lock: nothing stale to clear by hand
    assert open(os.path.join(out, ".lock")).read().strip() == f"pid {os.getpid()} on {socket.gethostname()}"


def test_a_fresh_run_moves_an_earlier_runs_metrics_aside(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1)
    os.makedirs(cfg.out)
    old = '{"epoch": 0, "reward/mean": -1.0}\n{"epoch": 1, "reward/mean": -0.9}\n'  # crashed before any checkpoint
    open(os.path.join(cfg.out, "metrics.jsonl"), "w").write(old)
    run(cfg)
    lines = open(os.path.join(cfg.out, "metrics.jsonl")).read().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0]  # only this run's epoch, nothing appended to the old log
    aside = [f for f in os.listdir(cfg.out) if f.startswith("metrics.") and f != "metrics.jsonl"]
    assert len(aside) == 1 and open(os.path.join(cfg.out, aside[0])).read() == old  # kept, unchanged


def test_a_resumed_run_drops_redone_epochs_and_a_line_cut_by_a_crash(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    open(path, "w").write('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "rew')
    fg.claim_metrics(path, 2, QUIET)
    assert open(path).read() == '{"epoch": 0}\n{"epoch": 1}\n'


# --- 5. --resume with changed flags ---


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run with checkpoints after epochs 1 and 2 (made once; each test damages a copy)."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("two"), epochs=2, save_every=1, ema=True, ema_every=1)
    run(cfg)
    return cfg


def copy_run(cfg, folder, **changes):
    """cfg with its run copied into `folder` (so a test may change it) and `changes` applied."""
    shutil.copytree(cfg.out, folder)
    return dataclasses.replace(cfg, out=str(folder), **changes)


def test_resume_refuses_settings_that_cannot_change_and_lists_them(two_checkpoints, tmp_path, capsys):
    cfg = copy_run(two_checkpoints, tmp_path / "run")
    changed = dataclasses.replace(cfg, resume="latest", epochs=3, lr=1e-3, seed=7, group_size=8, lora_rank=4, sde_type="cps")
    forbidden, allowed = runfiles.compare_to_checkpoint(json.load(open(os.path.join(runfiles.latest_checkpoint(cfg.out), "trainer_state.json")))["config"], changed)
    assert forbidden == ["--seed 42 -> 7", "--group_size 4 -> 8", "--sde_type 'sde' -> 'cps'", "--lora_rank 32 -> 4"]
    assert allowed == ["--lr 0.03 -> 0.001", "--epochs 2 -> 3"]
    with pytest.raises(fg.CheckpointError) as e:
        runfiles.check_out_folder(changed)
    assert all(line in str(e.value) for line in forbidden) and "--lr 0.03" not in str(e.value)
    # the command line says so before loading anything (the CLI preset differs in more than the LoRA rank)
    code, err = run_main(["--model", "tiny-random", "--out", cfg.out, "--resume", "--lora_rank", "4", "--epochs", "3"], capsys)
    assert code == 2 and "--lora_rank 32 -> 4" in err and "Traceback" not in err


def test_resume_with_a_new_lr_trains_with_it(two_checkpoints, tmp_path):
    cfg = copy_run(two_checkpoints, tmp_path / "run")  # trained with lr 3e-2 (tiny-random preset)
    control = copy_run(two_checkpoints, tmp_path / "control")
    saved = lora_of(runfiles.latest_checkpoint(cfg.out), cfg)

    # --lr 0: AdamW's step is p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + ε), exactly p, so the weights must not move at all
    zero = dataclasses.replace(cfg, resume="latest", epochs=3, lr=0.0)
    model = make_model(zero)
    lines = []
    fg.train(zero, model, rewards.build_reward(cfg.reward), [fg.Prompt(p) for p in PROMPTS], log=lines.append)
    assert any("resumed from" in x and "--lr 0.03 -> 0.0" in x for x in lines)
    for a, b in zip(model.trainable_parameters(), saved):
        assert torch.equal(a, b)
    state = json.load(open(os.path.join(runfiles.latest_checkpoint(cfg.out), "trainer_state.json")))
    assert state["epoch"] == 3 and state["param_groups"][0]["lr"] == 0.0 == state["config"]["lr"]

    # control: resumed with the checkpoint's lr, the same epoch does move them (so the check above can fail).
    # Adam moves a weight by up to ~lr = 3e-2 per step; largest change measured over seeds 0-4: 0.054 to 0.058
    model = make_model(control)
    run(dataclasses.replace(control, resume="latest", epochs=3), model)
    assert max((a - b).abs().max().item() for a, b in zip(model.trainable_parameters(), saved)) > 0.01


def test_resume_cli_forms():
    assert fg.parse_config(["--model", "tiny-random"]).resume == ""
    assert fg.parse_config(["--model", "tiny-random", "--resume"]).resume == "latest"
    assert fg.parse_config(["--resume", "--lr", "0.5"]).resume == "latest"
    assert fg.parse_config(["--resume", "runs/x/checkpoints/epoch-000009"]).resume == "runs/x/checkpoints/epoch-000009"


# --- 7. damaged checkpoints ---


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {  # what is done to the newest checkpoint -> the file the message must name, the checkpoint it offers
    "truncated trainer state": (lambda c: truncate(c + "/trainer_state.safetensors"), "trainer_state.safetensors", 1),
    "truncated LoRA": (lambda c: truncate(c + "/lora/pytorch_lora_weights.safetensors"), "lora/pytorch_lora_weights.safetensors", 1),
    "flipped byte in the EMA": (lambda c: flip_last_byte(c + "/ema/pytorch_lora_weights.safetensors"), "ema/pytorch_lora_weights.safetensors", 1),
    "garbled trainer_state.json": (lambda c: open(c + "/trainer_state.json", "w").write('{"epoch": 2, "st'), "trainer_state.json", 1),
    "deleted LoRA file": (lambda c: os.remove(c + "/lora/pytorch_lora_weights.safetensors"), "lora/pytorch_lora_weights.safetensors", 1),
    # both checkpoints intact, but `latest` names one that is not there: the newest intact one is epoch 2
    "latest points nowhere": (lambda c: open(os.path.dirname(c) + "/latest", "w").write("epoch-000009"), "epoch-000009", 2),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_names_the_file_and_the_newest_intact_one(two_checkpoints, tmp_path, damage):
    cfg = copy_run(two_checkpoints, tmp_path / "run", resume="latest", epochs=3)
    damage_fn, named, intact_epoch = DAMAGE[damage]
    damage_fn(os.path.join(cfg.out, "checkpoints", "epoch-000002"))
    intact = os.path.join(cfg.out, "checkpoints", f"epoch-{intact_epoch:06d}")
    with pytest.raises(fg.CheckpointError) as e:
        runfiles.check_out_folder(cfg)
    message = str(e.value)
    assert named in message and f"--resume {intact}" in message, message
    # and the way out it names is open (test_a_damaged_checkpoint_on_the_command_line trains from it)
    assert runfiles.check_out_folder(dataclasses.replace(cfg, resume=intact))[0] == intact


def test_a_damaged_checkpoint_on_the_command_line(two_checkpoints, tmp_path, capsys):
    out = copy_run(two_checkpoints, tmp_path / "run").out
    truncate(os.path.join(out, "checkpoints", "epoch-000002", "trainer_state.safetensors"))
    code, err = run_main(["--model", "tiny-random", "--out", out, "--resume"], capsys)
    assert code == 2 and "trainer_state.safetensors: damaged" in err and "Traceback" not in err
    intact = os.path.join(out, "checkpoints", "epoch-000001")
    assert f"--resume {intact}" in err
    hist = run(dataclasses.replace(two_checkpoints, out=out, resume=intact, epochs=2))  # the way out works
    assert [m["epoch"] for m in hist] == [1]


def test_resume_from_another_runs_checkpoint_into_a_used_folder_is_refused(two_checkpoints, tmp_path):
    other = copy_run(two_checkpoints, tmp_path / "other")  # a folder holding a run of its own
    cfg = dataclasses.replace(other, resume=os.path.join(two_checkpoints.out, "checkpoints", "epoch-000001"), epochs=3)
    with pytest.raises(FileExistsError, match="mix the two"):
        runfiles.check_out_folder(cfg)


# --- 6. failing before the big model loads ---


def test_ocr_prompts_without_target_text_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    prompts = tmp_path / "p.txt"
    prompts.write_text('a sign that says "OPEN"\na cat on a sofa\n')
    args = ["--model", "tiny-random", "--reward", "ocr", "--prompts", str(prompts), "--eval_every", "0", "--out", str(tmp_path / "o")]
    code, err = run_main(args, capsys)
    assert code == 2 and f"{prompts}:2:" in err and "a cat on a sofa" in err and "Traceback" not in err


def test_an_unreachable_reward_model_fails_in_seconds_before_the_model_loads(tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    with socket.socket() as s:  # a local port that is certainly closed: connecting is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    # PickScore's loading code with a model id no cache holds, so the result does not depend on this machine's cache
    pickscore = lambda device="cpu": rewards.pickscore(device, model_id="flow-grpo-tests/no-such-model")  # noqa: E731
    monkeypatch.setitem(rewards.REWARDS, "pickscore", pickscore)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    rewards._hub_reachable.cache_clear()
    from transformers import AutoProcessor, CLIPModel  # noqa: F401  imported before the clock: we time loading, not importing

    start = time.time()
    code, err = run_main(["--model", "tiny-random", "--reward", "pickscore", "--out", str(tmp_path / "o")], capsys)
    seconds = time.time() - start
    rewards._hub_reachable.cache_clear()
    assert code == 2 and "only the local cache was searched" in err and "hf download" in err and "Traceback" not in err
    # bound: measured 0.16-0.24 s (3 runs, load average 6 on 2 cores); the hub client's retries took 67 s before
    assert seconds < 10, seconds


def test_hub_probe_sees_an_open_port_and_a_closed_one(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        rewards._hub_reachable.cache_clear()
        assert rewards._hub_reachable()
    rewards._hub_reachable.cache_clear()
    assert not rewards._hub_reachable()  # the same port, now closed
    rewards._hub_reachable.cache_clear()


def test_the_reward_is_called_on_blank_images_with_the_first_prompts(tmp_path):
    cfg = tiny_cfg(tmp_path, batch_size=4)
    prompts = [fg.Prompt(f"prompt {i}", {"i": i}) for i in range(6)]
    calls = []

    def reward(images, texts, meta):
        calls.append((images.clone(), texts, meta))
        return torch.zeros(len(texts))

    rewards.check_reward(reward, cfg, prompts)
    # a graded reward (jpeg_compressibility) is called a second time, on noise (test_reliability.py: the warning)
    [(images, texts, meta), (noise, *again)] = calls
    assert images.shape == (4, 3, cfg.resolution, cfg.resolution) and bool((images == 0.5).all())
    assert texts == [f"prompt {i}" for i in range(4)] and meta == [{"i": i} for i in range(4)]
    assert noise.shape == images.shape and not bool((noise == 0.5).any()) and again == [texts, meta]

    def needs_a_key(images, texts, meta):
        return torch.tensor([float(m["count"]) for m in meta])

    with pytest.raises(fg.RewardError, match="--reward jpeg_compressibility fails on a blank image.*count"):
        rewards.check_reward(needs_a_key, cfg, prompts)
    with pytest.raises(fg.RewardError, match="NaN"):
        rewards.check_reward(lambda images, texts, meta: torch.full((len(texts),), float("nan")), cfg, prompts)


# --- 9. every start-up input validated ---


@pytest.mark.parametrize(
    "flag, value",
    [("epochs", "0"), ("save_every", "-1"), ("eval_every", "-1"), ("resolution", "0"), ("eval_count", "-2"),
     ("lr", "nan"), ("clip_range", "0"), ("ema_decay", "1.5"), ("eval_num_steps", "0")],
)  # fmt: skip
def test_bad_numbers_are_refused_naming_the_flag(tmp_path, capsys, monkeypatch, flag, value):
    no_model_load(monkeypatch)
    code, err = run_main(["--model", "tiny-random", "--reward", "jpeg_compressibility", f"--{flag}", value, "--out", str(tmp_path)], capsys)
    assert code == 2 and f"--{flag} must be" in err and "Traceback" not in err


def test_prompt_file_errors_name_file_and_line(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a cat\nun café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt:2: not UTF-8 \(byte 0xe9 at column 7\)"):
        fg.load_prompts(str(latin))
    for row, line in (('{"prompt": 5}', 2), ('{"prompt": "  "}', 2), ("[1, 2]", 2), ('{"prompt": null}', 2)):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "fine"}\n' + row + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:{line}:"):
            fg.load_prompts(str(bad))
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa cat\n".encode("utf-8"))
    assert [p.text for p in fg.load_prompts(str(bom))] == ["a cat"]  # the byte-order mark is not part of the prompt
    assert fg.load_prompts(str(bom))[0].source == f"{bom}:1"


def test_cli_bad_prompt_file_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"prompt": 5}\n')
    code, err = run_main(["--model", "tiny-random", "--prompts", str(bad), "--eval_every", "0", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"{bad}:2:" in err


# --- held-out evaluation (issue 8, item 7) ---


@pytest.mark.parametrize("name", list(runfiles.PROMPT_SETS))
def test_shipped_sets_have_disjoint_train_and_test_splits(name):
    train, test = fg.load_prompts(name), fg.load_prompts(name, "test")
    assert len(test) >= 8 and len(train) >= 30
    assert not {p.text for p in train} & {p.text for p in test}
    assert {json.dumps(sorted(p.metadata)) for p in test} <= {json.dumps(sorted(p.metadata)) for p in train}  # same schema
    if name == "ocr":
        assert all(rewards.ocr_target(p.text, {}) == p.metadata["text"] for p in test)
    if name == "geneval":  # every task is evaluated, every object is one the GenEval reward knows
        assert {p.metadata["tag"] for p in test} == {p.metadata["tag"] for p in train}
        assert all(o["class"] in rewards.GENEVAL_CLASSES for p in test for o in p.metadata["include"])


def test_the_references_dataset_folders_load(tmp_path):
    ocr = tmp_path / "dataset" / "ocr"
    ocr.mkdir(parents=True)
    (ocr / "train.txt").write_text('A storefront with a sign reading "Open Late", at night\nA mug printed with "Monday"\n')
    (ocr / "test.txt").write_text('A poster with the words "Spring Collection 2024" on a wall\n')
    geneval = tmp_path / "dataset" / "geneval"
    geneval.mkdir()
    row = {"tag": "counting", "include": [{"class": "wine glass", "count": 2}], "exclude": [{"class": "wine glass", "count": 3}], "prompt": "a photo of two wine glasses"}
    (geneval / "train_metadata.jsonl").write_text(json.dumps(row) + "\n")
    (geneval / "test_metadata.jsonl").write_text(json.dumps({**row, "prompt": "a photo of two cups"}) + "\n")

    assert [p.text for p in fg.load_prompts(str(ocr))] == ['A storefront with a sign reading "Open Late", at night', 'A mug printed with "Monday"']
    [test] = fg.load_prompts(str(ocr), "test")
    assert rewards.ocr_target(test.text, test.metadata) == "Spring Collection 2024" and test.metadata == {}
    [train] = fg.load_prompts(str(geneval))
    assert train.text == "a photo of two wine glasses" and train.metadata == {k: v for k, v in row.items() if k != "prompt"}
    assert [p.text for p in fg.load_prompts(str(geneval), "test")] == ["a photo of two cups"]
    # the command line's default evaluation set is the folder's test split
    cfg = dataclasses.replace(fg.Config(), prompts=str(ocr))
    assert [p.text for p in fg.eval_prompt_set(cfg)] == [test.text]
    with pytest.raises(FileNotFoundError, match="test.txt or test_metadata.jsonl"):
        os.remove(ocr / "test.txt")
        fg.eval_prompt_set(cfg)


def test_default_evaluation_never_uses_training_prompts(tmp_path):
    single = tmp_path / "mine.txt"
    single.write_text("a cat\na dog\n")
    with pytest.raises(ValueError, match="--eval_prompts"):
        fg.eval_prompt_set(fg.Config(prompts=str(single)))  # one file: no held-out split to default to
    assert fg.eval_prompt_set(fg.Config(prompts=str(single), eval_every=0)) == []
    assert [p.text for p in fg.eval_prompt_set(fg.Config(prompts=str(single), eval_prompts=str(single)))] == ["a cat", "a dog"]
    assert fg.eval_prompt_set(fg.Config(prompts="ocr", eval_prompts="general")) == fg.load_prompts("general", "test")

    # and train() evaluates on the prompts it is given, never on its training prompts
    cfg = tiny_cfg(tmp_path, epochs=1, eval_every=1, eval_count=2)
    held_out = [fg.Prompt("a held-out prompt"), fg.Prompt("another one"), fg.Prompt("a third")]
    shown = []
    run(cfg, on_eval=lambda epoch, images, r, ps: shown.append([p.text for p in ps]), eval_prompts=held_out)
    assert len(shown) == 1 and len(shown[0]) == 2 and set(shown[0]) <= {p.text for p in held_out}


@pytest.mark.tesseract  # skipped where the program is missing, unless CI=true (conftest.py)
def test_the_eval_grid_is_legible(tmp_path):
    import pytesseract
    from PIL import Image

    prompts = [fg.Prompt("a windmill beside a tulip field in spring"), fg.Prompt("two cats"), fg.Prompt("a sea otter")]
    path = str(tmp_path / "grid.png")
    fg.save_grid(path, torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)), prompts, torch.tensor([-0.0032123, -0.0032344, -0.0032011]), epoch=7)
    grid = Image.open(path)
    assert grid.width == 4 * 256  # 32 px images are scaled up to 256 px tiles, 4 columns
    # read back by Tesseract, an independent reader (spaces and dash glyphs normalised away)
    read = "".join(pytesseract.image_to_string(grid).lower().split()).replace("—", "-").replace("–", "-")
    # tiny-random's JPEG rewards: a spread of 3.3e-5, two significant digits of it are 6 decimals (reward_decimals;
    # 4 would print -0.0032 on every tile)
    for text in ("epoch7", "windmillbesideatulipfield", "twocats", "aseaotter", "meanreward-0.003216", "reward-0.003212",
                 "reward-0.003234", "reward-0.003201"):
        assert text in read, (text, read)


def test_grid_rewards_show_how_they_differ():
    # two significant digits of the spread (max − min), 2 to 10 decimals; 4 where they do not differ
    assert runfiles.reward_decimals([0.25, -1.5, 2.0]) == 2  # spread 3.5
    assert runfiles.reward_decimals([0.21, 0.243]) == 3  # spread 0.033
    # tiny-random's JPEG rewards (kB/500): 4 decimals print -0.0032 on every tile
    rewards = [-0.0032123, -0.0032344, -0.0032011, -0.0032199]
    assert runfiles.reward_decimals(rewards) == 6
    assert len({f"{r:+.6f}" for r in rewards}) == 4 and len({f"{r:+.4f}" for r in rewards}) == 1
    assert runfiles.reward_decimals([0.5]) == runfiles.reward_decimals([0.5, 0.5]) == 4
    assert runfiles.reward_decimals([0.0, 1e-15]) == 10


def _caption_pixels(tmp_path, text: str, name: str):
    """The caption strip of a one-tile grid whose prompt is `text`, as bytes (the tile itself is the same image)."""
    from PIL import Image

    path = str(tmp_path / f"{name}.png")
    fg.save_grid(path, torch.zeros(1, 3, 32, 32), [fg.Prompt(text)], torch.tensor([0.5]), epoch=0)
    with Image.open(path) as grid:
        return grid.size, grid.crop((0, grid.height - 40, 256, grid.height)).tobytes()


def test_grid_captions_draw_the_letters_of_non_latin_prompts(tmp_path):
    # Pillow's own font has no Cyrillic letters: it drew every one as the same box, so two different words gave the
    # same caption. With a font that has them (DejaVu Sans on most Linux systems) the captions differ.
    words = ("Жук", "Щит")
    font, missing = runfiles.caption_font("".join(words))
    if missing:
        pytest.skip(f"no font with Cyrillic letters on this system (tried Pillow's and {runfiles.CAPTION_FONTS})")
    assert _caption_pixels(tmp_path, words[0], "a") != _caption_pixels(tmp_path, words[1], "b")
    # characters no font has (a private-use code point) are counted on a second title line
    plain_size, _ = _caption_pixels(tmp_path, "Жук", "c")
    boxed_size, _ = _caption_pixels(tmp_path, "Жук \U000f0001", "d")
    assert boxed_size[1] == plain_size[1] + 19  # one line of 19 px
    assert runfiles.caption_font("Жук \U000f0001")[1] == {"\U000f0001"}
