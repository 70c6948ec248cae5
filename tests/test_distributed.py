"""Data parallelism under torchrun: 2 gloo processes on the CPU give the 1-process result."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from contsparse.errors import UserError
from contsparse.faults import ENV

ARGS = ["ticket", "--model", "lenet300", "--dataset", "synthetic", "--train-subset", "512", "--batch-size", "64",
        "--epochs", "3", "--rounds", "1", "--rewind-epoch", "1", "--ticket-epochs", "2", "--mask-init", "0.0",
        "--penalty", "1e-6", "--no-dense-baseline", "--device", "cpu"]


def run(out, processes: int, fault: str | None = None, args: list[str] = ARGS,
        signal: str | None = None, path: str | None = None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--standalone"] if processes > 1 else [sys.executable])
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["OMP_NUM_THREADS"] = "1"
    if path:  # a folder of the user's own modules (--imports)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
    if fault:
        env[ENV] = fault
    if signal:
        env[ENV + "_SIGNAL"] = signal
    return subprocess.run([*launcher, "-m", "contsparse", *args, "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)


def assert_close_runs(a, b) -> None:
    """Same masks, weights equal up to float reduction order, and the same number of epochs."""
    masks_a, masks_b = load_file(str(a / "masks.safetensors")), load_file(str(b / "masks.safetensors"))
    assert masks_a.keys() == masks_b.keys()
    for key in masks_a:
        assert torch.equal(masks_a[key], masks_b[key]), key
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert sa["weights_remaining"] == sb["weights_remaining"]
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


def test_a_killed_run_resumes_every_process_with_its_own_random_numbers(tmp_path):
    """Dropout on shards of unequal size (63 = 32 + 31 examples) draws different amounts of
    random numbers in each process, so their generators drift apart: a resumed process must
    continue its own stream, not process 0's, to train as the uninterrupted run did."""
    (tmp_path / "dropout_models.py").write_text(
        "from torch import nn\n"
        "from contsparse.models import register_model\n\n\n"
        "@register_model('dropout-mlp', 'an MLP with dropout')\n"
        "def build(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Dropout(0.5),\n"
        "                         nn.Linear(64, num_classes))\n")
    args = ["ticket", "--imports", "dropout_models", "--model", "dropout-mlp", "--dataset", "synthetic",
            "--train-subset", "378", "--batch-size", "63", "--epochs", "3", "--rounds", "1", "--rewind-epoch", "0",
            "--ticket-epochs", "2", "--no-dense-baseline", "--device", "cpu"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run(whole, 2, args=args, path=str(tmp_path)).returncode == 0
    assert run(resumed, 2, fault="epoch:2", args=args, path=str(tmp_path)).returncode != 0
    done = run(resumed, 2, args=args, path=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ctrl_c_stops_data_parallel_processes_mid_epoch_and_the_run_resumes(tmp_path):
    """Both processes get SIGINT (as torchrun forwards it) 10 steps into an epoch of 60: they stop
    together at the next collective check (step 50), checkpoint the partial epoch, and the resumed
    run ends as an uninterrupted one-process run does."""
    from contsparse.training.loop import CHECK_EVERY

    args = [*ARGS, "--batch-size", "8", "--train-subset", "480", "--epochs", "2", "--ticket-epochs", "1"]
    single = tmp_path / "single"
    assert run(single, 1, args=args).returncode == 0
    out = tmp_path / "ddp"
    stopped = run(out, 2, fault="step:1:10", args=args, signal="INT")
    assert stopped.returncode != 0 and not (out / "summary.json").exists()
    assert f"after step {CHECK_EVERY + 1}; checkpoint saved" in stopped.stdout + stopped.stderr
    resumed = run(out, 2, args=args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_close_runs(single, out)


def test_two_processes_decoding_their_shares_of_image_folder_batches_equal_one_process(tmp_path):
    """ImageNet-style folders under DDP: each process decodes only its share of every batch (and of
    the evaluation batches, whose sums are added over the processes); the run equals one process's."""
    from conftest import write_image_folder

    write_image_folder(tmp_path / "data", per_class=5)  # 9 training images: batches of 4, 4, 1
    args = ["ticket", "--model", "conv2", "--dataset", "imagenet", "--data-dir", str(tmp_path / "data"),
            "--image-size", "32", "--workers", "0", "--batch-size", "4", "--epochs", "2", "--rounds", "1",
            "--rewind-epoch", "1", "--ticket-epochs", "1", "--mask-init", "0.0", "--penalty", "1e-6",
            "--no-dense-baseline", "--device", "cpu"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert run(single, 1, args=args).returncode == 0
    done = run(ddp, 2, args=args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close_runs(single, ddp)
    metrics = [[json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (single, ddp)]
    for a, b in zip(*metrics, strict=True):  # the training and validation figures of every epoch
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def _one_step_epoch(all_sum, poison: bool) -> None:
    """One training step on 4 samples; ``poison`` makes this process's loss NaN."""
    from contsparse.data.splits import BatchIterator, TensorSplit
    from contsparse.training import StepSettings, train_epoch

    model = torch.nn.Linear(3, 2)
    x = torch.full((4, 3), float("nan")) if poison else torch.randn(4, 3)
    batches = BatchIterator(TensorSplit(x, torch.tensor([0, 1, 0, 1])), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch(model, batches, [optimizer], device=torch.device("cpu"),
                speed=StepSettings(shard=(0, 1), all_sum=all_sum))


@pytest.mark.parametrize("this_process_nan", [False, True])
def test_a_nan_loss_in_one_process_stops_every_process(this_process_nan):
    """Each process joins the non-finite check's all-reduce, and each stops when any loss is NaN:
    a process stopping alone would leave the others waiting in the next gradient all-reduce."""
    from contsparse.training import NonFiniteLossError

    calls = []

    def all_sum(values: list[float]) -> list[float]:  # the other process's loss is NaN, or this one's
        calls.append(values)
        return [values[0] + (0.0 if this_process_nan else 1.0), values[1]]

    with pytest.raises(NonFiniteLossError, match="nan at step 0" if this_process_nan else "1 other process"):
        _one_step_epoch(all_sum, poison=this_process_nan)
    assert calls == [[1.0 if this_process_nan else 0.0, 0.0]]  # [non-finite losses, stop requests]


def test_finite_losses_everywhere_train_on():
    calls = []

    def all_sum(values: list[float]) -> list[float]:
        calls.append(values)
        return values

    _one_step_epoch(all_sum, poison=False)
    assert calls[0] == [0.0, 0.0] and len(calls) == 2  # the check, then the epoch's totals


@pytest.mark.parametrize("this_process_asked", [False, True])
def test_a_stop_request_in_any_process_stops_every_process_mid_epoch(this_process_asked):
    """Under DDP the processes stop together at the next collective check, and the stopped epoch's
    totals are summed over them: the first process's checkpoint holds every process's sums."""
    from contsparse.data import BatchIterator, TensorSplit
    from contsparse.training import StepSettings, train_epoch
    from contsparse.training.loop import CHECK_EVERY

    calls, checks = [], []

    def all_sum(values: list[float]) -> list[float]:  # two processes, the other one just like this one
        calls.append(values)
        if len(values) == 2:  # a check: at the second, the other process was asked to stop (or this one)
            checks.append(values)
            other_asked = not this_process_asked and len(checks) == 2
            return [2 * values[0], values[1] + (1.0 if other_asked else 0.0)]
        return [2 * v for v in values]

    steps = CHECK_EVERY + 2
    split = TensorSplit(torch.randn(8 * steps, 4), torch.randint(0, 2, (8 * steps,)))
    model = torch.nn.Linear(4, 2)
    asked = []
    result = train_epoch(model, BatchIterator(split, 8), [torch.optim.SGD(model.parameters(), lr=0.1)],
                         device=torch.device("cpu"), speed=StepSettings(shard=(0, 2), all_sum=all_sum),
                         should_stop=lambda: asked.append(1) or (this_process_asked and len(asked) > 1))
    # asked at the checks only (steps 0 and CHECK_EVERY); stopped at the second one, every
    # process's sums saved: 4 of each 8-example batch here, as many in the other process
    assert len(asked) == 2 and not result.complete and result.steps == CHECK_EVERY + 1
    assert int(result.totals["seen"]) == 2 * 4 * (CHECK_EVERY + 1)
    assert calls[-1][2] == 4 * (CHECK_EVERY + 1)


def test_a_resumed_epochs_sums_are_counted_once_over_the_processes():
    """A run stopped mid-epoch on one process may resume on several: the saved sums enter the
    epoch's totals through the first process only, since the processes' totals are added up."""
    from contsparse.data import BatchIterator, TensorSplit
    from contsparse.training import StepSettings, train_epoch

    split = TensorSplit(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    saved = {"loss": torch.tensor(50.0), "correct": torch.tensor(20), "seen": torch.tensor(32),
             "steps": torch.tensor(2), "regularizer": torch.tensor(0.0)}
    summed = {}
    for rank in (0, 1):
        model = torch.nn.Linear(4, 2)
        speed = StepSettings(shard=(rank, 2), all_sum=lambda values, rank=rank: summed.setdefault(rank, values))
        train_epoch(model, BatchIterator(split, 16), [torch.optim.SGD(model.parameters(), lr=0.1)],
                    device=torch.device("cpu"), resume=saved, speed=speed)
    # batches 2 and 3 of 16 examples, 8 per process, plus the 32 saved examples on process 0 only
    assert summed[0][2] == 32 + 16 and summed[1][2] == 16


def test_a_gpu_index_under_torchrun_is_refused_before_any_process_group(monkeypatch):
    from contsparse.errors import UserError
    from contsparse.experiments.distributed import from_environment

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match="give --device cuda"):
        from_environment("cuda:0")


@pytest.mark.parametrize("case", ["foreign folder", "name too long", "no tensorboard"])
def test_a_refusal_only_the_first_process_makes_stops_every_process_with_its_reason(case, tmp_path):
    """Rank 0 alone looks at the run folder and checks for TensorBoard (it writes the logs): the
    other process learns its refusal instead of failing in the next collective with a connection
    error."""
    args, out, message = ARGS, tmp_path / "photos", "is not a contsparse run directory"
    if case == "foreign folder":
        out.mkdir()
        (out / "beach.jpg").write_bytes(b"\xff\xd8")
    elif case == "name too long":
        out, message = tmp_path / ("a" * 300), "File name too long"
    else:
        if importlib.util.find_spec("tensorboard") is not None:
            pytest.skip("tensorboard is installed")
        args, message = [*ARGS, "--tensorboard"], "tensorboard"
    done = run(out, 2, args=args)
    assert done.returncode != 0
    assert done.stderr.count("contsparse: error: ") == 2 and message in done.stderr, done.stderr
    assert "Connection closed" not in done.stderr and "[rank1]: Traceback" not in done.stderr


def test_processes_given_different_settings_are_refused(tmp_path):
    from contsparse.experiments import Runner, make_config
    from contsparse.experiments.distributed import Distributed

    class OtherRankDiffers(Distributed):
        def gather(self, value):
            version, _, out, force, settings = value
            other = make_config({**settings, "lr": 0.01})
            return [value, (version, other.identity(), out, force, other.to_dict())]

    class OtherRankWritesElsewhere(Distributed):
        def gather(self, value):
            return [value, (value[0], value[1], "/elsewhere", *value[3:])]

    runner = Runner(make_config({"dataset": "synthetic"}), tmp_path / "run")
    runner.dist = OtherRankDiffers(rank=0, world_size=2)
    with pytest.raises(UserError, match=r"different settings \(rank 0 vs rank 1: lr: 0.0012 vs 0.01\)"):
        runner._check_processes_agree()
    runner.dist = OtherRankWritesElsewhere(rank=0, world_size=2)
    with pytest.raises(UserError, match=f"--out {tmp_path / 'run'} vs /elsewhere"):
        runner._check_processes_agree()
    runner.dist = Distributed(rank=0, world_size=1)
    runner._check_processes_agree()  # one process: nothing to compare
