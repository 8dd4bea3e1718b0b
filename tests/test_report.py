"""``alpa-tune report``: one offline HTML file, rendered in a real headless Chromium.

The browser checks are the point: the plots must actually draw, no script may fail, and the
page must fetch nothing (plotly.js is inline).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
from conftest import cli, write_config
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from test_export import STUDY, finished_study, sqlite_url

from alpa_tune.config import load_config
from alpa_tune.report import MIN_IMPORTANCE_TRIALS, write_report
from alpa_tune.study import create_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Injected first into <head>: records script errors, rejected promises and every resource the
# page fetched as attributes of <html>, which --dump-dom then shows.
PROBE = """<script>(function () {
  var errors = [], root = document.documentElement;
  function note(text) { errors.push(text); root.setAttribute("data-script-errors", errors.join(" | ")); }
  window.addEventListener("error", function (e) { note(String(e.message || e.type)); });
  window.addEventListener("unhandledrejection", function (e) { note("unhandled rejection: " + String(e.reason)); });
  window.addEventListener("load", function () {
    setTimeout(function () {
      var fetched = performance.getEntriesByType("resource").map(function (r) { return r.name; });
      root.setAttribute("data-resources", JSON.stringify(fetched));
      root.setAttribute("data-probe", "done");
    }, 1000);
  });
})();</script>"""


def render(page: Path, work: Path) -> tuple[str, str]:
    """(DOM after the page's scripts ran, Chromium's log) for ``page``."""
    assert CHROMIUM, "chromium is not installed (.ci/run installs it: apt-get install chromium)"
    probed = work / f"probed-{page.name}"
    probed.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: a fetch could only fail
               f"--user-data-dir={work / 'chromium-profile'}", "--virtual-time-budget=20000",
               "--enable-logging=stderr", "--v=0", "--dump-dom", probed.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def assert_drew_offline(page: Path, work: Path, plots: int) -> str:
    dom, log = render(page, work)
    root = re.search(r"<html[^>]*>", dom).group(0)
    assert 'data-probe="done"' in root, "the page never finished loading"
    assert "data-script-errors" not in root, root
    assert "Uncaught" not in log, [line for line in log.splitlines() if "Uncaught" in line]
    assert re.search(r'data-resources="([^"]*)"', root).group(1) == "[]", root  # fetched nothing at all
    assert dom.count('class="plot-container') == plots
    assert dom.count('<svg class="main-svg"') >= plots
    return dom


class _Links(HTMLParser):
    """Every src/href attribute (script bodies are not parsed as markup)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value or "" for name, value in attrs if name in ("src", "href")]


def external_links(text: str) -> list[str]:
    parser = _Links()
    parser.feed(text)
    return [url for url in parser.urls if re.match(r"\s*(https?:)?//", url, re.I)]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_study(tmp_path_factory, tmp_path_factory.mktemp("report"))


def test_report_of_a_real_study_draws_in_chromium(study_dir: Path, tmp_path: Path) -> None:
    page = study_dir / "out" / "report.html"
    done = cli("report", STUDY, "-o", str(page), cwd=study_dir)
    assert done.returncode == 0, done.stderr
    text = page.read_text(encoding="utf-8")
    assert "<script src" not in text and external_links(text) == []
    # Two trials: importances are explained, not drawn from noise.
    assert f"need at least {MIN_IMPORTANCE_TRIALS} completed trials" in text
    dom = assert_drew_offline(page, tmp_path, plots=5)  # history, parallel, slice, timeline, per-class
    assert external_links(dom) == []
    assert "Best trial" in dom and "class_3" in dom


def _rich_study(folder: Path) -> optuna.Study:
    """A study with every kind of trial and a stored comparison, built without training."""
    url = sqlite_url(folder)
    study = create_study(load_config(write_config(folder, "rich", n_trials=12)), url)
    space = {name: FloatDistribution(low, high) for name, (low, high) in
             (("alpha", (0.5, 2)), ("beta", (0.5, 2)), ("gamma_pos", (0, 5)), ("gamma_neg", (0, 5)))}
    space["variant"] = CategoricalDistribution(["alpa", "alpa_hill"])
    for k in range(10):
        params = {"alpha": 0.5 + 0.15 * k, "beta": 2 - 0.1 * k, "gamma_pos": (k * 7) % 5, "gamma_neg": k % 5 + 0.5,
                  "variant": ["alpa", "alpa_hill"][k % 2]}
        value = 0.4 + 0.05 * params["alpha"] - 0.01 * params["gamma_pos"]
        attrs = {"fold_balanced_accuracy": [value - 0.01, value + 0.01], "class_names": ["a", "b", "c", "d"],
                 "class_recall": [0.9, 0.5, 0.3, None], "class_f1": [0.8, 0.5, 0.35, None], "device": "cpu"}
        state = TrialState.PRUNED if k == 7 else TrialState.COMPLETE
        study.add_trial(create_trial(params=params, distributions=space, value=value if k != 7 else None,
                                     state=state, user_attrs=attrs, intermediate_values={0: value}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "NonFiniteLossError"}))
    runs = [{"loss": loss, "seed": seed, "balanced_accuracy": 0.5 + 0.1 * i, "macro_f1": 0.4 + 0.1 * i + seed / 100,
             "recall": [0.9, 0.5 + seed / 10, 0.3, 0.2], "f1": [0.8, 0.5, 0.3, 0.2]}
            for i, loss in enumerate(("ce", "alpa")) for seed in (0, 1)]
    study.set_user_attr("comparison", {
        "study": "rich", "class_names": ["a", "b", "c", "d"], "train_counts": [40, 20, 10, 5],
        "test_counts": [10, 5, 3, 2], "losses": [{"label": "ce"}, {"label": "alpa"}], "seeds": [0, 1],
        "runs": runs})
    return study


def test_every_section_draws_for_a_full_study(tmp_path: Path) -> None:
    study = _rich_study(tmp_path)
    page = write_report(study, tmp_path / "rich.html")
    text = page.read_text(encoding="utf-8")
    assert "could not draw" not in text and "need at least" not in text
    # plotly.js embedded exactly once; seven figures use it.
    assert len(re.findall(r"plotly\.js v\d", text)) == 1 and text.count("Plotly.newPlot(") == 7
    dom = assert_drew_offline(page, tmp_path, plots=7)
    for title in ("Optimisation history", "Parameter importances", "Parallel coordinates", "Slice plots",
                  "Trial states over time", "per-class recall and F1", "Held-out comparison"):
        assert title in dom
    assert "Balanced accuracy / macro F1" in dom and "60.00 ± 0.00" in dom  # alpa's balanced accuracy
    assert external_links(dom) == []
    assert json.loads(json.dumps(study.user_attrs["comparison"]))  # stored as plain JSON


def test_report_bad_input(tmp_path: Path) -> None:
    def one_line(done: subprocess.CompletedProcess, message: str) -> None:
        assert done.returncode == 2, done.stdout + done.stderr
        assert message in done.stderr and done.stderr.strip().count("\n") == 0

    # No storage file yet: refused without creating one.
    one_line(cli("report", "nope", cwd=tmp_path), "alpa-tune.db does not exist (nothing to read")
    assert not (tmp_path / "alpa-tune.db").exists()
    create_study(load_config(write_config(tmp_path, "empty")), sqlite_url(tmp_path))
    one_line(cli("report", "nope", cwd=tmp_path), "study 'nope' does not exist")
    one_line(cli("report", "empty", cwd=tmp_path), "study 'empty' has no completed trial yet; nothing to report")
    _rich_study(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line(cli("report", "rich", "-o", str(blocker / "report.html"), cwd=tmp_path), "cannot write")
