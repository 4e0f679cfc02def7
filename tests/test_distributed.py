"""Many processes: torchrun + gloo on the CPU, 2 processes against 1.

With the same seed and global batch, a 2-process run must compute the same advantages and end with the same
weights as a 1-process run (the two differ only in the order floating-point gradients are summed); only rank 0
writes files; a failing rank stops the whole run with its error instead of leaving the others waiting."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds: a hang fails the test instead of stalling the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def run_worker(tmp_path, mode: str, nproc: int):
    out = tmp_path / f"{mode}-{nproc}"
    out.mkdir()
    result = torchrun(nproc, "tests/dist_worker.py", mode, str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, [load_file(out / f"rank{r}-of-{nproc}.safetensors") for r in range(nproc)]


@pytest.mark.parametrize("mode", ["toy", "tiny"])
def test_two_processes_match_one(tmp_path, mode):
    _, (single,) = run_worker(tmp_path, mode, 1)
    out2, ranks = run_worker(tmp_path, mode, 2)

    # advantages: every rank holds its own samples' advantages, computed over all of each group's samples
    ids = torch.cat([r["sample_ids"] for r in ranks])
    assert sorted(ids.tolist()) == list(range(len(single["sample_ids"])))  # the ranks split the epoch's samples
    adv_single = torch.empty_like(single["advantages"])
    adv_single[single["sample_ids"]] = single["advantages"]
    for r in ranks:
        torch.testing.assert_close(r["advantages"], adv_single[r["sample_ids"]], atol=1e-6, rtol=0)
        torch.testing.assert_close(r["rewards"], single["rewards"], atol=0, rtol=0)  # gathered: all N on every rank
    # weights: identical on both ranks (DDP), equal to the single-process run up to summation order
    weights = [k for k in single if k.startswith("p")]
    changed = 0.0
    for k in weights:
        assert torch.equal(ranks[0][k], ranks[1][k])
        torch.testing.assert_close(ranks[0][k], single[k], atol=2e-5, rtol=1e-4)
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
    common = ["flow_grpo.py", "--model", "tiny-random", "--reward", "jpeg_compressibility", "--out", str(out),
              "--group_size", "4", "--groups_per_epoch", "4", "--batch_size", "4", "--eval_every", "0", "--save_every", "1"]  # fmt: skip
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
