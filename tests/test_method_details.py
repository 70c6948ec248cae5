"""Details of the methods and the loop that whole runs would not show (each found surviving a
mutation in a review): the penalty's coefficient, GMP's cubic schedule, DNW's straight-through
gradient, global IMP's rate, the learning-rate schedules, evaluation in eval mode, which
optimisers rounds share, what a round records and which split the summary's accuracy is from."""

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from contsparse.data import load_dataset
from contsparse.experiments import Runner, make_config
from contsparse.experiments.runner import build_method, masked_model, plan_phases
from contsparse.methods import (
    DiscoveringNeuralWirings,
    GradualMagnitudePruning,
    IterativeMagnitudePruning,
    PruneSettings,
)
from contsparse.models import build_model
from contsparse.training.loop import evaluate
from contsparse.training.optim import OptimizerSettings, learning_rate

TINY = dict(model="lenet300", dataset="synthetic", synthetic_size=256, batch_size=64, epochs=2, rewind_epoch=1,
            ticket_epochs=1, dense_baseline=False, device="cpu")


def quiet(_message: str) -> None:
    pass


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 4))


@pytest.mark.parametrize("normalize", [False, True])
def test_the_runs_penalty_reaches_every_mask_and_is_reported_by_hand(normalize):
    config = make_config(dict(TINY, penalty=3e-4, penalty_normalize=normalize, mask_init=0.3))
    data = load_dataset(config.dataset, config.data_dir, config.data_options())
    _, method = masked_model(config, data, 4)
    masks = method.mask_set
    count = sum(mask.logits.numel() for _, mask in masks)
    coefficient = 3e-4 / count if normalize else 3e-4
    assert all(mask.fused_penalty == pytest.approx(coefficient, rel=1e-12) for _, mask in masks)
    # at temperature 1 and s = s0 every soft mask is sigmoid(s0): the logged penalty is lambda * that sum
    sigmoid = 1 / (1 + math.exp(-0.3))
    assert method.reported_penalty().item() == pytest.approx(coefficient * count * sigmoid, rel=1e-5)


def test_a_stronger_penalty_prunes_more_in_a_run(tmp_path):
    kept = [Runner(make_config(dict(TINY, command="prune", rounds=1, mask_init=0.2, penalty=penalty)),
                   tmp_path / f"p{penalty}", quiet).execute()["weights_remaining"] for penalty in (0.0, 1.0)]
    assert kept[1] < kept[0]


def test_gmp_follows_the_cubic_schedule():
    settings = PruneSettings(sparsity=0.9, epochs_per_round=4, steps_per_epoch=10, gmp_frequency=1)
    gmp = GradualMagnitudePruning(settings)
    gmp.attach(mlp())
    assert (gmp.start, gmp.end) == (0, 30)  # 3/4 of the round's 40 steps
    for step in range(15):  # t = 1 .. 15: halfway through the window
        gmp.after_step(0, step // 10, step % 10)
    pruned = 0.9 * (1 - (1 - 15 / 30) ** 3)  # 0.7875, where a linear ramp would be 0.45
    for name, mask in gmp.final_mask().items():
        assert mask.float().mean().item() == pytest.approx(1 - pruned, abs=1 / mask.numel()), name


def test_dnw_passes_every_weights_gradient_straight_through():
    model = mlp()
    dnw = DiscoveringNeuralWirings(PruneSettings(sparsity=0.9))
    dnw.attach(model)
    model(torch.randn(8, 20)).pow(2).sum().backward()
    layer = model[1]
    grad = layer.parametrizations.weight.original.grad
    pruned = ~dnw.final_mask()["1.weight"]
    assert pruned.float().mean().item() == pytest.approx(0.9, abs=1e-3)
    assert (grad[pruned] != 0).float().mean().item() > 0.5  # pruned weights learn too, and may come back


def test_global_imp_prunes_its_fraction_of_all_remaining_weights_each_round():
    imp = IterativeMagnitudePruning(PruneSettings(fraction=0.2, scope="global"))
    model = mlp()
    imp.attach(model)
    total = sum(m.numel() for m in imp.final_mask().values())
    for round_index, expected in enumerate((0.8, 0.64, 0.512)):
        imp.end_of_round(round_index, last=False)
        kept = sum(int(m.sum()) for m in imp.final_mask().values()) / total
        assert kept == pytest.approx(expected, abs=1.5 / total), round_index
    layers = {name: m.float().mean().item() for name, m in imp.final_mask().items()}
    assert len({round(v, 3) for v in layers.values()}) > 1  # ranked across layers, not per layer


def test_learning_rate_schedules_by_hand():
    cosine = OptimizerSettings("sgd", lr=1.0, schedule="cosine")
    assert [learning_rate(cosine, e, 4) for e in range(4)] == pytest.approx([1, 0.853553, 0.5, 0.146447], abs=1e-6)
    step = OptimizerSettings("sgd", lr=0.1, schedule="step", milestones=(2, 3), gamma=0.1)
    assert [learning_rate(step, e, 5) for e in range(5)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])
    assert learning_rate(OptimizerSettings("adam", lr=0.3), 7, 8) == 0.3


def test_evaluation_runs_in_eval_mode_and_leaves_batch_norm_statistics_alone():
    from contsparse.data.splits import make_batches

    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10)
    config = make_config(dict(TINY, model="resnet20", synthetic_shape=[3, 32, 32], synthetic_size=64))
    data = load_dataset(config.dataset, config.data_dir, config.data_options())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, make_batches(data.val, 32), torch.device("cpu"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_search_rounds_share_their_optimisers_and_imp_rounds_do_not(tmp_path, monkeypatch):
    from contsparse.experiments import runner as runner_module

    made = []
    original = runner_module.Runner._optimizers

    def spy(self, phase, model, method):
        made.append(phase.label())
        return original(self, phase, model, method)

    monkeypatch.setattr(runner_module.Runner, "_optimizers", spy)
    Runner(make_config(dict(TINY, rounds=2, mask_init=0.3)), tmp_path / "cs", quiet).execute()
    # one for both search rounds (the reference code's), one for the ticket
    assert len(made) == 2 and "ticket" in made[1]
    made.clear()
    Runner(make_config(dict(TINY, method="imp", rounds=3)), tmp_path / "imp", quiet).execute()
    assert len(made) == 4  # every IMP round trains its ticket from the rewind point with fresh optimisers


def test_each_cs_round_records_the_mask_it_ended_with_before_the_reset(tmp_path, monkeypatch):
    from contsparse.methods import ContinuousSparsification

    ended = []
    original = ContinuousSparsification.end_of_round

    def spy(self, round_index, last):
        ended.append(float(sum(int(m.sum()) for m in self.final_mask().values())
                           / sum(m.numel() for m in self.final_mask().values())))
        original(self, round_index, last)

    monkeypatch.setattr(ContinuousSparsification, "end_of_round", spy)
    # s0 < 0: the reset s <- min(beta * s, s0) leaves no logit above 0, so a mask read after it keeps nothing
    summary = Runner(make_config(dict(TINY, rounds=2, mask_init=-0.001, penalty=0.0)), tmp_path / "run",
                     quiet).execute()
    assert summary["rounds_weights_remaining"] == pytest.approx(ended) and ended[0] > 0.05


def test_the_summarys_test_accuracy_is_the_saved_models_on_the_test_split(tmp_path):
    from contsparse.data.splits import make_batches

    config = make_config(dict(TINY, command="train"))
    summary = Runner(config, tmp_path / "run", quiet).execute()
    data = load_dataset(config.dataset, config.data_dir, config.data_options())
    model = build_model(config.model, data.input_shape, data.num_classes)
    model.load_state_dict(load_file(str(tmp_path / "run" / "model.safetensors")))
    for split, key in ((data.test, "test_accuracy"), (data.val, "val_accuracy")):
        assert evaluate(model, make_batches(split, 1000), torch.device("cpu")).accuracy == summary[key]
    assert summary["test_accuracy"] != summary["val_accuracy"]  # else the check above could not tell them apart
    assert plan_phases(config)[0].kind == "dense" and build_method(config, 1).name == "dense"
