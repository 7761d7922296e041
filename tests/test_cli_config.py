"""``fedrecon serve`` configured by ``--config FILE.toml`` and ``FEDRECON_<OPTION>`` variables besides flags
(issue 14, Package): flag over environment over file over default, strict files, no secrets in them.

Which value won is read off what serve does with it: the port each source names is held by another socket,
so serve refuses it and names it (exit 2, before any store is opened or created).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fedrecon.cli import app

TASK = """
name = "configured"
[model]
kind = "matrix_factorization"
num_items = 6
num_factors = 2
"""


@pytest.fixture
def busy_ports() -> Iterator[list[int]]:
    """Three loopback ports held open (listening), so serve must refuse whichever it is given."""
    held = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        held.append(s)
    try:
        yield [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "task.toml"
    path.write_text(TASK)
    return path


def _serve(args: Sequence[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, ["serve", *args], env=env)


def _refused_port(result: Result) -> int:
    """The port serve said it could not listen on."""
    assert result.exit_code == 2, result.output
    line = next(line for line in result.stderr.splitlines() if "cannot listen on" in line)
    return int(line.split("cannot listen on 127.0.0.1:", 1)[1].split(":", 1)[0])


def test_flag_over_environment_over_file(tmp_path: Path, task_file: Path, busy_ports: list[int]) -> None:
    in_file, in_env, in_flag = busy_ports
    store = tmp_path / "never.db"
    config = tmp_path / "serve.toml"
    config.write_text(f'task = "{task_file}"\nstore = "sqlite:///{store}"\nport = {in_file}\n'
                      "max-workers = 3\n")
    assert _refused_port(_serve(["--config", str(config)])) == in_file
    assert _refused_port(_serve(["--config", str(config)], env={"FEDRECON_PORT": str(in_env)})) == in_env
    assert _refused_port(_serve(["--config", str(config), "--port", str(in_flag)],
                                env={"FEDRECON_PORT": str(in_env)})) == in_flag
    # The file named by the environment, and every option from the environment alone.
    assert _refused_port(_serve([], env={"FEDRECON_CONFIG": str(config)})) == in_file
    assert _refused_port(_serve([], env={"FEDRECON_TASK": str(task_file),
                                         "FEDRECON_PORT": str(in_env)})) == in_env
    assert not store.exists()


def test_an_unknown_key_is_an_error_naming_every_one(tmp_path: Path, task_file: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f'task = "{task_file}"\nbogus = 1\nmax_worker = 2\nport = 0\n')
    result = _serve(["--config", str(config)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "unknown keys 'bogus', 'max_worker'" in message and "max_workers" in message, message
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("line", "expected"), [
    ('port = "abc"', "port = 'abc'"),
    ("port = 70000", "port = 70000"),
    ('log_level = "loud"', "log_level = 'loud'"),
    ("port = 1\n port = 2", "not valid TOML"),
    ("max-workers = 2\nmax_workers = 3", "max_workers set twice"),
])
def test_a_value_its_option_refuses_names_the_file_and_key(tmp_path: Path, task_file: Path, line: str,
                                                           expected: str) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f'task = "{task_file}"\n{line}\n')
    result = _serve(["--config", str(config)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert str(config) in message and expected in message, message


def test_a_password_is_never_taken_from_the_file(tmp_path: Path, task_file: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f'task = "{task_file}"\nstore = "postgresql+psycopg://fed:s3cret@db/fedrecon"\n')
    result = _serve(["--config", str(config)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "store holds a password" in message and "FEDRECON_STORE" in message, message
    assert "s3cret" not in result.output


def test_a_missing_config_file(tmp_path: Path) -> None:
    result = _serve(["--config", str(tmp_path / "nothing.toml")])
    assert result.exit_code == 2 and "nothing.toml" in result.stderr, result.output
