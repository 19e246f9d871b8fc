"""The large-table path's Keras side: plan which Embedding tables to shrink, and build the skeleton.

:func:`plan_tables` picks every float ``Embedding`` layer with more rows than the skeleton size
(layers whose tables are equal share one :class:`ShrunkTable`); :func:`build_skeleton` rebuilds
the Functional/Sequential graph with ``keras.models.clone_model``, reusing every other layer as
is and replacing each planned Embedding by one with ``input_dim = k`` (17, 18, ...: one distinct
value per table) whose table is a seeded random *pattern*. See :mod:`converters.keras_large`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bridge.errors import UnsupportedError
from bridge.render import human_bytes
from converters.keras_env import import_keras
from converters.keras_layers import embedding_layers
from converters.keras_map import digest, same_bytes

#: ``large=None``: Embedding tables totalling at least this many bytes take the large path.
LARGE_THRESHOLD = 256 * 2**20
#: tf2onnx cannot write a model past protobuf's limit; weights past it always take the large path.
TF2ONNX_LIMIT = 2**31 - 1
#: Rows of the first shrunk table in the skeleton; the next ones get 18, 19, ...
SKELETON_ROWS = 17
_FLOATS = ("float16", "float32", "float64")

__all__ = ["LARGE_THRESHOLD", "SKELETON_ROWS", "TF2ONNX_LIMIT", "ShrunkTable", "build_skeleton",
           "check_skeleton_size", "plan_tables", "shrinkable", "skeleton_pattern", "still_read_warnings",
           "table_view", "unique_embeddings", "weight_bytes"]


@dataclass
class ShrunkTable:
    """One table the skeleton replaces by a ``[skeleton_rows, dim]`` pattern; ``layers`` hold equal tables."""

    layers: list[Any]
    paths: list[str]
    rows: int
    dim: int
    dtype: np.dtype[Any]
    skeleton_rows: int
    pattern: np.ndarray = field(repr=False)
    #: The real table when it is not read from ``layers[0]`` (a ``.keras`` file streamed by
    #: :mod:`converters.keras_stream`: ``layers`` are then the skeleton's small layers).
    source: np.ndarray | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * self.dtype.itemsize


# ----------------------------------------------------------------------------- sizes


def _itemsize(dtype: Any) -> int:
    name = str(getattr(dtype, "name", dtype))
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def _unique(items: Iterable[Any]) -> list[Any]:
    """``items`` without repeats (by identity), in first-seen order."""
    seen: dict[int, Any] = {}
    for item in items:
        seen.setdefault(id(item), item)
    return list(seen.values())


def weight_bytes(weights: Iterable[Any]) -> int:
    """Bytes of the distinct Keras variables ``weights`` (a variable listed twice counts once)."""
    return sum(math.prod(int(d) for d in w.shape) * _itemsize(w.dtype) for w in _unique(weights))


def unique_embeddings(model: Any) -> list[Any]:
    """The Embedding layers of ``model``, each once (a shared layer has several paths)."""
    return _unique(embedding_layers(model).values())


def shrinkable(layer: Any, skeleton_rows: int) -> bool:
    """A built float Embedding, not quantized, without LoRA, with more rows than the skeleton's."""
    if not layer.built or getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
        return False
    shape = tuple(layer.embeddings.shape)
    return str(layer.embeddings.dtype) in _FLOATS and len(shape) == 2 and shape[0] > skeleton_rows


def table_view(layer: Any) -> np.ndarray:
    """A read-only NumPy view of ``layer.embeddings``: the TensorFlow buffer itself, no copy.

    Except for a variable TensorFlow keeps in copy-on-read mode (after a sparse update: an
    optimizer step on an Embedding, a slice assignment, ``scatter_*``): every read of such a
    variable copies it, so this costs one table. A model loaded from a file, or only called, has none.
    """
    tf, _ = import_keras()
    return np.asarray(tf.convert_to_tensor(layer.embeddings.value))


# ----------------------------------------------------------------------------- plan and skeleton


def skeleton_pattern(rows: int, dim: int, dtype: np.dtype[Any]) -> np.ndarray:
    """The seeded random ``[rows, dim]`` table a skeleton holds in place of a real one."""
    return np.random.default_rng((0xE8B, rows, dim)).standard_normal((rows, dim)).astype(dtype)


def plan_tables(model: Any, skeleton_rows: int = SKELETON_ROWS) -> list[ShrunkTable]:
    """The tables to shrink: each shrinkable Embedding, layers with equal tables grouped together."""
    paths = {id(layer): path for path, layer in reversed(embedding_layers(model).items())}
    plan: list[ShrunkTable] = []
    for group in _twin_groups(model, skeleton_rows):
        rows, dim = (int(d) for d in group[0].embeddings.shape)
        k = skeleton_rows + len(plan)
        if rows <= k:
            continue
        dtype = np.dtype(str(group[0].embeddings.dtype))
        plan.append(ShrunkTable(group, [paths[id(layer)] for layer in group], rows, dim, dtype, k,
                                skeleton_pattern(k, dim, dtype)))
    return plan


def _twin_groups(model: Any, skeleton_rows: int) -> list[list[Any]]:
    """The shrinkable Embedding layers of ``model``, layers with equal tables in one group."""
    groups: list[list[Any]] = []
    for layer in unique_embeddings(model):
        if not shrinkable(layer, skeleton_rows):
            continue
        twin = next((g for g in groups if _same_table(g[0], layer)), None)
        if twin is not None:
            twin.append(layer)
        else:
            groups.append([layer])
    return groups


def _same_table(a: Any, b: Any) -> bool:
    if tuple(a.embeddings.shape) != tuple(b.embeddings.shape) or str(a.embeddings.dtype) != str(b.embeddings.dtype):
        return False
    va, vb = table_view(a), table_view(b)
    return digest(va) == digest(vb) and same_bytes(va, vb)


def build_skeleton(model: Any, plan: list[ShrunkTable]) -> tuple[Any, list[ShrunkTable]]:
    """``model`` rebuilt with each planned table replaced by its pattern; returns it and the plan it honoured.

    Every other layer is the original object (shared, not copied). An Embedding that the clone
    does not reach (inside a custom layer) keeps its full table and leaves the plan.
    """
    _, keras = import_keras()
    by_layer = {id(layer): entry for entry in plan for layer in entry.layers}
    reached: dict[int, Any] = {}

    def clone(layer: Any) -> Any:
        entry = by_layer.get(id(layer))
        if entry is None:
            return layer
        small = type(layer).from_config({**layer.get_config(), "input_dim": entry.skeleton_rows})
        reached[id(layer)] = small
        return small

    try:
        skeleton = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises ValueError, TypeError, NotImplementedError ...
        raise _rebuild_error(model, exc) from exc
    return skeleton, _honoured(plan, reached)


def _rebuild_error(model: Any, exc: Exception) -> UnsupportedError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
    return UnsupportedError(
        f"cannot rebuild model {model.name!r} with small tables ({type(exc).__name__}: {first_line}); "
        "the large-table path needs a Functional or Sequential model whose layers can be re-created from their config"
    )


def _honoured(plan: list[ShrunkTable], reached: dict[int, Any]) -> list[ShrunkTable]:
    """``plan`` restricted to the layers the clone replaced, each small layer built and holding its pattern.

    ``reached`` maps ``id(original layer)`` to the small layer that replaced it in the skeleton.
    """
    honoured = []
    for entry in plan:
        layers = [layer for layer in entry.layers if id(layer) in reached]
        for layer in layers:
            small = reached[id(layer)]
            if not small.built:
                small.build((None, None))
            small.embeddings.assign(entry.pattern)
        if layers:
            keep = [i for i, layer in enumerate(entry.layers) if id(layer) in reached]
            honoured.append(replace(entry, layers=layers, paths=[entry.paths[i] for i in keep]))
    return honoured


def still_read_warnings(skeleton: Any, plan: list[ShrunkTable]) -> list[str]:
    """Warnings for shrunk tables that another layer of the skeleton still reads in full (e.g. a tied head)."""
    ids = {id(w) for w in skeleton.weights}
    return [f"the table of {entry.paths[0]!r} is also read by another layer outside the Functional graph; "
            "tf2onnx converts that use with the full table inline" for entry in plan
            if any(id(layer.embeddings) in ids for layer in entry.layers)]


def check_skeleton_size(skeleton: Any, model_name: str) -> None:
    """Raise :class:`UnsupportedError` when the skeleton's weights are still past tf2onnx's 2 GiB limit."""
    size = weight_bytes(skeleton.weights)
    if size > TF2ONNX_LIMIT:
        big = sorted(_unique(skeleton.weights), key=lambda w: -weight_bytes([w]))[:3]
        names = ", ".join(f"{w.path} ({human_bytes(weight_bytes([w]))})" for w in big)
        raise UnsupportedError(
            f"model {model_name!r} still holds {human_bytes(size)} of weights with its Embedding tables shrunk "
            f"(largest: {names}); tf2onnx cannot convert past 2 GiB, and only plain float Embedding layers of a "
            "Functional or Sequential graph can be kept outside it"
        )
