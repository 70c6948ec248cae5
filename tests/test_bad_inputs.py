"""The bad-input catalogue: every user mistake is one line naming the problem and the fix, exit
status 2, no traceback, and it loses or changes nothing in any run directory."""

import ast
import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from safetensors import SafetensorError
from torch import nn

from contsparse.cli import main
from contsparse.data import register_dataset
from contsparse.data.synthetic import load_synthetic
from contsparse.experiments import RunConfig
from contsparse.experiments.lock import RunLock
from contsparse.faults import ENV
from contsparse.models import register_model
from contsparse.training import checkpoint as checkpoint_module

QUICK = ["--model", "lenet300", "--dataset", "synthetic", "--train-subset", "256", "--epochs", "2", "--rounds", "1",
         "--rewind-epoch", "0", "--ticket-epochs", "1", "--no-dense-baseline", "--device", "cpu"]


def _bad_labels(_data_dir, _options):
    data = load_synthetic()
    data.train.y[::7] = 12  # labels beyond the 10 classes
    return data


register_dataset("test-bad-labels", _bad_labels)


def _float_labels(_data_dir, _options):
    data = load_synthetic()
    data.val.y = data.val.y.float()
    return data


register_dataset("test-float-labels", _float_labels)


def _no_validation(_data_dir, _options):
    data = load_synthetic()
    data.val = data.val.subset(0)
    return data


register_dataset("test-no-validation", _no_validation)


@register_model("test-fixed-input", "takes 3x32x32 inputs whatever the data")
def _fixed_input(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))


class Evil:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "done": root / "done", "stopped": root / "stopped", "marker": root / "code-ran"}
    assert main(["ticket", *QUICK, "--out", str(w["done"])]) == 0
    env = dict(os.environ, **{ENV: "epoch:1"})  # SIGKILL after the first epoch's checkpoint
    killed = subprocess.run([sys.executable, "-m", "contsparse", "ticket", *QUICK, "--out", str(w["stopped"])],
                            env=env, capture_output=True, timeout=300)
    assert killed.returncode == -9
    w["stale"] = root / "stale"
    shutil.copytree(w["stopped"], w["stale"])  # with the lock file the killed run left
    for name, damage in (("truncated", lambda p: p.write_bytes(p.read_bytes()[:500])),
                         ("tampered", lambda p: p.write_bytes(p.read_bytes().replace(b"\x00\x00", b"\x01\x00", 50)))):
        w[name] = root / name
        shutil.copytree(w["stopped"], w[name])
        for folder in ("checkpoint", "checkpoint.prev"):
            if (w[name] / folder).is_dir():
                damage(w[name] / folder / "tensors.safetensors")
    # a checkpoint replaced by a pickle, with checksums recomputed to match it
    w["evil_ckpt"] = root / "evil-ckpt"
    shutil.copytree(w["stopped"], w["evil_ckpt"])
    shutil.rmtree(w["evil_ckpt"] / "checkpoint.prev", ignore_errors=True)
    evil_tensors = w["evil_ckpt"] / "checkpoint" / "tensors.safetensors"
    evil_tensors.write_bytes(pickle.dumps(Evil(w["marker"])))
    manifest = w["evil_ckpt"] / "checkpoint" / "manifest.json"
    entries = json.loads(manifest.read_text())
    entries["sha256"]["tensors.safetensors"] = hashlib.sha256(evil_tensors.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(entries))

    w["not_a_run"] = root / "holiday-photos"
    w["not_a_run"].mkdir()
    (w["not_a_run"] / "beach.jpg").write_bytes(b"\xff\xd8")
    w["empty"] = root / "empty"
    w["empty"].mkdir()
    w["a_file"] = root / "notes.txt"
    w["a_file"].write_text("hello")
    configs = {"malformed": "epochs: [1,\n", "unknown_key": "epochz: 3\n", "not_mapping": "- epochs\n- 3\n",
               "bad_bool": "dense_baseline: maybe\n", "bad_value": "penalty: -1e-8\n", "no_value": "epochs:\n",
               "bool_number": "lr: true\n"}
    for name, text in configs.items():
        w[name] = root / f"{name}.yaml"
        w[name].write_text(text)
    w["binary_config"] = root / "binary.yaml"
    w["binary_config"].write_bytes(bytes([0xF8, 0x00, 0x9C, 0xFF]) * 50)
    w["list_summary"] = root / "list-summary"
    shutil.copytree(w["done"], w["list_summary"])
    (w["list_summary"] / "summary.json").write_text("[1, 2]\n")
    w["empty_summary"] = root / "empty-summary"
    shutil.copytree(w["done"], w["empty_summary"])
    (w["empty_summary"] / "summary.json").write_text("{}\n")
    w["text_accuracy"] = root / "text-accuracy"  # found by a review of the reports
    shutil.copytree(w["done"], w["text_accuracy"])
    summary = json.loads((w["done"] / "summary.json").read_text())
    (w["text_accuracy"] / "summary.json").write_text(json.dumps({**summary, "val_accuracy": "0.9"}))
    w["imports_run"] = root / "imports-run"  # found by a review of export: a run folder from someone else
    shutil.copytree(w["done"], w["imports_run"])
    config = w["imports_run"] / "config.yaml"
    config.write_text(config.read_text().replace("imports: []", "imports:\n- evil_helpers"))
    (root / "evil_helpers.py").write_text(f"open({str(w['marker'])!r}, 'w').close()\n")
    w["imports_sweep"] = root / "imports-sweep"  # a sweep folder from someone else, found by a diff review
    w["imports_sweep"].mkdir()
    base = {**RunConfig().to_dict(), "imports": ["evil_helpers"]}
    (w["imports_sweep"] / "sweep.yaml").write_text(yaml.safe_dump({"base": base, "grid": {"mask_init": [-0.05]}}))
    w["truncated_csv"] = root / "truncated-csv"
    w["truncated_csv"].mkdir()
    (w["truncated_csv"] / "compare.csv").write_text(
        "method,label,seed,weights_remaining,test_accuracy,train_epochs,wall_seconds,run_dir\ncs,cs s0=-0.05,0\n")
    w["other_model"] = root / "other-model"
    shutil.copytree(w["done"], w["other_model"])
    config = w["other_model"] / "config.yaml"
    config.write_text(config.read_text().replace("model: lenet300", "model: conv2"))
    w["logit_masks"] = root / "logits.safetensors"  # the mask logits, not binary masks
    saved_masks = safetensors.torch.load_file(str(w["done"] / "masks.safetensors"))
    safetensors.torch.save_file({name: torch.randn(mask.shape) for name, mask in saved_masks.items()},
                                str(w["logit_masks"]))
    w["evil_weights"] = root / "evil-weights.pt"  # starting weights that would run code if unpickled
    w["evil_weights"].write_bytes(pickle.dumps(Evil(w["marker"])))
    w["empty_config"] = root / "empty-config"
    shutil.copytree(w["done"], w["empty_config"])
    (w["empty_config"] / "config.yaml").write_text("")
    data = {"bad_checksum": b"not the mnist pickle", "evil_pickle": gzip.compress(pickle.dumps(Evil(w["marker"])))}
    for name, payload in data.items():
        w[name] = root / f"data-{name}"
        w[name].mkdir()
        (w[name] / "mnist.pkl.gz").write_bytes(payload)
    w["truncated_idx"] = root / "data-truncated-idx"
    w["truncated_idx"].mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (w["truncated_idx"] / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 40)[:30])
    return w


@contextmanager
def disk_full():
    def no_space(tensors, path):  # what safetensors raises on a full disk (not an OSError)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    original = checkpoint_module.save_file
    checkpoint_module.save_file = no_space
    try:
        yield
    finally:
        checkpoint_module.save_file = original


@contextmanager
def locked(path: Path):
    with RunLock(path):
        yield


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# (case, argv with {placeholders} from `world`, expected part of the message, context)
CATALOGUE = [
    ("unknown model", "ticket --model resnet9000 --out {root}/x", "unknown model 'resnet9000'; available:", None),
    ("unknown dataset", "ticket --dataset imagenet22k --out {root}/x", "unknown dataset 'imagenet22k'", None),
    ("unknown method", "ticket --method magic --out {root}/x", "unknown method 'magic'; available: cs", None),
    ("sparsity outside (0, 1)", "prune --method magnitude --sparsity 1.2 --out {root}/x",
     "sparsity is the fraction of weights pruned and must be in (0, 1)", None),
    ("target method without --sparsity", "prune --method random --out {root}/x", "give --sparsity", None),
    ("unknown prune scope", "ticket --method imp --prune-scope everywhere --out {root}/x", "prune_scope must be", None),
    ("unknown preset", "ticket --preset cifar11-resnet21 --out {root}/x", "unknown preset 'cifar11-resnet21'", None),
    ("negative penalty", "ticket --penalty -1 --out {root}/x", "penalty must be >= 0", None),
    ("final_temp <= 1", "ticket --final-temp 1 --out {root}/x", "final_temp must be > 1", None),
    ("rounds < 1", "ticket --rounds 0 --out {root}/x", "rounds must be in [1, 1000]", None),
    ("absurd number of rounds", "ticket --rounds 99999999999999 --out {root}/x", "rounds must be in [1, 1000]", None),
    ("absurd number of epochs", "ticket --epochs 99999999999999 --out {root}/x", "epochs must be in [1, 100000]",
     None),
    ("setting out of range (1e308)", "ticket --mask-init 1e308 --out {root}/x", "mask_init = 1e+308 is out of range",
     None),
    ("mask scaling overflow", "ticket --mask-init -31 --out {root}/x", "give a mask_init >= -30", None),
    ("negative weight decay", "ticket --weight-decay -1 --out {root}/x", "weight_decay must be >= 0", None),
    ("seed beyond 64 bits", "ticket --seed 99999999999999999999999 --out {root}/x", "seed must be in [0, 2**63)",
     None),
    ("NaN STR threshold", "ticket --method str --str-init nan --out {root}/x", "str_init must be a finite number",
     None),
    ("more data than memory", "train --dataset synthetic --synthetic-size 99999999999999 --out {root}/x",
     "out of memory", None),
    ("rewind epoch >= epochs", "ticket --epochs 3 --rewind-epoch 3 --out {root}/x",
     "rewind_epoch must be in [0, epochs) = [0, 3)", None),
    ("IMP pruning rounds past the rewind point", "prune --method imp --epochs 2 --rounds 2 --out {root}/x",
     "rewind_epoch must be in [0, epochs) = [0, 2)", None),
    ("NaN learning rate", "ticket --lr nan --out {root}/x", "lr must be a finite number", None),
    ("infinite penalty", "ticket --penalty inf --out {root}/x", "penalty must be a finite number", None),
    ("fractional epochs", "ticket --epochs 2.5 --out {root}/x", "epochs = '2.5' is not a valid int", None),
    ("word for a number", "ticket --epochs many --out {root}/x", "epochs = 'many' is not a valid int", None),
    ("batch size 0", "ticket --batch-size 0 --out {root}/x", "batch_size must be >= 1", None),
    ("negative learning rate", "train --lr -0.1 --out {root}/x", "learning rates must be > 0", None),
    ("momentum >= 1", "ticket --momentum 1.5 --out {root}/x", "momentum must be in [0, 1)", None),
    ("unknown lr schedule", "ticket --lr-schedule wavy --out {root}/x", "unknown lr_schedule 'wavy'", None),
    ("unknown device", "ticket --device tpu --out {root}/x", "device must be auto, cpu, cuda or cuda:N", None),
    ("bad layer regex", "ticket --mask-include [ --out {root}/x", "is not a valid regular expression", None),
    ("empty training subset", "ticket --train-subset 0 --out {root}/x", "train_subset must be >= 1", None),
    ("malformed YAML", "ticket --config {malformed} --out {root}/x", "is not valid YAML", None),
    ("unknown YAML key", "ticket --config {unknown_key} --out {root}/x", "unknown config key(s): epochz", None),
    ("YAML not a mapping", "ticket --config {not_mapping} --out {root}/x", "must be a mapping of settings", None),
    ("bad YAML boolean", "ticket --config {bad_bool} --out {root}/x", "dense_baseline = 'maybe' is not a valid bool",
     None),
    ("bad YAML value", "ticket --config {bad_value} --out {root}/x", "penalty must be >= 0", None),
    ("missing config file", "ticket --config {root}/nope.yaml --out {root}/x", "cannot read config file", None),
    ("binary file as config", "ticket --config {binary_config} --out {root}/x", "is not a text file", None),
    ("missing data directory", "ticket --data-dir {root}/no-data --out {root}/x", "data directory", None),
    ("data directory that is a file", "ticket --data-dir {a_file} --out {root}/x", "is a file; give the folder",
     None),
    ("data file with a wrong checksum", "train --data-dir {bad_checksum} --out {root}/x", "has sha256", None),
    ("truncated data files", "train --data-dir {truncated_idx} --out {root}/x", "md5", None),
    ("malicious pickle as data", "train --data-dir {evil_pickle} --out {root}/x", "has sha256", None),
    ("truncated checkpoint", "resume {truncated}", "no usable checkpoint", None),
    ("tampered checkpoint", "resume {tampered}", "does not match its checksum", None),
    ("pickle in place of a checkpoint", "resume {evil_ckpt}", "no usable checkpoint", None),
    ("resume a directory that is not a run", "resume {not_a_run}", "is not a contsparse run directory", None),
    ("resume a path that does not exist", "resume {root}/nowhere", "is not a directory", None),
    ("info on an empty directory", "info {empty}", "is not a contsparse run directory", None),
    ("info on an unfinished run", "info {stopped}", "has not finished yet", None),
    ("summary that is not a JSON object", "info {list_summary}", "summary.json is damaged (a JSON list", None),
    ("emptied config.yaml", "resume {empty_config}", "config.yaml is damaged (no command, method, model, dataset)",
     None),
    ("emptied config.yaml, same command again", "ticket " + " ".join(QUICK) + " --out {empty_config}",
     "config.yaml is damaged", None),
    ("--out is a folder of other files", "ticket --out {not_a_run}", "is not a contsparse run directory", None),
    ("--out is a file", "ticket --out {a_file}", "is a file", None),
    ("other settings without --force", "ticket " + " ".join(QUICK) + " --seed 7 --out {stopped}",
     "seed: 0 -> 7", None),
    ("--force with fewer epochs than trained", "ticket " + " ".join(QUICK).replace("--epochs 2", "--epochs 1")
     + " --force --out {stopped}", "has trained 1 epoch of search 0, which the new settings end after 1", None),
    ("--force with another model", "resume {stopped} --model conv2 --force",
     "holds a checkpoint whose tensors do not fit the model of the new settings (model: 'lenet300' -> 'conv2')", None),
    ("--force with other masked layers", "resume {stopped} --mask-exclude ^output$ --force",
     "whose tensors do not fit the model of the new settings", None),
    ("--force with another s0", "resume {stopped} --mask-init -0.2 --force",
     "mask_init cannot change in a started run", None),
    ("compare: IMP rounds end before the rewind point", "compare --dataset synthetic --train-subset 256 --epochs 3 "
     "--ticket-epochs 1 --rewind-epoch 1 --out {root}/cmp", "the comparison's IMP runs train each round for "
     "--ticket-epochs (1) epochs and rewind to epoch 1 (--rewind-epoch): give --rewind-epoch below --ticket-epochs",
     None),
    ("other settings for a finished run", "ticket " + " ".join(QUICK) + " --seed 7 --force --out {done}",
     "finished run with other settings", None),
    ("run directory in use", "resume {stopped}", "is in use by pid", "lock"),
    ("disk full while checkpointing", "ticket " + " ".join(QUICK) + " --out {root}/full", "the disk is full",
     "disk_full"),
    ("labels out of range", "train --dataset test-bad-labels --epochs 1 --out {root}/x", "outside [0, 10)", None),
    ("labels given as floats", "train --dataset test-float-labels --epochs 1 --out {root}/x",
     "the validation split of synthetic has float32 labels; give class indices as integers", None),
    ("an empty validation split", "train --dataset test-no-validation --epochs 1 --out {root}/x",
     "the validation split of synthetic is empty", None),
    ("a last training batch of 1 at a 1x1 feature map", "train --model resnet20 --dataset synthetic "
     "--synthetic-shape 3 4 4 --train-subset 5 --batch-size 4 --epochs 1 --out {root}/x",
     "reached a normalisation layer with one value per channel", None),
    ("a sparsity target for a method that ignores it", "ticket --method imp --sparsity 0.99 --out {root}/x",
     "method imp would ignore it (its sparsity follows from --rounds and --prune-fraction)", None),
    ("input shape the model cannot take", "train --model test-fixed-input --dataset synthetic --epochs 1 "
     "--out {root}/y", "cannot take inputs of shape (1, 28, 28)", None),
    ("CUDA requested without a GPU", "train --dataset synthetic --device cuda --out {root}/z",
     "no CUDA GPU is available", "no_gpu"),
    # found by a review of the CLI
    ("YAML key with no value", "ticket --config {no_value} --out {root}/x", "epochs needs a value", None),
    ("YAML boolean for a number", "ticket --config {bool_number} --out {root}/x", "lr = True is not a valid float",
     None),
    ("summary.json without its fields", "info {empty_summary}",
     "summary.json is damaged: missing or wrong command (text)", None),
    ("report of a summary without its fields", "report {empty_summary} --out {root}/rep", "summary.json is damaged",
     None),
    ("summary.json with a text accuracy", "report {text_accuracy} --out {root}/rep2",
     "summary.json is damaged: missing or wrong val_accuracy (a number)", None),
    ("comparison table cut short", "report {truncated_csv} --out {root}/rep3", "cannot read the comparison", None),
    ("export over the run's own model file", "export {done} --out {done}/model.safetensors",
     "is one of the files of the run", None),
    ("export over another run's file", "export {done} --out {stopped}/config.yaml", "is one of the files of the run",
     None),
    ("export under another format's name", "export {done} --format onnx --out {root}/m.safetensors",
     "names a safetensors file but --format is onnx", None),
    ("export to a file name too long", "export {done} --out {root}/" + "a" * 300 + ".safetensors",
     "File name too long", None),
    ("export of a run whose config imports modules", "export {imports_run} --out {root}/i.safetensors",
     "importing a module runs its code: if you trust them, give --imports evil_helpers", "in_root"),
    ("report of a sweep whose plan imports modules", "report {imports_sweep} --out {root}/rs",
     "importing a module runs its code: if you trust them, give --imports evil_helpers", "in_root"),
    ("sweep into a folder whose plan imports modules", "sweep --dataset synthetic --out {imports_sweep}",
     "importing a module runs its code: if you trust them, give --imports evil_helpers", "in_root"),
    ("export into a path under a file", "export {done} --out {a_file}/model.safetensors", "is a file, not a folder",
     None),
    ("export over a file of yours", "export {done} --format pytorch --out {a_file}",
     "exists: give --force to replace it, or another file name", None),
    ("export of a run whose config names another model", "export {other_model} --out {root}/other.st",
     "its config.yaml names the model conv2, its summary.json lenet300 (config.yaml was edited by hand: restore it)",
     None),
    ("malformed GPU index", "ticket --device cuda:abc --out {root}/x", "device must be auto, cpu, cuda or cuda:N",
     None),
    ("--out under a file", "ticket " + " ".join(QUICK) + " --out {a_file}/sub", "is a file; choose another --out",
     None),
    ("conv model for flat inputs", "ticket --model conv2 --dataset synthetic --synthetic-shape 28 --out {root}/x",
     "cannot build conv2 for inputs of shape (28,)", None),
    ("lr milestones out of order", "ticket --lr-schedule step --lr-milestones 5 3 --out {root}/x",
     "lr_milestones are the epochs (from 1) where the learning rate drops, in increasing order", None),
    ("compare with a NaN s0", "compare --methods dense cs --mask-inits -0.05 nan --out {root}/cmp-nan",
     "mask_init must be a finite number", None),
    ("compare into a run directory", "compare --out {done}", "is a run directory", None),
    ("sweep into a run directory", "sweep --dataset synthetic --point mask_init=-0.03 --out {done}",
     "is a run directory", None),
    ("sweep into a folder of other files", "sweep --dataset synthetic --point mask_init=-0.03 --out {not_a_run}",
     "holds other files (no sweep.yaml)", None),
    ("sweep point naming a setting twice", "sweep --point mask_init=-0.02,mask_init=-0.03 --out {root}/sw",
     "mask_init given twice", None),
    ("method given without a mask", "ticket --method given --out {root}/x", "method given needs --mask-from", None),
    ("a mask for another method", "ticket --mask-from {done} --out {root}/x", "--mask-from is for --method given",
     None),
    ("a mask file that does not exist", "ticket --method given --mask-from {root}/none.safetensors --out {root}/x",
     "does not exist", None),
    ("the mask of an unfinished run", "ticket --method given --mask-from {stopped} --out {root}/x",
     "no masks.safetensors in it", None),
    ("the mask of another model", "ticket --method given --mask-from {done} --model conv2 --dataset synthetic "
     "--synthetic-shape 3 32 32 --out {root}/x", "the given masks do not fit this model's masked layers", None),
    ("a mask file of logits, not binary masks", "ticket --method given --mask-from {logit_masks} --out {root}/x",
     "must be boolean or hold only 0 and 1", None),
    ("starting weights that do not exist", "prune --weights-from {root}/none.pt --out {root}/x", "does not exist",
     None),
    ("starting weights of an unfinished run", "prune --weights-from {stopped} --out {root}/x",
     "no model.safetensors in it", None),
    ("starting weights that would run code", "prune --weights-from {evil_weights} --out {root}/x",
     "is neither a safetensors nor a torch.save file", None),
    ("starting weights of another model", "prune --weights-from {done} --model conv2 --dataset synthetic "
     "--synthetic-shape 3 32 32 --out {root}/x", "does not fit this model (missing: features.0.weight", None),
    ("sweep setting given by a flag and the grid", "sweep --mask-init -0.05 --grid mask_init=-0.02,-0.03 "
     "--out {root}/sw", "mask_init is given twice: by --mask-init and in --grid/--point", None),
]


@contextmanager
def working_in(folder: Path):
    """The case runs from ``folder`` (where a module of the same name as the one asked for lies)."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("case, argv, message, context", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_clean_line(case, argv, message, context, world, capsys):
    if context == "no_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    runs = {name: snapshot(world[name]) for name in ("done", "stopped", "truncated", "tampered", "evil_ckpt")}
    manager = {"lock": lambda: locked(world["stopped"]), "disk_full": disk_full,
               "in_root": lambda: working_in(world["root"])}.get(context, nullcontext)
    new_folder = world["root"] / "x"
    was_there = new_folder.exists()
    with manager():
        status = main(argv.format(**world).split())
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err, err
    assert err.startswith("contsparse: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for name, before in runs.items():
        assert snapshot(world[name]) == before, f"{case} changed {name}"
    # a new run refused before it starts leaves no folder (one that started keeps its settings)
    assert was_there or not new_folder.exists() or (new_folder / "config.yaml").is_file(), \
        f"{case} left an empty {new_folder} behind"
    assert not world["marker"].exists(), "a pickle or a module ran code"


def test_catalogue_is_large_enough():
    assert len({case for case, *_ in CATALOGUE}) >= 25


def test_debug_shows_the_traceback(world):
    with pytest.raises(Exception, match="unknown model"):
        main(["ticket", "--model", "resnet9000", "--debug", "--out", str(world["root"] / "x")])


def test_stale_lock_of_a_killed_run_is_taken_over(world, capsys):
    copy = world["stale"]
    assert (copy / ".lock").read_text().startswith("pid ")  # left by the SIGKILLed run
    assert main(["resume", str(copy)]) == 0
    captured = capsys.readouterr()
    assert "taking over the lock left by a stopped run" in captured.out + captured.err
    assert (copy / ".lock").read_text() == ""  # released on a clean exit


def unsafe_loads(source: str) -> list[int]:
    """Lines calling ``pickle.load(s)``, or ``torch.load`` without ``weights_only=True``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            continue
        owner, name = node.func.value.id, node.func.attr
        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in node.keywords)
        if (owner == "pickle" and name in ("load", "loads")) or (owner == "torch" and name == "load" and not safe):
            found.append(node.lineno)
    return found


def test_no_unsafe_deserialisation_in_the_package():
    """Checkpoints are safetensors and JSON; no code path unpickles (a comment naming
    ``weights_only=True`` beside an unsafe call does not count)."""
    assert unsafe_loads("import pickle, torch\ntorch.load(f)  # weights_only=True\npickle.loads(b)\n"
                        "torch.load(f, weights_only=True)\n") == [2, 3]
    source = Path(__file__).resolve().parents[1] / "src" / "contsparse"
    for path in source.rglob("*.py"):
        assert unsafe_loads(path.read_text()) == [], path


def test_missing_gpu_or_tensorboard_is_refused_before_the_settings_are_written(tmp_path, capsys):
    import importlib.util

    cases = [] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU is available")]
    if importlib.util.find_spec("tensorboard") is None:
        cases.append((["--tensorboard"], "--tensorboard needs the tensorboard package"))
    if not cases:
        pytest.skip("this machine has a GPU and tensorboard")
    for flags, message in cases:
        out = tmp_path / flags[0].strip("-")
        assert main(["train", "--dataset", "synthetic", *flags, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()  # a new folder is removed again: nothing left, the same --out works afterwards
