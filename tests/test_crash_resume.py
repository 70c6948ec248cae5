"""Crash safety: a run killed (SIGKILL) or stopped (Ctrl-C, SIGTERM) anywhere resumes to exactly the
result of an uninterrupted run; damaged checkpoints and full disks lose nothing."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from contsparse.cli import main
from contsparse.errors import UserError
from contsparse.experiments import Runner, make_config
from contsparse.experiments.config import load_saved_config
from contsparse.faults import ENV
from contsparse.training import checkpoint as checkpoint_module
from contsparse.training import load_checkpoint

# 10 steps per epoch; global epochs 0-2 are search round 0 (rewind point at the start of epoch 1),
# 3-5 search round 1, 6-7 the ticket.
ARGS = ["--model", "lenet300", "--dataset", "synthetic", "--train-subset", "640", "--batch-size", "64",
        "--epochs", "3", "--rounds", "2", "--rewind-epoch", "1", "--ticket-epochs", "2", "--mask-init", "-0.02",
        "--no-dense-baseline", "--device", "cpu"]
SETTINGS = dict(model="lenet300", dataset="synthetic", train_subset=640, batch_size=64, epochs=3, rounds=2,
                rewind_epoch=1, ticket_epochs=2, mask_init=-0.02, dense_baseline=False, device="cpu")
KILL_POINTS = {
    "round 0 before the rewind point": "step:0:4",
    "round 0 after the rewind point": "step:1:6",
    "between rounds (after the mask reset)": "epoch:3",
    "first step of round 1": "step:3:1",
    "during ticket training": "step:6:7",
    "inside a checkpoint write": "rename:4",
    "after the last epoch, before the summary": "epoch:8",
}


def quiet(_message: str) -> None:
    pass


def run_cli(args: list[str], fault: str | None = None, signal_name: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if fault:
        env[ENV] = fault
    if signal_name:
        env["CONTSPARSE_FAULT_SIGNAL"] = signal_name
    return subprocess.run([sys.executable, "-m", "contsparse", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    Runner(make_config(dict(SETTINGS)), out, quiet).execute()
    return out


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    for key in ("test_accuracy", "val_accuracy", "weights_remaining", "train_epochs", "per_layer",
                "rounds_weights_remaining"):
        assert sa[key] == sb[key], key
    for name in ("masks.safetensors", "model.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (name, key)
    ma, mb = ([{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b))
    assert ma == mb


@pytest.mark.parametrize("where", list(KILL_POINTS))
def test_sigkill_then_resume_is_identical(where, reference, tmp_path):
    out = tmp_path / "run"
    killed = run_cli(["ticket", *ARGS, "--out", str(out)], fault=KILL_POINTS[where])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "summary.json").exists()
    assert main(["resume", str(out)]) == 0
    assert_same_run(reference, out)


def test_ctrl_c_checkpoints_mid_epoch_and_resumes_identically(reference, tmp_path, capsys):
    out = tmp_path / "run"
    stopped = run_cli(["ticket", *ARGS, "--out", str(out)], fault="step:4:3", signal_name="INT")
    assert stopped.returncode == 130, stopped.stderr
    assert "after step 3" in stopped.stderr and f"contsparse resume {out}" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    state = load_checkpoint(out / "checkpoint")
    assert state["progress"]["epochs_done"] == 4 and state["progress"]["step"] == 3
    assert main(["resume", str(out)]) == 0
    assert_same_run(reference, out)


def test_a_per_step_temperature_resumes_mid_epoch_where_it_stopped(tmp_path):
    """The temperature of a per-step schedule after a mid-epoch resume is the step's, not the
    epoch's first (a mutation that restarted it survived every test until this one)."""
    reference = tmp_path / "reference"
    Runner(make_config(dict(SETTINGS, temp_schedule="step")), reference, quiet).execute()
    out = tmp_path / "run"
    stopped = run_cli(["ticket", *ARGS, "--temp-schedule", "step", "--out", str(out)], fault="step:1:3",
                      signal_name="INT")
    assert stopped.returncode == 130, stopped.stderr
    assert main(["resume", str(out)]) == 0
    assert_same_run(reference, out)


def test_sigterm_stops_cleanly(tmp_path):
    out = tmp_path / "run"
    stopped = run_cli(["ticket", *ARGS, "--out", str(out)], fault="step:1:2", signal_name="TERM")
    assert stopped.returncode == 130 and "stopped (SIGTERM)" in stopped.stderr
    assert load_checkpoint(out / "checkpoint")["progress"]["step"] == 2


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, monkeypatch):
    out = stopped_run(tmp_path / "run", monkeypatch, epochs=5)
    state_file = out / "checkpoint" / "state.json"
    state_file.write_text(state_file.read_text().replace('"epochs_done": 5', '"epochs_done": 1'))  # tampered
    messages = []
    Runner(make_config(dict(SETTINGS)), out, messages.append).execute()
    assert any("state.json does not match its checksum" in m and "previous one" in m for m in messages)
    assert_same_run(reference, out)


def test_a_damaged_latest_checkpoint_never_replaces_the_good_one(tmp_path, monkeypatch):
    """Resuming from .prev sets the damaged latest aside: the next save must not rotate it into
    .prev, or a crash before that save completes would leave no good checkpoint (found by a review)."""
    directory = tmp_path / "checkpoint"
    checkpoint_module.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, directory)
    checkpoint_module.save_checkpoint({"epoch": 2, "w": torch.ones(3)}, directory)
    state_file = directory / "state.json"
    state_file.write_text(state_file.read_text().replace('"epoch": 2', '"epoch": 7'))  # damaged
    assert load_checkpoint(directory, set_aside_damaged=True)["epoch"] == 1
    assert not directory.exists() and (tmp_path / "checkpoint.damaged").is_dir()

    def crash(*args):  # the next save dies just before its new checkpoint takes the latest's place
        raise OSError(errno.EIO, "crashed")

    monkeypatch.setattr(checkpoint_module.faults, "inject", crash)
    with pytest.raises(UserError):
        checkpoint_module.save_checkpoint({"epoch": 3, "w": torch.ones(3)}, directory)
    assert load_checkpoint(directory)["epoch"] == 1  # the good checkpoint is still there


def test_no_good_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    out = stopped_run(tmp_path / "run", monkeypatch, epochs=3)
    for folder in ("checkpoint", "checkpoint.prev"):
        tensors = out / folder / "tensors.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match=r"no usable checkpoint .*does not match its checksum"):
        Runner(make_config(dict(SETTINGS)), out, quiet).execute()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def fills_the_disk(tensors, path):
        calls["n"] += 1
        if calls["n"] == 4:
            with open(path, "wb") as handle:
                handle.write(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", fills_the_disk)
    with pytest.raises(UserError, match=r"the disk is full.*previous checkpoint is intact"):
        Runner(make_config(dict(SETTINGS)), out, quiet).execute()
    monkeypatch.undo()
    assert not (out / "checkpoint.tmp").exists()
    assert load_checkpoint(out / "checkpoint")["progress"]["epochs_done"] == 2  # rewind point + 2 epochs saved
    Runner(make_config(dict(SETTINGS)), out, quiet).execute()
    assert_same_run(reference, out)


def test_checkpoints_at_phase_boundaries(tmp_path, monkeypatch):
    saved = []
    real_save = checkpoint_module.save_checkpoint

    def record(state, directory):
        progress = state["progress"]
        saved.append((progress["epochs_done"], progress["phase"], progress["entered"], state["rewind"] is not None))
        real_save(state, directory)

    from contsparse.experiments import runner as runner_module
    monkeypatch.setattr(runner_module, "save_checkpoint", record)
    Runner(make_config(dict(SETTINGS)), tmp_path / "run", quiet).execute()
    assert saved[0] == (1, 0, True, False)  # after epoch 0
    assert saved[1] == (1, 0, True, True)  # the rewind point, before epoch 1 trains
    assert (3, 1, False, True) in saved  # end of round 0, logits reset
    assert (6, 2, True, True) in saved  # start of ticket training: rewound and hardened
    assert len(saved) == 8 + 2


def stopped_run(out: Path, monkeypatch, epochs: int) -> Path:
    """The SETTINGS run in ``out``, stopped (as by Ctrl-C) after ``epochs`` epochs."""
    interrupt_after(monkeypatch, epochs)
    with pytest.raises(KeyboardInterrupt):
        Runner(make_config(dict(SETTINGS)), out, quiet).execute()
    monkeypatch.undo()
    return out


def interrupt_after(monkeypatch, epochs: int) -> None:
    from contsparse.experiments import runner as runner_module

    original = runner_module.Runner._epoch
    calls = {"n": 0}

    def crash(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > epochs:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(runner_module.Runner, "_epoch", crash)


def test_divergence_keeps_the_last_good_checkpoint_and_resumes_with_a_lower_lr(tmp_path, monkeypatch, capsys):
    from contsparse.experiments import runner as runner_module

    original = runner_module.Runner._epoch
    calls = {"n": 0}

    def poisoned(self, phase, epoch, step, partial, stop, model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return original(self, phase, epoch, step, partial, stop, model, *args, **kwargs)

    monkeypatch.setattr(runner_module.Runner, "_epoch", poisoned)
    out = tmp_path / "run"
    assert main(["ticket", *ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "training diverged in search 0, epoch 3" in err and "the checkpoint of epoch 2 is kept" in err
    assert f"contsparse resume {out} --lr 0.00012 --force" in err and "Traceback" not in err
    state = load_checkpoint(out / "checkpoint")
    assert state["progress"]["epochs_done"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point())
    monkeypatch.undo()
    assert main(["resume", str(out), "--lr", "0.00012"]) == 2  # changed settings need --force
    assert "lr: 0.0012 -> 0.00012" in capsys.readouterr().err
    assert main(["resume", str(out), "--lr", "0.00012", "--force"]) == 0
    assert "--force: resuming" in capsys.readouterr().out


def test_forced_resume_keeps_a_finished_dense_baseline_and_refuses_before_writing(tmp_path, capsys):
    args = [a for a in ARGS if a != "--no-dense-baseline"]  # the dense baseline trains first, in dense/
    out = tmp_path / "run"
    # Killed in search round 0, the baseline finished: the remedy for a divergence, resuming with
    # another --lr and --force, keeps the baseline as it was trained instead of refusing it.
    assert run_cli(["ticket", *args, "--out", str(out)], fault="epoch:3").returncode == -signal.SIGKILL
    baseline = (out / "dense" / "summary.json").read_bytes()
    assert main(["resume", str(out), "--lr", "0.0006", "--force"]) == 0
    assert "finished before the settings changed (lr: 0.0012 -> 0.0006): kept as it is" in capsys.readouterr().out
    assert (out / "dense" / "summary.json").read_bytes() == baseline
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dense_test_accuracy"] == json.loads(baseline)["test_accuracy"]
    assert summary["dense_val_accuracy"] == json.loads(baseline)["val_accuracy"]

    # Killed in the baseline's first epoch: fewer --ticket-epochs than it has trained is refused,
    # naming that flag, before the ticket run rewrites anything.
    out = tmp_path / "early"
    assert run_cli(["ticket", *args, "--out", str(out)], fault="epoch:1").returncode == -signal.SIGKILL
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    shorter = list(args)
    shorter[shorter.index("--ticket-epochs") + 1] = "1"
    assert main(["ticket", *shorter, "--force", "--out", str(out)]) == 2
    assert "has trained 1 epoch of dense, which the new settings end after 1: resume with --ticket-epochs 2" \
        in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert main(["resume", str(out)]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_killed_cuda_run_resumes(tmp_path):
    # The checkpoint loads onto the run's device, random-generator states included (numpy's must
    # come back to the host): resuming a GPU run used to fail there.
    args = [a if a != "cpu" else "cuda" for a in ARGS]
    out = tmp_path / "run"
    assert run_cli(["ticket", *args, "--out", str(out)], fault="epoch:2").returncode == -signal.SIGKILL
    resumed = run_cli(["resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["train_epochs"] == 8


def test_a_run_whose_checkpoints_were_deleted_starts_over_with_fresh_records(tmp_path, monkeypatch):
    """The no-usable-checkpoint error says to delete the checkpoints; the run then trains from the
    start, saying so, and its metrics.jsonl holds each epoch once (not the old records plus the new)."""
    out = stopped_run(tmp_path / "run", monkeypatch, epochs=3)
    for folder in out.glob("checkpoint*"):
        shutil.rmtree(folder)
    with open(out / "metrics.jsonl", "ab") as handle:
        handle.write(b"\xff\xfe torn line")  # a crash mid-write, undecodable
    said = []
    Runner(make_config(dict(SETTINGS)), out, said.append).execute()
    assert any("has no checkpoint: training starts from the beginning" in line for line in said)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [(r["phase"], r["round"], r["epoch"]) for r in records]
    assert len(epochs) == len(set(epochs)) == len(records)


def test_a_torn_metrics_line_does_not_stop_a_resume(reference, tmp_path, monkeypatch):
    out = stopped_run(tmp_path / "run", monkeypatch, epochs=3)
    with open(out / "metrics.jsonl", "ab") as handle:
        handle.write(b"\xff\xfe torn line")
    Runner(make_config(dict(SETTINGS)), out, quiet).execute()
    assert_same_run(reference, out)


@pytest.mark.parametrize("damage", ["cut short", "deleted"])
def test_records_lost_from_metrics_jsonl_are_restored_from_the_checkpoint(damage, reference, tmp_path, monkeypatch):
    """The checkpoint keeps the lines written so far: a resumed run's history is whole again (a
    cut-short file had the next record glued to its torn last line, a deleted one lost the epochs)."""
    out = stopped_run(tmp_path / "run", monkeypatch, epochs=3)
    metrics = out / "metrics.jsonl"
    if damage == "cut short":
        metrics.write_bytes(metrics.read_bytes()[:30])
    else:
        metrics.unlink()
    said = []
    Runner(make_config(dict(SETTINGS)), out, said.append).execute()
    assert any("metrics.jsonl was missing records" in line for line in said)
    assert_same_run(reference, out)


def test_a_mid_epoch_stop_resumed_with_a_larger_batch_finishes(tmp_path, capsys):
    """Stopped at step 7 of 10, resumed (--force) at 5 steps an epoch: that epoch is over; the
    per-step temperature is read at its end, not refused as a step beyond it (found by a review)."""
    out = tmp_path / "run"
    stopped = run_cli(["ticket", *ARGS, "--temp-schedule", "step", "--out", str(out)], fault="step:1:7",
                      signal_name="INT")
    assert stopped.returncode == 130, stopped.stderr
    assert main(["resume", str(out), "--batch-size", "128", "--force"]) == 0
    assert json.loads((out / "summary.json").read_text())["train_epochs"] == 8


def test_a_checkpoint_from_before_metrics_were_kept_resumes_with_its_whole_history(reference, tmp_path, monkeypatch):
    """Checkpoints written before they kept the metrics lines count them only: resumed twice, the
    history is whole (found by a review: the second resume kept only the lines since the first)."""
    from contsparse.experiments.rundir import RunDir

    original = RunDir.append_metrics
    monkeypatch.setattr(RunDir, "append_metrics", lambda self, record: original(self, record) and None)
    out = stopped_run(tmp_path / "run", monkeypatch, epochs=2)  # (stopped_run undoes the patch after it)
    assert "metrics" not in load_checkpoint(out / "checkpoint")["progress"]
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        Runner(make_config(dict(SETTINGS)), out, quiet).execute()
    monkeypatch.undo()
    said = []
    Runner(make_config(dict(SETTINGS)), out, said.append).execute()
    assert not any("missing records" in line for line in said)
    assert_same_run(reference, out)


def test_a_full_disk_while_saving_the_final_model_is_one_line_and_leaves_no_half_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from contsparse.experiments import rundir
    from contsparse.experiments.rundir import RunDir

    def no_space(tensors, path):  # what safetensors raises on a full disk, after part of the file
        Path(path).write_bytes(b"half")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(rundir, "save_file", no_space)
    with pytest.raises(UserError, match=r"cannot write in .* \(the disk is full\)"):
        RunDir(tmp_path).save_tensors("model.safetensors", {"w": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_metrics_lines_keep_bytes_that_are_not_utf8_through_the_checkpoint(tmp_path):
    from contsparse.experiments.rundir import RunDir

    written = b'{"note": "caf\xe9"}\n{"epoch": 1}\n'
    (tmp_path / "metrics.jsonl").write_bytes(written)
    run = RunDir(tmp_path)
    kept = json.loads(json.dumps(run.metrics_lines()))  # as the checkpoint's JSON part keeps them
    (tmp_path / "metrics.jsonl").unlink()
    assert run.restore_metrics(kept) is True
    assert (tmp_path / "metrics.jsonl").read_bytes() == written


def test_a_config_yaml_edited_by_hand_is_judged_against_the_checkpoint(tmp_path, monkeypatch):
    """Resuming reads config.yaml: an edit must meet the same checks as a flag (found by a review:
    an edited rewind_epoch printed "rewound to epoch 0" while the stored epoch-1 point was used)."""
    out = stopped_run(tmp_path / "run", monkeypatch, epochs=2)  # the rewind point (epoch 1) is stored
    path = out / "config.yaml"
    original = path.read_text()

    def resume(text: str, force: bool = False) -> None:
        path.write_text(text)
        Runner(make_config(load_saved_config(path)), out, quiet, force=force).execute()

    with pytest.raises(UserError, match=r"config.yaml differs from the settings .* checkpoint was trained with "
                                        r"\(rewind_epoch: 1 -> 0\)"):
        resume(original.replace("rewind_epoch: 1", "rewind_epoch: 0"))
    with pytest.raises(UserError, match=r"rewind_epoch .* cannot change any more"):
        resume(original.replace("rewind_epoch: 1", "rewind_epoch: 0"), force=True)
    with pytest.raises(UserError, match=r"\(lr: 0.0012 -> 0.002\)"):
        resume(original.replace("lr: 0.0012", "lr: 0.002"))
    with pytest.raises(UserError, match=r"\(lr: 0.0012 -> 0.002\)"):  # rewritten by a tool that drops comments
        resume(yaml.safe_dump({**yaml.safe_load(original), "lr": 0.002}, sort_keys=False))
    with pytest.raises(UserError, match=r"holds a run with other settings \(epochs: 3 -> 4\)"):
        path.write_text(original.replace("data_dir: null", "data_dir: /elsewhere"))  # how, not what: no edit
        Runner(make_config({**load_saved_config(path), "data_dir": None, "epochs": 4}), out, quiet).execute()
    resume(original)  # as trained: resumes
    assert (out / "summary.json").is_file()


def test_a_forced_resume_stopped_before_its_first_checkpoint_resumes_plainly(tmp_path, monkeypatch):
    """--force rewrites config.yaml before training; stopped before the next checkpoint, the run
    still holds the old one, yet its config.yaml is contsparse's own, not a hand edit."""
    out = stopped_run(tmp_path / "run", monkeypatch, epochs=2)
    interrupt_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        Runner(make_config({**SETTINGS, "lr": 0.002}), out, quiet, force=True).execute()
    monkeypatch.undo()
    assert "lr: 0.002" in (out / "config.yaml").read_text()
    Runner(make_config(load_saved_config(out / "config.yaml")), out, quiet).execute()  # `contsparse resume`
    assert (out / "summary.json").is_file()


def test_a_checkpoint_from_a_machine_with_more_gpus_resumes_on_fewer(monkeypatch):
    """The CUDA generator states of devices this machine does not have are left out, not an
    IndexError (found by a review: checkpoints of multi-GPU nodes resumed on one GPU)."""
    from contsparse.training import restore_rng, rng_state

    state = rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # saved with 2 GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda generator_state, device: restored.append(device))
    restore_rng(state)
    assert restored == [0]


def test_force_refuses_settings_the_run_has_already_acted_on(tmp_path, monkeypatch):
    """A round that ended as the last one (or not) stays so: 2 rounds resumed as 1 after round 0 had
    ended with its logit reset would have given a ticket without weights; the stored rewind point
    stays where it was taken. Adding a round after round 0 is fine (found by a review)."""
    out = stopped_run(tmp_path / "run", monkeypatch, epochs=4)  # in round 1 of 2; rewind point stored
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    for change, message in ((dict(rounds=1), r"rounds \(2 -> 1: 1 round\(s\) have ended\)"),
                            (dict(rewind_epoch=2), "rewind_epoch .the rewind point is stored.")):
        with pytest.raises(UserError, match=message):
            Runner(make_config({**SETTINGS, **change}), out, quiet, force=True).execute()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    summary = Runner(make_config({**SETTINGS, "rounds": 3}), out, quiet, force=True).execute()
    assert summary["weights_remaining"] > 0 and len(summary["rounds_weights_remaining"]) == 3
    # the ticket's optimiser state is kept in the parameter groups its steps chose (found by a review)
    ticket = stopped_run(tmp_path / "ticket", monkeypatch, epochs=7)  # in ticket training
    with pytest.raises(UserError, match=r"reference_steps \(the ticket's optimiser has begun"):
        Runner(make_config({**SETTINGS, "reference_steps": False}), ticket, quiet, force=True).execute()
    searching = stopped_run(tmp_path / "search", monkeypatch, epochs=5)  # still searching: no ticket optimiser yet
    summary = Runner(make_config({**SETTINGS, "reference_steps": False}), searching, quiet, force=True).execute()
    assert summary["weights_remaining"] > 0


def test_a_schedulers_sigterm_then_the_drivers_sigint_still_checkpoint(monkeypatch):
    """A scheduler's SIGTERM reaches a sweep's points and its driver, which then sends each point a
    SIGINT: that must not count as the second Ctrl-C that stops at once; two Ctrl-Cs still do.
    A sweep started with nohup keeps ignoring SIGHUP (found by a review)."""
    from contsparse.experiments.interrupt import StopRequest, signals_interrupt

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        assert stop.reason == "SIGTERM"
    with StopRequest() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals_interrupt():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_torchrun_variables_that_do_not_fit_are_one_line_errors(monkeypatch):
    from contsparse.experiments.distributed import from_environment

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="WORLD_SIZE is set but the other torchrun variables"):
        from_environment("cpu")


def test_a_folder_of_other_files_is_refused_without_a_lock_file_left_in_it(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a contsparse run directory"):
        Runner(make_config(dict(SETTINGS)), folder, quiet).execute()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
