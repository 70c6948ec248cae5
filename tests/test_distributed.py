"""Data parallelism under torchrun: 2 gloo processes on the CPU give the 1-process result."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from contsparse.faults import ENV

ARGS = ["ticket", "--model", "lenet300", "--dataset", "synthetic", "--train-subset", "512", "--batch-size", "64",
        "--epochs", "3", "--rounds", "1", "--rewind-epoch", "1", "--ticket-epochs", "2", "--mask-init", "0.0",
        "--penalty", "1e-6", "--no-dense-baseline", "--device", "cpu"]


def run(out, processes: int, fault: str | None = None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--standalone"] if processes > 1 else [sys.executable])
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env[ENV] = fault
    return subprocess.run([*launcher, "-m", "contsparse", *ARGS, "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)


def assert_close_runs(a, b) -> None:
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert sa["weights_remaining"] == pytest.approx(sb["weights_remaining"], abs=2e-3)
    assert sa["test_accuracy"] == pytest.approx(sb["test_accuracy"], abs=0.01)
    ma, mb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for key in ma:
        torch.testing.assert_close(ma[key], mb[key], rtol=1e-3, atol=1e-3)
    assert len((a / "metrics.jsonl").read_text().splitlines()) == len((b / "metrics.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    done = run(out, 1)
    assert done.returncode == 0, done.stderr
    return out


def test_two_gloo_processes_equal_one_process(single, tmp_path):
    done = run(tmp_path / "ddp", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("weights remaining") == 1  # rank 0 alone reports
    assert_close_runs(single, tmp_path / "ddp")


def test_killed_data_parallel_run_resumes(single, tmp_path):
    out = tmp_path / "ddp"
    killed = run(out, 2, fault="epoch:2")
    assert killed.returncode != 0 and not (out / "summary.json").exists()
    resumed = run(out, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_close_runs(single, out)
