"""Task descriptions: the shipped examples load and fit their data; mistakes are refused with a reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedrecon.server.task import RoundSettings, TaskSpec, read_task_table
from fedrecon.simulations.ratings import load_dataset

TASKS = Path(__file__).resolve().parents[1] / "deploy" / "tasks"


def test_example_tasks_fit_their_data(ml_2998_dir: Path) -> None:
    synthetic = TaskSpec.load(TASKS / "synthetic.toml")
    movielens = TaskSpec.load(TASKS / "movielens-2998u.toml")
    for spec, data in ((synthetic, load_dataset("synthetic", seed=42)),
                       (movielens, load_dataset(str(ml_2998_dir), seed=42))):
        assert spec.model["num_items"] == data.num_items
        assert spec.model["initial_offset"] == pytest.approx(data.mean_rating, abs=1e-4)
    assert movielens.training.server_optimizer.learning_rate == 3.0
    assert movielens.rounds.selection_goal == 130 and movielens.rounds.minimum == 80


def test_round_trip_through_json(tmp_path: Path) -> None:
    spec = TaskSpec.load(TASKS / "synthetic.toml")
    path = tmp_path / "task.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert TaskSpec.load(path) == spec


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "blue"}, "unknown task fields"),
    ({"rounds": {"clients_per_round": 10, "min_reports": 11}}, "min_reports must be between"),
    ({"rounds": {"over_selection": 0.5}}, "over_selection"),
    ({"rounds": {"clients": 3}}, "bad task description"),
    ({"name": "no spaces please"}, "task name"),
])
def test_mistakes_are_refused(change: dict, message: str) -> None:
    data = {"name": "t", "model": {"kind": "matrix_factorization", "num_items": 3}, **change}
    with pytest.raises(ValueError, match=message):
        TaskSpec.from_dict(data)


def test_default_minimum_is_eighty_percent() -> None:
    assert RoundSettings(clients_per_round=10).minimum == 8
    assert RoundSettings(clients_per_round=1).minimum == 1


def test_the_coordinator_does_not_import_tensorflow() -> None:
    code = ("import sys, fedrecon.server.app, fedrecon.server.coordinator, fedrecon.core.model_spec as m; "
            "m.model_from_config({'kind': 'matrix_factorization', 'num_items': 4}).initial_globals(0); "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_task_table_is_read_as_written_and_bad_files_name_themselves(tmp_path: Path) -> None:
    path = tmp_path / "task.toml"
    path.write_text('name = "t"\n[model]\nkind = "matrix_factorization"\nnum_items = 3\n'
                    '[training]\nrecon_epochs = 2\n')
    table = read_task_table(path)
    assert table["training"] == {"recon_epochs": 2}  # only what the file says, no defaults filled in
    assert TaskSpec.load(path).training.recon_epochs == 2
    path.write_text("name = \n")
    with pytest.raises(ValueError, match=r"task\.toml: Invalid value"):
        read_task_table(path)


def test_the_example_dp_task_states_its_accounting() -> None:
    """The figures its comments state are the accountant's (no amplification, z = 10, δ 1e-6)."""
    spec = TaskSpec.load(TASKS / "movielens-2998u-dp.toml")
    assert spec.privacy is not None and spec.aggregation.noise_multiplier == 10.0
    parameters = spec.privacy.parameters(10.0, spec.rounds.clients_per_round)
    assert [round(parameters.epsilon_after(n), 2) for n in (1, 100, 200)] == [0.43, 5.22, 7.77]
    budget = spec.privacy.epsilon_budget
    assert budget is not None and parameters.epsilon_after(210) <= budget < parameters.epsilon_after(211)
