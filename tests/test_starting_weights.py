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
    for name in ("plain.safetensors", "plain.pt", "ddp.pth", "compiled.pth"):
        read = read_weights(tmp_path / name)
        assert set(read) == set(state) and all(torch.equal(read[k], state[k]) for k in state), name


def test_unreadable_or_missing_weights_are_one_line_errors(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"epoch": 3, "notes": "none"}, tmp_path / "no_tensors.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module: weights_only refuses to run its code
    (tmp_path / "unfinished").mkdir()
    cases = {"missing.safetensors": "does not exist", "unfinished": "no model.safetensors in it",
             "text.pt": "cannot be read", "no_tensors.pt": r"holds no state_dict of tensors \(its keys: epoch, notes",
             "module.pt": "cannot be read"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message):
            read_weights(tmp_path / name)


def test_weights_that_do_not_fit_are_refused_with_what_differs_and_nothing_is_loaded(tmp_path):
    model = build_model("lenet300", (1, 28, 28), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = lenet_state()
    state["output.weight"] = torch.zeros(5, 100)  # another number of classes
    state["extra.weight"] = torch.zeros(1)
    del state["hidden.0.bias"]
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match=r"other shapes: output.weight \(5, 100\) \(the model's: \(10, 100\)\); "
                                        r"missing: hidden.0.bias; not in the model: extra.weight"):
        load_starting_weights(model, tmp_path / "other.safetensors")
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
    assert f"starting from the weights in {dense.absolute() / 'model.safetensors'}" in capsys.readouterr().out
    summary = json.loads((pruned / "summary.json").read_text())
    model_file = dense / "model.safetensors"
    assert summary["weights_from"] == str(model_file.absolute())
    assert summary["weights_from_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    # saved as an absolute path: resumable from any folder
    assert "weights_from: " + str(dense.absolute()) in (pruned / "config.yaml").read_text()
    # another model's weights: a one-line error before anything trains
    code = main(["ticket", *SYNTHETIC, "--model", "conv2", "--synthetic-shape", "3", "32", "32", "--epochs", "1",
                 "--rewind-epoch", "0", "--weights-from", str(dense), "--out", str(tmp_path / "conv")])
    assert code == 2 and "does not fit this model" in capsys.readouterr().err
    assert not (tmp_path / "conv" / "checkpoint").exists()
