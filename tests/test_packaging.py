"""What each kind of user installs: an app embedding the client gets the wire and nothing it did not ask."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}


def test_the_base_install_is_what_an_app_embedding_the_client_needs() -> None:
    base = _names(PROJECT["dependencies"])
    assert base == {"numpy", "grpcio", "protobuf", "tenacity"}
    # No TensorFlow of our choosing (an app's own `tensorflow` would get a second copy), no CLI, no plots.
    assert not base & {"tensorflow", "tensorflow-cpu", "typer", "rich", "matplotlib", "sqlalchemy"}


def test_extras_give_each_use_what_it_runs() -> None:
    extras = PROJECT["optional-dependencies"]
    assert {"tensorflow-cpu", "keras"} <= _names(extras["tf"])
    assert {"typer", "rich"} <= _names(extras["cli"])
    assert {"fedrecon", "matplotlib"} <= _names(extras["sim"]) and "fedrecon[tf,cli]" in extras["sim"]
    assert {"sqlalchemy", "alembic", "psycopg"} <= _names(extras["server"])
    assert not _names(extras["server"]) & {"tensorflow-cpu", "matplotlib"}  # the coordinator runs without
    # Secure aggregation: the coordinator always has it, an app opts in (the base stays light).
    assert _names(extras["secagg"]) == {"cryptography", "pycryptodome"}
    assert "fedrecon[cli,secagg]" in extras["server"] and "secagg" in extras["dev"][0]
    assert "<3.12" not in PROJECT["requires-python"]


def test_the_client_library_runs_without_cli_plotting_or_store() -> None:
    """Import the client library with the CLI, plotting and store libraries made unimportable (as in an app
    that never installed them). TensorFlow's own optional imports of them, if present, are not ours."""
    code = ("import sys\n"
            "for name in ('typer', 'matplotlib', 'sqlalchemy', 'alembic', 'psycopg'):\n"
            "    sys.modules[name] = None\n"
            "from fedrecon.client import FederatedClient, Personalization\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO / "tests")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_the_command_without_its_extra_says_what_to_install() -> None:
    """The console script is installed with the base package; without typer it names the extra."""
    code = ("import sys; sys.modules['typer'] = None; "  # as if typer were not installed
            "from fedrecon.command import main; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO / "tests")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "fedrecon: the command needs the CLI extra (typer is missing): pip install 'fedrecon[cli]' "
        "(or [sim] for simulations, [server] for the coordinator)"]
