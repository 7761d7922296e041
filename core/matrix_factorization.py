"""Matrix factorization for personalized rating prediction, in FedRecon's direct (low-level) form.

Rating ŷ(u, i) = p_u · q_i [+ b_u + b_i + μ]. The user's factors p_u (and bias b_u) are *local*: they exist
only on the user's device and are reconstructed from its ratings every round. Item factors q_i (and biases
b_i, offset μ) are *global*. Initialisation is uniform in ±0.05 as in the paper's code.

The per-client view of the global item table holds only the rows of the items the client rated, one after
another over clients (ragged: ``[Σ_c K_c, F]``, each row tagged with its client): a step then reads
``C*B`` rows with one gather and TensorFlow's gradient of that gather is sparse (``IndexedSlices``), so a
step costs ``O(C·B·F)`` instead of ``O(C·items·F)``, and a round touches each client's own rows only, never
the padding of the client with the most items.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import numpy as np

from fedrecon.core.lazy_tensorflow import tf
from fedrecon.core.model import ClientViews, ReconstructionModel, VariableSpec, uniform_init

INIT_SCALE = 0.05
# How a client's fresh user factors start:
# - "uniform": a new draw in ±INIT_SCALE for every client in every round (the paper's description);
# - "shared": one draw in ±INIT_SCALE, the same for every client and round. This is what TFF 0.87's
#   build_fed_recon does: it evaluates the Keras initializer once when it builds the client computation
#   (measured: every client's predictions before reconstruction are equal), and it learns faster early on;
# - "zeros": the same start for every client, with no draw at all (exact-parity runs against TFF use it).
class LocalInit(StrEnum):
    UNIFORM = "uniform"
    SHARED = "shared"
    ZEROS = "zeros"


LOCAL_INITS = tuple(i.value for i in LocalInit)
SHARED_INIT_SEED = 0x5EED


#: Below this many possible (client, item) keys, ``build_views`` ranks them through a table of every
#: possible key (a few MB at most) instead of sorting the round's examples: a third of the time.
_KEY_TABLE_MAX = 1 << 22


def _distinct_with_rank(keys: np.ndarray, key_space: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``keys`` (each in ``[0, key_space)``), ascending, and the position of each
    key among them (``np.unique(keys, return_inverse=True)``)."""
    if key_space > _KEY_TABLE_MAX:
        distinct, rank = np.unique(keys, return_inverse=True)
        return distinct, rank.reshape(-1)
    present = np.zeros(key_space, bool)
    present[keys] = True
    distinct = np.flatnonzero(present)
    table = np.empty(key_space, np.int32)
    table[distinct] = np.arange(len(distinct), dtype=np.int32)
    return distinct, table[keys]


class MatrixFactorization(ReconstructionModel):
    """User factors local, item factors global (``shared_user=True`` makes one shared user vector global:
    the FedAvg baseline of the paper, which has nothing to reconstruct)."""

    def __init__(
        self,
        num_items: int,
        num_factors: int = 50,
        *,
        use_biases: bool = False,
        shared_user: bool = False,
        initial_offset: float = 0.0,
        local_init: str = "uniform",
    ) -> None:
        if num_items <= 0 or num_factors <= 0:
            raise ValueError("num_items and num_factors must be positive")
        self.num_items = num_items
        self.num_factors = num_factors
        self.use_biases = use_biases
        self.shared_user = shared_user
        self.initial_offset = float(initial_offset)
        if local_init not in LOCAL_INITS:
            raise ValueError(f"local_init must be one of {LOCAL_INITS}, not {local_init!r}")
        self.local_init = local_init
        globals_ = [VariableSpec("item_embedding", (num_items, num_factors))]
        locals_ = [VariableSpec("user_embedding", (num_factors,))]
        if use_biases:
            globals_ += [VariableSpec("item_bias", (num_items,)), VariableSpec("global_bias", ())]
            locals_ += [VariableSpec("user_bias", ())]
        if shared_user:
            globals_ += locals_
            locals_ = []
        self.global_variables = tuple(globals_)
        self.local_variables = tuple(locals_)
        self._names = [v.name for v in globals_]

    def config(self) -> dict[str, object]:
        return {
            "kind": "matrix_factorization",
            "num_items": self.num_items,
            "num_factors": self.num_factors,
            "use_biases": self.use_biases,
            "shared_user": self.shared_user,
            "initial_offset": self.initial_offset,
            "local_init": self.local_init,
        }

    # ----- initialisation --------------------------------------------------------------------------
    def _init(self, spec: VariableSpec, rng: np.random.Generator) -> np.ndarray:
        if spec.name == "global_bias":
            return np.asarray(self.initial_offset, np.float32)
        if spec.name.endswith("_bias"):
            return np.zeros(spec.shape, np.float32)
        return uniform_init(rng, spec.shape, INIT_SCALE)

    def initial_globals(self, seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [self._init(spec, rng) for spec in self.global_variables]

    def initial_locals(self, rng: np.random.Generator) -> list[np.ndarray]:
        if self.local_init == "zeros":
            return [np.zeros(spec.shape, np.float32) for spec in self.local_variables]
        if self.local_init == "shared":
            rng = np.random.default_rng(SHARED_INIT_SEED)
        return [self._init(spec, rng) for spec in self.local_variables]

    # ----- views -------------------------------------------------------------------------------------
    def build_views(self, client_x: Sequence[np.ndarray], *, bucket_rows: bool = False) -> ClientViews:
        """Each client's distinct items become its view rows, client after client; item ids map to flat
        view positions. ``index`` is ``[2, R]`` int32: the global item row and the owning client of each
        view row. With ``bucket_rows`` R is padded up to one of four sizes per power of two (at most 25%
        more rows) with rows of item 0 owned by client 0 that no example reads: their delta is exactly
        zero, so they change no sum, and a compiler sees a bounded number of shapes."""
        lengths = np.array([len(x) for x in client_x], np.int64)
        flat = (np.concatenate([np.asarray(x, np.int64).reshape(-1) for x in client_x]) if len(client_x)
                else np.zeros(0, np.int64))
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_items):
            raise ValueError(f"item id out of range [0, {self.num_items})")
        owners = np.repeat(np.arange(len(client_x), dtype=np.int64), lengths)
        # Distinct (client, item) keys are the view rows in client order; each example's flat view
        # position is its key's rank among them.
        keys, positions = _distinct_with_rank(owners * self.num_items + flat,
                                              len(client_x) * self.num_items)
        rows = len(keys)
        if bucket_rows and rows > 8:
            granule = 1 << max(int(rows - 1).bit_length() - 3, 0)
            rows = -(-rows // granule) * granule
        index = np.zeros((2, rows), np.int32)
        index[0, : len(keys)] = keys % self.num_items
        index[1, : len(keys)] = keys // self.num_items
        remapped = np.split(positions.astype(np.int32, copy=False), np.cumsum(lengths)[:-1])
        return ClientViews(num_clients=len(client_x), index=index, x=remapped)

    def view_owners(self, views_index: tf.Tensor) -> list[tf.Tensor | None]:
        owners = views_index[1]
        return [owners if name in ("item_embedding", "item_bias") else None for name in self._names]

    def gather_views(self, globals_: Sequence[tf.Tensor], views_index: tf.Tensor, num_clients: tf.Tensor
                     ) -> list[tf.Tensor]:
        flat_rows = views_index[0]
        views = []
        for name, g in zip(self._names, globals_, strict=True):
            if name in ("item_embedding", "item_bias"):
                views.append(tf.gather(g, flat_rows))
            else:
                views.append(tf.repeat(g[None], num_clients, axis=0))
        return views

    def reduce_views(self, view_deltas: Sequence[tf.Tensor], weights: tf.Tensor, views_index: tf.Tensor
                     ) -> list[tf.Tensor]:
        flat_rows = views_index[0]
        row_weights = tf.gather(weights, views_index[1])
        sums = []
        for name, d in zip(self._names, view_deltas, strict=True):
            if name == "item_embedding":
                sums.append(tf.math.unsorted_segment_sum(d * row_weights[:, None], flat_rows, self.num_items))
            elif name == "item_bias":
                sums.append(tf.math.unsorted_segment_sum(d * row_weights, flat_rows, self.num_items))
            else:
                sums.append(tf.tensordot(weights, d, axes=1))
        return sums

    def expand_views(self, view_deltas: Sequence[tf.Tensor], views_index: tf.Tensor, num_clients: tf.Tensor
                     ) -> list[tf.Tensor]:
        segments = views_index[1] * self.num_items + views_index[0]  # a row of client c, item i: [c, i]
        dense = []
        for name, d in zip(self._names, view_deltas, strict=True):
            if name in ("item_embedding", "item_bias"):
                summed = tf.math.unsorted_segment_sum(d, segments, num_clients * self.num_items)
                shape = tf.concat([[num_clients, self.num_items], tf.shape(d)[1:]], 0)
                dense.append(tf.reshape(summed, shape))
            else:
                dense.append(d)
        return dense

    # ----- forward -------------------------------------------------------------------------------------
    def predict(self, global_views: Sequence[tf.Tensor], locals_: Sequence[tf.Tensor], x: tf.Tensor
                ) -> tf.Tensor:
        named = dict(zip(self._names, global_views, strict=True))
        if not self.shared_user:
            named.update(zip([v.name for v in self.local_variables], locals_, strict=True))
        user = named["user_embedding"]  # [C, F]
        # One batched dot per step, not a product then a sum over F: XLA emits the sum as two kernels
        # (F > 32 is split for precision), and per-step kernels are most of a lock-step round's cost.
        pred = tf.einsum("cbf,cf->cb", tf.gather(named["item_embedding"], x), user)
        if self.use_biases:
            pred += tf.gather(named["item_bias"], x) + (named["user_bias"] + named["global_bias"])[:, None]
        return pred

    # ----- inference -----------------------------------------------------------------------------------
    def score_items(self, globals_: Sequence[np.ndarray], locals_: Sequence[np.ndarray]) -> np.ndarray:
        """Predicted rating of every item for one user (locals without a client axis)."""
        named = dict(zip(self._names, globals_, strict=True))
        named.update(zip([v.name for v in self.local_variables], locals_, strict=True))
        scores = np.asarray(named["item_embedding"]) @ np.asarray(named["user_embedding"])
        if self.use_biases:
            scores = scores + named["item_bias"] + named["user_bias"] + named["global_bias"]
        return scores.astype(np.float32)

    def recommend(self, globals_: Sequence[np.ndarray], locals_: Sequence[np.ndarray], k: int,
                  exclude: Sequence[int] = ()) -> list[tuple[int, float]]:
        """Top-``k`` (item, predicted rating) for a user, skipping items it has already rated."""
        scores = self.score_items(globals_, locals_)
        if len(exclude):
            scores[np.asarray(list(exclude), np.int64)] = -np.inf
        k = int(min(k, np.isfinite(scores).sum()))
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(i), float(scores[i])) for i in top]
