"""benchmarks/gpu_check.py --cpu-smoke: every check of the GPU run, at tiny sizes on CPU, so the
script a GPU session runs in one call keeps working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_runs_every_check_and_prints_one_table(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert [name for name, r in sections.items() if r["status"] == "skipped"] == [
        "train:bf16", "train:bf16+channels_last+compile"]
    assert all(r["status"] == "ok" for r in sections.values() if r["status"] != "skipped"), sections

    data = sections["input"]["data"]
    assert data["reader_identical"] and data["batches"] >= 2 and not data["pinned"]
    assert data["channels_last"] and data["layout_values_equal"]
    assert data["nan_message"] == "loss became nan in fold 0, epoch 0, step 3"
    assert data["nan_calls"] == 4  # on CPU the losses are read every step
    assert 0 <= data["fold_balanced_accuracy"] <= 1
    for name in ("train:fp32", "train:bf16+channels_last"):
        figures = sections[name]["data"]
        assert figures["real"] > 0 and figures["synthetic"] > 0 and figures["flops_per_image"] > 1e6
    errors = sections["alpa"]["data"]["errors"]["fp32"]
    assert errors[0] < 1e-5 and errors[1] < 1e-4  # float32 against float64
    study = sections["study"]["data"]
    assert study["finished"] == study["budget"] == 2 and study["devices"] == ["cpu"]
    assert sections["compare"]["data"]["workers"] == 1 and sections["compare"]["data"]["devices"] == ["cpu"]

    table = done.stdout
    assert table.startswith("gpu_check --cpu-smoke: CPU") and "| check | result | detail |" in table
    for label in ("input: reader", "input: NaN stop", "resnet10t 32 px b16 fp32", "ALPA: accuracy", "ALPA: speed",
                  "study: --workers 2", "compare: ce vs alpa"):
        assert f"| {label}" in table, table
    assert len(report["rows"]) == table.count("\n| ") - 1  # every row printed, under the header
