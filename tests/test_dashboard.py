"""The dashboard's server side over real HTTP on loopback: its admin credential (Basic and Bearer, 401
otherwise), the refusal to expose it without one, read-only answers, the state it serves from the store and
the live round, and ``serve``'s dashboard flags. The page itself is tested in a browser
(``test_dashboard_browser``)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.protocol import PROTOCOL_VERSION, Assignment
from fedrecon.server.app import RunningServer, start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.dashboard import (
    DashboardAuth,
    DashboardSettings,
    DashboardState,
    is_loopback,
    read_credential_file,
)
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec

CREDENTIAL = "s3cret-dashboard-credential"
TASK_TOML = """
name = "flags"
[model]
kind = "matrix_factorization"
num_items = 6
num_factors = 2
"""


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET"
         ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


BEARER = {"Authorization": f"Bearer {CREDENTIAL}"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    task = TaskSpec(name="tiny", model={"kind": "matrix_factorization", "num_items": 6, "num_factors": 2},
                    rounds=RoundSettings(clients_per_round=2, over_selection=1.0, min_reports=2))
    with SqlStore(f"sqlite:///{tmp_path / 'store.db'}") as store, \
            start_server(Coordinator(store, task),
                         dashboard=DashboardSettings(port=0, credential=CREDENTIAL)) as running:
        yield running


def test_without_the_credential_every_path_is_401(server: RunningServer) -> None:
    url = server.dashboard_url
    assert url is not None and url.startswith("http://127.0.0.1:")
    for path, headers in [("", {}), ("api/state", {}), ("static/dashboard.js", {}),
                          ("api/state", {"Authorization": "Bearer wrong-credential-of-some-length"}),
                          ("api/state", _basic("admin", "wrong")),
                          ("api/state", {"Authorization": "Basic %%%"}),
                          ("api/state", {"Authorization": f"Token {CREDENTIAL}"}),
                          ("api/state", {"Authorization": f"Bearer {CREDENTIAL}x"})]:
        status, response_headers, body = _get(url + path, headers)
        assert status == 401, (path, headers, status)
        assert response_headers["WWW-Authenticate"].startswith('Basic realm="fedrecon dashboard"')
        assert b"tiny" not in body  # nothing of the state leaks with the refusal


def test_basic_or_bearer_credential_gets_the_page_and_the_state(server: RunningServer) -> None:
    url = server.dashboard_url
    assert url is not None
    status, headers, page = _get(url, _basic("anyone", CREDENTIAL))
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script src="/static/dashboard.js"' in page and b"http" not in page  # nothing external
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    status, headers, body = _get(url + "api/state", BEARER)
    assert status == 200 and headers["Content-Type"] == "application/json"
    state = json.loads(body)
    assert state["store_error"] is None
    assert state["live"] == {"task": "tiny", "version": 0, "leading": True, "standby_reason": "",
                             "round": None}
    [task] = state["tasks"]
    assert task["name"] == "tiny" and task["latest_version"] == 0 and task["version_count"] == 1
    assert task["settings"]["rounds"]["clients_per_round"] == 2 and "spec" not in task
    assert task["recent_rounds"] == [] and task["open_round"] is None and task["privacy"] is None


def test_it_is_read_only(server: RunningServer) -> None:
    url = server.dashboard_url
    assert url is not None
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = _get(url + "api/state", BEARER, method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    assert _get(url + "../server/dashboard.py", BEARER)[0] == 404
    assert _get(url + "static/../dashboard.py", BEARER)[0] == 404
    status, _, body = _get(url + "api/state", BEARER, method="HEAD")
    assert status == 200 and body == b""


def test_the_live_round_comes_from_the_coordinator_before_the_store_has_it(server: RunningServer) -> None:
    """A check-in opens round 1; the live view has it with its one assignment at once (the store gets the
    counts only on the next progress write)."""
    coordinator = server.coordinator
    assert isinstance(coordinator.check_in("tiny", "device-1", PROTOCOL_VERSION), Assignment)
    state: dict[str, Any] = DashboardState(coordinator.store, _live_of(server)).compute()
    live_round = state["live"]["round"]
    assert live_round["round_num"] == 1 and live_round["phase"] == "selecting"
    assert (live_round["selected"], live_round["reported"], live_round["goal"], live_round["min_reports"]) \
        == (1, 0, 2, 2)
    assert live_round["stages"] and 0 < live_round["seconds_to_selection_end"] <= 30
    assert state["tasks"][0]["rounds"]["open"] == 1


def _live_of(server: RunningServer) -> Any:
    from fedrecon.server.dashboard import coordinator_live

    return coordinator_live(server.coordinator)


def test_state_is_computed_at_most_once_per_interval(tmp_path: Path) -> None:
    calls = []
    now = [0.0]
    with SqlStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        state = DashboardState(store, lambda: calls.append(1) or None, max_age_s=1.0, clock=lambda: now[0])
        first = state.json()
        assert state.json() is first and len(calls) == 1
        now[0] = 1.0
        state.json()
        assert len(calls) == 2


def test_non_finite_values_reach_the_page_as_null(tmp_path: Path) -> None:
    with SqlStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        state = DashboardState(store, lambda: {"task": "x", "round": {"total_weight": float("nan")},
                                               "values": [float("inf"), 1.5]})
        assert json.loads(state.json())["live"] == {"task": "x", "round": {"total_weight": None},
                                                    "values": [None, 1.5]}


def test_an_exposed_dashboard_needs_a_credential() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.1")
    assert not is_loopback("no-such-host.invalid")
    with pytest.raises(ValueError, match="--dashboard-credential-file"):
        DashboardSettings(host="0.0.0.0").check()
    DashboardSettings(host="0.0.0.0", credential=CREDENTIAL).check()
    DashboardSettings(host="127.0.0.1").check()


def test_auth_compares_the_secret_only() -> None:
    auth = DashboardAuth(CREDENTIAL)
    assert auth.required and not DashboardAuth(None).required and DashboardAuth(None).allows(None)
    assert auth.allows(f"Bearer {CREDENTIAL}") and auth.allows(f"bearer  {CREDENTIAL} ")
    assert auth.allows(_basic("admin", CREDENTIAL)["Authorization"])
    assert auth.allows(_basic("", CREDENTIAL)["Authorization"])
    for bad in (None, "", "Bearer", "Bearer ", _basic(CREDENTIAL, "")["Authorization"],
                f"Basic {CREDENTIAL}", "Basic " + base64.b64encode(b"\xff\xfe:x").decode()):
        assert not auth.allows(bad), bad


@pytest.mark.parametrize(("content", "problem"), [
    ("", "one credential on one line"), ("two words-of-enough-length", "one credential on one line"),
    ("short", "at least 16"), (None, "cannot read")])
def test_a_credential_file_must_hold_a_usable_credential(tmp_path: Path, content: str | None,
                                                         problem: str) -> None:
    path = tmp_path / "credential"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=problem):
        read_credential_file(path)


def test_a_credential_file_is_read_stripped(tmp_path: Path) -> None:
    (tmp_path / "credential").write_text(f"  {CREDENTIAL}\n")
    assert read_credential_file(tmp_path / "credential") == CREDENTIAL


@pytest.mark.parametrize(("args", "expected"), [
    (["--dashboard-port", "0", "--dashboard-host", "0.0.0.0"], "would be reachable from other machines"),
    (["--dashboard-port", "0", "--dashboard-credential-file", "{missing}"], "cannot read the dashboard"),
    (["--dashboard-credential-file", "{credential}"], "need --dashboard-port"),
    (["--dashboard-host", "0.0.0.0"], "need --dashboard-port"),
])
def test_serve_refuses_bad_dashboard_flags_before_the_store_is_opened(tmp_path: Path, args: list[str],
                                                                      expected: str) -> None:
    (tmp_path / "task.toml").write_text(TASK_TOML)
    (tmp_path / "credential").write_text(CREDENTIAL)
    db = tmp_path / "store.db"
    files = {"missing": tmp_path / "missing", "credential": tmp_path / "credential"}
    result = CliRunner().invoke(app, ["serve", "--task", str(tmp_path / "task.toml"), "--store",
                                      f"sqlite:///{db}", "--port", "0", *(a.format(**files) for a in args)])
    assert result.exit_code == 2, result.output
    assert len([line for line in result.stderr.splitlines() if expected in line]) == 1, result.output
    assert "Traceback" not in result.output and not db.exists()
