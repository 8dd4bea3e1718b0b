"""The search: paper points, pruner choice, per-epoch reporting, partial metrics, failures."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from alpa_tune.config import StudyConfig
from alpa_tune.data import load_dataset
from alpa_tune.objective import Objective
from alpa_tune.search import loss_spec, make_pruner, paper_points


def tiny(*overrides: str) -> StudyConfig:
    return StudyConfig(name="s").replace([
        "data.source=synthetic", "data.image_size=16", "data.num_classes=3", "data.samples_per_class=20",
        "data.imbalance_ratio=2.0", "training.folds=2", "training.epochs=2", "training.batch_size=32",
        "search.pruner='none'", *overrides,
    ])


def test_paper_points_respect_space_and_variants() -> None:
    assert len(paper_points(tiny().search)) == 3
    only_plain = tiny("search.variants=['alpa']").search
    assert [p["alpha"] for p in paper_points(only_plain)] == [1.0, 0.875]
    narrow = tiny("search.space.gamma_neg=[0.0, 3.0]").search  # v1 and v2 use gamma_neg = 4
    assert [p["variant"] for p in paper_points(narrow)] == ["alpa_hill"]


def test_loss_spec_maps_the_variant_and_space_constants() -> None:
    space = tiny("search.space.clip=0.1", "search.space.focusing='single'").search.space
    name, kwargs = loss_spec({"alpha": 1.25, "beta": 2.0, "gamma_pos": 3.0, "gamma_neg": 2.0,
                              "variant": "alpa_hill"}, space)
    assert name == "alpa"
    assert kwargs == {"alpha": 1.25, "beta": 2.0, "gamma_pos": 3.0, "gamma_neg": 2.0, "clip": 0.1,
                      "focusing": "single", "variant": "hill", "hill_lambda": 1.5}


@pytest.mark.parametrize(("name", "kind"), [
    ("none", optuna.pruners.NopPruner), ("median", optuna.pruners.MedianPruner),
    ("wilcoxon", optuna.pruners.WilcoxonPruner), ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
])
def test_pruner_choice(name: str, kind: type) -> None:
    assert isinstance(make_pruner(tiny(f"search.pruner='{name}'")), kind)


def _run(config: StudyConfig, pruner: optuna.pruners.BasePruner | None = None) -> optuna.trial.FrozenTrial:
    study = optuna.create_study(direction="maximize", pruner=pruner or make_pruner(config),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(Objective(config, load_dataset(config.data)), n_trials=1, catch=(Exception,))
    return study.trials[0]


def test_per_fold_reports_and_metrics() -> None:
    trial = _run(tiny())
    assert trial.state == TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == [0, 1]  # step = fold
    assert trial.intermediate_values[1] == pytest.approx(trial.value, abs=1e-6)  # running mean of 2 folds
    assert len(trial.user_attrs["fold_balanced_accuracy"]) == 2
    assert len(trial.user_attrs["class_recall"]) == 3 and len(trial.user_attrs["class_f1"]) == 3
    assert trial.user_attrs["device"] == "cpu" and trial.user_attrs["epoch_seconds"] > 0
    assert trial.user_attrs["loss"]["name"] == "alpa"


def test_per_epoch_reports_use_a_global_step() -> None:
    trial = _run(tiny("search.report='epoch'"))
    assert sorted(trial.intermediate_values) == [0, 1, 2, 3]  # fold * epochs + epoch


def test_pruned_trial_keeps_its_partial_metrics() -> None:
    trial = _run(tiny(), pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # prunes at the first report
    assert trial.state == TrialState.PRUNED
    assert len(trial.user_attrs["fold_balanced_accuracy"]) == 1


def test_diverging_training_fails_the_trial_with_its_reason() -> None:
    trial = _run(tiny("training.lr=1e30"))
    assert trial.state == TrialState.FAIL
    assert "loss became" in trial.user_attrs["fail_reason"]


def test_wilcoxon_gets_each_folds_own_score() -> None:
    trial = _run(tiny("search.pruner='wilcoxon'"))
    assert [trial.intermediate_values[f] for f in (0, 1)] == pytest.approx(trial.user_attrs["fold_balanced_accuracy"], abs=1e-6)
