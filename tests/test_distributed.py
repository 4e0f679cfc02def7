"""Many processes: torchrun + gloo on the CPU, 2 processes against 1.

With the same seed and global batch, a 2-process run must compute the same advantages and end with the same
weights as a 1-process run; only rank 0 writes files; a failing rank stops the whole run with its error, and a
rank that stops answering ends it after --dist_timeout_s instead of leaving the others waiting.
Every torchrun here forces the CPU and gloo (dist_worker.py passes cpu=True, the command line --cpu), also on a
machine with GPUs: one GPU would otherwise refuse 2 processes (test_more_processes_than_gpus_*)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import flow_grpo as fg
import runfiles  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds: a hang fails the test instead of stalling the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args]
    # the parent's environment (a package may be importable only through PYTHONPATH), the repository in front
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def run_worker(tmp_path, mode: str, nproc: int):
    out = tmp_path / f"{mode}-{nproc}"
    out.mkdir()
    result = torchrun(nproc, "tests/dist_worker.py", mode, str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, [load_file(out / f"rank{r}-of-{nproc}.safetensors") for r in range(nproc)]


@pytest.mark.parametrize("mode", ["toy", "fast", "tiny"])
def test_two_processes_match_one(tmp_path, mode):
    _, (single,) = run_worker(tmp_path, mode, 1)
    out2, ranks = run_worker(tmp_path, mode, 2)

    # advantages: every rank holds its own samples' advantages, computed over all of each group's samples
    ids = torch.cat([r["sample_ids"] for r in ranks])
    assert sorted(ids.tolist()) == list(range(len(single["sample_ids"])))  # the ranks split the epoch's samples
    adv_single = torch.empty_like(single["advantages"])
    adv_single[single["sample_ids"]] = single["advantages"]
    for r in ranks:
        # exact: the same gathered rewards go through the same group_advantages on every process
        assert torch.equal(r["rewards"], single["rewards"])  # gathered: all N on every rank
        assert torch.equal(r["advantages"], adv_single[r["sample_ids"]])
    # the steps each batch trains (Fast: its window, drawn from the batch's own seed) do not depend on who samples it
    windows = {m: w for r in ranks for m, w in zip(r["batches"].tolist(), r["windows"].tolist())}
    assert windows == dict(zip(single["batches"].tolist(), single["windows"].tolist()))
    assert mode != "fast" or len({tuple(w) for w in windows.values()}) > 1  # and batches drew different windows
    # weights: identical on both ranks (DDP), and BIT FOR BIT equal to the single-process run. Why exact and not
    # "close": dist_worker trains one denoising step per trajectory with one batch per process per optimiser step,
    # so each process does a single backward per step. Alone: grad = fl(c₀g₀ + c₁g₁) (c_m: train_epoch's loss
    # scale); two processes: DDP's all-reduce gives fl(2c₀g₀ + 2c₁g₁)·½ on both, which is the same number
    # (doubling and halving are exact in binary floating point, a + b = b + a), and every batch's g is computed by
    # the same kernels on the same rows. With several backwards per process the two runs sum in different orders;
    # AdamW divides each gradient by its own running magnitude, so a rounding error of a component whose terms
    # nearly cancel moves that weight by up to ~lr per step: no tolerance would then be both machine-independent
    # and small enough to catch a real bug (another machine saw 4.65e-5 with lr 3e-2 where 2e-5 was allowed).
    weights = [k for k in single if k.startswith("p")]
    assert any(not torch.equal(single[k], single["init" + k[1:]]) for k in weights)  # training moved the weights
    for k in weights:
        assert torch.equal(ranks[0][k], ranks[1][k])
        assert torch.equal(ranks[0][k], single[k])
    # only rank 0 wrote: its run folder has one metrics line per epoch, rank 1's folder was never created
    lines = (out2 / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(len(lines))) and lines
    assert not (out2 / "run-rank1").exists()


def test_a_failing_rank_stops_the_whole_run(tmp_path):
    out = tmp_path / "fail"
    out.mkdir()
    result = torchrun(2, "tests/dist_worker.py", "fail", str(out))  # raises TimeoutExpired if it hangs
    assert result.returncode != 0
    assert "RewardError" in result.stderr and "NaN" in result.stderr


def test_cli_under_torchrun_trains_resumes_and_writes_once(tmp_path):
    out = tmp_path / "cli"
    common = ["flow_grpo.py", "--model", "tiny-random", "--reward", "jpeg_compressibility", "--out", str(out), "--cpu",
              "--group_size", "4", "--groups_per_epoch", "4", "--batch_size", "4", "--optimizer_steps_per_epoch", "2",
              "--eval_every", "0", "--save_every", "1"]  # fmt: skip
    first = torchrun(2, *common, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("batch plan:") == 1 and "(2 per process x 2)" in first.stdout  # rank 0 prints alone
    second = torchrun(2, *common, "--epochs", "2", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1] and lines[1]["step"] == 4
    bad = torchrun(2, *common, "--epochs", "1", "--groups_per_epoch", "1", "--optimizer_steps_per_epoch", "1")
    # torchrun reports a failed worker as exit 1; the worker's own message says what to change
    assert bad.returncode != 0 and "2 processes cannot share an optimiser step" in bad.stderr


def test_a_rank_that_stops_answering_ends_the_run(tmp_path):
    # rank 1's reward never returns; rank 0 waits in the reward all-gather for --dist_timeout_s 10 (dist_worker)
    out = tmp_path / "hang"
    out.mkdir()
    start = time.time()
    result = torchrun(2, "tests/dist_worker.py", "hang", str(out))  # raises TimeoutExpired if it hangs
    assert result.returncode != 0
    assert "another process did not answer for --dist_timeout_s 10 s" in result.stderr, result.stderr[-3000:]
    assert time.time() - start < TIMEOUT  # not gloo's default 30 minutes


def test_more_processes_than_gpus_is_refused_at_start_up(monkeypatch, capsys):
    # what torchrun --nproc_per_node 2 sets up on a machine with one GPU (faked here: this runs on CPU-only machines
    # too; test_gpu.py starts the real thing where GPUs exist)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", RANK="1", LOCAL_RANK="1").items():
        monkeypatch.setenv(k, v)
    message = r"torchrun started 2 processes on this machine but it has 1 visible GPU\(s\): run torchrun --nproc_per_node 1"
    with pytest.raises(ValueError, match=message + ".* or add --cpu"):
        runfiles.init_distributed()
    assert fg.main(["--model", "tiny-random"]) == 2  # the command line says so before loading anything
    assert "--nproc_per_node 1" in capsys.readouterr().err
