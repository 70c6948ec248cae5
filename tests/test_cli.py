"""The command line: one-line errors with exit status 2, runs, info tables."""

import errno
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contsparse.cli import main
from contsparse.experiments import make_config

QUICK = ["--model", "lenet300", "--dataset", "synthetic", "--epochs", "2", "--rounds", "1",
         "--rewind-epoch", "0", "--ticket-epochs", "1", "--no-dense-baseline", "--mask-init", "0.05"]


@pytest.mark.parametrize("argv, message", [
    (["ticket", "--model", "resnet9000"], "unknown model"),
    (["ticket", "--dataset", "imagenet22k"], "unknown dataset"),
    (["ticket", "--penalty", "-1"], "penalty must be >= 0"),
    (["ticket", "--final-temp", "1"], "final_temp must be > 1"),
    (["ticket", "--rounds", "0"], "rounds must be in [1, 1000]"),
    (["ticket", "--epochs", "3", "--rewind-epoch", "3"], "rewind_epoch"),
    (["ticket", "--lr", "nan"], "lr must be a finite number"),
    (["ticket", "--epochs", "many"], "epochs = 'many' is not a valid int"),
    (["ticket", "--data-dir", "/does/not/exist", "--no-dense-baseline"], "does not exist"),
    (["ticket", "--device", "tpu"], "device must be"),
    (["info", "/does/not/exist"], "is not a directory"),
])
def test_user_mistakes_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "run")] if argv[0] != "info" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["compare", "--methods", "foo"], "invalid choice: 'foo'"),
    (["ticket", "--epochs"], "expected one argument"),
    (["ticket", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # no abbreviations (--method was silently --methods); the flag meant is suggested
    (["compare", "--method", "imp"], "contsparse compare: error: unrecognized arguments: --method imp "
                                     "(did you mean --methods?)"),
    (["ticket", "--rewind=2"], "(did you mean --rewind-epoch?)"),
    (["ticket", "--epoch", "2", "--lrr", "1"], "(did you mean --epochs, --lr?)"),
    (["export"], "the following arguments are required"),
])
def test_mistakes_argparse_catches_are_one_line_errors_too(argv, message, capsys):
    """argparse's own errors come without its usage block (dozens of lines for a training command)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "--help" in err and err.count("\n") == 1


def test_bad_config_files(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1,\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochz: 3\n")
    assert main(["ticket", "--config", str(bad_yaml)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["ticket", "--config", str(unknown)]) == 2
    assert "unknown config key(s): epochz" in capsys.readouterr().err


def test_ticket_then_info(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("epochs: 2\nseed: 3\n")
    out = tmp_path / "run"
    assert main(["ticket", *QUICK, "--config", str(config), "--seed", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weights remaining" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 4  # flags override the config file
    assert main(["info", str(out)]) == 0
    assert "per layer" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "not a contsparse run directory" in capsys.readouterr().err


def test_compiled_ticket_search_matches_the_eager_one(tmp_path, capsys):
    """--compile: torch.compile'd search, hardened ticket and evaluation run end to end and learn
    what the eager run learns (fused kernels round differently, so not bit for bit)."""
    summaries = []
    for flags in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flags else "eager")
        assert main(["ticket", *QUICK, *flags, "--out", str(out)]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
    eager, compiled = summaries
    assert compiled["weights_remaining"] == pytest.approx(eager["weights_remaining"], abs=0.01)
    assert 0 < compiled["weights_remaining"] < 1
    assert compiled["test_accuracy"] == pytest.approx(eager["test_accuracy"], abs=0.05)
    assert "compile: true" in (tmp_path / "compiled" / "config.yaml").read_text()
    assert make_config({"compile": True}).identity() == make_config({}).identity()  # how it runs, not what


def test_compile_without_a_cpp_compiler_is_a_one_line_error(tmp_path):
    env = {**os.environ, "PATH": "/nonexistent", "CXX": "/nonexistent/g++", "CC": "/nonexistent/gcc",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # an empty cache: nothing compiled to reuse
    done = subprocess.run([sys.executable, "-m", "contsparse", "ticket", *QUICK, "--compile", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr
    assert "torch.compile failed" in done.stderr and "run without --compile" in done.stderr
    assert "Traceback" not in done.stderr


def test_console_script_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "contsparse", "prune", *QUICK, "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert (summary["command"], summary["method"]) == ("prune", "cs") and 0 < summary["weights_remaining"] < 1
    assert f"{100 * summary['test_accuracy']:.2f} %" in done.stdout  # the table printed is this run's


def test_divergence_is_reported_not_a_traceback(tmp_path, capsys):
    argv = ["train", "--model", "lenet300", "--dataset", "synthetic", "--epochs", "2", "--optimizer", "sgd",
            "--lr", "1e6", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "lower --lr" in err and "Traceback" not in err


def test_presets_are_listed_and_fill_the_defaults(capsys):
    from contsparse.cli import build_parser, config_from_args

    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    for name in ("mnist-lenet300-ticket", "cifar10-resnet20-ticket", "cifar10-vgg16-ticket", "cifar10-conv2-ticket",
                 "cifar10-conv4-ticket", "cifar10-conv6-ticket", "imagenet-resnet50-prune"):
        assert name in listing
    args = build_parser().parse_args(["ticket", "--preset", "cifar10-resnet20-ticket", "--dataset", "synthetic",
                                      "--epochs", "1"])
    config = config_from_args(args)
    assert (config.model, config.dataset, config.epochs, config.rounds, config.batch_size) == (
        "resnet20", "synthetic", 1, 3, 128)
    assert config.lr_milestones == [56, 71] and config.mask_exclude == ["downsample", "^fc$"]
    assert config.rewind_epoch == 0  # the preset's epoch-2 rewind point, moved inside a 1-epoch round
    assert (config.mask_nesterov, config.prune_scope) == (True, "global")  # the reference's mask SGD; open_lth's IMP
    args = build_parser().parse_args(["prune", "--preset", "imagenet-resnet50-prune", "--rewind-epoch", "0"])
    assert config_from_args(args).model == "resnet50"
    # Frankle & Carbin's Conv-6: 30K iterations of batch 60 on 45,000 images, convs pruned at 15 % per IMP round
    conv6 = config_from_args(build_parser().parse_args(["ticket", "--preset", "cifar10-conv6-ticket"]))
    assert (conv6.epochs, conv6.lr, conv6.batch_size, conv6.prune_fraction_conv, conv6.rewind_epoch) == (
        40, 3e-4, 60, 0.15, 0)


@pytest.mark.parametrize("command", ["ticket", "compare", "sweep"])
def test_help_with_a_preset_shows_its_values_as_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--preset", "cifar10-resnet20-ticket", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "(default: 85)" in text and "(default: 0.0001)" in text and "(default: 8)" not in text
    assert "The defaults shown are preset cifar10-resnet20-ticket's." in text
    # the preset's CS rounds, which one-shot methods do not take (make_config's METHOD_DEFAULTS)
    assert "--rounds" not in text or "(default: 3; 1 for methods magnitude, random, gmp, dnw and str)" in text
    with pytest.raises(SystemExit):
        main([command, "--preset=no-such-preset", "--help"])  # refused when it runs, not when helping
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8)" in text and "defaults shown are preset" not in text


def test_cifar_resnet20_preset_runs_on_cpu_with_synthetic_data(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["ticket", "--preset", "cifar10-resnet20-ticket", "--dataset", "synthetic", "--epochs", "1",
            "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "resnet20" and summary["input_shape"] == [3, 32, 32]
    assert summary["train_epochs"] == 4 and summary["dense_train_epochs"] == 1  # 3 rounds + ticket, dense


@pytest.mark.parametrize("model, shape", [("vgg11", "3 32 32"), ("vgg16", "3 32 32"), ("vgg19", "3 32 32"),
                                          ("resnet20", "3 32 32"), ("resnet32", "3 32 32"), ("resnet56", "3 32 32"),
                                          ("resnet18", "3 64 64"), ("resnet50", "3 64 64")])
def test_paper_models_train_through_the_cli(model, shape, tmp_path):
    argv = ["prune", "--model", model, "--dataset", "synthetic", "--synthetic-shape", *shape.split(),
            "--synthetic-size", "32", "--batch-size", "16", "--epochs", "1", "--ticket-epochs", "1",
            "--mask-exclude", "downsample", "^fc$", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == model and "fc.weight" not in summary["per_layer"]


def test_cifar10_trains_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from test_datasets import write_cifar

    from contsparse.data import cifar as cifar_module

    variant = write_cifar(tmp_path, cifar_module.CIFAR10, n=40)
    monkeypatch.setitem(cifar_module.VARIANTS, "cifar10", variant)
    argv = ["ticket", "--model", "conv2", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "2",
            "--rounds", "1", "--rewind-epoch", "0", "--ticket-epochs", "1", "--batch-size", "32",
            "--no-dense-baseline", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"] == "cifar10" and summary["input_shape"] == [3, 32, 32]


def test_a_model_of_ones_own_reaches_the_cli_through_imports(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_cli_models.py").write_text(
        "from torch import nn\n"
        "from contsparse.models import register_model\n\n\n"
        "@register_model('my-cli-mlp', 'an MLP of the user')\n"
        "def build(input_shape, num_classes):\n"
        "    from my_cli_layers import WIDTH  # a sibling module imported only when the model is built\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, WIDTH), nn.ReLU(), nn.Linear(WIDTH, num_classes))\n")
    (tmp_path / "my_cli_layers.py").write_text("WIDTH = 32\n\n\ndef width():\n    return WIDTH\n")
    monkeypatch.chdir(tmp_path)
    assert main(["ticket", "--model", "my-cli-mlp", "--dataset", "synthetic", "--out", "x"]) == 2
    assert "register it in a module and pass --imports MODULE" in capsys.readouterr().err
    assert main(["ticket", "--imports", "my_cli_models", "--model", "my-cli-mlp", "--dataset", "synthetic",
                 "--synthetic-size", "256", "--epochs", "2", "--rewind-epoch", "0", "--rounds", "1",
                 "--ticket-epochs", "1", "--no-dense-baseline", "--out", "run"]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()
    # The current directory's folders are not packages: a run folder named like an optional package
    # (torch.export probes z3 by importing it) does not import as an empty one
    assert importlib.util.find_spec("run") is None and importlib.util.find_spec("my_cli_layers") is not None
    # processes started with spawn (a user's data-preparation pool) import the user's modules too
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(sys.modules["my_cli_layers"].width) == 32
    # A fresh process (as export or a resumed run would be) imports the module the saved settings name;
    # export (a run folder may come from anyone) only once it is named: importing runs its code
    export = [sys.executable, "-m", "contsparse", "export", "run", "--format", "safetensors"]
    done = subprocess.run(export, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "importing a module runs its code: if you trust them, give --imports " \
        "my_cli_models" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([*export, "--imports", "my_cli_models"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert main(["report", "run"]) == 0  # the masks need no model: nothing to import
    assert main(["ticket", "--imports", "no_such_module_here", "--out", "y"]) == 2
    assert "--imports no_such_module_here: ModuleNotFoundError" in capsys.readouterr().err


def test_a_refused_new_run_leaves_none_of_the_folders_made_for_it(tmp_path, capsys):
    (tmp_path / "kept").mkdir()
    (tmp_path / "no-data").mkdir()  # a data folder without CIFAR-10: refused after the run folder is made
    out = tmp_path / "kept" / "nest" / "a" / "run"
    assert main(["ticket", "--dataset", "cifar10", "--data-dir", str(tmp_path / "no-data"), "--out", str(out)]) == 2
    assert "cifar10" in capsys.readouterr().err
    assert list((tmp_path / "kept").iterdir()) == []  # nest/a/run all removed; what existed stays


def test_flags_a_command_does_not_act_on_are_noted(tmp_path, capsys):
    assert main(["train", "--dataset", "synthetic", "--synthetic-size", "256", "--epochs", "1", "--mask-init", "-0.5",
                 "--no-mask-scaling", "--out", str(tmp_path / "dense")]) == 0
    assert "contsparse: note: train ignores --mask-init, --no-mask-scaling\n" in capsys.readouterr().err
    # a run's saved config reused for another command: the command given wins, and says so
    saved = tmp_path / "dense" / "config.yaml"
    assert main(["prune", "--config", str(saved), "--out", str(tmp_path / "pruned")]) == 0
    assert f"note: {saved} is a config for `train`; its settings are used for `prune`" in capsys.readouterr().err
    assert json.loads((tmp_path / "pruned" / "summary.json").read_text())["command"] == "prune"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # report's check for a directory named twice
    assert main(["report", str(tmp_path / "loop")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    quick = ["--dataset", "synthetic", "--synthetic-size", "256", "--epochs", "2", "--ticket-epochs", "1"]
    assert main(["prune", *quick, "--rewind-epoch", "1", "--lr-milestones", "1", "--out", str(tmp_path / "p")]) == 0
    out, err = capsys.readouterr()
    assert "note: prune ignores --rewind-epoch (pruning fine-tunes the weights where the search left them)\n" in err
    assert "note: prune ignores --lr-milestones (they drop the learning rate under --lr-schedule step, not " \
        "constant)\n" in err
    # advice on settings that run: once the run is accepted (a refused one says only why), in its log
    assert "note: a CS round of 2 epochs jumps from temperature 1 to its final one: give it 3 epochs or more" in out
    assert main(["ticket", *quick, "--method", "str", "--rounds", "1", "--rewind-epoch", "0", "--no-dense-baseline",
                 "--out", str(tmp_path / "s")]) == 0
    assert "note: method str with --weight-decay 0: nothing pushes the thresholds up" in capsys.readouterr().out
    masks = tmp_path / "pruned" / "masks.safetensors"
    assert main(["ticket", *quick, "--method", "given", "--mask-from", str(masks), "--rounds", "3",
                 "--rewind-epoch", "1", "--no-dense-baseline", "--out", str(tmp_path / "g")]) == 0
    assert "note: ticket ignores --epochs, --rewind-epoch, --rounds (method given: no search, the ticket starts " \
        "at iteration 0)\n" in capsys.readouterr().err


def test_a_ticket_with_an_emptied_layer_is_flagged():
    """0 % of a layer means chance accuracy: the summary says so instead of looking like a success."""
    from rich.console import Console

    from contsparse.reports import print_summary

    summary = {"command": "ticket", "method": "cs", "model": "lenet300", "dataset": "mnist", "train_epochs": 4,
               "wall_seconds": 3.0, "weights_remaining": 0.004, "test_accuracy": 0.1135,
               "per_layer": {"hidden.0.weight": 0.0, "hidden.1.weight": 0.02, "output.weight": 0.3}}
    console = Console(record=True, width=200)
    print_summary(summary, console=console)
    assert "warning: every weight of hidden.0.weight is pruned: no signal passes" in console.export_text()
    console = Console(record=True, width=200)
    print_summary({**summary, "per_layer": {"hidden.0.weight": 0.01}}, console=console)
    assert "warning" not in console.export_text()
    # IMP's ticket of each round: the curve `info` shows
    tickets = [{"round": 0, "weights_remaining": 1.0, "val_accuracy": 0.93, "test_accuracy": 0.92, "train_epochs": 2},
               {"round": 1, "weights_remaining": 0.8004, "val_accuracy": 0.95, "test_accuracy": 0.94,
                "train_epochs": 4}]
    console = Console(record=True, width=200)
    print_summary({**summary, "round_tickets": tickets}, per_layer=True, console=console)
    text = console.export_text()
    assert "ticket of each round" in text and "80.04 %" in text


def test_a_read_only_folder_or_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from contsparse.experiments.lock import RunLock

    def refuse(lock):
        raise OSError(errno.EROFS, "Read-only file system", str(lock.path))

    monkeypatch.setattr(RunLock, "acquire", refuse)
    assert main(["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == f"contsparse: error: Read-only file system ({tmp_path / 'x' / '.lock'})\n"


def test_a_stopped_comparison_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """The run in progress turns Ctrl-C into RunInterrupted once its checkpoint is saved."""
    from contsparse.errors import RunInterrupted
    from contsparse.experiments import compare

    def stopped(*args, **kwargs):
        raise RunInterrupted("stopped (SIGINT) in search 0, epoch 1")

    monkeypatch.setattr(compare, "run_comparison", stopped)
    assert main(["compare", "--dataset", "synthetic", "--out", str(tmp_path / "cmp")]) == 130
    assert "Run the same command again to continue" in capsys.readouterr().err


def test_imports_name_what_went_wrong(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tqdm.py").write_text("")  # shadowed by the installed package of that name
    assert main(["ticket", "--imports", "tqdm", "--out", "x"]) == 2
    assert "an installed module of that name, not ./tqdm.py: rename your module" in capsys.readouterr().err
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "models.py").write_text("")
    assert main(["ticket", "--imports", "loose.models", "--out", "x"]) == 2
    assert "loose/ has no __init__.py: add one to make it a package" in capsys.readouterr().err


def test_python_m_does_not_let_the_current_directory_shadow_packages(tmp_path):
    (tmp_path / "yaml.py").write_text("raise RuntimeError('a local yaml.py imported instead of PyYAML')\n")
    (tmp_path / "z3").mkdir()  # a run folder named like a package torch probes
    done = subprocess.run([sys.executable, "-m", "contsparse", "presets"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_a_user_module_that_exits_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "exits_early.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    assert main(["ticket", *QUICK, "--imports", "exits_early", "--out", str(tmp_path / "run")]) == 2
    assert "--imports exits_early: SystemExit: 3" in capsys.readouterr().err


def test_info_on_a_run_in_progress_says_it_is_running(tmp_path, capsys):
    from contsparse.experiments.lock import RunLock

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("command: ticket\nmethod: cs\nmodel: lenet300\ndataset: mnist\n")
    assert main(["info", str(run)]) == 2
    assert "resume it with: contsparse resume" in capsys.readouterr().err
    with RunLock(run):
        assert main(["info", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"it is running (pid {os.getpid()} on" in err and "resume" not in err


DENORMAL_CHECK = """
import torch
{run}
product = torch.full((1 << 22,), 1e-20) * 1e-20  # 1e-40 is subnormal; the chunks run on two threads
print(torch.get_num_threads(), int((product == 0).sum()), product.numel())
"""


@pytest.mark.parametrize("before, flushed", [("run", True), ("work-then-run", False), ("nothing", False)])
def test_a_run_flushes_subnormals_on_every_thread_or_on_none(tmp_path, before, flushed):
    """A run sets flush-to-zero before its first parallel operation, so that the OpenMP worker
    threads start with it too (a CS search's late rounds are subnormal-heavy and several times
    slower without it). After parallel work in the same process the workers would keep IEEE
    subnormals while the calling thread flushed: the run then leaves the setting off everywhere."""
    run = f"from contsparse.cli import main; assert main({['ticket', *QUICK, '--out', str(tmp_path / 'r')]!r}) == 0"
    code = {"run": run, "work-then-run": "torch.full((1 << 22,), 1.0) * 2\n" + run, "nothing": ""}[before]
    done = subprocess.run([sys.executable, "-c", DENORMAL_CHECK.format(run=code)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    threads, zeros, total = map(int, done.stdout.split()[-3:])
    assert threads == 2
    assert zeros == (total if flushed else 0)


def test_a_relative_data_dir_is_kept_as_an_absolute_path(tmp_path, monkeypatch):
    """``resume`` from another folder must find the data the run was started with."""
    from contsparse.experiments.config import make_config

    monkeypatch.chdir(tmp_path)
    assert make_config({"data_dir": "data"}).data_dir == str(tmp_path / "data")
    assert make_config({}).data_dir is None


def test_a_run_saved_before_a_setting_existed_is_the_same_run(tmp_path, capsys):
    """Settings added later (ADDED_LATER) are missing from older config.yaml files: read with their
    defaults, which keep the old behaviour, not as a change of settings."""
    argv = ["prune", "--method", "gmp", "--sparsity", "0.5", "--gmp-frequency", "2", "--batch-size", "16",
            "--dataset", "synthetic", "--synthetic-size", "256", "--epochs", "2", "--out", str(tmp_path / "old")]
    assert main(argv) == 0
    config = tmp_path / "old" / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.startswith("gmp_start_epoch:")))
    capsys.readouterr()
    assert main(argv) == 0
    assert "already finished, nothing to do" in capsys.readouterr().out
