"""``alpa-tune compare``: tuned ALPA against baselines on the held-out split of a real finished study."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import cli
from test_export import STUDY, finished_study, sqlite_url

from alpa_tune.compare import (
    BASELINES,
    CompareError,
    find_study,
    load_best,
    parse_losses,
    run_comparison,
)
from alpa_tune.compare_table import table, to_csv, to_markdown
from alpa_tune.config import load_config
from alpa_tune.data import load_dataset
from alpa_tune.losses import LossConfigError
from alpa_tune.records import read_record
from alpa_tune.report import build_report
from alpa_tune.training import split_holdout


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_study(tmp_path_factory, tmp_path_factory.mktemp("compare"))


@pytest.fixture(scope="module")
def compared(study_dir: Path) -> subprocess.CompletedProcess:
    """One real comparison: two losses x two seeds in two spawned worker processes."""
    return cli("compare", "tiny.toml", "--best", "best.json", "--losses", "ce,alpa", "--seeds", "2",
               "--workers", "2", "-o", "cmp/tiny", cwd=study_dir)


def _one_line_exit_2(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def test_compare_prints_writes_and_stores_table_3(study_dir: Path, compared: subprocess.CompletedProcess) -> None:
    assert compared.returncode == 0, compared.stdout + compared.stderr
    out = compared.stdout
    assert "held-out comparison" in out and "Training" in out and "Balanced accuracy / macro F1" in out
    assert "stored in study tiny" in out

    comparison = json.loads((study_dir / "cmp" / "tiny.json").read_text())
    assert [loss["label"] for loss in comparison["losses"]] == ["ce", "alpa"]
    assert comparison["seeds"] == [0, 1] and comparison["workers"] == 2
    assert {(r["loss"], r["seed"]) for r in comparison["runs"]} == {("ce", 0), ("ce", 1), ("alpa", 0), ("alpa", 1)}
    # The tuned loss is exactly best.json's; the baseline has its paper defaults.
    best = read_record(study_dir / "best.json")
    assert comparison["losses"][1]["params"] == best["params"] and comparison["losses"][0]["params"] == BASELINES["ce"]
    # Trained on the search's development split, scored on the held-out rest.
    config = load_config(study_dir / "tiny.toml")
    dataset = load_dataset(config.data)
    dev, held = split_holdout(dataset, config.training.holdout, config.training.seed)
    assert comparison["train_counts"] == np.bincount(dataset.labels[dev], minlength=4).tolist()
    assert comparison["test_counts"] == np.bincount(dataset.labels[held], minlength=4).tolist()
    for run in comparison["runs"]:
        assert 0 <= run["balanced_accuracy"] <= 1 and len(run["recall"]) == len(run["f1"]) == 4

    rows = list(csv.reader(io.StringIO((study_dir / "cmp" / "tiny.csv").read_text())))
    assert rows[0][:5] == ["class", "train_samples", "test_samples", "ce_acc_mean", "ce_acc_std"]
    assert len(rows) == 1 + 4 + 1 and rows[-1][0] == "balanced_accuracy/macro_f1"
    markdown = (study_dir / "cmp" / "tiny.md").read_text()
    assert markdown.startswith("| Loss | Tuned | Balanced accuracy % [95 % CI] | Difference to best [95 % CI] |")
    assert "| Class | Training samples | Test samples | ce Acc | ce F1 | alpa Acc | alpa F1 |" in markdown
    assert comparison["verdict"] in markdown

    # The paired statistics, in the fields other tools read.
    assert comparison["format"] == 2 and "bootstrap" in comparison["statistics"]
    assert list(comparison["results"]) == ["ce", "alpa"]
    alpa, ce = comparison["results"]["alpa"], comparison["results"]["ce"]
    assert alpa["tuned"] and alpa["study"] == "tiny" and alpa["params"] == best["params"]
    assert not ce["tuned"] and ce["study"] is None
    for label, result in comparison["results"].items():
        runs = [r for r in comparison["runs"] if r["loss"] == label]
        assert all(len(r["predictions"]) == sum(comparison["test_counts"]) for r in runs)
        mean = result["balanced_accuracy"]["mean"]
        assert mean == pytest.approx(np.mean([r["balanced_accuracy"] for r in runs]))
        low, high = result["balanced_accuracy"]["ci95"]
        assert low <= mean <= high
        d_low, d_high = result["vs_best"]["ci95"]
        assert d_low <= result["vs_best"]["difference"] <= d_high
    assert [r["best"] for r in comparison["results"].values()].count(True) == 1
    assert comparison["verdict"].endswith(".") and ("best" in comparison["verdict"] or "cannot rank" in comparison["verdict"])

    study = optuna.load_study(study_name=STUDY, storage=sqlite_url(study_dir))
    assert study.user_attrs["comparison"]["runs"] == comparison["runs"]
    assert "Held-out comparison" in build_report(study)


def test_same_seed_same_result_in_process_or_in_a_worker(study_dir: Path,
                                                         compared: subprocess.CompletedProcess) -> None:
    assert compared.returncode == 0, compared.stderr
    parallel = json.loads((study_dir / "cmp" / "tiny.json").read_text())
    config = load_config(study_dir / "tiny.toml")
    alone = run_comparison(config, read_record(study_dir / "best.json"), ["ce"], 1, workers=1)
    first = next(r for r in parallel["runs"] if r["loss"] == "ce" and r["seed"] == 0)
    assert alone["runs"][0]["recall"] == first["recall"] and alone["runs"][0]["f1"] == first["f1"]


def test_two_identical_losses_are_not_distinguishable(study_dir: Path) -> None:
    """best.json set to the paper's Loss v2 trains exactly as alpa_paper does: same seeds, same
    predictions, so the paired difference is 0 with a [0, 0] interval and neither is 'worse'."""
    config = load_config(study_dir / "tiny.toml")
    record = {**read_record(study_dir / "best.json"), "params": dict(BASELINES["alpa_paper"])}
    comparison = run_comparison(config, record, ["alpa", "alpa_paper"], 2, workers=1)
    tuned, paper = comparison["results"]["alpa"], comparison["results"]["alpa_paper"]
    assert [r["predictions"] for r in comparison["runs"] if r["loss"] == "alpa"] == \
        [r["predictions"] for r in comparison["runs"] if r["loss"] == "alpa_paper"]
    assert tuned["best"] and not paper["best"]  # ties go to the first label
    assert paper["vs_best"] == {"difference": 0.0, "ci95": [0.0, 0.0]} and paper["distinguishable"] is False
    assert comparison["verdict"].startswith("The data cannot rank the losses") and "worse" not in comparison["verdict"]


def test_bad_best_json_is_refused_before_training(study_dir: Path, tmp_path: Path) -> None:
    best = json.loads((study_dir / "best.json").read_text())
    other_data = tmp_path / "other-data.json"
    other_data.write_text(json.dumps({**best, "dataset_fingerprint": "0123456789abcdef"}))
    _one_line_exit_2(cli("compare", str(study_dir / "tiny.toml"), "--best", str(other_data), cwd=tmp_path),
                     "tuned on dataset 0123456789abcdef, but the config's dataset is")
    assert not any(tmp_path.glob("alpa-tune-out/*"))  # nothing trained, nothing written

    config = load_config(study_dir / "tiny.toml")
    with pytest.raises(CompareError, match="tuned on 4 classes, but the config's dataset has 5"):
        run_comparison(config.replace(["data.num_classes=5"]), best, ["ce", "alpa"], 1)
    with pytest.raises(LossConfigError, match="alpha must be > 0"):
        run_comparison(config, {**best, "params": {**best["params"], "alpha": -1.0}}, ["alpa"], 1)
    with pytest.raises(CompareError, match="--seeds: must be >= 1"):
        run_comparison(config, best, ["ce"], 0)
    not_export = tmp_path / "not-export.json"
    not_export.write_text('{"value": 0.5}')
    with pytest.raises(CompareError, match="--best: .* is not an alpa-tune export"):
        load_best(not_export)
    with pytest.raises(CompareError, match="--best: .*missing.json does not exist"):
        load_best(tmp_path / "missing.json")


def test_unwritable_output_and_bad_loss_list(study_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_exit_2(cli("compare", str(study_dir / "tiny.toml"), "--best", str(study_dir / "best.json"),
                         "-o", str(blocker / "cmp"), cwd=tmp_path), "cannot write in")
    with pytest.raises(CompareError, match="choose from alpa, ce"):
        parse_losses("ce,hinge")
    with pytest.raises(CompareError, match="names a loss twice"):
        parse_losses("ce,ce")
    assert parse_losses(" CE, alpa ") == ["ce", "alpa"]


def test_no_study_no_store_and_no_new_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'absent.db'}"
    assert find_study(url, STUDY) is None
    assert not (tmp_path / "absent.db").exists()


def _comparison() -> dict:
    runs = [
        {"loss": "ce", "seed": 0, "balanced_accuracy": 0.5, "macro_f1": 0.4, "recall": [1.0, 0.0], "f1": [0.6, None]},
        {"loss": "ce", "seed": 1, "balanced_accuracy": 0.7, "macro_f1": 0.6, "recall": [1.0, 0.4], "f1": [0.7, 0.5]},
        {"loss": "alpa", "seed": 0, "balanced_accuracy": 0.8, "macro_f1": 0.7, "recall": [0.9, 0.7], "f1": [0.8, 0.6]},
        {"loss": "alpa", "seed": 1, "error": "loss became nan in fold 0, epoch 0, step 3"},
    ]
    return {"study": "s", "class_names": ["head", "tail"], "train_counts": [80, 8], "test_counts": [20, 2],
            "losses": [{"label": "ce"}, {"label": "alpa"}], "seeds": [0, 1], "runs": runs}


def test_table_means_spreads_best_and_failures() -> None:
    t = table(_comparison())
    assert t.header == ["Class", "Training samples", "Test samples", "ce Acc", "ce F1", "alpa Acc", "alpa F1"]
    head, tail, summary = t.rows
    assert head[:3] == ("head", 80, 20) and summary[1:3] == (88, 22)
    ce_acc, ce_f1, alpa_acc, alpa_f1 = tail[3]
    assert ce_acc.mean == pytest.approx(0.2) and ce_acc.std == pytest.approx(np.std([0.0, 0.4], ddof=1))
    assert ce_f1.mean == pytest.approx(0.5) and ce_f1.std is None  # one finite value: no spread
    assert alpa_acc.std is None and alpa_acc.best and not ce_acc.best  # the diverged seed is left out
    assert ce_acc.text() == "20.00 ± 28.28" and alpa_acc.text() == "70.00" and ce_f1.text() == "0.500"
    assert summary[3][0].mean == pytest.approx(0.6) and summary[3][2].best
    assert "Diverged (left out): alpa seed 1" in t.note
    markdown = to_markdown(_comparison())
    assert "| tail | 8 | 2 | 20.00 ± 28.28 | 0.500 | **70.00** | **0.600** |" in markdown
    rows = list(csv.reader(io.StringIO(to_csv(_comparison()))))
    assert rows[2][:7] == ["tail", "8", "2", "0.200000", "0.282843", "0.500000", ""]
