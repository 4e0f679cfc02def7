"""A run that learns nothing says so and stops; SIGTERM/SIGINT stop at a safe point and the run resumes as if
uninterrupted; one history per output folder; disk and folder errors get one-line messages; a stuck torchrun rank
ends the run promptly (issue 21). Runs use the tiny random SD3 pipeline on the CPU; nothing is downloaded."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import flow_grpo as fg
import rewards
import runfiles
from test_sd3 import PROMPTS, make_model, run_main, tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda line: None  # noqa: E731
# a small CLI run: 2 groups of 4 images, 2 batches of 4, one optimiser step per batch, no evaluation
SMALL = ["--model", "tiny-random", "--reward", "jpeg_compressibility", "--group_size", "4", "--groups_per_epoch", "2",
         "--batch_size", "4", "--optimizer_steps_per_epoch", "2", "--eval_every", "0", "--num_steps", "4"]  # fmt: skip


def ours(err: str) -> str:
    """stderr without the blocks logging prints when a library's handler writes to a stream an earlier test's
    capture has closed (an artefact of running main() in the test process, not a line of the run's)."""
    kept, skipping = [], False
    for line in err.splitlines():
        skipping = skipping or line.startswith("--- Logging error ---")
        if not skipping:
            kept.append(line)
        skipping = skipping and not line.startswith("Arguments:")
    return "\n".join(kept)


def small_cfg(path, **kw):
    return tiny_cfg(path, num_steps=4, **kw)  # 3 trained steps of 4: the machine may be shared


def constant_reward(images, texts, meta):
    return torch.zeros(len(texts))


def run(cfg, reward=None, log=QUIET, **kw):
    prompts = [fg.Prompt(p) for p in PROMPTS]
    return fg.train(cfg, make_model(cfg), reward or rewards.build_reward(cfg.reward), prompts, log=log, **kw)


def checkpoint_tensors(path):
    """Every tensor of a checkpoint folder (LoRA and trainer state), and its trainer_state.json without the config."""
    tensors = {f"lora/{k}": v for k, v in load_file(os.path.join(path, "lora", "pytorch_lora_weights.safetensors")).items()}
    tensors.update(load_file(os.path.join(path, "trainer_state.safetensors")))
    meta = json.load(open(os.path.join(path, "trainer_state.json")))
    return tensors, {k: meta[k] for k in ("epoch", "step", "param_groups")}


def assert_same_checkpoint(a, b):
    (ta, ma), (tb, mb) = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ma == mb and sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def metrics(out, drop=("time/",)):
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in m.items() if not k.startswith(drop)} for m in lines]


# --- 1. nothing to learn ---


def test_an_epoch_with_every_advantage_zero_says_so_and_logs_null(tmp_path):
    cfg = small_cfg(tmp_path, epochs=1, max_zero_adv_epochs=0)
    lines = []
    [m] = run(cfg, constant_reward, log=lines.append)
    assert m["step"] == 0 and m["policy/zero_adv_frac"] == 1.0
    assert "no update: every advantage is 0" in lines[-1] and "ratio" not in lines[-1]
    [logged] = metrics(cfg.out)
    for key in ("policy/ratio", "policy/clipfrac", "policy/approx_kl", "policy/kl_ref", "policy/policy_loss", "policy/grad_norm"):
        assert logged[key] is None, key  # nothing was measured: null, not 0.0
    # control: the real reward gives advantages ≠ 0, and then the line shows the measured ratio
    lines = []
    control = small_cfg(tmp_path / "control", epochs=1)
    run(control, log=lines.append)
    assert "| ratio 0.9" in lines[-1] or "| ratio 1.0" in lines[-1]
    assert "no update" not in lines[-1]
    # β = 0 (the tiny-random preset): no KL was computed, so the line says so and metrics.jsonl holds null, not 0
    assert "| kl_ref off (beta 0) |" in lines[-1] and metrics(control.out)[0]["policy/kl_ref"] is None


def test_a_run_with_nothing_to_learn_stops_naming_the_cause(tmp_path, capsys, monkeypatch):
    # jpeg_compressibility replaced by a reward that ignores the image: the start-up check warns, the run stops
    monkeypatch.setitem(rewards.REWARDS, "jpeg_compressibility", lambda device="cpu": constant_reward)
    out = str(tmp_path / "run")
    code = fg.main([*SMALL, "--out", out, "--epochs", "6", "--max_zero_adv_epochs", "2"])
    err = ours(capsys.readouterr().err)
    assert "warning: --reward jpeg_compressibility scores mid-grey images and random noise exactly alike" in err
    assert code == 1 and "epochs 0-1: every advantage was 0 (2 epochs in a row" in err and "Check the reward and the prompts" in err
    assert "Traceback" not in err and [m["epoch"] for m in metrics(out)] == [0, 1]


def test_the_reward_check_warns_only_where_a_constant_means_it_never_varies(tmp_path, capsys, monkeypatch):
    cfg = small_cfg(tmp_path)
    prompts = [fg.Prompt('a sign that says "OPEN"'), fg.Prompt('a mug printed with "Monday"')]
    rewards.check_reward(rewards.build_reward("jpeg_compressibility"), cfg, prompts)  # real, graded: varies
    assert capsys.readouterr().err == ""
    # OCR reads nothing on grey or noise: 0 for both, yet it varies once text is rendered: no warning
    monkeypatch.setitem(rewards.REWARDS, "ocr", lambda device="cpu": constant_reward)
    rewards.check_reward(rewards.build_reward("ocr"), dataclasses.replace(cfg, reward="ocr"), prompts)
    assert capsys.readouterr().err == ""
    # a graded reward (here a weighted sum of two) that scores noise as grey does not read the images
    monkeypatch.setitem(rewards.REWARDS, "pickscore", lambda device="cpu": constant_reward)
    spec = "jpeg_compressibility=0.5,pickscore=0.5"
    monkeypatch.setitem(rewards.REWARDS, "jpeg_compressibility", lambda device="cpu": constant_reward)
    rewards.check_reward(rewards.build_reward(spec), dataclasses.replace(cfg, reward=spec), prompts)
    assert "does not read the images" in capsys.readouterr().err


# --- 2. SIGTERM / SIGINT ---


def cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)  # one thread: the runs compare bit for bit
    return subprocess.Popen([sys.executable, "flow_grpo.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # fmt: skip


def test_sigterm_mid_epoch_stops_saves_and_resumes_as_if_uninterrupted(tmp_path):
    args = [*SMALL, "--epochs", "3", "--save_every", "0"]
    whole = cli([*args, "--out", str(tmp_path / "whole")])
    stopped = cli([*args, "--out", str(tmp_path / "stopped")])
    for line in stopped.stdout:  # the SIGTERM arrives while epoch 1 runs (sampling or training)
        if line.startswith("epoch    0"):
            stopped.send_signal(signal.SIGTERM)
            break
    _, err = stopped.communicate(timeout=600)
    assert stopped.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.count("stopped by SIGTERM") == 1
    saved = os.path.join(str(tmp_path / "stopped"), "checkpoints", "epoch-000001")
    assert f"stopped by SIGTERM in epoch 1: saved {saved}" in err
    command = err.split("continue with: ")[1].strip()
    assert command.startswith("python flow_grpo.py") and command.endswith("--resume")
    resumed = cli(command.split()[2:])  # what the line says, run from the repository root
    assert resumed.wait(timeout=600) == 0 and whole.wait(timeout=600) == 0, resumed.stderr.read()
    assert_same_checkpoint(os.path.join(str(tmp_path / "whole"), "checkpoints", "epoch-000003"),
                           os.path.join(str(tmp_path / "stopped"), "checkpoints", "epoch-000003"))  # fmt: skip
    assert metrics(str(tmp_path / "whole")) == metrics(str(tmp_path / "stopped"))


@pytest.mark.parametrize("where", ["sampling", "training"])
def test_sigint_stops_at_the_next_batch_and_saves_the_last_finished_epoch(tmp_path, capsys, monkeypatch, where):
    """Ctrl-C in epoch 1 (in-process): exit 130, one line, and the checkpoint it saves equals the one an
    uninterrupted run saves after epoch 1, bit for bit: the optimiser steps epoch 1 took before the stop are undone."""
    whole = str(tmp_path / "whole")
    assert fg.main([*SMALL, "--out", whole, "--epochs", "2", "--save_every", "1"]) == 0
    # an epoch: one sample_epoch call; 2 batches x 3 trained steps = 6 train_step calls, one optimiser step per batch.
    # Ctrl-C at epoch 1's sampling, or at its first trained step: then the stop comes at the second batch, after
    # epoch 1's first optimiser step, which the saved checkpoint must not contain
    plan = {"sampling": (fg, "sample_epoch", 2, 2), "training": (fg, "train_step", 7, 9)}
    calls, (module, name, at, stopped_after) = [], plan[where]
    original = getattr(module, name)

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
    capsys.readouterr()
    stopped = str(tmp_path / "stopped")
    code = fg.main([*SMALL, "--out", stopped, "--epochs", "2", "--save_every", "0"])
    err = ours(capsys.readouterr().err)
    assert code == 130 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped by SIGINT"), err
    assert len(calls) == stopped_after  # where it stopped: the next stop point after the signal
    assert f"stopped by SIGINT in epoch 1: saved {os.path.join(stopped, 'checkpoints', 'epoch-000001')}" in err
    assert_same_checkpoint(os.path.join(whole, "checkpoints", "epoch-000001"), os.path.join(stopped, "checkpoints", "epoch-000001"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main() put the handlers back


def test_a_signal_before_training_stops_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    def terminated(device="cpu"):  # SIGTERM while the reward models load (inside the check's `except Exception`)
        os.kill(os.getpid(), signal.SIGTERM)
        return constant_reward

    monkeypatch.setitem(rewards.REWARDS, "jpeg_compressibility", terminated)
    code, err = run_main([*SMALL, "--out", str(tmp_path / "run")], capsys)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM before training began: nothing to save" in err
    assert "Traceback" not in ours(err) and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_resume_command_replaces_any_resume_flag():
    assert runfiles.resume_command(["--lr", "1e-3", "--resume", "runs/x/checkpoints/epoch-000005", "--out", "a b"], 1) == (
        "python flow_grpo.py --lr 1e-3 --out 'a b' --resume")
    assert runfiles.resume_command(["--resume", "--epochs", "3"], 2).startswith("torchrun --nproc_per_node 2 flow_grpo.py --epochs 3")


# --- 3. one history per folder ---


def test_resuming_an_older_checkpoint_moves_the_abandoned_branch_aside(tmp_path):
    cfg = small_cfg(tmp_path, epochs=3, save_every=1)  # keeps epoch-000002 and epoch-000003
    run(cfg)
    root = os.path.join(cfg.out, "checkpoints")
    open(os.path.join(cfg.out, "eval-epoch-000002.png"), "w").write("grid of epoch 2")  # as main's on_eval names it
    open(os.path.join(cfg.out, "eval-epoch-000001.png"), "w").write("grid of epoch 1")
    old = metrics(cfg.out, drop=())
    lines = []
    branch = dataclasses.replace(cfg, resume=os.path.join(root, "epoch-000002"), epochs=4, save_every=0, lr=1e-3)
    run(branch, log=lines.append)
    [moved] = [x for x in lines if "starts a new branch" in x]
    [aside] = [d for d in os.listdir(cfg.out) if d.startswith("abandoned-")]
    assert os.path.join(cfg.out, aside) in moved
    # the abandoned branch, whole and apart: its checkpoint, its metrics line of epoch 2, its grid of epoch 2
    assert os.listdir(os.path.join(cfg.out, aside, "checkpoints")) == ["epoch-000003"]
    assert [json.loads(x) for x in open(os.path.join(cfg.out, aside, "metrics.jsonl"))] == old[2:]
    assert sorted(os.listdir(os.path.join(cfg.out, aside))) == ["checkpoints", "eval-epoch-000002.png", "metrics.jsonl"]
    # this folder holds one history: the branch point and the new branch's checkpoint, metrics of epochs 0-3
    assert runfiles.checkpoint_names(root) == ["epoch-000002", "epoch-000004"]
    assert metrics(cfg.out, drop=())[:2] == old[:2] and [m["epoch"] for m in metrics(cfg.out)] == [0, 1, 2, 3]
    assert os.path.exists(os.path.join(cfg.out, "eval-epoch-000001.png"))
    # a plain resume of the latest starts no branch
    lines = []
    run(dataclasses.replace(cfg, resume="latest", epochs=5, save_every=0), log=lines.append)
    assert not any("branch" in x for x in lines) and len([d for d in os.listdir(cfg.out) if d.startswith("abandoned-")]) == 1


def test_metrics_aside_name_changes_only_the_file_name(tmp_path):
    folder = tmp_path / "logs.jsonl" / "run"  # a folder above whose name holds ".jsonl"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"epoch": 0}\n')
    runfiles.claim_metrics(str(folder / "metrics.jsonl"), None, QUIET)
    [aside] = [f for f in os.listdir(folder)]
    assert aside.startswith("metrics.") and aside.endswith(".jsonl") and aside != "metrics.jsonl"


def test_compile_may_change_on_resume():
    forbidden, allowed = runfiles.compare_to_checkpoint(dataclasses.asdict(fg.Config(compile="on")), fg.Config(compile="off"))
    assert forbidden == [] and allowed == ["--compile 'on' -> 'off'"]


# --- 4. disk and folder errors ---


def test_a_file_as_out_and_an_unwritable_out_get_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    code, err = run_main([*SMALL, "--out", str(a_file)], capsys)
    assert code == 2 and f"--out {a_file} is a file, not a folder" in err and "Traceback" not in err

    def read_only(path, *args, **kwargs):  # what open() raises on a read-only file system (this may run as root)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(runfiles, "open", read_only, raising=False)
    code, err = run_main([*SMALL, "--out", str(tmp_path / "ro")], capsys)
    assert code == 2 and "cannot write there (Read-only file system): choose a writable --out" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_out_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, err = run_main([*SMALL, "--out", str(ro)], capsys)
    assert code == 2 and "cannot write there" in err and "Traceback" not in err


def test_a_full_disk_names_the_folder_the_size_and_the_intact_checkpoint(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    out = str(tmp_path / "run")
    assert fg.main([*SMALL, "--out", out, "--epochs", "1"]) == 0
    capsys.readouterr()
    previous = os.path.join(out, "checkpoints", "epoch-000001")

    def full(*args, **kwargs):  # the error safetensors' writer raises (SafetensorError) when the disk is full
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code = fg.main([*SMALL, "--out", out, "--epochs", "2", "--resume"])
    err = ours(capsys.readouterr().err)
    assert code == 1 and "Traceback" not in err
    assert f"cannot write checkpoint {os.path.join(out, 'checkpoints', 'epoch-000002')} (No space left on device)" in err
    assert "MB, " in err and f"the previous checkpoint {previous} is intact" in err
    assert runfiles.checkpoint_names(os.path.join(out, "checkpoints")) == ["epoch-000001"]
    assert not [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith(".tmp")]  # removed
    runfiles.read_checkpoint(previous)  # whole


def test_a_full_disk_while_logging_gets_one_line(tmp_path, capsys, monkeypatch):
    def full(path, m):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(fg, "append_metrics", full)
    code, err = run_main([*SMALL, "--out", str(tmp_path / "run"), "--epochs", "1"], capsys)
    err = ours(err)
    assert code == 1 and "metrics.jsonl (No space left on device)" in err and "none yet" in err and "Traceback" not in err


# --- 7. numbers that mean nothing ---


@pytest.mark.parametrize(
    "flag, value, rule",
    [("noise_level", "5", "< √2"), ("guidance_scale", "0", ">= 1"), ("seed", "-1", "in [0, 2^32)"),
     ("timestep_fraction", "1.5", "in (0, 1]"), ("max_zero_adv_epochs", "-1", ">= 0")],
)  # fmt: skip
def test_meaningless_numbers_are_refused(tmp_path, capsys, flag, value, rule):
    code, err = run_main([*SMALL, f"--{flag}", value, "--out", str(tmp_path)], capsys)
    assert code == 2 and f"--{flag} must be {rule}" in err


def test_the_sde_noise_limit_is_where_the_first_step_stops_denoising(tmp_path):
    # the first step's mean is x·(1 − a²/2) + v·dt (section 2, σ's 1/(1 − t) taken at t'): 0·x at a = √2
    x, v = torch.ones(1, 4), torch.zeros(1, 4)
    for a, coefficient in ((0.7, 1 - 0.49 / 2), (2**0.5, 0.0)):
        _, _, mean, _ = fg.sde_step(x, v, 1.0, 0.9, a, prev_x=x)
        assert torch.allclose(mean, torch.full_like(x, coefficient), atol=1e-6)
    fg.plan_batches(small_cfg(tmp_path, noise_level=1.4))  # just below: accepted


# --- 2 and 5 under torchrun (2 processes, gloo on the CPU) ---


def test_under_torchrun_a_sigterm_to_one_process_stops_both_at_the_same_batch(tmp_path):
    from test_distributed import torchrun

    result = torchrun(2, "tests/dist_worker.py", "sigterm", str(tmp_path))  # rank 1 alone gets SIGTERM in epoch 1
    saved = os.path.join(str(tmp_path), "run", "checkpoints", "epoch-000001")
    # rank 0 prints the line although the signal reached rank 1 only: they agreed to stop (and saved) together;
    # torchrun's summary, printed last, repeats it as the cause
    ours, summary = result.stderr.split("Root Cause (first observed failure):")
    assert ours.count(f"stopped by SIGTERM in epoch 1: saved {saved}") == 1, result.stderr[-3000:]
    assert f"traceback : stopped by SIGTERM in epoch 1: saved {saved}" in summary
    assert "continue with: torchrun --nproc_per_node 2 flow_grpo.py" in ours
    assert "StopRequested" not in result.stderr  # the only traceback is torchrun's own ChildFailedError
    assert runfiles.read_checkpoint(saved)["epoch"] == 1
    assert [m["epoch"] for m in metrics(os.path.join(str(tmp_path), "run"))] == [0]


def test_a_stopped_rank_ends_the_run_at_once_with_our_message_last(tmp_path):
    from test_distributed import torchrun

    result = torchrun(2, "tests/dist_worker.py", "stop", str(tmp_path))  # rank 1 is SIGSTOPped while sampling
    assert result.returncode != 0
    # torchrun's summary, which it prints last, shows our message as the cause
    summary = result.stderr.rsplit("Root Cause (first observed failure):", 1)[-1]
    assert "another process did not answer for --dist_timeout_s 10 s" in summary, result.stderr[-3000:]
    # and torchrun did not wait its 30 s for the stopped process to obey SIGTERM: rank 0 ended it
    assert "forcefully exiting" not in result.stderr
