"""Baselines on the same loop: IMP with rewinding, magnitude, random, GMP, the re-init control."""

import csv

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from contsparse.errors import UserError
from contsparse.experiments import Runner, make_config
from contsparse.masking import LayerSelection
from contsparse.methods import IterativeMagnitudePruning, MagnitudePruning, PruneSettings, RandomPruning
from contsparse.models import build_model

BASE = dict(model="lenet300", dataset="synthetic", train_subset=320, batch_size=64, epochs=2, ticket_epochs=1,
            dense_baseline=False, device="cpu")


def quiet(_message: str) -> None:
    pass


def test_imp_prunes_per_round_rewinds_and_records_every_ticket(tmp_path, monkeypatch):
    from contsparse.experiments import runner as runner_module

    starts = []
    original = runner_module.Runner._enter_phase

    def spy(self, phase, model, method, rewind):
        original(self, phase, model, method, rewind)
        if phase.kind == "ticket" or phase.round > 0:
            starts.append(({k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
                           {k: v.clone() for k, v in rewind.items()}))

    monkeypatch.setattr(runner_module.Runner, "_enter_phase", spy)
    summary = Runner(make_config(dict(BASE, method="imp", rounds=3, rewind_epoch=1)), tmp_path / "run",
                     quiet).execute()
    layers = summary["per_layer"]
    assert layers["hidden.0.weight"] == pytest.approx(0.8 ** 3, abs=1e-5)
    assert layers["output.weight"] == pytest.approx(0.9 ** 3, abs=1e-3)
    assert [p["round"] for p in summary["round_tickets"]] == [0, 1, 2]
    assert summary["round_tickets"][0]["weights_remaining"] == 1.0
    assert [p["train_epochs"] for p in summary["round_tickets"]] == [2, 4, 6]
    # each round's entry is the mask it ended with (pruned), as for CS: the last one is the ticket's
    produced = summary["rounds_weights_remaining"]
    assert produced[-1] == summary["weights_remaining"]
    assert produced[0] == pytest.approx(summary["round_tickets"][1]["weights_remaining"], abs=1e-6)
    from contsparse.reports.collect import load_results  # `report` shows the whole curve of the one run

    reported = load_results(tmp_path / "run")
    assert [r.name for r in reported] == ["run", "run round 0", "run round 1", "run round 2"]
    assert [r.weights_remaining for r in reported[1:]] == [p["weights_remaining"] for p in summary["round_tickets"]]
    assert len(starts) == 3  # rounds 1, 2 and the ticket start from the rewind point
    for state, rewind in starts:
        weight, start = state["hidden.0.weight"], rewind["hidden.0.weight"]
        keep = state["hidden.0.weight_cs_mask.hard_mask"].bool()
        assert torch.equal(weight[keep], start[keep]) and not weight[~keep].any()


@pytest.mark.parametrize("selection, kept", [
    (LayerSelection(), {"hidden.0.weight": 0.8, "hidden.1.weight": 0.8, "output.weight": 0.9}),
    (LayerSelection(exclude_last=True), {"hidden.0.weight": 0.8, "hidden.1.weight": 0.8}),
    (LayerSelection(include=["hidden"]), {"hidden.0.weight": 0.8, "hidden.1.weight": 0.8})])
def test_imp_prunes_the_output_rate_only_in_the_output_layer(selection, kept):
    """20 % of each hidden layer and 10 % of the output layer; with the output layer unmasked,
    the last masked layer is a hidden one and loses 20 % like the others."""
    method = IterativeMagnitudePruning(PruneSettings(fraction=0.2, last_fraction=0.1, selection=selection))
    method.attach(build_model("lenet300", (1, 28, 28), 10))
    method.end_of_round(0, last=False)
    masks = method.final_mask()
    assert {name: round(float(mask.float().mean()), 3) for name, mask in masks.items()} == kept


@pytest.mark.parametrize("optimizer, extra", [("sgd", dict(momentum=0.9, weight_decay=5e-4)),
                                              ("adam", {}), ("adamw", dict(weight_decay=0.1))])
def test_pruned_weights_stay_exactly_zero_under_every_optimiser(optimizer, extra, tmp_path):
    config = make_config(dict(BASE, command="prune", method="magnitude", sparsity=0.8, rounds=1,
                              optimizer=optimizer, **extra))
    Runner(config, tmp_path / "run", quiet).execute()
    model = load_file(str(tmp_path / "run/model.safetensors"))
    masks = load_file(str(tmp_path / "run/masks.safetensors"))
    for name, keep in masks.items():
        assert not model[name][~keep.bool()].any()
        assert (model[name][keep.bool()] != 0).float().mean() > 0.99


def _pruner(cls, **settings):
    model = build_model("lenet300", (1, 28, 28), 10)
    method = cls(PruneSettings(selection=LayerSelection(), **settings))
    method.attach(model)
    return model, method


def test_magnitude_keeps_the_largest_weights_layerwise_or_globally():
    _, method = _pruner(MagnitudePruning, sparsity=0.9)
    before = {n: w.detach().clone() for n, w in method.mask_set.masked_weights().items()}
    method.end_of_round(0, last=True)
    for name, keep in method.final_mask().items():
        assert keep.float().mean().item() == pytest.approx(0.1, abs=1e-3)
        assert before[name].abs()[keep].min() >= before[name].abs()[~keep].max()
    _, global_method = _pruner(MagnitudePruning, sparsity=0.9, scope="global")
    global_method.end_of_round(0, last=True)
    masks = global_method.final_mask()
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(0.1, abs=1e-3)
    assert masks["output.weight"].float().mean() != pytest.approx(0.1, abs=1e-3)  # global: layers differ


def test_global_magnitude_pruning_keeps_exactly_the_target_when_magnitudes_tie():
    _, method = _pruner(MagnitudePruning, sparsity=0.9, scope="global")
    with torch.no_grad():
        for weight in method.mask_set.masked_weights().values():
            weight.copy_(torch.randint(-3, 4, weight.shape))  # a handful of distinct magnitudes
    method.end_of_round(0, last=True)
    masks = method.final_mask()
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * sum(m.numel() for m in masks.values()))


@pytest.mark.parametrize("rounds", [3, 18])
def test_random_pruning_matches_imps_per_layer_sparsity_with_another_mask(rounds):
    """At IMP's sparsity after r rounds the random control keeps 0.8 ** r of each hidden layer and
    0.9 ** r of the output layer, as IMP does (a uniform mask would starve the output layer)."""
    sizes = {"hidden.0.weight": 784 * 300, "hidden.1.weight": 300 * 100, "output.weight": 100 * 10}
    kept = {name: 0.9 ** rounds if name == "output.weight" else 0.8 ** rounds for name in sizes}
    overall = sum(kept[n] * sizes[n] for n in sizes) / sum(sizes.values())
    _, random = _pruner(RandomPruning, sparsity=1 - overall)
    _, magnitude = _pruner(MagnitudePruning, sparsity=1 - kept["hidden.0.weight"])
    random.end_of_round(0, last=True)
    magnitude.end_of_round(0, last=True)
    masks = random.final_mask()
    for name, fraction in kept.items():
        assert masks[name].float().mean().item() == pytest.approx(fraction, abs=2 / sizes[name] + 1e-6)
    assert not torch.equal(masks["hidden.0.weight"], magnitude.final_mask()["hidden.0.weight"])


CONV4_RATES = {"features.0.weight": 0.1, "features.2.weight": 0.1, "features.5.weight": 0.1,
               "features.7.weight": 0.1, "classifier.1.weight": 0.2, "classifier.3.weight": 0.2,
               "classifier.5.weight": 0.1}  # Frankle & Carbin's Conv-4: conv 10 %, dense 20 %, output 10 %


def test_imp_prunes_conv_layers_at_their_own_rate_when_given():
    method = IterativeMagnitudePruning(PruneSettings(fraction=0.2, last_fraction=0.1, conv_fraction=0.1))
    method.attach(build_model("conv4", (3, 32, 32), 10))
    assert method.round_fractions() == CONV4_RATES
    for _ in range(2):
        method.end_of_round(0, last=False)
    masks = method.final_mask()
    assert {name: round(float(mask.float().mean()), 2) for name, mask in masks.items()} == \
        {name: round((1 - rate) ** 2, 2) for name, rate in CONV4_RATES.items()}
    shared = IterativeMagnitudePruning(PruneSettings(fraction=0.2, last_fraction=0.1))  # no conv rate: as before
    shared.attach(build_model("conv4", (3, 32, 32), 10))
    assert shared.round_fractions() == {name: 0.1 if name == "classifier.5.weight" else 0.2 for name in CONV4_RATES}


def test_random_pruning_follows_imps_conv_rate_too():
    rounds = 5
    model = build_model("conv4", (3, 32, 32), 10)
    sizes = {name: p.numel() for name, p in model.named_parameters() if name in CONV4_RATES}
    kept = {name: (1 - rate) ** rounds for name, rate in CONV4_RATES.items()}
    overall = sum(kept[n] * sizes[n] for n in sizes) / sum(sizes.values())
    random = RandomPruning(PruneSettings(fraction=0.2, last_fraction=0.1, conv_fraction=0.1, sparsity=1 - overall))
    random.attach(model)
    random.end_of_round(0, last=True)
    for name, mask in random.final_mask().items():
        assert mask.float().mean().item() == pytest.approx(kept[name], abs=2 / sizes[name] + 1e-6)


def test_gmp_raises_sparsity_gradually_to_the_target(tmp_path):
    config = make_config(dict(BASE, command="prune", method="gmp", sparsity=0.9, rounds=1, epochs=4,
                              gmp_frequency=2))
    summary = Runner(config, tmp_path / "run", quiet).execute()
    import json

    kept = [json.loads(line)["weights_remaining"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert kept[0] > kept[1] > kept[2] and kept[2] == pytest.approx(0.1, abs=1e-3)  # target at 3/4 of the round
    assert summary["weights_remaining"] == pytest.approx(0.1, abs=1e-3)
    # Zhu & Gupta's t0: nothing is pruned before it, and the target is still reached at 3/4 of the round
    started = make_config(dict(BASE, command="prune", method="gmp", sparsity=0.9, rounds=1, epochs=4,
                               gmp_frequency=2, gmp_start_epoch=1))
    Runner(started, tmp_path / "late", quiet).execute()
    lines = (tmp_path / "late/metrics.jsonl").read_text().splitlines()
    kept = [json.loads(line)["weights_remaining"] for line in lines]
    assert kept[0] == 1.0 and 1.0 > kept[1] > kept[2] and kept[2] == pytest.approx(0.1, abs=1e-3)
    # fewer than 4 pruning steps in the window (15 steps here) would be one-shot pruning in disguise
    for frequency, steps in ((5, 3), (15, 1), (16, 1)):  # every `frequency` steps and at the window's end
        once = make_config(dict(BASE, command="prune", method="gmp", sparsity=0.9, rounds=1, epochs=4,
                                gmp_frequency=frequency))
        with pytest.raises(UserError, match=rf"leaves {steps} pruning step\(s\) in GMP's window of 15 steps"):
            Runner(once, tmp_path / "once", quiet).execute()
    short = make_config(dict(BASE, command="prune", method="gmp", sparsity=0.9, rounds=1, epochs=1, gmp_frequency=1))
    with pytest.raises(UserError, match="train more epochs, or take smaller batches"):  # 3 steps: no frequency fits
        Runner(short, tmp_path / "short", quiet).execute()
    with pytest.raises(UserError, match="gmp_start_epoch must be >= 0 and before 3/4"):
        make_config(dict(BASE, command="prune", method="gmp", sparsity=0.9, rounds=1, epochs=4, gmp_start_epoch=3))


def test_reinit_control_trains_the_same_mask_from_other_weights(tmp_path):
    runs = {}
    for reinit in (False, True):
        config = make_config(dict(BASE, method="magnitude", sparsity=0.9, rounds=1, rewind_epoch=0, reinit=reinit))
        Runner(config, tmp_path / str(reinit), quiet).execute()
        runs[reinit] = (load_file(str(tmp_path / str(reinit) / "masks.safetensors")),
                        load_file(str(tmp_path / str(reinit) / "model.safetensors")))
    assert all(torch.equal(runs[False][0][k], runs[True][0][k]) for k in runs[False][0])
    assert not torch.equal(runs[False][1]["hidden.0.weight"], runs[True][1]["hidden.0.weight"])


def test_reinit_control_reaches_every_imp_round_ticket(tmp_path):
    """IMP reports a ticket per round: with --reinit each round starts from a fresh initialisation
    too, not from the rewind point."""
    import json

    first_epochs, logs = {}, {}
    for reinit in (False, True):
        logs[reinit] = []
        config = make_config(dict(BASE, method="imp", rounds=3, rewind_epoch=0, reinit=reinit))
        summary = Runner(config, tmp_path / str(reinit), logs[reinit].append).execute()
        records = [json.loads(line) for line in (tmp_path / str(reinit) / "metrics.jsonl").read_text().splitlines()]
        first_epochs[reinit] = [r["train_loss"] for r in records if r["phase"] == "search" and r["epoch"] == 1]
        assert len(summary["round_tickets"]) == 3
    restarts = [line for line in logs[True] if "re-initialised" in line]
    assert len(restarts) == 3 and not any("re-initialised" in line for line in logs[False])  # rounds 1, 2, ticket
    assert first_epochs[False][0] == first_epochs[True][0]  # round 0 is the same training
    assert first_epochs[False][1:] != first_epochs[True][1:]


def test_each_imp_round_of_the_reinit_control_draws_its_own_initialisation(tmp_path, monkeypatch):
    """One initialisation for every round would make the control IMP rewound to iteration 0 of
    other weights: real tickets again."""
    drawn = []
    fresh_init = Runner._fresh_init

    def record(self, model, phase):
        drawn.append(fresh_init(self, model, phase))
        return drawn[-1]

    monkeypatch.setattr(Runner, "_fresh_init", record)
    config = make_config(dict(BASE, method="imp", rounds=3, rewind_epoch=0, reinit=True))
    Runner(config, tmp_path / "imp", quiet).execute()
    assert len(drawn) == 3  # rounds 1 and 2, and the final ticket
    weights = [init["hidden.0.weight"] for init in drawn]
    assert not any(torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1:])


def test_compare_writes_tables_and_plots_and_reuses_finished_runs(tmp_path, capsys, monkeypatch):

    from contsparse.cli import main

    argv = ["compare", "--dataset", "synthetic", "--train-subset", "320", "--batch-size", "64", "--epochs", "2",
            "--rounds", "1", "--rewind-epoch", "0", "--ticket-epochs", "1", "--mask-inits", "0.0", "-0.02",
            "--imp-rounds", "3", "--random-every", "2", "--seeds", "2", "--out", str(tmp_path / "cmp")]
    assert main(argv) == 0
    first = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "cmp/compare.csv").read_text().splitlines()))
    methods = {r["method"] for r in rows}
    assert methods == {"dense", "cs", "imp", "random"}
    assert len([r for r in rows if r["method"] == "imp"]) == 2 * 4  # rounds 0-2 and the final ticket, 2 seeds
    assert len([r for r in rows if r["method"] == "random"]) == 2  # IMP's 2nd sparsity, each seed
    for name in ("accuracy_vs_weights.png", "accuracy_vs_epochs.png"):
        assert (tmp_path / "cmp" / name).read_bytes()[:4] == b"\x89PNG"
    assert "Sparsest ticket whose validation accuracy is within 0.3 points of dense's" in first and "± " in first
    assert all(0 <= float(r["val_accuracy"]) <= 1 for r in rows)  # every ticket carries what it is chosen by
    def data_gone(*args):
        raise UserError("the dataset is gone")

    monkeypatch.setattr("contsparse.experiments.compare.load_dataset", data_gone)
    assert main(argv) == 0  # everything finished: nothing is trained again, and no data is needed
    assert "[search" not in capsys.readouterr().out
    plot = (tmp_path / "cmp" / "accuracy_vs_weights.png").read_bytes()
    assert main(["report", str(tmp_path / "cmp"), str(tmp_path / "cmp"), "--out", str(tmp_path / "cmp")]) == 2
    assert "is a comparison folder: give the report a folder of its own" in capsys.readouterr().err
    assert (tmp_path / "cmp" / "accuracy_vs_weights.png").read_bytes() == plot
    assert main(["report", str(tmp_path / "cmp")]) == 0  # into its own report/ folder
    assert (tmp_path / "cmp" / "report" / "report.md").is_file()
    assert main(["report", str(tmp_path / "cmp"), "--out", str(tmp_path / "report")]) == 0  # one comparison
    report = (tmp_path / "report" / "report.md").read_text()
    assert all(f"| {r['label']} seed {r['seed']} |" in report for r in rows)
    with open(tmp_path / "report" / "report.csv", newline="") as handle:  # the report's front is chosen on these
        reported = list(csv.DictReader(handle))
    assert {r["point"]: float(r["val_accuracy"]) for r in reported} == {
        f"{r['label']} seed {r['seed']}": float(r["val_accuracy"]) for r in rows}
    # one series per method, as the comparison's own plot has, each row once; the first carries dense
    assert len(reported) == len(rows)
    assert {r["series"] for r in reported} == {"cmp: cs", "cmp: imp", "cmp: random"}
    assert {r["series"] for r in reported if r["point"].startswith("dense")} == {"cmp: cs"}
    assert report.startswith("# comparison cmp\n") and report.count("Dense reference:") == 3  # each method's
    tables = {name: (tmp_path / "cmp" / name).read_bytes() for name in ("compare.csv", "compare.md")}
    changed = [*argv[:argv.index("--imp-rounds")], "--imp-rounds", "2", *argv[argv.index("--imp-rounds") + 2:]]
    capsys.readouterr()
    assert main(changed) == 2  # once refused run by run, and the report rewritten without IMP and random
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path / 'cmp'} holds a comparison made with other settings " \
        "(imp-seed0: " in err and "give another --out, or the settings it was made with" in err
    assert tables == {name: (tmp_path / "cmp" / name).read_bytes() for name in tables}


def test_one_failing_run_does_not_cost_the_comparison_its_report(tmp_path, capsys):
    from contsparse.cli import main

    argv = ["compare", "--dataset", "synthetic", "--train-subset", "256", "--batch-size", "64", "--epochs", "2",
            "--rounds", "1", "--rewind-epoch", "0", "--ticket-epochs", "1", "--mask-inits", "0.0", "-0.02",
            "--imp-rounds", "2", "--random-every", "1", "--out", str(tmp_path / "cmp")]
    assert main(argv) == 0
    (tmp_path / "cmp" / "cs-s0=0-seed0" / "config.yaml").write_text("x: 1\n")  # a damaged run folder
    (tmp_path / "cmp" / "compare.md").unlink()
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "1 run(s) of the comparison failed" in captured.err and "cs-s0=0-seed0: " in captured.err
    rows = list(csv.DictReader((tmp_path / "cmp/compare.csv").read_text().splitlines()))
    assert {r["label"] for r in rows if r["method"] == "cs"} == {"cs s0=-0.02"}  # the others are all reported
    assert {r["method"] for r in rows} == {"dense", "cs", "imp", "random"} and (tmp_path / "cmp/compare.md").exists()
    # the first run failing (a damaged dense baseline) costs the others nothing either
    (tmp_path / "cmp" / "dense-seed0" / "config.yaml").write_text("x: 1\n")
    assert main(argv) == 2
    assert "2 run(s) of the comparison failed" in capsys.readouterr().err
    rows = list(csv.DictReader((tmp_path / "cmp/compare.csv").read_text().splitlines()))
    assert {r["method"] for r in rows} == {"cs", "imp", "random"}


def test_search_progress_follows_the_sparsest_ticket_near_dense_not_the_most_accurate_network():
    """The epochs plot shows what a search has found: IMP's dense round 0 is no ticket, and a
    denser, more accurate ticket does not replace a sparser one that meets the bar."""
    from contsparse.reports.compare import search_progress

    def row(method, epochs, weights, val, test=0.9, seed=0):
        return {"method": method, "seed": seed, "train_epochs": epochs, "weights_remaining": weights,
                "val_accuracy": val, "test_accuracy": test}

    rows = [row("imp", 10, 1.0, 0.99), row("imp", 20, 0.8, 0.975), row("imp", 30, 0.64, 0.981),
            row("imp", 40, 0.51, 0.99), row("cs", 12, 0.05, 0.970), row("cs", 12, 0.2, 0.985),
            row("cs", 12, 0.03, 0.979), row("dense", 10, 1.0, 0.98)]
    progress = search_progress(rows, bar=0.98)
    assert [(e, b["weights_remaining"]) for e, b in progress[("imp", 0)]] == [(30, 0.64), (40, 0.51)]
    assert [(e, b["weights_remaining"]) for e, b in progress[("cs", 0)]] == [(24, 0.2), (36, 0.03)]
    # without a dense run: the most accurate sparse ticket, still never the dense round
    assert [b["weights_remaining"] for _, b in search_progress(rows, bar=None)[("imp", 0)]] == [0.8, 0.64, 0.51]


def test_the_sparsest_ticket_near_dense_is_chosen_on_validation_not_test():
    from contsparse.experiments.compare import sparsest_within

    def group(method, kept, val, test):
        return {"method": method, "label": f"{method} {kept}", "weights_remaining": kept,
                "val_accuracy": val, "test_accuracy": test}

    groups = [group("dense", 1.0, 0.980, 0.978),
              group("cs", 0.01, 0.970, 0.990),  # the best test accuracy, but validation says no
              group("cs", 0.03, 0.979, 0.975),  # within 0.3 points on validation: chosen, test as it is
              group("imp", 0.02, None, 0.990)]  # saved without a validation accuracy: never chosen
    best = sparsest_within(groups, dense_val_accuracy=0.980)
    assert best == {"cs": groups[2]}
    diverged = [*groups, group("cs", 0.001, float("nan"), float("nan"))]  # NaN compares as "not below"
    assert sparsest_within(diverged, dense_val_accuracy=0.980) == {"cs": groups[2]}
    assert sparsest_within(groups, dense_val_accuracy=float("nan")) == {}


@pytest.mark.parametrize("flags, message", [
    (["--mask-inits", "0.5", "0.5"], "lists the --mask-inits value 0.5 twice"),
    (["--methods", "dense", "random"], "add imp to --methods"),
    (["--imp-rounds", "2", "--random-every", "3"], "none; give a smaller --random-every"),
])
def test_compare_refuses_plans_that_would_drop_or_double_count_rows(tmp_path, capsys, flags, message):
    from contsparse.cli import main

    assert main(["compare", "--dataset", "synthetic", "--out", str(tmp_path / "cmp"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_compare_seeds_count_from_the_seed_flag(tmp_path, monkeypatch):
    from contsparse.cli import main
    from contsparse.experiments import compare

    seen = []
    monkeypatch.setattr(compare, "run_comparison", lambda plan, out, log, failures=None: seen.append(plan.seeds) or [])
    monkeypatch.setattr("contsparse.reports.compare.write_comparison", lambda *args: None)
    monkeypatch.setattr("pathlib.Path.read_text", lambda self: "")
    assert main(["compare", "--dataset", "synthetic", "--seed", "7", "--seeds", "2", "--out", str(tmp_path)]) == 0
    assert seen == [(7, 8)]


def test_each_rounds_mask_is_recorded_once_str_has_fixed_it(tmp_path):
    """STR's last round folds the threshold into the weights: the mask recorded for that round is
    the fixed one, not the threshold applied a second time to the thresholded weights."""
    config = make_config(dict(BASE, method="str", rounds=2, epochs=2, rewind_epoch=1, optimizer="sgd", lr=0.1,
                              weight_decay=5e-4))
    summary = Runner(config, tmp_path / "run", quiet).execute()
    assert summary["rounds_weights_remaining"][-1] == summary["weights_remaining"] < 1


@pytest.mark.parametrize("method, extra", [("str", dict(optimizer="sgd", lr=0.1, weight_decay=5e-4)),
                                           ("dnw", dict(sparsity=0.9))])
@pytest.mark.parametrize("command", ["prune", "ticket"])
def test_str_and_dnw_fix_a_mask_and_keep_it(method, extra, command, tmp_path, monkeypatch):
    from contsparse.experiments import runner as runner_module

    config = make_config(dict(BASE, command=command, method=method, rounds=1, epochs=3, rewind_epoch=1, **extra))
    reference = Runner(config, tmp_path / "reference", quiet).execute()
    masks = load_file(str(tmp_path / "reference/masks.safetensors"))
    model = load_file(str(tmp_path / "reference/model.safetensors"))
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert reference["weights_remaining"] == pytest.approx(kept)
    assert kept == pytest.approx(0.1, abs=1e-3) if method == "dnw" else 0 < kept < 1
    for name, keep in masks.items():
        assert not model[name][~keep.bool()].any()
    # interrupted in the last phase and resumed: the same result
    original, calls = runner_module.Runner._epoch, {"n": 0}

    def crash(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(runner_module.Runner, "_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        Runner(config, tmp_path / "run", quiet).execute()
    monkeypatch.undo()
    resumed = Runner(config, tmp_path / "run", quiet).execute()
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    again = load_file(str(tmp_path / "run/model.safetensors"))
    assert all(torch.equal(again[k], model[k]) for k in model)


def test_random_pruning_with_an_output_layer_never_pruned():
    """prune_fraction_last = 0: the output layer keeps all its weights while the target allows it
    (LeNet: 1,000 of 266,200), and the mask is uniform below that instead of missing the target."""
    for sparsity, output_kept in ((0.99, 1.0), (0.999, 0.001)):
        _, random = _pruner(RandomPruning, sparsity=sparsity, last_fraction=0.0)
        random.end_of_round(0, last=True)
        masks = random.final_mask()
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert kept == pytest.approx(1 - sparsity, abs=1e-5)
        assert masks["output.weight"].float().mean().item() == pytest.approx(output_kept, abs=1e-3)


def test_dense_reference_and_dnw_on_tied_or_reparametrised_weights():
    from contsparse.methods import Dense, DiscoveringNeuralWirings

    normed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    nn.utils.parametrizations.weight_norm(normed[0])
    dense = Dense()
    dense.attach(normed)
    assert {k: v.all().item() for k, v in dense.final_mask().items()} == {"0.weight": True, "1.weight": True}

    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    tied[2].weight = tied[0].weight
    method = DiscoveringNeuralWirings(PruneSettings(selection=LayerSelection(), sparsity=0.75))
    method.attach(tied)
    assert list(method.mask_set.masks) == ["0.weight"]
    assert torch.equal(tied[0].weight, tied[2].weight) and int((tied[2].weight != 0).sum()) == 9  # top 25 %
    method.end_of_round(0, last=True)
    method.harden()
    assert tied[0].weight is tied[2].weight and int((tied[0].weight != 0).sum()) == 9


def test_a_given_mask_trains_as_a_ticket_from_the_initialisation_or_re_initialised(tmp_path):
    """IMP keeps every round's mask; --method given trains one of them (no search) from the
    initialisation, or with --reinit from a fresh one: Frankle & Carbin's control for that ticket."""
    imp = tmp_path / "imp"
    summary = Runner(make_config({**BASE, "method": "imp", "rounds": 3, "rewind_epoch": 0}), imp, quiet).execute()
    rounds = sorted((imp / "round_masks").iterdir())
    assert [p.name for p in rounds] == ["round-0.safetensors", "round-1.safetensors", "round-2.safetensors"]
    chosen = load_file(str(rounds[2]))
    kept = sum(int(m.sum()) for m in chosen.values()) / sum(m.numel() for m in chosen.values())
    assert kept == pytest.approx(summary["round_tickets"][2]["weights_remaining"], abs=1e-6)
    said, weights = [], {}
    for reinit in (False, True):
        out = tmp_path / f"given-reinit={reinit}"
        config = make_config({**BASE, "method": "given", "mask_from": str(rounds[2]), "reinit": reinit})
        result = Runner(config, out, said.append).execute()
        assert result["weights_remaining"] == pytest.approx(kept, abs=1e-6)
        assert result["train_epochs"] == BASE["ticket_epochs"]  # the ticket training alone
        saved = load_file(str(out / "masks.safetensors"))
        assert saved.keys() == chosen.keys() and all(torch.equal(saved[k], chosen[k]) for k in saved)
        weights[reinit] = load_file(str(out / "model.safetensors"))
        assert all(torch.count_nonzero(weights[reinit][k]) <= int(chosen[k].sum()) for k in chosen)
    assert any("at their initialisation (iteration 0)" in line for line in said)
    assert any("re-initialised (--reinit control)" in line for line in said)
    assert any(not torch.equal(weights[False][k], weights[True][k]) for k in chosen)


@pytest.mark.parametrize("metrics", ['{"seconds": 1.0}\n{"seconds": 2.', '{"seconds": 1.0}\n', None])
def test_a_damaged_imp_metrics_file_is_a_one_line_error(tmp_path, metrics):
    """The comparison times IMP's rounds from its metrics.jsonl: torn, short or missing, it says so."""
    from contsparse.errors import UserError
    from contsparse.experiments.compare import _imp_rows

    if metrics is not None:
        (tmp_path / "metrics.jsonl").write_text(metrics)
    summary = {"round_tickets": [{"round": 1, "weights_remaining": 0.8, "test_accuracy": 0.9, "train_epochs": 2}]}
    with pytest.raises(UserError, match=r"metrics\.jsonl is damaged or incomplete"):
        _imp_rows(summary, 0, tmp_path)


def test_dnw_progress_shows_the_live_sparsity_during_the_search():
    """The progress bar read the stored hard masks, all ones until the mask is fixed (found by a review)."""
    from contsparse.data import load_dataset
    from contsparse.experiments.runner import masked_model

    config = make_config(dict(BASE, method="dnw", sparsity=0.75, rewind_epoch=0))
    _, method = masked_model(config, load_dataset("synthetic", None, config.data_options()), 1)
    assert method.progress() == {"kept": "0.2500"}
