"""``--weights-from``: runs that start from trained weights (a run's final model or a state_dict file)."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from contsparse.cli import main
from contsparse.data import load_dataset
from contsparse.errors import UserError
from contsparse.experiments import make_config
from contsparse.experiments.runner import masked_model
from contsparse.experiments.starting_weights import load_starting_weights, read_weights
from contsparse.models import build_model

SYNTHETIC = ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "64", "--device", "cpu"]


def lenet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return build_model("lenet300", (1, 28, 28), 10).state_dict()


def test_state_dicts_are_read_from_safetensors_torch_save_checkpoints_and_wrapped_models(tmp_path):
    state = lenet_state()
    save_file(state, tmp_path / "plain.safetensors")
    torch.save(state, tmp_path / "plain.pt")
    # a training script's checkpoint of a DistributedDataParallel model, and a torch.compile'd one
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best": 0.9},
               tmp_path / "ddp.pth")
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "compiled.pth")
    torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, tmp_path / "both.pt")
    for name in ("plain.safetensors", "plain.pt", "ddp.pth", "compiled.pth", "both.pt"):
        model = build_model("lenet300", (1, 28, 28), 10)
        load_starting_weights(model, tmp_path / name)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), name


def test_unreadable_or_missing_weights_are_one_line_errors(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"epoch": 3, "notes": "none"}, tmp_path / "no_tensors.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module: weights_only refuses to run its code
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("command: train\n")
    (tmp_path / "sweep").mkdir()
    cases = {"missing.safetensors": "does not exist", "unfinished": "no model.safetensors in it",
             "sweep": "is a folder but not a run directory", "": "needs a path",
             "text.pt": "is neither a safetensors nor a torch.save file",
             "no_tensors.pt": r"holds no state_dict of tensors \(its keys: epoch, notes",
             "module.pt": r"holds objects other than tensors \(torch.nn.modules.linear.Linear\), .*: save "
                          r"model.state_dict\(\), not the model$"}
    (tmp_path / "requirements.txt").write_text("torch>=2.1\n")  # text the unpickler fails on with an IndexError
    torch.save({0: torch.zeros(3)}, tmp_path / "int_keys.pt")
    torch.save({"state_dict": {}, "epoch": 1}, tmp_path / "empty_state.pt")
    header = b'{"__metadata__": 5}'
    (tmp_path / "odd_metadata.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    cases |= {"requirements.txt": "is neither a safetensors nor a torch.save file",
              "int_keys.pt": r"holds tensors keyed by ints \(0, \.\.\.\), not by parameter names",
              "empty_state.pt": "holds an empty 'state_dict': no weights to start from",
              "odd_metadata.safetensors": "is a damaged safetensors file"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message):
            read_weights(tmp_path / name if name else "")


def test_files_are_told_apart_by_content_and_sparse_or_compressed_weights_load_dense(tmp_path):
    from contsparse.export.compressed import save_compressed

    state = lenet_state()
    state["hidden.0.weight"][:, 100:] = 0.0  # mostly zeros: compressed
    save_file(state, tmp_path / "a_safetensors_file.bin")
    torch.save({k: v.to_sparse() for k, v in state.items()}, tmp_path / "sparse.safetensors")  # misnamed, sparse
    save_compressed(state, tmp_path / "compressed.safetensors")  # contsparse export --format compressed
    for name in ("a_safetensors_file.bin", "sparse.safetensors", "compressed.safetensors"):
        read = read_weights(tmp_path / name)
        assert all(v.layout == torch.strided and torch.equal(v, state[k]) for k, v in read.items()), name


def test_a_replaced_file_is_refused_and_the_digest_names_the_weights(tmp_path):
    save_file(lenet_state(), tmp_path / "w.safetensors")
    digest = hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    config = make_config({"dataset": "synthetic", "weights_from": str(tmp_path / "w.safetensors")})
    assert config.weights_sha256 == digest
    # the same file elsewhere is the same run; its path is not part of what the run is
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes())
    moved = make_config({"dataset": "synthetic", "weights_from": str(tmp_path / "elsewhere" / "w.safetensors")})
    assert moved.identity() == config.identity() != make_config({"dataset": "synthetic"}).identity()
    torch.manual_seed(1)
    save_file(build_model("lenet300", (1, 28, 28), 10).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(UserError, match=r"has changed since this run was set up \(sha256 [0-9a-f]{12}\.\.\. then.*"
                                        r"`contsparse resume RUN_DIR --weights-from FILE`"):
        read_weights(tmp_path / "w.safetensors", config.weights_sha256)
    assert make_config({"dataset": "synthetic", "weights_from": str(tmp_path / "w.safetensors")}).identity() \
        != config.identity()


def test_a_wrappers_prefix_and_a_missing_batch_count_still_fit():
    torch.manual_seed(3)
    resnet = build_model("resnet20", (3, 32, 32), 10)
    state = {f"model.{k}": v + 1 if v.is_floating_point() else v for k, v in resnet.state_dict().items()
             if not k.endswith("num_batches_tracked")}  # a Lightning module's attribute, an older BatchNorm
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        torch.save({"state_dict": state}, f"{folder}/lightning.ckpt")
        load_starting_weights(resnet, f"{folder}/lightning.ckpt")
    assert all(torch.equal(resnet.state_dict()[k.removeprefix("model.")], v) for k, v in state.items())


def test_weights_that_do_not_fit_are_refused_with_what_differs_and_nothing_is_loaded(tmp_path):
    model = build_model("lenet300", (1, 28, 28), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = lenet_state()
    state["output.weight"] = torch.zeros(5, 100)  # another number of classes
    state["extra.weight"] = torch.zeros(1)
    del state["hidden.0.bias"]
    state["hidden.1.weight"] = state["hidden.1.weight"].long()
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match=r"other shapes: output.weight \(5, 100\) \(the model's: \(10, 100\)\); "
                                        r"not floating point: hidden.1.weight \(torch.int64\); "
                                        r"missing: hidden.0.bias; not in the model: extra.weight"):
        load_starting_weights(model, tmp_path / "other.safetensors")
    nan = lenet_state()
    nan["output.bias"][3] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(UserError, match=r"holds NaN or infinite values \(output.bias\)"):
        load_starting_weights(model, tmp_path / "nan.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_run_starts_from_the_weights_and_its_reinitialised_control_does_not(tmp_path):
    state = lenet_state()
    save_file(state, tmp_path / "start.safetensors")
    config = make_config({"dataset": "synthetic", "synthetic_size": 256,
                          "weights_from": str(tmp_path / "start.safetensors")})
    data = load_dataset(config.dataset, config.data_dir, config.data_options())
    model, _ = masked_model(config, data, 1)
    own = model.state_dict()  # the masks attach after loading: a masked weight is its parametrization's original
    for key, value in state.items():
        assert torch.equal(own[key if key in own else key.replace(".weight", ".parametrizations.weight.original")],
                           value), key
    fresh, _ = masked_model(config, data, 1, starting_weights=False)
    assert not torch.equal(fresh.state_dict()["output.parametrizations.weight.original"], state["output.weight"])


def test_pruning_a_trained_run_from_the_command_line(tmp_path, capsys):
    dense = tmp_path / "dense"
    assert main(["train", *SYNTHETIC, "--epochs", "2", "--out", str(dense)]) == 0
    trained = json.loads((dense / "summary.json").read_text())
    # the same weights trained on with a vanishing learning rate: the trained network's accuracy
    again = tmp_path / "again"
    assert main(["train", *SYNTHETIC, "--epochs", "1", "--lr", "1e-12", "--weights-from", str(dense),
                 "--out", str(again)]) == 0
    assert json.loads((again / "summary.json").read_text())["test_accuracy"] == trained["test_accuracy"]
    pruned = tmp_path / "pruned"
    assert main(["prune", *SYNTHETIC, "--epochs", "1", "--ticket-epochs", "1", "--mask-init", "0.5",
                 "--weights-from", str(dense), "--out", str(pruned)]) == 0
    model_file = dense / "model.safetensors"
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert f"starting from the weights in {dense.absolute()} (sha256 {digest})" in capsys.readouterr().out
    summary = json.loads((pruned / "summary.json").read_text())
    assert (summary["weights_from"], summary["weights_from_sha256"]) == (str(dense.absolute()), digest)
    # saved as an absolute path: resumable from any folder
    assert "weights_from: " + str(dense.absolute()) in (pruned / "config.yaml").read_text()
    # another model's weights: a one-line error before anything trains
    code = main(["ticket", *SYNTHETIC, "--model", "conv2", "--synthetic-shape", "3", "32", "32", "--epochs", "1",
                 "--rewind-epoch", "0", "--weights-from", str(dense), "--out", str(tmp_path / "conv")])
    assert code == 2 and "does not fit this model" in capsys.readouterr().err
    assert not (tmp_path / "conv" / "checkpoint").exists()


def test_a_started_run_keeps_the_weights_it_began_from(tmp_path, monkeypatch, capsys):
    """Found by a review: a file replaced between start and resume used to be recorded as the run's
    starting weights, and a deleted one stopped commands that no longer read it."""
    weights, run = tmp_path / "w.safetensors", tmp_path / "run"
    save_file(lenet_state(), weights)
    argv = ["ticket", *SYNTHETIC, "--epochs", "2", "--rewind-epoch", "0", "--ticket-epochs", "1",
            "--no-dense-baseline", "--weights-from", str(weights), "--out", str(run)]
    monkeypatch.setenv("CONTSPARSE_FAULT", "epoch:1")  # a Ctrl-C after the first epoch's checkpoint
    monkeypatch.setenv("CONTSPARSE_FAULT_SIGNAL", "INT")
    assert main(argv) == 130
    monkeypatch.delenv("CONTSPARSE_FAULT")
    began = hashlib.sha256(weights.read_bytes()).hexdigest()
    torch.manual_seed(1)
    save_file(build_model("lenet300", (1, 28, 28), 10).state_dict(), weights)  # replaced
    capsys.readouterr()
    for force in ([], ["--force"]):  # the checkpoint holds the weights it began from: no flag changes them
        assert main([*argv, *force]) == 2
        said = capsys.readouterr().err
        assert f"began from other starting weights (sha256 {began[:12]}...), which it keeps" in said
        assert f"continue it with `contsparse resume {run}`" in said
    weights.unlink()  # the checkpoint holds the weights: resuming and exporting need no file
    assert main(["resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["weights_from_sha256"] == began
    assert main(["export", str(run), "--out", str(tmp_path / "exported.safetensors")]) == 0
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    assert f"started from the weights in {weights.absolute()} (sha256 {began[:12]}...)" in capsys.readouterr().out


def test_weights_from_mistakes_in_settings_are_refused(tmp_path, capsys):
    save_file(lenet_state(), tmp_path / "w.safetensors")
    (tmp_path / "list.yaml").write_text("weights_from: [a, b]\n")
    assert main(["ticket", "--config", str(tmp_path / "list.yaml")]) == 2
    assert "weights_from = ['a', 'b'] is not a valid path" in capsys.readouterr().err
    given = ["ticket", "--method", "given", "--mask-from", str(tmp_path / "w.safetensors"), "--reinit",
             "--weights-from", str(tmp_path / "w.safetensors")]
    assert main(given) == 2 and "nothing to act on with --method given --reinit" in capsys.readouterr().err
    sweep = ["sweep", *SYNTHETIC, "--grid", f"weights_from={tmp_path / 'w.safetensors'}", "--out", str(tmp_path / "s")]
    assert main(sweep) == 2 and "give --weights-from to the whole sweep" in capsys.readouterr().err


def test_a_config_file_naming_weights_takes_their_digest_anew(tmp_path):
    """A copy of a run's config.yaml holds its weights_sha256: a new run from it names the file as
    it is now, not the digest copied with it (found by a review)."""
    save_file(lenet_state(), tmp_path / "w.safetensors")
    stale = "0" * 64
    (tmp_path / "copy.yaml").write_text(f"dataset: synthetic\nsynthetic_size: 256\nepochs: 1\nrewind_epoch: 0\n"
                                        f"ticket_epochs: 1\nweights_from: {tmp_path / 'w.safetensors'}\n"
                                        f"weights_sha256: '{stale}'\n")
    assert main(["prune", "--config", str(tmp_path / "copy.yaml"), "--device", "cpu",
                 "--out", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["weights_from_sha256"] == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
