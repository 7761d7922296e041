"""The next-word task over the wire (issue 12): ``deploy/tasks/nextword.toml`` served by ``fedrecon serve``,
trained by ``fedrecon client --data`` devices holding their own text (tiny Shakespeare speakers), and the
rule that a device encodes its text with the task's vocabulary, never with one of its own.

That the adapter's values never travel is ``tests/test_locals_stay_home.py``'s proof (a Keras task with a
local layer, bytes on the wire); here the point is that the whole path from a task file and raw text to a
committed round works as a user runs it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.cli_client import _load_users
from fedrecon.client import FederatedClient
from fedrecon.server.process import CoordinatorProcess
from fedrecon.server.task import TaskSpec, read_task_table
from fedrecon.simulations.text import BOS, SPECIAL

REPO = Path(__file__).resolve().parents[1]
TASK_FILE = REPO / "deploy" / "tasks" / "nextword.toml"
SHAKESPEARE = REPO.parent / "shared" / "data" / "text" / "tinyshakespeare"


def small_rounds_copy(folder: Path, clients: int) -> Path:
    """``nextword.toml`` as served, with rounds of ``clients`` devices (the file's own 10 would wait out the
    selection window for devices this test does not run): the description resolved (architecture and
    vocabulary embedded) and written as a JSON task file."""
    table = read_task_table(TASK_FILE)
    table["rounds"] = {**table["rounds"], "clients_per_round": clients, "min_reports": clients,
                       "selection_timeout_s": 120.0}
    spec = TaskSpec.from_dict(table, base=TASK_FILE.parent)
    path = folder / "nextword.json"
    path.write_text(json.dumps(spec.to_dict()))
    return path


def test_the_deploy_task_agrees_with_its_vocabulary() -> None:
    """The objective's excluded OOV class is the one after the served words, and the model's output has a
    class for each id the encoding can produce (padding, BOS, EOS, words, OOV)."""
    spec = TaskSpec.load(TASK_FILE)
    text = spec.model["text"]
    classes = SPECIAL + len(text["words"]) + 1
    assert spec.model["objective"]["accuracy_excludes"] == [2, classes - 1]
    layers = {layer["config"]["name"]: layer for layer in spec.model["architecture"]["config"]["layers"]}
    assert layers["logits"]["config"]["units"] == classes
    assert layers["embedding"]["config"]["input_dim"] == classes
    assert spec.model["local_layers"] == ["adapter"]
    # Up to 256 sequences (16 batches of 16) a device against 8-step phases: devices must shuffle.
    assert spec.training.shuffle_each_round is True
    assert spec.batch_size * spec.training.post_recon_steps_max < 256


def test_a_device_encodes_its_text_with_the_tasks_vocabulary() -> None:
    """A task whose vocabulary lacks the device's words gets them as OOV ids: the device builds no
    vocabulary of its own from the text it holds."""
    description = {"kind": "keras", "text": {"words": ["zz", "w1"], "seq_len": 4, "oov_buckets": 3}}
    users, item_ids = _load_users("synthetic", json.dumps(description), (), split="train", split_seed=42,
                                  users=2)
    assert item_ids is None and len(users) == 2
    for examples in users.values():
        tokens = examples.x[:, :, 0]
        assert examples.x.shape[1:] == (4, 2) and len(examples) <= 256
        # Only padding, BOS, the task's words (3, 4) and OOV (5) appear, although the synthetic users
        # write eighty different words.
        assert set(np.unique(tokens)) <= {0, BOS, 3, 4, 5}
        assert (tokens == 5).sum() > (tokens == 4).sum()


def test_serve_the_nextword_task_and_devices_train_it_from_their_text(
        tmp_path: Path, require: Callable[[bool, str], None]) -> None:
    """``fedrecon serve --task`` (the deploy task, three devices a round) and ``fedrecon client --data``
    three tiny Shakespeare speakers: every report is accepted and committed into version 1."""
    require((SHAKESPEARE / "by_speaker.json").is_file(),
            f"tiny Shakespeare not found at {SHAKESPEARE} (see ../shared/data/README.md)")
    task = small_rounds_copy(tmp_path, clients=3)
    server = CoordinatorProcess(task, f"sqlite:///{tmp_path / 'nextword.db'}", tmp_path, timeout_s=120.0)
    try:
        ran = CliRunner().invoke(app, ["client", "--task", "nextword", "--data", str(SHAKESPEARE), "--users",
                                       "3", "--coordinator", server.address, "--max-wait", "120"])
        assert ran.exit_code == 0, ran.output + server.log_text()[-3000:]
        assert ran.output.splitlines()[-1] == "3 clients: accepted 3 (committed 3 into version 1), refused 0"
    finally:
        assert server.stop(timeout_s=60) == 0, server.log_text()[-3000:]


def test_an_app_gives_its_users_text_and_gets_personal_next_words(tmp_path: Path) -> None:
    """The client library with a user's raw text (no examples built by the app): it checks in, trains and
    reports into a committed version, then personalizes against that version and completes a prefix with
    words of the task's vocabulary, ranked by probability. Needs no data files: the task carries its words."""
    task = small_rounds_copy(tmp_path, clients=1)
    words = set(TaskSpec.load(TASK_FILE).model["text"]["words"])
    my_text = ["Now is the winter of our discontent made glorious summer by this sun of York."] * 20
    server = CoordinatorProcess(task, f"sqlite:///{tmp_path / 'nextword.db'}", tmp_path, timeout_s=120.0)
    try:
        with FederatedClient(server.address, "nextword", "reader-1", my_text) as client:
            report = client.participate(max_wait_s=120.0)
            assert report.in_round and report.accepted, report
            encoded = client.model_examples()
            assert encoded.x.shape[1:] == (16, 2) and len(encoded) == 40  # BOS, 16 tokens, EOS: 2 windows
            give_up = time.monotonic() + 120.0  # one report of one: the round commits once it is folded
            while (settled := client.settle(report)).committed_version is None and time.monotonic() < give_up:
                time.sleep(0.2)
            assert settled.committed_version == 1, server.log_text()[-3000:]
            mine = client.personalize(rng=np.random.default_rng(0))
            assert mine.version == 1
            suggestions = mine.next_words("Now is the winter of", k=5)
        assert len(suggestions) == 5 and {w for w, _ in suggestions} <= words, suggestions
        probabilities = [p for _, p in suggestions]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
    finally:
        assert server.stop(timeout_s=60) == 0, server.log_text()[-3000:]
