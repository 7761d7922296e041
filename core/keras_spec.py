"""Keras models as task descriptions: what a coordinator serves and a device rebuilds, safely.

A Keras model travels as JSON (``kind = "keras"``)::

    {"kind": "keras",
     "architecture": {...},            # keras.saving.serialize_keras_object(model): no code, no weights
     "local_layers": ["user"],         # layers whose variables are local (reconstructed, never sent)
     "objective": {"name": "mse"},     # core.objectives: the loss and the metrics
     "variables": [{"name": "items/embeddings", "shape": [10, 4], "trainable": true, "local": false}, ...],
     "text": {"words": ["the", ...], "seq_len": 16, "oov_buckets": 50}}   # optional: see below

``text`` (optional) says how a device turns its own text into the model's input (``fedrecon.text_encoding``):
the vocabulary's words in id order, the sequence length and the out-of-vocabulary buckets. It travels
with the model, to every device and into exported model files, because a device must use the task's
vocabulary: one built from its own text would give ids another meaning than the model learnt. In a task
file, ``text = { vocabulary = "words.txt", seq_len = 16, oov_buckets = 50 }`` names a file of one word a
line, in id order, which is read and embedded.

``variables`` (optional in a task file) is the variable table in wire order: globals first, then locals.
The coordinator reads names and shapes from it and never imports TensorFlow: when the table is missing, or
when it needs a seeded version 0, it asks a short-lived subprocess (``python -m fedrecon.core.keras_spec``),
which builds the model with Keras and answers with the table and the initial global values.

Safe by default. A description from the network is deserialised with Keras' ``safe_mode`` and, before
that, refused outright (``UnsafeModelDescription``) if it holds a ``Lambda`` layer or names a class or
function outside Keras that the app has not registered (``custom_objects``, or
``keras.saving.register_keras_serializable``). So no description can make a device or the coordinator
execute code it does not already have; an app that trusts its coordinator with Lambda layers says so with
``safe_mode=False``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrecon.core.model import ClientViews, ReconstructionModel, VariableSpec
from fedrecon.core.objectives import objective_from_config

if TYPE_CHECKING:
    from fedrecon.core.keras_model import KerasReconstructionModel
    from fedrecon.core.lazy_tensorflow import tf

KIND = "keras"
DESCRIPTION_FIELDS = frozenset({"kind", "architecture", "local_layers", "objective", "variables", "text"})
TEXT_FIELDS = frozenset({"words", "seq_len", "oov_buckets"})
SUBPROCESS_TIMEOUT_S = 600.0


class UnsafeModelDescription(ValueError):
    """A model description that would run code the receiver did not register (a Lambda layer, a class or
    function from outside Keras)."""


def variable_table(global_variables: Sequence[VariableSpec], local_variables: Sequence[VariableSpec]
                   ) -> list[dict[str, Any]]:
    """The description's ``variables``: globals in wire order, then locals."""
    return [{"name": v.name, "shape": list(v.shape), "trainable": v.trainable, "local": local}
            for local, group in ((False, global_variables), (True, local_variables)) for v in group]


def _specs(table: Sequence[Mapping[str, Any]], local: bool) -> tuple[VariableSpec, ...]:
    return tuple(VariableSpec(str(v["name"]), tuple(int(d) for d in v["shape"]),
                              bool(v.get("trainable", True)))
                 for v in table if bool(v.get("local", False)) == local)


def variable_differences(expected: Sequence[Mapping[str, Any]], actual: Sequence[Mapping[str, Any]]
                         ) -> list[str]:
    """What differs between two variable tables, one line per variable (empty: they agree)."""
    def index(table: Sequence[Mapping[str, Any]]) -> dict[str, tuple]:
        return {str(v["name"]): (tuple(int(d) for d in v["shape"]), bool(v.get("trainable", True)),
                                 bool(v.get("local", False))) for v in table}

    want, got = index(expected), index(actual)
    lines = []
    for name, (shape, trainable, local) in want.items():
        if name not in got:
            lines.append(f"{name}: the task has {'local' if local else 'global'} {list(shape)}, the model "
                         "has no such variable")
            continue
        g_shape, g_trainable, g_local = got[name]
        if g_shape != shape:
            lines.append(f"{name}: the task has shape {list(shape)}, the model {list(g_shape)}")
        if g_local != local:
            lines.append(f"{name}: {'local' if local else 'global'} in the task, "
                         f"{'local' if g_local else 'global'} in the model")
        if g_trainable != trainable:
            lines.append(f"{name}: {'' if trainable else 'not '}trainable in the task, "
                         f"{'' if g_trainable else 'not '}trainable in the model")
    lines += [f"{name}: the model has it, the task has no such variable" for name in got if name not in want]
    if not lines and [v["name"] for v in expected] != [v["name"] for v in actual]:
        lines.append("the variables are listed in another order")
    return lines


def check_description(description: Mapping[str, Any]) -> None:
    """Refuse a malformed ``kind = "keras"`` description with one line (no Keras needed)."""
    unknown = set(description) - DESCRIPTION_FIELDS
    if unknown:
        raise ValueError(f"unknown keras model fields {sorted(unknown)}; known: {sorted(DESCRIPTION_FIELDS)}")
    if not isinstance(description.get("architecture"), Mapping):
        raise ValueError("a keras model needs its architecture (keras.saving.serialize_keras_object output, "
                         "or `architecture = \"file.json\"` / `file = \"model.keras\"` in a task file)")
    layers = description.get("local_layers")
    if not isinstance(layers, list | tuple) or not all(isinstance(n, str) for n in layers):
        raise ValueError("local_layers must be a list of layer names (it may be empty: all global)")
    objective_from_config(description.get("objective"))
    table = description.get("variables")
    if table is not None:
        try:
            _specs(table, False)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"bad keras variable table: {err!r}") from err
    if description.get("text") is not None:
        check_text(description["text"])


def check_text(text: Any) -> None:
    """Refuse a malformed ``text`` encoding with one line: the words (distinct, non-empty strings without
    spaces: the tokenizer never yields one), a positive ``seq_len`` and ``oov_buckets``."""
    if not isinstance(text, Mapping):
        raise ValueError("text must be a table: words (or vocabulary = a file), seq_len, oov_buckets")
    unknown = set(text) - TEXT_FIELDS
    if unknown:
        raise ValueError(f"unknown text fields {sorted(unknown)}; known: {sorted(TEXT_FIELDS)}")
    words = text.get("words")
    if not isinstance(words, list | tuple) or not words or not all(
            isinstance(w, str) and w and not any(c.isspace() for c in w) for w in words):
        raise ValueError("text.words must be a non-empty list of words without spaces, in id order")
    if len(set(words)) != len(words):
        raise ValueError("text.words lists a word twice")
    for key in ("seq_len", "oov_buckets"):
        value = text.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"text.{key} must be a positive integer")
    if "seq_len" not in text:
        raise ValueError("text.seq_len is required (the model's sequence length)")


def _walk(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _walk(value)


def check_safe(architecture: Mapping[str, Any], custom_objects: Mapping[str, Any] | None = None) -> None:
    """Refuse an architecture that would make Keras run code: a ``Lambda`` layer, or a class or function
    from a module outside Keras that neither ``custom_objects`` nor Keras' registry holds."""
    import keras

    allowed = dict(custom_objects or {})
    for node in _walk(architecture):
        class_name = node.get("class_name")
        if not isinstance(class_name, str):
            continue
        if class_name == "Lambda":
            name = (node.get("config") or {}).get("name", "?")
            raise UnsafeModelDescription(f"the model has a Lambda layer ({name!r}): a description received "
                                         "from the network may not carry code (pass safe_mode=False to "
                                         "trust it)")
        module = node.get("module")
        if module is None or not isinstance(module, str) or module == "keras" or module.startswith("keras."):
            continue
        registered = node.get("registered_name") or class_name
        if registered in allowed or class_name in allowed:
            continue
        if keras.saving.get_registered_object(registered) is not None:
            continue
        raise UnsafeModelDescription(f"the model names {class_name!r} from module {module!r}, which this "
                                     "process has not registered: pass it in custom_objects (or register it "
                                     "with keras.saving.register_keras_serializable)")


def build_keras_model(description: Mapping[str, Any], *, custom_objects: Mapping[str, Any] | None = None,
                      safe_mode: bool = True, seed: int | None = None) -> KerasReconstructionModel:
    """The reconstruction model a description names, built with Keras (``seed``: its initial weights).

    With ``safe_mode`` (the default) the description is checked by ``check_safe`` and deserialised with
    Keras' safe mode. A description that lists its variables must match the built model exactly; the
    error names every difference."""
    import keras

    from fedrecon.core.keras_model import KerasReconstructionModel

    check_description(description)
    architecture = copy.deepcopy(dict(description["architecture"]))  # Keras consumes the dict it reads
    if safe_mode:
        check_safe(architecture, custom_objects)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    try:
        model = keras.saving.deserialize_keras_object(architecture, custom_objects=dict(custom_objects or {}),
                                                      safe_mode=safe_mode)
    except UnsafeModelDescription:
        raise
    except Exception as err:  # Keras raises TypeError/ValueError/KeyError for unknown or broken configs
        raise ValueError(f"cannot build the keras model from its description: {type(err).__name__}: "
                         f"{err}") from err
    if not isinstance(model, keras.Model):
        raise ValueError(f"the description builds a {type(model).__name__}, not a keras.Model")
    if not model.built:
        raise ValueError("the described keras model is not built (give it an Input, or build it before "
                         "describing it)")
    try:
        wrapped = KerasReconstructionModel(model, list(description["local_layers"]),
                                           objective=objective_from_config(description.get("objective")))
    except ValueError as err:  # e.g. get_layer of an unknown name
        raise ValueError(f"bad keras model description: {err}") from err
    table = description.get("variables")
    if table is not None:
        differences = variable_differences(table, wrapped.config()["variables"])
        if differences:
            raise ValueError("the described variables differ from the model's: " + "; ".join(differences))
    return wrapped


def check_model_fits(description: Mapping[str, Any], model: ReconstructionModel, owner: str) -> None:
    """Refuse an app's own model whose variables are not those of the task's description (names, shapes,
    roles), naming each difference."""
    from fedrecon.core.model_spec import model_from_config

    table = description.get("variables")
    if table is None:
        described = model_from_config(description)
        table = variable_table(described.global_variables, described.local_variables)
    differences = variable_differences(table, variable_table(model.global_variables, model.local_variables))
    if differences:
        raise ValueError(f"{owner} does not fit the task's model: " + "; ".join(differences))


class KerasDescribedModel(ReconstructionModel):
    """A ``kind = "keras"`` description as a model: variables from its table (no TensorFlow needed, which
    is all the coordinator uses), and the Keras model built on first use of the forward pass (a device,
    the simulator)."""

    def __init__(self, description: Mapping[str, Any], *, custom_objects: Mapping[str, Any] | None = None,
                 safe_mode: bool = True) -> None:
        check_description(description)
        self._description = dict(description)
        self._custom_objects = custom_objects
        self._safe_mode = safe_mode
        self.objective = objective_from_config(description.get("objective"))
        self._built: KerasReconstructionModel | None = None
        self._initial: dict[int, list[np.ndarray]] = {}
        if self._description.get("variables") is None:
            if _keras_loaded():
                self._description["variables"] = self.built.config()["variables"]
            else:
                table, arrays = _describe_in_subprocess(self._description, 0)
                self._description["variables"] = table
                self._initial[0] = arrays
        table = self._description["variables"]
        self.global_variables = _specs(table, False)
        self.local_variables = _specs(table, True)

    @property
    def built(self) -> KerasReconstructionModel:
        """The Keras model itself (imports Keras; checked against the variable table if there is one)."""
        if self._built is None:
            self._built = build_keras_model(self._description, custom_objects=self._custom_objects,
                                            safe_mode=self._safe_mode)
        return self._built

    def config(self) -> dict[str, Any]:
        return dict(self._description)

    def initial_globals(self, seed: int) -> list[np.ndarray]:
        """Keras' own initial weights of the model built with ``seed`` (in a subprocess when this process
        has not loaded Keras: the coordinator)."""
        if seed not in self._initial:
            if _keras_loaded():
                built = build_keras_model(self._description, custom_objects=self._custom_objects,
                                          safe_mode=self._safe_mode, seed=seed)
                self._initial[seed] = built.initial_globals(seed)
            else:
                _, self._initial[seed] = _describe_in_subprocess(self._description, seed)
        return [a.copy() for a in self._initial[seed]]

    def initial_locals(self, rng: np.random.Generator) -> list[np.ndarray]:
        return self.built.initial_locals(rng)

    def build_views(self, client_x: Sequence[np.ndarray], *, bucket_rows: bool = False) -> ClientViews:
        return self.built.build_views(client_x, bucket_rows=bucket_rows)

    def view_owners(self, views_index: Any) -> list[tf.Tensor | None]:
        return self.built.view_owners(views_index)

    def predict(self, global_views: Sequence[tf.Tensor], locals_: Sequence[tf.Tensor], x: tf.Tensor
                ) -> tf.Tensor:
        return self.built.predict(global_views, locals_, x)


def resolve_task_model(table: Mapping[str, Any], base: Path | None = None) -> dict[str, Any]:
    """A task file's ``[model]`` as a description: for ``kind = "keras"``, ``architecture = "x.json"`` (a
    file of ``model.to_json()`` or ``serialize_keras_object`` output) or ``file = "x.keras"`` (a saved
    model: its architecture only; start the task from its weights with ``serve --init-model x.keras``) is
    read, relative to ``base`` (the task file's folder), and embedded. Reads JSON and zip files only: no
    Keras, no code. Other kinds are returned unchanged."""
    model = dict(table)
    if model.get("kind") != KIND:
        return model
    path_field = [k for k in ("architecture", "file") if isinstance(model.get(k), str)]
    if len(path_field) > 1 or ("file" in model and "architecture" in model):
        raise ValueError("give a keras model's architecture once: architecture (a JSON file or table) or "
                         "file (a .keras file)")
    if path_field:
        key = path_field[0]
        path = Path(str(model.pop(key)))
        path = path if path.is_absolute() or base is None else base / path
        try:
            if key == "file":
                with zipfile.ZipFile(path) as archive:
                    text = archive.read("config.json").decode()
            else:
                text = path.read_text()
            architecture = json.loads(text)
        except (OSError, KeyError, zipfile.BadZipFile, ValueError) as err:
            raise ValueError(f"cannot read the keras model's {key} {path}: {err}") from err
        if isinstance(architecture, str):  # a JSON string holding JSON (json.dumps of model.to_json())
            architecture = json.loads(architecture)
        model["architecture"] = architecture
    if isinstance(model.get("text"), Mapping) and "vocabulary" in model["text"]:
        model["text"] = _read_text_vocabulary(dict(model["text"]), base)
    check_description(model)
    return model


def _read_text_vocabulary(text: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """``text.vocabulary`` (a file of one word a line, in id order) read into ``text.words``."""
    if "words" in text:
        raise ValueError("give the text vocabulary once: words (inline) or vocabulary (a file)")
    path = Path(str(text.pop("vocabulary")))
    path = path if path.is_absolute() or base is None else base / path
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValueError(f"cannot read the text vocabulary {path}: {err.strerror or err}") from err
    return {**text, "words": [line.strip() for line in lines if line.strip()]}


def globals_from_keras_file(description: Mapping[str, Any], path: Path) -> list[np.ndarray]:
    """The global values a saved ``.keras`` file holds for the described model (by variable name; the file
    must be the same model), read with Keras' safe mode (in a subprocess when this process has not loaded
    Keras: the coordinator)."""
    if not _keras_loaded():
        _, arrays = _describe_in_subprocess(description, 0, weights_from=str(path))
        return arrays
    import keras

    from fedrecon.core.keras_model import KerasReconstructionModel

    described = build_keras_model(description)
    try:
        saved = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # unreadable, not a .keras file, unsafe content
        raise ValueError(f"cannot load {path} with Keras: {type(err).__name__}: {err}") from err
    loaded = KerasReconstructionModel(saved, list(description["local_layers"]), objective=described.objective)
    differences = variable_differences(described.config()["variables"], loaded.config()["variables"])
    if differences:
        raise ValueError(f"{path} is not the task's model: " + "; ".join(differences))
    return loaded.initial_globals(0)


def save_keras_file(description: Mapping[str, Any], globals_: Sequence[np.ndarray], path: Path) -> None:
    """A ``.keras`` file of the described model holding ``globals_`` (local layers keep their initial
    values: an app reconstructs them on the device)."""
    model = build_keras_model(description)
    model.set_globals(globals_)
    model.keras_model.save(path)


def keras_model_from_file(model_file: Any, *, custom_objects: Mapping[str, Any] | None = None
                          ) -> KerasReconstructionModel:
    """The Keras model of a fedrecon model file (``fedrecon.model_file.ModelFile`` of a keras task) with
    its global values loaded: what an app runs, or hands to ``FederatedClient(model=...)``."""
    from fedrecon.model_file import globals_for_model

    model = build_keras_model(model_file.model_spec, custom_objects=custom_objects)
    model.set_globals(globals_for_model(model_file, model, "the model file's keras model"))
    return model


def _keras_loaded() -> bool:
    return "keras" in sys.modules


def _describe_in_subprocess(description: Mapping[str, Any], seed: int, weights_from: str | None = None
                            ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """The variable table and Keras' initial global values for ``seed`` (or those of the ``.keras`` file
    ``weights_from``), computed by a child interpreter so that this process (the coordinator) never
    imports TensorFlow."""
    from fedrecon.tensors import arrays_from_bytes

    request = json.dumps({"description": dict(description), "seed": seed, "weights_from": weights_from})
    # -P: the child imports the fedrecon this interpreter has installed, not a folder named fedrecon in the
    # working directory (``python -m`` would put it first on sys.path): from the root of a checkout that
    # is the source tree's fedrecon/, without its generated protocol modules, and the child failed there.
    try:
        done = subprocess.run([sys.executable, "-P", "-m", "fedrecon.core.keras_spec"],
                              input=request.encode(), capture_output=True, timeout=SUBPROCESS_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as err:
        raise ValueError(f"building the keras model took over {SUBPROCESS_TIMEOUT_S:g} s") from err
    if done.returncode != 0:
        lines = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit {done.returncode}"
        if "No module named 'keras'" in reason or "No module named 'tensorflow'" in reason:
            reason += ("; a keras task needs Keras where its model is first built: install fedrecon[tf] "
                       "beside the coordinator, or give the task its `variables` and `--init-model`")
        raise ValueError(f"cannot build the keras model: {reason}")
    named, meta = arrays_from_bytes(done.stdout)
    table = meta["variables"]
    return table, [named[v["name"]] for v in table if not v.get("local")]


def _main() -> None:
    """Subprocess entry: a JSON request on stdin; the table and initial globals (.npz) on stdout."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from fedrecon.tensors import arrays_to_bytes

    request = json.loads(sys.stdin.buffer.read())
    seed = int(request["seed"])
    try:
        model = build_keras_model(request["description"], seed=seed)
        table = model.config()["variables"]
        arrays = model.initial_globals(seed)
        if request.get("weights_from"):
            arrays = globals_from_keras_file(request["description"], Path(request["weights_from"]))
    except ValueError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    names = [v["name"] for v in table if not v["local"]]
    sys.stdout.buffer.write(arrays_to_bytes(dict(zip(names, arrays, strict=True)), {"variables": table}))


if __name__ == "__main__":
    _main()
