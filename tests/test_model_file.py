"""Model files say what they are: description, variables (names, shapes, dtypes), settings; old files load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrecon.client.model_file import ModelFile as ReExported
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.model_file import FORMAT, ModelFile, ModelFileError, globals_for_model
from fedrecon.tensors import arrays_to_bytes


def _file(model: MatrixFactorization, **extra: object) -> ModelFile:
    arrays = model.initial_globals(0)
    return ModelFile(task="t", version=4, model_spec=model.config(),
                     names=[v.name for v in model.global_variables], arrays=arrays,
                     training={"recon_epochs": 2}, batch_size=3, extra=dict(extra))


def test_round_trip_states_variables_and_keeps_optional_fields(tmp_path: Path) -> None:
    assert ReExported is ModelFile
    model = MatrixFactorization(7, 3, use_biases=True)
    original = _file(model, item_ids=[10, 20, 30, 40, 50, 60, 70])
    original.save(tmp_path / "m.npz")
    loaded = ModelFile.load(tmp_path / "m.npz")
    meta = loaded.meta()
    assert meta["format"] == FORMAT == "fedrecon.model/2"
    assert meta["variables"] == [{"name": "item_embedding", "shape": [7, 3], "dtype": "float32"},
                                 {"name": "item_bias", "shape": [7], "dtype": "float32"},
                                 {"name": "global_bias", "shape": [], "dtype": "float32"}]
    assert (loaded.task, loaded.version, loaded.batch_size) == ("t", 4, 3)
    assert loaded.training == {"recon_epochs": 2} and loaded.model_spec == model.config()
    assert loaded.extra == {"item_ids": [10, 20, 30, 40, 50, 60, 70]}  # an optional field survives
    for a, b in zip(loaded.arrays, original.arrays, strict=True):
        np.testing.assert_array_equal(a, b)


def test_version_1_files_still_load(tmp_path: Path) -> None:
    arrays = {"item_embedding": np.ones((5, 2), np.float32)}
    meta = {"format": "fedrecon.model/1", "task": "old", "version": 2,
            "model": {"kind": "matrix_factorization", "num_items": 5, "num_factors": 2}, "training": {},
            "batch_size": 5, "names": ["item_embedding"]}
    (tmp_path / "old.npz").write_bytes(arrays_to_bytes(arrays, meta))
    loaded = ModelFile.load(tmp_path / "old.npz")
    assert loaded.version == 2 and loaded.variables[0].shape == (5, 2)


def test_unreadable_files_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match=r"junk\.npz is not a fedrecon model file"):
        ModelFile.load(tmp_path / "junk.npz")
    (tmp_path / "future.npz").write_bytes(arrays_to_bytes({}, {"format": "fedrecon.model/9"}))
    with pytest.raises(ModelFileError, match=r"format 'fedrecon.model/9'; readable: fedrecon.model/1"):
        ModelFile.load(tmp_path / "future.npz")
    arrays = {"item_embedding": np.ones((5, 2), np.float32)}
    lying = {"format": FORMAT, "task": "t", "version": 1, "model": {}, "training": {}, "batch_size": 5,
             "variables": [{"name": "item_embedding", "shape": [5, 3], "dtype": "float32"}]}
    (tmp_path / "lying.npz").write_bytes(arrays_to_bytes(arrays, lying))
    with pytest.raises(ModelFileError, match=r"stored as float32\[5, 2\] but described as float32\[5, 3\]"):
        ModelFile.load(tmp_path / "lying.npz")


def test_a_model_that_does_not_fit_names_the_first_mismatching_variable() -> None:
    small = _file(MatrixFactorization(7, 3))
    with pytest.raises(ModelFileError, match=r"variable 'item_embedding': task x needs shape \[9, 3\], the "
                                             r"model file has \[7, 3\]"):
        globals_for_model(small, MatrixFactorization(9, 3), "task x")
    with pytest.raises(ModelFileError, match=r"variable 'item_bias': task x needs shape \[7\], the model "
                                             r"file has no such variable"):
        globals_for_model(small, MatrixFactorization(7, 3, use_biases=True), "task x")
    fits = globals_for_model(_file(MatrixFactorization(7, 3, use_biases=True)),
                             MatrixFactorization(7, 3, use_biases=True), "task x")
    assert [a.shape for a in fits] == [(7, 3), (7,), ()]


def test_serve_refuses_a_model_of_other_shapes_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    task = tmp_path / "task.toml"
    task.write_text('name = "t"\n[model]\nkind = "matrix_factorization"\nnum_items = 600\nnum_factors = 8\n'
                    'use_biases = true\n')
    _file(MatrixFactorization(600, 8)).save(tmp_path / "plain.npz")  # no biases
    ran = subprocess.run([sys.executable, "-m", "fedrecon.cli", "serve", "--task", str(task), "--store",
                          f"sqlite:///{tmp_path / 'f.db'}", "--port", "0", "--init-model",
                          str(tmp_path / "plain.npz")], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stdout + ran.stderr
    refusal = [line for line in ran.stderr.splitlines() if "cannot use model" in line]
    assert len(refusal) == 1, ran.stderr  # one line on stderr (TensorFlow may log its own start-up lines)
    assert "variable 'item_bias': task t needs shape [600], the model file has no such variable" in refusal[0]
