"""The module map holds: no import cycle, a config that is a leaf, read-only commands and
``load_loss`` that pull in no heavy library (checked in fresh processes, with -X importtime)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import write_config

from alpa_tune.config import load_config
from alpa_tune.storage import open_storage
from alpa_tune.study import create_study

PACKAGE = Path(__file__).resolve().parents[1] / "alpa_tune"
HEAVY = ("torch", "sklearn", "timm")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """alpa_tune modules imported at module level (not inside functions, not for type checking)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks import nothing at run time
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try)) else ():
            if isinstance(sub, ast.Import):
                found.update(alias.name for alias in sub.names if alias.name.startswith("alpa_tune"))
            elif isinstance(sub, ast.ImportFrom):
                module = sub.module or ""
                if sub.level:  # relative: from ._x import y
                    base = package.split(".")[: len(package.split(".")) - sub.level + 1]
                    module = ".".join([*base, module] if module else base)
                if not module.startswith("alpa_tune"):
                    continue
                if sub.module is None:  # from . import _kernels: the submodules, not the package
                    found.update(f"{module}.{alias.name}" for alias in sub.names)
                else:
                    found.add(module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _top_level_imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycle_among_the_modules() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                cycle = stack[stack.index(child):] + [child]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if child not in state:
                visit(child)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 20  # the walk saw the package, not an empty folder


def test_config_is_a_leaf() -> None:
    assert _graph()["alpa_tune.config"] <= {"alpa_tune.errors", "alpa_tune.units", "alpa_tune.files"}


def _imported(code: str, cwd: Path | None = None) -> set[str]:
    """Top-level packages a fresh interpreter imported while running ``code`` (from -X importtime)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         cwd=cwd, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("module", ["alpa_tune.study", "alpa_tune.search", "alpa_tune.views", "alpa_tune.export",
                                    "alpa_tune.report", "alpa_tune.dashboard", "alpa_tune.records",
                                    "alpa_tune.config", "alpa_tune.storage", "alpa_tune.compare_table"])
def test_read_only_modules_import_no_heavy_library(module: str) -> None:
    imported = _imported(f"import {module}")
    assert module.split(".")[0] in imported
    assert not imported & set(HEAVY), f"{module} imports {sorted(imported & set(HEAVY))}"


@pytest.fixture
def finished_study(tmp_path: Path) -> str:
    """A real study with one completed trial, as a worker would have recorded it."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = load_config(write_config(tmp_path), ["search.enqueue_paper_points=false"])
    study = create_study(config, url)
    trial = optuna.trial.create_trial(
        params={"alpha": 1.0, "beta": 1.5, "gamma_pos": 0.5, "gamma_neg": 3.0, "variant": "alpa"},
        distributions={name: optuna.distributions.FloatDistribution(0.0, 5.0)
                       for name in ("alpha", "beta", "gamma_pos", "gamma_neg")}
        | {"variant": optuna.distributions.CategoricalDistribution(["alpa", "alpa_hill"])},
        value=0.75, user_attrs={"class_names": ["a", "b", "c", "d"]})
    optuna.load_study(study_name=study.study_name, storage=open_storage(url)).add_trial(trial)
    return url


@pytest.mark.parametrize("command", [["study", "list"], ["study", "show", "tiny"], ["export", "tiny", "-o", "b.json"]])
def test_read_only_commands_import_no_heavy_library(finished_study: str, tmp_path: Path, command: list[str]) -> None:
    """`python -X importtime -m alpa_tune study list` (and show, export) does its work without torch."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "alpa_tune", *command, "--storage", finished_study],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tiny" in run.stdout or (tmp_path / "b.json").is_file()
    imported = {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines()
                if line.startswith("import time:")}
    assert "optuna" in imported  # the check sees real imports
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_load_loss_needs_only_torch(tmp_path: Path) -> None:
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"loss": "alpa", "params": {"alpha": 1.0, "beta": 1.5, "gamma_pos": 0.0,
                                                          "gamma_neg": 4.0}}))
    imported = _imported(f"import alpa_tune; loss = alpa_tune.load_loss({str(best)!r}); "
                         "assert type(loss).__name__ == 'ALPALoss'")
    assert "torch" in imported
    assert not imported & {"optuna", "sqlalchemy", "sklearn"}, sorted(imported & {"optuna", "sqlalchemy", "sklearn"})


@pytest.mark.parametrize("command", [["study", "list"], ["study", "show", "tiny", "--limit", "1"]])
def test_study_list_and_show_skip_typer_and_pydantic(finished_study: str, tmp_path: Path,
                                                     command: list[str]) -> None:
    """The two commands typed most often to watch a study take the entry's narrow door; `--help`
    still reaches the Typer app."""
    def imported(*args: str) -> tuple[set[str], str]:
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "alpa_tune", *args],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines()
                if line.startswith("import time:")}, run.stdout

    door, stdout = imported(*command, f"--storage={finished_study}")
    assert "tiny" in stdout and "optuna" in door
    assert not door & {"typer", "pydantic", "rich"}, sorted(door & {"typer", "pydantic", "rich"})
    helped, stdout = imported(*command, "--help")
    assert "Usage" in stdout and "typer" in helped


@pytest.mark.parametrize("args", [
    ["study", "list"],
    ["study", "show", "tiny", "--limit", "1"],
    ["study", "show", "nope"],
    ["study", "show", "tiny", "--limit", "0"],
    ["study", "list", "--storage", "redis://localhost/0"],
    ["study", "list", "--storage", "postgresql://alice:s3cret@127.0.0.1:1/db"],
])
def test_the_narrow_door_and_the_typer_app_say_the_same(finished_study: str, tmp_path: Path,
                                                        args: list[str]) -> None:
    """Same stdout, stderr and exit code whichever door a read-only command takes."""
    if "--storage" not in args:
        args = [*args, "--storage", finished_study]
    door = subprocess.run([sys.executable, "-m", "alpa_tune", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    app = subprocess.run([sys.executable, "-c", "from alpa_tune.cli import main; main()", *args],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert (door.returncode, door.stdout, door.stderr) == (app.returncode, app.stdout, app.stderr)
    assert "s3cret" not in door.stdout + door.stderr
    if door.returncode:
        assert door.returncode == 2 and door.stderr.startswith("error: "), door.stderr
    else:
        assert "tiny" in door.stdout
