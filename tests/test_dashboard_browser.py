"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright (issue 14).

A real coordinator over SQLite serves a DP task on the embedded synthetic data with the dashboard on port 0;
real gRPC clients run its rounds. The page must show round 1 live (two of four reports in) before it
commits, then round 1 committed in the timeline with the evaluation curve and the privacy budget; without
the credential it is 401; a task name that is HTML (operator input, put straight into the store) is shown as
text and never runs. Screenshots of the live and committed states are saved as test artifacts: under
``$FEDRECON_ARTIFACTS`` when set, else the test's tmp folder (their paths are printed).

Skips (fails under CI's FEDRECON_REQUIRE_ALL=1) without Playwright or a chromium binary (``make browser``
installs Debian's; ``$FEDRECON_CHROMIUM`` names another). Playwright never downloads a browser here.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedrecon.client import FederatedClient
from fedrecon.server.app import RunningServer, start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.dashboard import DashboardSettings
from fedrecon.server.store import SqlStore
from fedrecon.server.task import TaskSpec
from fedrecon.simulations.ratings import FederatedRatings, load_dataset

TASK = """
name = "synthetic-dp"
batch_size = 5
[model]
kind = "matrix_factorization"
num_items = 600
num_factors = 8
use_biases = true
initial_offset = 3.5858
[training]
server_optimizer = { name = "sgd", learning_rate = 1.0 }
[rounds]
clients_per_round = 4
over_selection = 1.0
min_reports = 4
selection_timeout_s = 600.0   # generous: the test decides when a round fills, on a busy machine
reporting_timeout_s = 600.0
retry_delay_s = [0.05, 0.2]
[aggregation]
weighting = "uniform"
max_update_norm = 1.0
noise_multiplier = 1.0
[privacy]
delta = 1e-5
epsilon_budget = 100.0
"""
HOSTILE_NAME = '<img src=x onerror="window.__pwned=1">'
WAIT_MS = 120_000  # page conditions: bounded generously, met as soon as they hold


def _chromium() -> str | None:
    named = os.environ.get("FEDRECON_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


@pytest.fixture(scope="module")
def browser(require: Callable[[bool, str], None]) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require(sync_playwright is not None, "Playwright is not installed (pip install -e '.[dev]')")
    executable = _chromium()
    require(executable is not None, "no chromium binary (make browser, or set FEDRECON_CHROMIUM)")
    assert sync_playwright is not None and executable is not None
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True,
                                              args=["--no-sandbox"])  # CI and this test run as root
        yield launched
        launched.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FEDRECON_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 300.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _participate(address: str, data: FederatedRatings, users: list[int]) -> list[threading.Thread]:
    """Clients taking part in the open round, each on its own thread (as devices would)."""
    def one(user: int) -> None:
        with FederatedClient(address, "synthetic-dp", f"user-{user}", data.train[user]) as client:
            client.participate(max_wait_s=300.0)

    threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in users]
    for t in threads:
        t.start()
    return threads


def _evaluate(address: str, data: FederatedRatings, users: list[int]) -> None:
    for u in users:
        with FederatedClient(address, "synthetic-dp", f"val-{u}", data.validation[u]) as client:
            client.evaluate(rng=np.random.default_rng(u))


def _accepted(server: RunningServer) -> int:
    r = server.coordinator._round
    return len(r.accepted) if r is not None else -1


def test_the_page_shows_the_live_round_then_the_committed_one(browser: Any, tmp_path: Path,
                                                               artifacts: Path) -> None:
    from playwright.sync_api import expect

    data = load_dataset("synthetic", seed=42)
    task = tmp_path / "task.toml"
    task.write_text(TASK)
    credential = secrets.token_urlsafe(24)
    train, validation = sorted(data.train), sorted(data.validation)[:3]
    with SqlStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.create_task(HOSTILE_NAME, {"model": {"kind": "matrix_factorization"}}, initial_parameters=b"",
                          optimizer_state=b"")
        with start_server(Coordinator(store, TaskSpec.load(task)),
                          dashboard=DashboardSettings(port=0, credential=credential)) as server:
            url = server.dashboard_url
            assert url is not None

            anonymous = browser.new_context()  # the browser's own HTTP stack, without the credential
            for path in ("", "api/state"):
                refused = anonymous.request.get(url + path)
                assert refused.status == 401 and "synthetic-dp" not in refused.text()
            anonymous.close()

            context = browser.new_context(http_credentials={"username": "admin", "password": credential},
                                          viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: problems.append(str(err)))
            assert page.goto(url).status == 200
            section = page.locator('section[data-task="synthetic-dp"]')
            expect(section.locator(".card.live")).to_contain_text("No round in flight", timeout=WAIT_MS)

            _evaluate(server.address, data, validation)  # version 0's point of the curve
            first = _participate(server.address, data, train[:2])
            _wait_for(lambda: _accepted(server) == 2, "two accepted reports in round 1")
            live = section.locator(".card.live")
            expect(live).to_contain_text("Round 1", timeout=WAIT_MS)
            expect(live.locator(".bar", has_text="reported")).to_contain_text("2 / 4", timeout=WAIT_MS)
            expect(section.locator('tr[data-round="1"]')).to_contain_text("live", timeout=WAIT_MS)
            live_shot = artifacts / "dashboard-live-round.png"
            page.screenshot(path=str(live_shot), full_page=True)
            print(f"dashboard screenshot (live round): {live_shot}")

            rest = _participate(server.address, data, train[2:4])
            for t in first + rest:
                t.join(300)
            assert server.coordinator.wait_for_version(1, 300)
            _evaluate(server.address, data, validation)
            for t in _participate(server.address, data, train[4:8]):  # round 2, for a curve of 3 points
                t.join(300)
            assert server.coordinator.wait_for_version(2, 300)
            _evaluate(server.address, data, validation)

            for n in (1, 2):
                row = section.locator(f'tr[data-round="{n}"][data-state="committed"]')
                expect(row).to_contain_text(f"{n - 1} → {n}", timeout=WAIT_MS)
            expect(section.locator(".card.live")).to_contain_text("No round in flight", timeout=WAIT_MS)
            expect(section.locator(".strip .cell.s-committed")).to_have_count(2, timeout=WAIT_MS)
            expect(section.locator("svg[aria-label='RMSE by version'] circle.dot")).to_have_count(
                3, timeout=WAIT_MS)
            rounds = store.list_rounds("synthetic-dp")
            epsilon = rounds[-1].metrics["epsilon"]
            expect(section.locator(".epsilon")).to_contain_text(f"ε = {epsilon:.3f} of 100", timeout=WAIT_MS)

            hostile = page.locator("section.task").filter(has_text=HOSTILE_NAME)
            expect(hostile.locator("h2")).to_contain_text(HOSTILE_NAME)
            assert page.evaluate("window.__pwned") is None
            assert page.locator("section.task img").count() == 0

            done_shot = artifacts / "dashboard-committed.png"
            page.screenshot(path=str(done_shot), full_page=True)
            print(f"dashboard screenshot (committed rounds): {done_shot}")
            assert problems == [], problems  # no script error, no refused resource (CSP)
            context.close()
