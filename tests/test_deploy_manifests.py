"""The deployment files as their tools read them: docker compose (GPU and CPU) and Kubernetes.

Compose files are rendered by Debian's ``docker-compose config`` (.ci/run installs it) and the
rendered worker commands are run for real against PostgreSQL; the Kubernetes manifests are
validated offline against the API schemas ``kubernetes-validate`` ships, and their command lines
parsed by alpa-tune's own CLI.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli, write_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# Oldest Kubernetes the manifests claim (podFailurePolicy's schema before 1.29 wants fields
# a real API server does not) and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29", "latest")


# --- docker compose -------------------------------------------------------------------------

@pytest.fixture
def compose_project(tmp_path: Path) -> Path:
    """A copy of the compose files with a .env made from storage/example.env and a fresh password."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package)")
    for path in ROOT.glob("docker-compose*.yml"):
        shutil.copy(path, tmp_path)
    (tmp_path / "storage").mkdir()
    shutil.copy(ROOT / "storage" / "postgresql.conf", tmp_path / "storage")
    password = f"pw-{uuid.uuid4().hex}"
    env = (ROOT / "storage" / "example.env").read_text().replace("change-me", password)
    assert password in env, "storage/example.env no longer has the change-me placeholder"
    (tmp_path / ".env").write_text(env)
    return tmp_path


def set_env_line(project: Path, key: str, value: str) -> None:
    lines = (project / ".env").read_text().splitlines()
    assert any(line.startswith(f"{key}=") for line in lines), f"{key} is not in storage/example.env"
    (project / ".env").write_text("\n".join(f"{key}={value}" if line.startswith(f"{key}=") else line
                                            for line in lines) + "\n")


def env_value(project: Path, key: str) -> str:
    for line in (project / ".env").read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1]
    raise KeyError(key)


def render(project: Path, *files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``docker-compose config`` of ``files`` (none: the files .env's COMPOSE_FILE names)."""
    command = ["docker-compose"]
    for name in files:
        command += ["-f", name]
    # The host's shell: only what compose needs, so a stray COMPOSE_FILE or WORKER_THREADS stays out.
    shell = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **(env or {})}
    done = subprocess.run([*command, "config"], cwd=project, env=shell, capture_output=True, text=True,
                          timeout=60)
    # The rendered file holds .env's password: say only that it failed, and compose's own error.
    assert done.returncode == 0, f"docker-compose config failed: {done.stderr.strip()[-2000:]}"
    return yaml.safe_load(done.stdout)


def device_requests(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def check_common(config: dict[str, Any], project: Path) -> None:
    """What every variant must keep: the URL from .env only, services on 127.0.0.1 only."""
    url = env_value(project, "ALPA_TUNE_STORAGE")
    password = env_value(project, "POSTGRES_PASSWORD")
    services = config["services"]
    for name in ("dashboard", "study", "worker"):
        service = services[name]
        words = [str(word) for word in service.get("command", []) + service.get("entrypoint", [])]
        assert not any("://" in word or password in word for word in words), f"{name}: storage URL on its command line"
        assert "--storage" not in words, f"{name}: --storage on its command line"
        # env_file: .env renders into the environment; the value must be .env's, unchanged.
        assert service["environment"].get("ALPA_TUNE_STORAGE") == url, f"{name}: storage URL is not .env's"
    for name in ("dashboard", "postgres"):
        ports = services[name].get("ports", [])
        assert ports, f"{name} publishes no port"
        assert all(str(port).startswith("127.0.0.1:") for port in ports), f"{name} publishes beyond 127.0.0.1: {ports}"


def test_compose_gpu_is_the_default(compose_project: Path) -> None:
    config = render(compose_project)  # COMPOSE_FILE from .env, as `docker compose up` reads it
    assert config == render(compose_project, "docker-compose.yml", "docker-compose.gpu.yml")
    check_common(config, compose_project)
    worker = config["services"]["worker"]
    assert device_requests(worker) == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # One launcher per host pins one worker per GPU (Docker gives every `count: 1` replica GPU 0).
    assert worker["command"][:2] == ["launch", env_value(compose_project, "STUDY_NAME")]
    assert [s for s, v in config["services"].items() if device_requests(v)] == ["worker"]


def test_compose_cpu_override(compose_project: Path) -> None:
    explicit = render(compose_project, "docker-compose.yml", "docker-compose.cpu.yml")
    set_env_line(compose_project, "COMPOSE_FILE", "docker-compose.yml:docker-compose.cpu.yml")
    set_env_line(compose_project, "WORKER_THREADS", "3")
    from_env = render(compose_project)
    check_common(from_env, compose_project)
    for config in (explicit, from_env):
        assert not any(device_requests(service) for service in config["services"].values()), "a GPU is reserved"
        assert "runtime" not in config["services"]["worker"]
    worker = from_env["services"]["worker"]
    assert worker["command"] == ["worker", env_value(compose_project, "STUDY_NAME"), "--device", "cpu", "--threads", "3"]
    assert worker["environment"]["OMP_NUM_THREADS"] == "3"
    assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    # The host's shell wins over .env, as for every compose variable.
    assert render(compose_project, env={"WORKER_THREADS": "2"})["services"]["worker"]["command"][-1] == "2"


def run_rendered(command: list[str], environment: dict[str, Any], cwd: Path, timeout: float = 300) -> str:
    """A rendered service command run here as the image's ENTRYPOINT (alpa-tune) would run it."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "COLUMNS": "200",
           **{key: os.environ[key] for key in ("PYTHONPATH",) if key in os.environ},
           **{key: str(value) for key, value in environment.items()}}
    process = subprocess.Popen([sys.executable, "-m", "alpa_tune", *command], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Twice, as `docker compose stop` then kill would: the launcher passes SIGTERM, then SIGKILL,
        # on to its workers (their own sessions: a kill of the launcher alone would leave them).
        for _ in range(2):
            process.send_signal(signal.SIGTERM)
            time.sleep(5)
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"{command[0]} ran past {timeout}s:\n{out[-3000:]}")
    assert process.returncode == 0, f"{command[0]} exited {process.returncode}:\n{out[-3000:]}"
    return out


def test_compose_worker_commands_run(compose_project: Path, pg_url: str, tmp_path: Path) -> None:
    """The CPU worker's and the GPU launcher's rendered commands work with the URL from .env only.

    This host has no GPU, so the launcher falls back to CPU workers (one, to keep it short): it
    shows that the command line and its environment are right, not that a GPU is used.
    """
    import optuna

    from alpa_tune.storage import open_storage

    set_env_line(compose_project, "ALPA_TUNE_STORAGE", pg_url)
    set_env_line(compose_project, "STUDY_NAME", "tiny")
    config_path = write_config(tmp_path, n_trials=2)
    created = cli("study", "create", str(config_path), env={"ALPA_TUNE_STORAGE": pg_url})
    assert created.returncode == 0, created.stderr

    cpu = render(compose_project, "docker-compose.yml", "docker-compose.cpu.yml")["services"]["worker"]
    run_rendered([*cpu["command"], "--trials", "1"], cpu["environment"], tmp_path)

    gpu = render(compose_project)["services"]["worker"]
    command = [str(tmp_path / "logs") if word == "/logs" else word for word in gpu["command"]]
    assert command != gpu["command"], "the launcher's --log-dir /logs is gone"
    out = run_rendered([*command, "--workers", "1"], {**gpu["environment"], "CUDA_VISIBLE_DEVICES": ""}, tmp_path)
    assert "postgresql://" not in out
    assert (tmp_path / "logs" / "worker-0.log").exists()

    study = optuna.load_study(study_name="tiny", storage=open_storage(pg_url))
    states = Counter(trial.state for trial in study.get_trials(deepcopy=False))
    assert states[optuna.trial.TrialState.COMPLETE] == 2 and not states[optuna.trial.TrialState.RUNNING], states


# --- Kubernetes -----------------------------------------------------------------------------

def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        documents += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found in deploy/k8s"
    return found[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")
    if version == "latest":
        version = ".".join(kubernetes_validate.latest_version().split(".")[:2])
    documents = k8s_documents()
    assert {doc["kind"] for _, doc in documents} == {"Job", "Secret"}
    for file_name, doc in documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{file_name}: {doc['kind']}/{doc['metadata']['name']} is not valid for Kubernetes {version}: "
                        f"{exc.message}")


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def parse_cli(args: list[str]) -> dict[str, Any]:
    """alpa-tune's own parser on a manifest's args (types and ranges checked, nothing run)."""
    import typer.main

    from alpa_tune.cli import app

    command = typer.main.get_command(app)
    words = list(args)
    while hasattr(command, "commands"):  # descend `study create` and the like
        command = command.commands[words.pop(0)]
    return command.make_context(command.name, words).params


def test_k8s_worker_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from alpa_tune.config import load_config
    from alpa_tune.errors import EXIT_BAD_INPUT, EXIT_GAVE_UP
    from alpa_tune.workers import explicit_rank

    job = k8s_object("Job", "alpa-tune-workers")
    study_job = k8s_object("Job", "alpa-tune-study-create")
    secret = k8s_object("Secret", "alpa-tune-storage")

    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # SIGTERM to SIGKILL: long enough to finish a ConvNeXt-B epoch, like compose's stop_grace_period.
    assert pod["terminationGracePeriodSeconds"] >= 600
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    args = container["args"]
    assert args[0] == "worker" and not any("://" in word for word in args) and "--storage" not in args
    params = parse_cli(args)
    assert params["rank"] is None, "the rank comes from the completion index, not the command line"

    env = container_env(container)
    ref = env["ALPA_TUNE_STORAGE"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert "value" not in env["ALPA_TUNE_STORAGE"]
    field = env["ALPA_TUNE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    monkeypatch.setenv("ALPA_TUNE_RANK", "7")  # what Kubernetes puts there for pod index 7
    assert explicit_rank(None) == 7

    # A failure every pod would repeat fails the Job at once; the codes are the worker's own.
    fail_job = [rule for rule in job["spec"]["podFailurePolicy"]["rules"] if rule["action"] == "FailJob"]
    assert [set(rule["onExitCodes"]["values"]) for rule in fail_job] == [{EXIT_BAD_INPUT, EXIT_GAVE_UP}]

    # The one-shot Job creates the very study the workers pull, from a config in the image.
    (creator,) = study_job["spec"]["template"]["spec"]["containers"]
    assert creator["image"] == container["image"]
    assert study_job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    assert creator["args"][:2] == ["study", "create"]
    config_path = parse_cli(creator["args"])["config_path"]
    assert load_config(ROOT / config_path).name == params["study_name"]
    assert container_env(creator)["ALPA_TUNE_STORAGE"] == env["ALPA_TUNE_STORAGE"]
