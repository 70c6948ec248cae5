"""``contsparse sweep``: the grid, skipping and resuming, failure isolation, threads, Ray, reports."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contsparse.cli import main
from contsparse.errors import UserError
from contsparse.experiments import make_config
from contsparse.experiments.executors import LocalPool, PointJob, RayExecutor, ray_slots, unpack_files
from contsparse.experiments.sweep import (
    PointResult,
    SweepDisplay,
    SweepPlan,
    default_grid,
    load_plan,
    pareto_front,
    parse_assignments,
    parse_point,
    run_sweep,
)

TINY = {"dataset": "synthetic", "synthetic_size": 256, "epochs": 2, "rewind_epoch": 1, "ticket_epochs": 1}
TINY_FLAGS = ["--dataset", "synthetic", "--synthetic-size", "256", "--epochs", "2", "--rewind-epoch", "1",
              "--ticket-epochs", "1"]


class Recorder(SweepDisplay):
    def __init__(self) -> None:
        self.skipped, self.ended, self.progress = None, [], {}

    def start(self, points, finished):
        self.skipped = finished

    def running(self, point, epochs_done):
        self.progress[point.name] = (epochs_done, point.total_epochs())

    def finished(self, point, result):
        self.ended.append((point.name, result.status))


def test_plan_expands_grid_points_seeds_and_dense_reference():
    base = make_config(TINY)
    plan = SweepPlan(base, {"mask_init": ["-0.02", "-0.05"], "penalty": ["1e-9", "1e-8"]}, seeds=2)
    points = plan.expand()
    names = [p.name for p in points]
    assert names[:2] == ["dense_seed=0", "dense_seed=1"]
    assert len(points) == 2 + 2 * 2 * 2
    assert "mask_init=-0.05_penalty=1e-08_seed=1" in names
    point = next(p for p in points if p.name == "mask_init=-0.05_penalty=1e-08_seed=1")
    close = SweepPlan(base, {"lr": ["0.00123456", "0.001234564"]}, dense_reference=False).expand()
    assert len({p.name for p in close}) == 2  # names keep every digit that matters
    assert (point.config.mask_init, point.config.penalty, point.config.seed) == (-0.05, 1e-8, 1)
    assert not point.config.dense_baseline  # the dense reference is a point of its own
    assert points[0].config.command == "train" and points[0].total_epochs() == base.phase_epochs
    assert point.total_epochs() == base.rounds * base.epochs + base.phase_epochs
    # a pruning sweep's dense reference trains as long as its points do in all (found by a review);
    # a plan saved before that keeps its reference as it was trained, --ticket-epochs long
    prune_plan = SweepPlan(make_config({**TINY, "command": "prune"}), {"mask_init": ["0.1"]})
    pruning = prune_plan.expand()
    assert pruning[0].config.epochs == pruning[1].total_epochs() == TINY["epochs"] + TINY["ticket_epochs"]
    saved = prune_plan.to_dict()
    assert SweepPlan.from_dict(saved).expand()[0].config.epochs == pruning[0].config.epochs
    del saved["dense_reference_budget"]
    assert SweepPlan.from_dict(saved).expand()[0].config.epochs == TINY["ticket_epochs"]
    # the same values in another order are one point
    with pytest.raises(UserError, match=r"lists the point penalty=1e-08_mask_init=0\.1_seed=0 twice"):
        SweepPlan(base, points=[{"mask_init": 0.1, "penalty": 1e-8}, {"penalty": 1e-8, "mask_init": 0.1}],
                  dense_reference=False).expand()

    default = SweepPlan(base, default_grid(base), dense_reference=False).expand()
    assert [p.values["mask_init"] for p in default] == [-0.02, -0.03, -0.05, -0.08]
    assert default_grid(make_config({**TINY, "method": "imp"})) == {}  # s0 means nothing to IMP
    assert default_grid(make_config({**TINY, "command": "train"})) == {}
    seeded = SweepPlan(make_config({**TINY, "seed": 7}), seeds=2, dense_reference=False).expand()
    assert [p.name for p in seeded] == ["seed=7", "seed=8"]  # seeds count from --seed
    listed = SweepPlan(base, points=[{"mask_init": "-0.1", "seed": "3"}, {"penalty": "1e-7"}],
                       dense_reference=False).expand()
    assert [p.name for p in listed] == ["mask_init=-0.1_seed=3", "penalty=1e-07"]


@pytest.mark.parametrize("plan, message", [
    (SweepPlan(make_config({}), {"mask_inti": ["1"]}), "cannot sweep over mask_inti"),
    (SweepPlan(make_config({}), {"penalty": ["-1"]}), "penalty must be >= 0"),
    (SweepPlan(make_config({}), points=[{"seed": "1"}, {"seed": "1"}]), "twice"),
    (SweepPlan(make_config({}), {"seed": ["0", "1"]}, seeds=2), "seeds are given twice: by --seeds and in --grid"),
    (SweepPlan(make_config({}), {"mask_init": ["-0.05"]}, points=[{"mask_init": "-0.02"}]),
     "mask_init is given both by --point and by --grid"),
    (SweepPlan(make_config({}), {"seed": ["a"]}), "seed 'a' is not an integer"),
    (SweepPlan(make_config({}), points=[{"seed": "1.5"}]), "seed '1.5' is not an integer"),
    (SweepPlan(make_config({}), {"seed": ["01", "1"]}), "twice"),  # one seed, however it is spelled
    (SweepPlan(make_config({}), {"mask_include": ["x" * 300]}), "names a folder of"),
])
def test_bad_plans_fail_before_running(plan, message):
    with pytest.raises(UserError, match=message):
        plan.expand()


def test_parsing_grid_and_point_flags():
    assert parse_assignments(["mask-init=-0.02, -0.05", "seed=0,1"], "--grid") == {
        "mask_init": ["-0.02", "-0.05"], "seed": ["0", "1"]}
    assert parse_point("mask_init=-0.05,penalty=1e-8") == {"mask_init": "-0.05", "penalty": "1e-8"}
    for bad in (["mask_init"], ["=1"], ["mask_init=1,,2"], ["seed=1", "seed=2"]):
        with pytest.raises(UserError):
            parse_assignments(bad, "--grid")
    with pytest.raises(UserError):
        parse_point("mask_init")


def test_pareto_front_keeps_only_undominated_finished_points():
    def point(name, kept, accuracy, status="done", command="ticket"):
        return PointResult(name, {}, command, status, "", kept, accuracy)
    results = [point("a", 0.01, 0.90), point("b", 0.02, 0.95), point("c", 0.03, 0.94), point("d", 0.05, 0.97),
               point("e", 0.005, 0.99, status="failed"), point("dense", 1.0, 0.99, command="train"),
               point("f", 0.02, 0.93)]
    assert [r.name for r in pareto_front(results)] == ["a", "b", "d"]
    tied = [point("a", 0.01, 0.90), point("b", 0.01, 0.90)]  # neither beats the other: both are on it
    assert [r.name for r in pareto_front(tied)] == ["a", "b"]


def test_pareto_front_is_chosen_on_validation_accuracy_not_on_test_accuracy():
    def point(name, kept, val, test):
        return PointResult(name, {}, "ticket", "done", "", kept, test, val_accuracy=val)
    # b is better than a on test only, c is better than b on validation only
    results = [point("a", 0.01, 0.96, 0.95), point("b", 0.02, 0.95, 0.97), point("c", 0.03, 0.97, 0.96)]
    assert [r.name for r in pareto_front(results)] == ["a", "c"]
    # a run saved without validation accuracy is chosen on its test accuracy
    assert [r.name for r in pareto_front([*results, point("d", 0.005, None, 0.99)])] == ["d"]


def test_local_sweep_runs_skips_finished_points_and_records_threads(tmp_path):
    plan = SweepPlan(make_config(TINY), {"mask_init": ["-0.02", "0.05"]})
    first = Recorder()
    results = run_sweep(plan, tmp_path, LocalPool(workers=2, threads=1), first)
    assert [r.status for r in results] == ["done"] * 3
    assert [r.threads for r in results] == [1, 1, 1]  # 2 workers x 1 thread on these cores
    assert all(r.finished_after_s is not None for r in results)
    assert results[1].weights_remaining < 0.01 < results[2].weights_remaining  # s0 decides the sparsity
    assert first.skipped == 0 and sorted(first.ended) == sorted((r.name, "done") for r in results)
    assert load_plan(tmp_path).grid == plan.grid
    summaries = {p: (tmp_path / p / "summary.json").stat().st_mtime_ns for p in (r.name for r in results)}
    from contsparse.reports.sweep import write_sweep

    write_sweep(results, tmp_path, "t")  # as `contsparse sweep` does after each invocation

    again = Recorder()
    rerun = run_sweep(plan, tmp_path, LocalPool(workers=2), again)
    assert again.skipped == 3 and again.ended == []
    assert [r.threads for r in rerun] == [1, 1, 1]  # what they ran with, from the last sweep.json
    assert [r.test_accuracy for r in rerun] == [r.test_accuracy for r in results]
    assert all(r.val_accuracy is not None for r in results + rerun)  # what the front is chosen on
    assert all(r.finished_after_s is None for r in rerun)  # read from disk, not run again
    assert summaries == {p: (tmp_path / p / "summary.json").stat().st_mtime_ns for p in summaries}

    threads = run_sweep(SweepPlan(make_config(TINY), {"seed": ["5"]}, dense_reference=False), tmp_path / "t",
                        LocalPool(workers=1, threads=2))
    assert threads[0].threads == 2
    # the grid's settings in another order are the same points: nothing runs again, no folder is added
    two = SweepPlan(make_config(TINY), {"mask_init": ["0.05"], "penalty": ["1e-8"]}, dense_reference=False)
    run_sweep(two, tmp_path / "two", LocalPool(workers=1))
    swapped = Recorder()
    again = run_sweep(SweepPlan(make_config(TINY), {"penalty": ["1e-8"], "mask_init": ["0.05", "0.5"]},
                                dense_reference=False), tmp_path / "two", LocalPool(workers=1), swapped)
    assert swapped.skipped == 1 and [name for name, _ in swapped.ended] == ["penalty=1e-08_mask_init=0.5_seed=0"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_dir() and p.name != "logs") == [
        "mask_init=0.05_penalty=1e-08_seed=0", "penalty=1e-08_mask_init=0.5_seed=0"]
    assert [r.status for r in again] == ["done", "done"]

    # The same points with other settings in the same directory are not taken for finished ones: the
    # sweep is refused before it writes anything (its plan, results and runs stay as they were).
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(UserError, match=r"holds a sweep with other shared settings \(lr 0.0012 -> 0.002\)"):
        run_sweep(SweepPlan(make_config({**TINY, "lr": 0.002}), {"mask_init": ["-0.02", "0.05"]}), tmp_path,
                  LocalPool(workers=2))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_failing_point_is_reported_and_the_others_finish(tmp_path, capsys):
    # lr 1e6 with SGD makes the loss NaN: that point stops with its message, the other one finishes.
    code = main(["sweep", *TINY_FLAGS, "--optimizer", "sgd", "--grid", "lr=0.001,1e6", "--no-dense-reference",
                 "--workers", "2", "--out", str(tmp_path)])
    assert code == 1
    captured = capsys.readouterr()
    assert "lr=1000000.0_seed=0" in captured.err and "training diverged" in captured.err
    # advice that keeps the point's folder true to its name (a `resume --lr ... --force` would not)
    assert "Give this point a lower lr in the sweep (lr=100000" in captured.err and "resume" not in captured.err
    table = (tmp_path / "sweep.md").read_text()
    assert "| lr=0.001_seed=0 |" in table and "| failed |" in table and "| done |" in table
    rows = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert {r["point"]: r["status"] for r in rows} == {"lr=0.001_seed=0": "done", "lr=1000000.0_seed=0": "failed"}
    # `report` writes the tables again from the run directories: the failure and its message stay
    assert main(["report", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["points"]
    failed = next(r for r in rows if r["point"] == "lr=1000000.0_seed=0")
    assert failed["status"] == "failed" and "training diverged" in failed["message"]
    assert "| failed |" in (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "logs" / "lr=1000000.0_seed=0.log").is_file()


def test_a_crashed_worker_does_not_stop_the_sweep_and_its_point_resumes(tmp_path):
    plan = SweepPlan(make_config({**TINY, "epochs": 3}), {"seed": ["0", "1"]}, dense_reference=False)
    os.environ["CONTSPARSE_FAULT"] = "epoch:2"  # every worker is SIGKILLed after its 2nd epoch
    try:
        crashed = run_sweep(plan, tmp_path, LocalPool(workers=2, threads=1))
    finally:
        del os.environ["CONTSPARSE_FAULT"]
    assert [r.status for r in crashed] == ["failed", "failed"]
    assert all("killed by signal 9" in r.message for r in crashed)
    resumed = run_sweep(plan, tmp_path, LocalPool(workers=2, threads=1))
    assert [r.status for r in resumed] == ["done", "done"]
    assert "resuming" in (tmp_path / "logs" / "seed=0.log").read_text()
    metrics = (tmp_path / "seed=0" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3 * 2 + 1  # no epoch trained twice


def test_ctrl_c_stops_the_sweep_and_the_same_command_continues(tmp_path):
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "contsparse", "sweep", "--dataset", "synthetic", "--synthetic-size", "16384",
            "--epochs", "4", "--rewind-epoch", "1", "--ticket-epochs", "2", "--grid", "seed=0,1",
            "--no-dense-reference", "--workers", "2", "--out", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "seed=1" / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "seed=1" / "metrics.jsonl").is_file(), "no point trained an epoch in 120 s"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Run the same command again" in err
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in (out / "logs" / "seed=1.log").read_text()
    rows = json.loads((out / "sweep.json").read_text())["points"]
    assert [r["status"] for r in rows] == ["done", "done"]


def test_report_regenerates_a_sweep_and_combines_directories(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    run_sweep(SweepPlan(make_config(TINY), {"mask_init": ["-0.02", "0.05"]}), sweep, LocalPool(workers=2))
    for name in ("sweep.md", "sweep.csv", "sweep.json", "sweep.png"):
        (sweep / name).unlink(missing_ok=True)
    assert main(["report", str(sweep)]) == 0
    assert all((sweep / name).is_file() for name in ("sweep.md", "sweep.csv", "sweep.json", "sweep.png"))
    assert "Pareto front" in capsys.readouterr().out
    single = tmp_path / "single"
    assert main(["ticket", *TINY_FLAGS, "--out", str(single)]) == 0  # with its dense baseline
    capsys.readouterr()
    assert main(["report", str(sweep), str(single), "--out", str(tmp_path / "both")]) == 0
    report = (tmp_path / "both" / "report.md").read_text()
    assert "## sweep" in report and "## single" in report
    dense = json.loads((single / "summary.json").read_text())["dense_test_accuracy"]
    single_part = report.split("## single")[1]  # the run's own dense baseline is its reference
    assert f"Dense reference: {100 * dense:.2f} % (1 run(s))" in single_part and "points vs dense" in single_part
    assert (tmp_path / "both" / "accuracy_vs_weights.png").stat().st_size > 1000
    (tmp_path / "nothing").mkdir()
    assert main(["report", str(sweep), str(tmp_path / "nothing")]) == 2
    assert "is not a run, sweep or comparison directory" in capsys.readouterr().err
    assert main(["report", str(single), str(single), "--out", str(tmp_path / "once")]) == 0  # one run, once
    assert (tmp_path / "once" / "per_layer.png").is_file() and not (tmp_path / "once" / "report.md").exists()
    capsys.readouterr()
    assert main(["report", str(sweep), "--out", str(single)]) == 2  # a run's folder is not the report's
    assert "is a run directory: give the report a folder of its own" in capsys.readouterr().err
    assert main(["report", str(sweep), "--out", str(sweep)]) == 0  # its own tables, written again
    other = tmp_path / "other-sweep"
    run_sweep(SweepPlan(make_config(TINY), {"mask_init": ["0.1"]}), other, LocalPool(workers=1))
    assert main(["report", str(other)]) == 0
    tables = {name: (other / name).read_bytes() for name in ("sweep.md", "sweep.json", "sweep.png")}
    capsys.readouterr()
    for argv in (["report", str(sweep), "--out", str(other)], ["report", str(single), "--out", str(other)],
                 ["report", str(sweep), str(single), "--out", str(other)]):
        assert main(argv) == 2, argv  # another sweep's tables (a failed point's reason lives only there)
        assert f"--out {other} is a sweep folder: give the report a folder of its own" in capsys.readouterr().err
    assert tables == {name: (other / name).read_bytes() for name in tables}
    assert main(["report", str(sweep), "--out", str(single / "checkpoints")]) == 2  # inside a run: its files
    assert "would overwrite one of the files of the run" in capsys.readouterr().err
    assert main(["report", str(single), str(sweep), "--out", str(other / "mine")]) == 2
    assert (f"--out {other / 'mine'} is inside the sweep {other}, whose folders are its runs: give the report a "
            f"folder outside it, or {other / 'report'}") in capsys.readouterr().err
    assert main(["report", str(single), str(sweep), "--out", str(other / "report")]) == 0
    (tmp_path / "a-file").write_text("notes")
    assert main(["report", str(sweep), "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert main(["info", str(sweep)]) == 2
    assert "it is a sweep, whose runs are its subfolders" in capsys.readouterr().err
    assert main(["resume", str(sweep)]) == 2
    assert "the same contsparse sweep command, run again, continues it" in capsys.readouterr().err


def test_base_flags_reach_the_points(tmp_path, capsys):
    # --mask-init given: no default s0 grid over it; --seed: where the seeds start.
    assert main(["sweep", *TINY_FLAGS, "--mask-init", "0.05", "--seed", "3", "--no-dense-reference",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert [r["point"] for r in rows] == ["seed=3"]
    saved = (tmp_path / "seed=3" / "config.yaml").read_text()
    assert "mask_init: 0.05" in saved and "seed: 3" in saved


def test_the_target_sparsity_of_a_baseline_is_swept(tmp_path, capsys):
    """--sparsity, which magnitude pruning needs, may come from the grid alone."""
    assert main(["sweep", *TINY_FLAGS, "--run", "prune", "--method", "magnitude", "--grid", "sparsity=0.5,0.9",
                 "--no-dense-reference", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert sorted(round(r["weights_remaining"], 3) for r in rows) == [0.1, 0.5]
    assert main(["report", str(tmp_path)]) == 0  # the saved plan reads back
    assert main(["sweep", *TINY_FLAGS, "--run", "prune", "--method", "magnitude", "--no-dense-reference",
                 "--out", str(tmp_path / "none")]) == 2  # no point gives it: refused before anything runs
    assert "give --sparsity" in capsys.readouterr().err
    assert main(["compare", "--dataset", "synthetic", "--out", str(tmp_path)]) == 2  # a sweep is no comparison
    assert "is a sweep folder; give a new folder for the comparison" in capsys.readouterr().err


def test_a_sweep_started_by_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    for world in ("2", "x"):  # a malformed WORLD_SIZE is no traceback either
        monkeypatch.setenv("WORLD_SIZE", world)
        assert main(["sweep", *TINY_FLAGS, "--out", str(tmp_path / "s")]) == 2
        assert "start it without torchrun" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_a_bad_shared_setting_fails_before_any_point_runs_even_if_only_the_dense_reference_has_it(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("ticket_epochs: 0\n")  # every point's grid value replaces it, not dense's
    flags = ["--dataset", "synthetic", "--synthetic-size", "256", "--epochs", "2", "--rewind-epoch", "1"]
    assert main(["sweep", *flags, "--config", str(tmp_path / "bad.yaml"), "--grid", "ticket_epochs=1",
                 "--out", str(tmp_path / "s")]) == 2
    assert "epochs must be in [1, 100000], got 0" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_a_sweep_of_ones_own_model_from_a_config_file(tmp_path, capsys, monkeypatch):
    """The modules a user's own --config names are theirs to import (only a sweep folder's saved
    plan must not import others)."""
    (tmp_path / "sweep_cfg_models.py").write_text(
        "from torch import nn\nfrom contsparse.models import register_model\n\n\n"
        "@register_model('sweep-cfg-mlp', 'an MLP of the user')\n"
        "def build(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.ReLU(), nn.Linear(16, num_classes))\n")
    (tmp_path / "cfg.yaml").write_text("imports: [sweep_cfg_models]\nmodel: sweep-cfg-mlp\n")
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "--run", "train", "--config", "cfg.yaml", "--dataset", "synthetic", "--synthetic-size", "256",
            "--epochs", "1", "--workers", "1", "--out", "s"]
    assert main(argv) == 0
    assert main(argv) == 0  # run again into its folder: its plan imports what the same command names


def test_sweep_flag_mistakes_are_one_line_errors(tmp_path, capsys):
    for argv, message in ((["--grid", "mask_init"], "expected KEY=VALUE"),
                          (["--grid", "epochz=1"], "cannot sweep over epochz"),
                          (["--workers", "0"], "--workers must be >= 1"),
                          (["--threads", "0"], "--threads must be in [1, 1024]"),
                          (["--threads", "99999999999"], "--threads must be in [1, 1024]"),
                          (["--lr", "-1"], "learning rates must be > 0"),  # shared settings: checked with each point
                          (["--seeds", "0"], "--seeds must be >= 1"),
                          (["--run", "prune", "--grid", "command=train"], "command is given twice: by --run and")):
        assert main(["sweep", *TINY_FLAGS, *argv, "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# -- Ray ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A Ray head on loopback, started for these tests and stopped after them: ``ray start
    --block`` in the foreground, whose SIGTERM stops the processes it started (``ray stop`` would
    stop every Ray on the machine, a user's too). Token authentication is off for the head and the
    drivers of these tests: otherwise a new local Ray (``ray.init(address="local")``) writes
    ~/.ray/auth_token, and every later head started on this machine requires a token that these
    drivers do not send."""
    pytest.importorskip("ray")
    ray_cli = Path(sys.executable).parent / "ray"
    port = _free_port()
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log, "w") as output:
        head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address",
                                 "127.0.0.1", "--port", str(port), "--include-dashboard", "false",
                                 "--disable-usage-stats"], stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode


def test_ray_sweep_on_a_local_cluster(local_ray, tmp_path, capsys):
    out = tmp_path / "ray"
    assert main(["sweep", *TINY_FLAGS, "--grid", "mask_init=-0.02,0.05", "--ray-address", local_ray,
                 "--out", str(out)]) == 0
    rows = {r["point"]: r for r in json.loads((out / "sweep.json").read_text())["points"]}
    assert [r["status"] for r in rows.values()] == ["done"] * 3
    assert rows["mask_init=-0.02_seed=0"]["weights_remaining"] < 0.01
    assert (out / "sweep.png").is_file() and (out / "logs" / "mask_init=0.05_seed=0.log").is_file()
    # The same points run by the local pool give the same results (runs are deterministic).
    local = run_sweep(SweepPlan(make_config(TINY), {"mask_init": ["-0.02", "0.05"]}), tmp_path / "local",
                      LocalPool(workers=2))
    assert [r.test_accuracy for r in local] == [r["test_accuracy"] for r in rows.values()]
    assert not (out / ".sweep-token").exists()


def test_asking_ray_for_more_than_any_node_has(local_ray, tmp_path, capsys):
    # A Ray of this machine alone (2 CPUs, no GPU) would queue such tasks forever: one-line error.
    for flags, need in ((["--gpus-per-point", "1"], "1 CPU(s) and 1 GPU(s)"), (["--threads", "64"], "64 CPU(s)")):
        assert main(["sweep", *TINY_FLAGS, "--ray-address", "local", "--out", str(tmp_path / "s"), *flags]) == 2
        err = capsys.readouterr().err
        assert f"no node of the Ray cluster at local has {need}" in err and "Traceback" not in err
        assert not (tmp_path / "s").exists()
    # A running cluster may grow (autoscaling): a warning, and the points wait.
    executor = RayExecutor(local_ray, tmp_path / "s", threads=1, gpus=1)
    try:
        assert executor.capacity == 1
        assert f"no node of the Ray cluster at {local_ray} has 1 CPU(s) and 1 GPU(s)" in capsys.readouterr().err
    finally:
        executor.close()
    assert main(["sweep", *TINY_FLAGS, "--gpus-per-point", "1", "--out", str(tmp_path / "s")]) == 2
    assert "--gpus-per-point is for Ray tasks" in capsys.readouterr().err


def test_ray_slots_count_what_each_alive_node_fits():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
             {"Alive": True, "Resources": {"CPU": 3.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    assert ray_slots(nodes, threads=2, gpus=0) == 4 + 1
    assert ray_slots(nodes, threads=2, gpus=1) == 2  # the GPUs of the first node; the second has none
    assert ray_slots(nodes, threads=1, gpus=0.1) == 8  # 20 GPU shares, 8 CPUs
    assert ray_slots(nodes, threads=16, gpus=0) == 0


def test_a_point_on_a_machine_without_the_sweep_directory_ships_its_files_back(tmp_path):
    # The task cannot see the sweep directory (no matching token): it runs in a temporary
    # directory and returns the run directory, which the driver unpacks. Run in a subprocess so
    # that the worker's thread setting does not touch this test process.
    job = PointJob("p", str(tmp_path / "sweep" / "p"), dict(make_config(TINY).__dict__), str(tmp_path / "x.log"),
                   str(tmp_path / "sweep"))
    code = (f"import pickle, sys; from contsparse.experiments.executors import *; "
            f"o = run_point_anywhere(pickle.loads({__import__('pickle').dumps(job)!r}), 'no-token'); "
            f"sys.stdout.buffer.write(pickle.dumps(o))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    outcome = __import__("pickle").loads(done.stdout)
    assert outcome.status == "done" and outcome.files
    assert not (tmp_path / "sweep" / "p").exists()
    unpack_files(outcome, tmp_path / "sweep")
    assert json.loads((tmp_path / "sweep" / "p" / "summary.json").read_text())["test_accuracy"] == \
        outcome.summary["test_accuracy"]
    assert (tmp_path / "sweep" / "logs" / "p.log").is_file()


def test_markdown_table_rows_match_the_header_with_and_without_grid_keys():
    from contsparse.reports.sweep import markdown

    for values in ({}, {"mask_init": -0.05}):
        results = [PointResult("a", values, "ticket", "done", "a", 0.03, 0.97, 10, 5.0),
                   PointResult("dense", {}, "train", "done", "dense", 1.0, 0.98, 10, 5.0, reference=True)]
        table = [line for line in markdown(results, results[:1], "t").splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in table}) == 1, table  # header, separator, rows: same cells
        assert "|  |" not in table[0]  # no unnamed column


def test_accuracy_plot_without_a_finished_sparse_point_says_so_instead_of_drawing_an_axis(tmp_path, monkeypatch):
    from contsparse.reports import sweep as sweep_report

    drawn = {}

    def capture(fig, ax, path, title, log_x=True):
        drawn.update(texts=[t.get_text() for t in ax.texts], xticks=list(ax.get_xticks()), log_x=log_x)
        return path

    monkeypatch.setattr(sweep_report, "save_accuracy_plot", capture)
    waiting = [PointResult("dense", {}, "train", "done", "dense", 1.0, 0.98, 10, 5.0, reference=True),
               PointResult("a", {}, "ticket", "failed", "a"), PointResult("b", {}, "ticket", "pending", "b")]
    sweep_report.accuracy_plot({"sweep": waiting}, tmp_path / "p.png", "t")
    assert drawn == {"texts": ["no finished sparse point yet"], "xticks": [], "log_x": False}
    finished = [*waiting, PointResult("c", {}, "ticket", "done", "c", 0.03, 0.97, 10, 5.0)]
    sweep_report.accuracy_plot({"sweep": finished}, tmp_path / "p.png", "t")
    assert drawn["log_x"] and "no finished sparse point yet" not in drawn["texts"]


def test_a_damaged_point_config_is_pending_in_the_report_and_refused_by_the_sweep(tmp_path, capsys):
    argv = ["sweep", *TINY_FLAGS, "--grid", "mask_init=-0.02,0.05", "--no-dense-reference", "--workers", "2",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    (tmp_path / "mask_init=-0.02_seed=0" / "config.yaml").write_text("")
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    table = (tmp_path / "sweep.md").read_text()
    assert "| mask_init=-0.02_seed=0 |" in table and "| pending |" in table and "| done |" in table
    assert main(argv) == 2
    assert "config.yaml is damaged (no command, method, model, dataset)" in capsys.readouterr().err


def test_a_damaged_point_summary_is_named_and_the_other_points_reported(tmp_path, capsys):
    argv = ["sweep", *TINY_FLAGS, "--grid", "mask_init=-0.02,0.05", "--no-dense-reference", "--workers", "2",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    (tmp_path / "mask_init=-0.02_seed=0" / "summary.json").write_text("{")
    assert main(["report", str(tmp_path)]) == 0
    table = (tmp_path / "sweep.md").read_text()
    assert "| mask_init=0.05_seed=0 |" in table and "| damaged |" in table
    assert "summary.json is damaged" in table.split("Not finished:")[1]


def test_a_sweep_made_before_a_setting_existed_still_reports_its_points(tmp_path, capsys):
    """Its plan and its points' settings lack the setting alike: both read with its old value, the
    finished points are done, not pending (found by a review); sweeping on names the flag."""
    argv = ["sweep", *TINY_FLAGS, "--grid", "mask_init=0.05", "--no-dense-reference", "--workers", "1",
            "--out", str(tmp_path), "--no-reference-steps"]
    assert main(argv) == 0
    for path in [tmp_path / "sweep.yaml", *tmp_path.glob("*/config.yaml")]:
        path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                                if "reference_steps" not in line))
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    assert "| done |" in (tmp_path / "sweep.md").read_text() and "pending" not in (tmp_path / "sweep.md").read_text()
    assert main(argv[:-1]) == 2  # today's default: another sweep
    assert "it predates reference_steps: add --no-reference-steps to go on as it was" in capsys.readouterr().err


def test_a_sweep_of_dense_runs_has_no_dense_reference_of_its_own_points(tmp_path):
    """A --run train sweep's points are not its dense reference: no mean of them, no band."""
    from contsparse.reports.sweep import markdown

    points = [PointResult("lr=0.1", {"lr": 0.1}, "train", "done", "a", 1.0, 1.0, 10, 5.0),
              PointResult("lr=0.5", {"lr": 0.5}, "train", "done", "b", 1.0, 0.95, 10, 5.0)]
    text = markdown(points, [], "t")
    assert "Dense reference" not in text and "* (dense runs only: no sparse point)" in text


def test_tickets_without_weights_are_named_not_drawn(tmp_path, monkeypatch):
    """0 % of the weights has no place on a log axis: the plots name such tickets instead of
    letting a curve end at full accuracy where they failed, and the front flags them."""
    from contsparse.reports import compare as compare_report
    from contsparse.reports import sweep as sweep_report
    from contsparse.reports.sweep import markdown

    drawn = {}

    def capture(fig, ax, path, title, log_x=True):
        drawn.update(texts=[t.get_text() for t in ax.texts],
                     xs={line.get_label(): [round(float(x), 6) for x in line.get_xdata()] for line in ax.lines},
                     curves={bars.get_label(): [round(float(x), 6) for x in bars.lines[0].get_xdata()]
                             for bars in ax.containers})
        return path

    monkeypatch.setattr(sweep_report, "save_accuracy_plot", capture)
    monkeypatch.setattr(compare_report, "save_accuracy_plot", capture)
    empty = PointResult("mask_init=-0.5_seed=0", {"mask_init": -0.5}, "ticket", "done", "e", 0.0, 0.082, 10, 5.0)
    kept = PointResult("mask_init=0.1_seed=0", {"mask_init": 0.1}, "ticket", "done", "k", 0.07, 0.97, 10, 5.0)
    sweep_report.accuracy_plot({"sweep": [empty, kept]}, tmp_path / "p.png", "t")
    assert drawn["xs"]["sweep (Pareto front on validation)"] == [7.0]
    assert any("0 % of the weights kept: mask_init=-0.5 (8.20 %)" in t for t in drawn["texts"])
    sweep_report.accuracy_plot({"sweep": [empty]}, tmp_path / "p.png", "t")
    assert "no finished sparse point with weights left" in drawn["texts"]
    assert "(every weight pruned)" in markdown([empty, kept], [empty], "t")
    groups = [{"method": "cs", "label": "s0=-0.5", "weights_remaining": 0.0, "test_accuracy": 0.082,
               "test_accuracy_std": 0.0},
              {"method": "cs", "label": "s0=0.1", "weights_remaining": 0.07, "test_accuracy": 0.97,
               "test_accuracy_std": 0.0}]
    compare_report.accuracy_vs_weights(groups, [0.98], tmp_path / "c.png", "t")
    assert drawn["curves"] == {"cs": [7.0]}
    assert any("s0=-0.5 (8.2 %)" in t for t in drawn["texts"])


@pytest.mark.parametrize(("value", "text"), [(None, "-"), (0.0, "0.00 %"), (1.0, "100.00 %"), (0.0298, "2.98 %"),
                                             (18 / 235200, "0.0077 %"), (0.99997, "99.9970 %"), (0.5, "50.00 %")])
def test_percentages_show_what_two_decimals_would_round_away(value, text):
    from contsparse.reports.table import percent

    assert percent(value) == text


def test_a_sweep_folder_of_another_command_is_refused(tmp_path):
    from contsparse.experiments.sweep import SweepPlan, _write_plan, check_sweep_folder

    tickets = SweepPlan(make_config({"command": "ticket"}), {"mask_init": ["-0.03"]}, [], 1, False)
    _write_plan(tickets, tmp_path / "sweep")
    check_sweep_folder(tickets, tmp_path / "sweep")  # the same sweep again: continues
    dense = SweepPlan(make_config({"command": "train"}), {"lr": ["0.001"]}, [], 1, False)
    with pytest.raises(UserError, match="holds a sweep of ticket --method cs; give another --out"):
        check_sweep_folder(dense, tmp_path / "sweep")


def test_a_sweep_run_again_with_new_values_keeps_its_earlier_points(tmp_path):
    """Adding grid values to a finished sweep runs the new points only; the tables and the saved
    plan keep the earlier ones (a later plan used to replace the earlier)."""
    first = run_sweep(SweepPlan(make_config(TINY), {"mask_init": ["0.5"]}, dense_reference=False), tmp_path,
                      LocalPool(workers=1))
    assert [r.name for r in first] == ["mask_init=0.5_seed=0"]
    second = run_sweep(SweepPlan(make_config(TINY), {"mask_init": ["1.0"]}, dense_reference=False), tmp_path,
                       LocalPool(workers=1))
    assert [(r.name, r.status) for r in second] == [("mask_init=0.5_seed=0", "done"), ("mask_init=1.0_seed=0", "done")]
    assert [p.name for p in load_plan(tmp_path).expand()] == ["mask_init=0.5_seed=0", "mask_init=1.0_seed=0"]
    assert main(["report", str(tmp_path)]) == 0
    assert {r["point"] for r in json.loads((tmp_path / "sweep.json").read_text())["points"]} == {
        "mask_init=0.5_seed=0", "mask_init=1.0_seed=0"}
    again = run_sweep(SweepPlan(make_config(TINY), {"mask_init": ["1.0"]}, dense_reference=False), tmp_path,
                      LocalPool(workers=1))  # nothing new: nothing runs, nothing is lost
    assert [r.name for r in again] == ["mask_init=0.5_seed=0", "mask_init=1.0_seed=0"]


@pytest.mark.parametrize("plan_text, message", [
    ("base: 5\n", "base is not a mapping"),
    ("base: {}\ngrid: {mask_init: -0.05}\n", "grid is not a mapping of settings to lists"),
    ("base: {}\npoints: 5\n", "points is not a list"),
    ("base: {}\nseeds: abc\n", "seeds is 'abc'"),
])
def test_a_damaged_sweep_plan_is_a_one_line_error(tmp_path, capsys, plan_text, message):
    (tmp_path / "sweep.yaml").write_text(plan_text)
    assert main(["report", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_sweep_tables_escape_cell_separators_and_write_strict_json(tmp_path):
    """A '|' in a swept value (a layer regex) stays in its cell; a diverged run's NaN accuracy is
    null in sweep.json, which strict JSON readers refuse as a bare NaN."""
    from contsparse.reports.sweep import write_sweep

    results = [PointResult("a", {"mask_include": "hidden|output"}, "ticket", "done", "a", 0.03, 0.97, 10, 5.0),
               PointResult("b", {"mask_include": "hidden"}, "ticket", "done", "b", 0.02, float("nan"), 10, 5.0,
                           val_accuracy=float("nan")),
               PointResult("dense", {}, "train", "done", "dense", 1.0, float("nan"), 10, 5.0, reference=True)]
    write_sweep(results, tmp_path, "t")
    table = [line for line in (tmp_path / "sweep.md").read_text().splitlines() if line.startswith("|")]
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1, table
    assert "hidden\\|output" in (tmp_path / "sweep.md").read_text()
    assert "Dense reference" not in (tmp_path / "sweep.md").read_text()  # a NaN dense run is no reference
    payload = json.loads((tmp_path / "sweep.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert next(p for p in payload["points"] if p["point"] == "b")["test_accuracy"] is None


def test_a_sweep_over_training_settings_says_its_dense_reference_did_not_vary_them():
    from contsparse.reports.sweep import markdown

    dense = PointResult("dense_seed=0", {"seed": 0}, "train", "done", "d", 1.0, 0.98, 10, 5.0, reference=True)
    for values, noted in (({"lr": 0.1, "mask_init": -0.05}, "vary lr,"), ({"mask_init": -0.05, "seed": 0}, None)):
        point = PointResult("a", values, "ticket", "done", "a", 0.03, 0.97, 10, 5.0)
        text = markdown([dense, point], [point], "t")
        assert (noted in text) if noted else "the points vary" not in text


def test_a_second_sweep_into_a_running_sweeps_folder_is_refused(tmp_path):
    """Two drivers in one folder used to rewrite each other's plan and tables and report the
    other's running points as failed (found by a review)."""
    from contsparse.experiments.lock import RunLock
    from contsparse.experiments.sweep import SWEEP_LOCK

    plan = SweepPlan(make_config(TINY), {"mask_init": ["0.5"]}, dense_reference=False)
    tmp_path.mkdir(exist_ok=True)
    import io

    from rich.console import Console

    from contsparse.reports.progress import SweepProgress

    def display() -> tuple[SweepProgress, io.StringIO]:
        text = io.StringIO()
        return SweepProgress(Console(file=text), where=" here"), text

    refused, said = display()
    with RunLock(tmp_path, SWEEP_LOCK), pytest.raises(UserError, match=r"sweep directory .* is in use by pid"):
        run_sweep(plan, tmp_path, LocalPool(workers=1), refused)  # the lock held as by a running driver
    assert not (tmp_path / "sweep.yaml").exists()
    assert "sweep of" not in said.getvalue()  # no opening line for a sweep that does not start
    assert [r.status for r in run_sweep(plan, tmp_path, LocalPool(workers=1))] == ["done"]
    # a later invocation adding a point: the opening line counts the whole plan's points
    more, said = display()
    later = SweepPlan(make_config(TINY), {"mask_init": ["0.4"]}, dense_reference=False)
    assert [r.status for r in run_sweep(later, tmp_path, LocalPool(workers=1), more)] == ["done", "done"]
    assert said.getvalue().startswith("sweep of 2 points here\n")


def test_points_get_the_gpus_the_user_left_visible(monkeypatch):
    """CUDA_VISIBLE_DEVICES=2,3: the points' own variable names 2 and 3, not the indices 0 and 1
    that CUDA would read as other (physical) GPUs (found by a review)."""
    from contsparse.experiments.executors import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus(2) == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa, MIG-bbbb,GPU-cccc")
    assert visible_gpus(2) == ["GPU-aaaa", "MIG-bbbb"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus(3) == ["0", "1", "2"]


def test_a_large_point_outcome_does_not_hang_the_pool(tmp_path, monkeypatch):
    """An outcome bigger than the pipe's buffer blocks the worker in send() until it is read: the
    pool reads it when it is ready instead of waiting for the worker to exit first."""
    from contsparse.experiments import executors

    pool = LocalPool(workers=1, threads=1)
    job = PointJob("big", str(tmp_path / "big"), {}, str(tmp_path / "big.log"), str(tmp_path))
    monkeypatch.setattr(executors, "_worker_main", _big_outcome_worker)
    pool.start(job)
    outcomes, deadline = [], time.monotonic() + 60
    while not outcomes and time.monotonic() < deadline:
        outcomes = pool.wait(0.5)
    pool.close()
    assert [(o.name, o.status, len(o.message)) for o in outcomes] == [("big", "failed", 200_000)]


def _big_outcome_worker(connection, job, driver, stop):
    from contsparse.experiments.executors import PointOutcome, _send

    _send(connection, PointOutcome(job.name, "failed", message="x" * 200_000))


def test_a_ctrl_c_while_a_finished_worker_exits_keeps_its_outcome():
    """The pool reads a worker's outcome, then joins the process (it takes a while to exit): a
    Ctrl-C in the join must not turn the finished point into a dead worker when collected again,
    and a worker that the sweep's own Ctrl-C stopped is interrupted, not failed."""
    import multiprocessing

    from contsparse.experiments.executors import PointOutcome

    class ExitingWorker:
        exitcode = -signal.SIGINT

        def __init__(self):
            self.joins = 0

        def join(self):
            self.joins += 1
            if self.joins == 1:
                raise KeyboardInterrupt

    pool = LocalPool(1, threads=1)
    receive, send = multiprocessing.Pipe(duplex=False)
    send.send(PointOutcome("p", "done", summary={"weights_remaining": 0.1}))
    pool._live["p"] = (ExitingWorker(), receive)
    with pytest.raises(KeyboardInterrupt):
        pool._collect("p", *pool._live["p"])
    assert pool._collect("p", *pool._live["p"]).status == "done" and not pool._live
    receive, _ = multiprocessing.Pipe(duplex=False)  # a worker that died without a word
    pool._live["q"] = (ExitingWorker(), receive)
    pool._live["q"][0].joins = 1
    assert pool._collect("q", *pool._live["q"]).status == "failed"
    pool._stop.set()  # ... unless the sweep was stopping it
    receive, _ = multiprocessing.Pipe(duplex=False)
    pool._live["r"] = (ExitingWorker(), receive)
    pool._live["r"][0].joins = 1
    assert pool._collect("r", *pool._live["r"]).status == "interrupted"


def test_a_ctrl_c_while_the_executor_shuts_down_keeps_every_result(tmp_path):
    """Ray's shutdown takes seconds: a Ctrl-C then used to escape as a bare KeyboardInterrupt and
    lose the tables of a finished sweep. It ends as an interrupted sweep with every result."""
    from contsparse.experiments.sweep import SweepInterrupted

    class InterruptedAtClose(LocalPool):
        def close(self) -> None:
            super().close()
            raise KeyboardInterrupt

    plan = SweepPlan(make_config(TINY), {"mask_init": ["0.5"]}, dense_reference=False)
    try:
        run_sweep(plan, tmp_path, InterruptedAtClose(workers=1))
    except SweepInterrupted as stopped:
        results = stopped.results
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("a bare KeyboardInterrupt escaped run_sweep")
    else:
        pytest.fail("the interrupt was lost")
    assert [(r.name, r.status) for r in results] == [("mask_init=0.5_seed=0", "done")]
    assert (tmp_path / "mask_init=0.5_seed=0" / "summary.json").is_file()


def test_plot_labels_say_which_point_is_which(tmp_path, monkeypatch):
    """A comparison's points all had method=cs (or imp): the label is what varies in the series,
    or the point's own name; a dense run's series draws no empty legend entry."""
    import warnings

    import matplotlib.axes

    from contsparse.reports.sweep import accuracy_plot, markdown

    def point(name, values, remaining, command="ticket", reference=False):
        return PointResult(name, values, command, "done", "", remaining, 0.9, 1, 1.0, val_accuracy=0.9,
                           reference=reference)

    comparison = [point("dense seed 0", {"method": "dense", "seed": 0}, 1.0, command="train", reference=True),
                  point("cs s0=-0.05 seed 0", {"method": "cs", "seed": 0}, 0.05),
                  point("cs s0=-0.08 seed 0", {"method": "cs", "seed": 0}, 0.03)]
    imp = [point("run", {"method": "imp"}, 0.2), point("run round 1", {"method": "imp", "round": 1}, 0.8)]
    sweep = [point("mask_init=-0.02", {"mask_init": -0.02, "seed": 0}, 0.1),
             point("mask_init=-0.05", {"mask_init": -0.05, "seed": 0}, 0.04)]
    dense = [point("dense", {}, 1.0, command="train", reference=True)]
    annotations, legend = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda self, text, *a, **k: annotations.append(text))
    original_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: legend.append(k.get("label")) or original_plot(self, *a, **k))
    accuracy_plot({"cmp: cs": comparison, "imp": imp, "sweep": sweep, "train": dense}, tmp_path / "p.png", "t")
    assert annotations == ["cs s0=-0.05 seed 0", "cs s0=-0.08 seed 0", "run", "round=1",
                           "mask_init=-0.02", "mask_init=-0.05"]
    assert not any(label and label.startswith("train") for label in legend)
    assert "dense runs only: no sparse point" in markdown(dense, [], "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing labelled: no legend, and no warning about it
        accuracy_plot({"sweep": [point("a", {"mask_init": 0.1}, 0.0)]}, tmp_path / "q.png", "t")
