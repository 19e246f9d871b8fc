"""Graph patterns the scanner recognises, one small function each.

A *link* pattern says that a node passes a table through unchanged in shape (``Identity``,
``Cast``, ``DequantizeLinear``, ``Mul`` by a constant scale after a ``Cast``); the scanner then
follows the node's output. A *role* pattern classifies a node that ends the chain: ``gather``
(reads rows), ``slice`` (reads the first rows, ``W[:n]``, as keras-hub position embeddings do),
``tied`` (uses the table as a projection). Both registries are keyed by op type
(as onnx2torch keys its converters), so a node of an unregistered op costs one dict lookup;
adding a pattern is writing one function and listing it under its op type. An *after-gather*
pattern recognises dequantization applied to the gathered rows (Keras int8 divides them by a
per-row scale gathered with the same ids; Keras int4 with blocks subtracts a zero point and multiplies
by a scale, both ``[rows, groups]`` and gathered with the same ids); every match is kept, and the rows of an
integer table dequantized in a way no pattern recognises are marked ``"unrecognized"`` (refused later, never
stored as raw integers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx

from bridge.errors import UnsupportedError
from bridge.onnx_io import tensor_dtype

_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
ValueKey = tuple[str, str]  # (path of the graph defining a value, its name)


class GraphView(Protocol):
    """Read-only queries on the graph around a node, names resolved in that node's scope (ONNX outer-scope
    rules: the innermost enclosing graph defining a name)."""

    def key(self, name: str) -> ValueKey:
        """Where the value ``name`` is defined: ``(graph path, name)``."""

    def constant(self, name: str) -> ValueKey | None:
        """The constant (initializer or ``Constant`` output) ``name`` is, through Identity and Casts that keep
        its type (its values reach the node as stored); or None."""

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of :meth:`constant` ``(name)``, or None if ``name`` is not a constant."""

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of :meth:`constant` ``(name)`` if it is small (a few elements, stored inline), else None."""

    def producer(self, name: str) -> tuple[onnx.NodeProto, GraphView] | None:
        """The node whose output is ``name`` with the view of its own graph, or None (graph input,
        initializer, unknown)."""

    def consumers(self, name: str) -> Sequence[tuple[onnx.NodeProto, int, GraphView]]:
        """The nodes reading ``name``, with the input index they read it at and the view of their graph."""


@dataclass(frozen=True)
class Step:
    """A node reading a table-derived value at ``input_index``, reached through ``via``.

    ``rank`` is the table's rank; ``view`` answers questions about the node's surroundings;
    ``table_graph`` is the path of the graph defining the table, ``table_type`` its ONNX element type.
    """

    node: onnx.NodeProto
    label: str
    input_index: int
    via: tuple[str, ...]
    rank: int
    view: GraphView
    table_graph: str = ""
    table_type: int = 0  # the table's ONNX element type (0: unknown)


@dataclass(frozen=True)
class Link:
    """The node passes the table on; ``quantization`` describes a dequantization step."""

    op: str
    quantization: dict[str, Any] | None = None


def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    """An INT attribute of ``node``, or ``default`` when absent."""
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _is(step: Step, op_type: str, domains: frozenset[str] = _DEFAULT_DOMAINS) -> bool:
    return step.node.op_type == op_type and step.node.domain in domains


def params(step: Step, **found: ValueKey | None) -> dict[str, str | None]:
    """The constants of a dequantization as a table's ``quantization`` names them: ``{role: name}``, plus
    ``{role + "_graph": path}`` where the constant is defined in another graph than the table (a branch's
    own scale, an outer-scope one)."""
    named: dict[str, str | None] = {}
    for role, key in found.items():
        named[role] = key[1] if key else None
        if key and key[0] != step.table_graph:
            named[f"{role}_graph"] = key[0]
    return named


# ------------------------------------------------------------------------- links


def identity(step: Step) -> Link | None:
    """``Identity(W)``."""
    return Link("Identity") if _is(step, "Identity") else None


def cast(step: Step) -> Link | None:
    """``Cast(W, to=...)``: any target type."""
    return Link("Cast") if _is(step, "Cast") else None


def dequantize_linear(step: Step) -> Link | None:
    """``DequantizeLinear(W, scale[, zero_point])`` with constant scale (and zero point); ``output_dtype``
    (opset 23) is recorded by its numpy name."""
    if not _is(step, "DequantizeLinear", _DEFAULT_DOMAINS | {"com.microsoft"}) or step.input_index != 0:
        return None
    inputs = list(step.node.input) + ["", ""]
    scale = step.view.constant(inputs[1]) if inputs[1] else None
    zero_point = step.view.constant(inputs[2]) if inputs[2] else None
    if scale is None or (inputs[2] and zero_point is None):
        return _cast_parameter(step, inputs[1:3])
    quant: dict[str, Any] = {"scheme": "dequantize_linear", **params(step, scale=scale, zero_point=zero_point),
                             "axis": attr_int(step.node, "axis", 1)}
    block_size = attr_int(step.node, "block_size", 0)
    if block_size:
        quant["block_size"] = block_size
    output_dtype = attr_int(step.node, "output_dtype", 0)
    if output_dtype:
        quant["output_dtype"] = onnx_type_name(output_dtype)
    return Link("DequantizeLinear", quant)


def onnx_type_name(elem_type: int) -> str:
    """The numpy name of an ONNX element type (``"float16"``, ``"bfloat16"``); ONNX's own name, lower case,
    where numpy has none; the number itself for an unknown type."""
    try:
        return tensor_dtype(elem_type).name
    except UnsupportedError:
        known = elem_type in onnx.TensorProto.DataType.values()
        return onnx.TensorProto.DataType.Name(elem_type).lower() if known else str(elem_type)


def mul_scale_after_cast(step: Step) -> Link | None:
    """``Mul(Cast(W), scale)`` (either operand order) with a constant ``scale``."""
    if not _is(step, "Mul") or "Cast" not in step.via or len(step.node.input) != 2:
        return None
    other = step.node.input[1 - step.input_index]
    scale = step.view.constant(other)
    return Link("Mul", {"scheme": "mul_cast", **params(step, scale=scale)}) if scale is not None else \
        _cast_parameter(step, [other])


def _cast_parameter(step: Step, names: Sequence[str]) -> Link | None:
    """A link that marks the table's dequantization unsupported (scheme ``"cast_parameter"``) when one of the
    ``names`` it reads is a constant only through a Cast to another type; None when none is.

    The Cast would change the parameter the store keeps (its dtype, perhaps its values): the table must be
    refused, not left out (an unrecognised dequantization hides it) nor served with the stored parameter.
    """
    view = step.view
    cast = next((n for n in names if n and view.constant(n) is None and view.constant_shape(n) is not None), None)
    if cast is None:
        return None
    return Link(step.node.op_type, {"scheme": "cast_parameter", "op": step.node.op_type, "parameter": cast})


#: Link patterns by op type, tried in order; the first that matches wins.
LINK_PATTERNS: dict[str, tuple[Callable[[Step], Link | None], ...]] = {
    "Identity": (identity,),
    "Cast": (cast,),
    "DequantizeLinear": (dequantize_linear,),
    "Mul": (mul_scale_after_cast,),
}


# ------------------------------------------------------------------------- roles


def gather_rows(step: Step) -> str | None:
    """``Gather(W, ids, axis=0)`` on rank-2 data: the embedding lookup itself."""
    if not _is(step, "Gather") or step.input_index != 0 or step.rank != 2:
        return None
    return "gather" if attr_int(step.node, "axis", 0) in (0, -step.rank) else None


def _slice_operand(step: Step, position: int, attr: str) -> list[int] | None:
    """Input ``position`` of a Slice (opset >= 10) or its attribute ``attr`` (opset < 10) as ints; None if
    absent; ``[]`` if present but not a small constant."""
    node = step.node
    if len(node.input) > position and node.input[position]:
        value = step.view.constant_value(node.input[position])
        return [] if value is None or value.ndim > 1 else [int(v) for v in value.reshape(-1)]
    for attribute in node.attribute:
        if attribute.name == attr:
            return [int(v) for v in attribute.ints]
    return None


def slice_start_problem(step: Step) -> str | None:
    """Why ``Slice(W, ...)`` does not read rows ``[0, n)`` of the whole table; None when it does.

    Accepted: constant starts that are 0 on axis 0 (and on axis 1 if it is sliced too), steps absent
    or 1; the ends may be computed (``W[:seq_len]``).
    """
    starts = _slice_operand(step, 1, "starts")
    axes = _slice_operand(step, 3, "axes")
    steps = _slice_operand(step, 4, "steps")
    if not starts:
        return f"Slice {step.label!r} starts at a computed row"
    axes = list(range(len(starts))) if axes is None else axes
    if len(axes) != len(starts):
        return f"Slice {step.label!r} has starts and axes of different lengths"
    by_axis = {a % step.rank: s for a, s in zip(axes, starts, strict=True)}
    if 0 not in by_axis:
        return f"Slice {step.label!r} slices columns only (axis 1), not rows"
    if any(s != 0 for s in by_axis.values()):
        return f"Slice {step.label!r} starts at {[by_axis.get(a) for a in sorted(by_axis)]}, not at row 0"
    if steps is not None and (not steps or any(s != 1 for s in steps)):
        return f"Slice {step.label!r} has steps {steps or 'computed'}, not 1"
    return None


def slice_rows(step: Step) -> str | None:
    """``Slice(W, starts=[0, 0], ends=[n, ...])`` on rank-2 data: the first ``n`` rows, a position table."""
    if not _is(step, "Slice") or step.input_index != 0 or step.rank != 2:
        return None
    return "slice" if slice_start_problem(step) is None else None


def tied_projection(step: Step) -> str | None:
    """``MatMul``/``Gemm``/``Transpose`` reading the table: a tied output projection."""
    return "tied" if step.node.domain in _DEFAULT_DOMAINS else None


#: Role patterns by op type for the node that ends a chain; none matching means ``"other"``.
ROLE_PATTERNS: dict[str, tuple[Callable[[Step], str | None], ...]] = {
    "Gather": (gather_rows,),
    "Slice": (slice_rows,),
    "MatMul": (tied_projection,),
    "Gemm": (tied_projection,),
    "Transpose": (tied_projection,),
}


def match_link(step: Step) -> Link | None:
    """The first link pattern matching ``step``, or None."""
    for pattern in LINK_PATTERNS.get(step.node.op_type, ()):
        link = pattern(step)
        if link is not None:
            return link
    return None


def match_role(step: Step) -> str:
    """``"gather"``, ``"slice"``, ``"tied"`` or ``"other"`` for the node ending a chain."""
    for pattern in ROLE_PATTERNS.get(step.node.op_type, ()):
        role = pattern(step)
        if role is not None:
            return role
    return "other"


# ------------------------------------------------------------------------- after the gather


_RESHAPES = frozenset({"Unsqueeze", "Reshape", "Expand", "Identity"})
_CASTS = frozenset({"Cast", "Identity"})


def _producer_through(graph: GraphView, name: str, ops: frozenset[str]) -> tuple[onnx.NodeProto, GraphView] | None:
    """The producer of ``name`` past up to 8 nodes of ``ops`` (following their first input), with its view."""
    found = graph.producer(name)
    for _ in range(8):
        if found is None or found[0].op_type not in ops or not found[0].input:
            break
        found = found[1].producer(found[0].input[0])
    return found


def _row_scale(graph: GraphView, name: str, ids: ValueKey) -> tuple[ValueKey, list[str]] | None:
    """``(S, casts)`` if ``name`` is ``Gather(S, ids)`` of a rank-1 constant ``S``, possibly reshaped and cast
    (``casts``: the dtype names of the Casts after the Gather, first applied first); else None."""
    casts: list[str] = []
    found = graph.producer(name)
    for _ in range(8):
        if found is None or found[0].op_type not in _RESHAPES | {"Cast"} or not found[0].input:
            break
        if found[0].op_type == "Cast":
            casts.insert(0, onnx_type_name(attr_int(found[0], "to", 0)))
        found = found[1].producer(found[0].input[0])
    if found is None:
        return None
    node, view = found
    if node.op_type != "Gather" or len(node.input) < 2 or view.key(node.input[1]) != ids:
        return None
    scale = view.constant(node.input[0])
    if scale is None or len(view.constant_shape(node.input[0]) or ()) != 1:
        return None
    return scale, casts


def _consumers_of_cast_rows(step: Step) -> Iterator[tuple[onnx.NodeProto, int, GraphView, ValueKey]]:
    """``(consumer, input index, its view, ids)`` for every consumer of a ``Cast`` of the rows ``step.node``
    gathers; ``ids`` is where the Gather's ids are defined."""
    if len(step.node.input) < 2 or not step.node.output:
        return
    ids = step.view.key(step.node.input[1])
    for cast_node, _, cast_view in step.view.consumers(step.node.output[0]):
        if cast_node.op_type == "Cast" and cast_node.output:
            for consumer, index, view in cast_view.consumers(cast_node.output[0]):
                yield consumer, index, view, ids


def keras_row_scale(step: Step) -> list[dict[str, Any]]:
    """Keras int8: ``Cast(Gather(Q, ids)) / Unsqueeze(Gather(S, ids))`` (or ``*``), ``S`` of shape [rows]; every match.

    Casts of the gathered scale are recorded as ``scale_casts`` (``Cast(Gather(S_f16, ids), FLOAT)``);
    :mod:`bridge.quantization_onnx` accepts them where they keep every value (a widening).
    """
    found = []
    for op_node, index, view, ids in _consumers_of_cast_rows(step):
        if op_node.op_type not in ("Div", "Mul") or (op_node.op_type == "Div" and index != 0):
            continue
        scale = _row_scale(view, op_node.input[1 - index], ids)
        if scale is not None:
            casts = {"scale_casts": scale[1]} if scale[1] else {}
            found.append({"scheme": "row_scale", "op": op_node.op_type, **params(step, scale=scale[0]), **casts})
    return found


def _grouped_param(graph: GraphView, name: str, ids: ValueKey) -> tuple[ValueKey, ValueKey] | None:
    """``(P, g_idx)`` if ``name`` is ``Gather(Gather(P, ids), g_idx, axis=-1)`` (through Cast), ``P`` of rank 2."""
    found = _producer_through(graph, name, _CASTS)
    if found is None or found[0].op_type != "Gather" or len(found[0].input) < 2 or \
            attr_int(found[0], "axis", 0) not in (1, -1):
        return None
    node, view = found
    g_idx, inner = view.constant(node.input[1]), view.producer(node.input[0])
    if g_idx is None or inner is None:
        return None
    gather, inner_view = inner
    if gather.op_type != "Gather" or len(gather.input) < 2 or inner_view.key(gather.input[1]) != ids or \
            attr_int(gather, "axis", 0) != 0:
        return None
    param = inner_view.constant(gather.input[0])
    return (param, g_idx) if param is not None and len(inner_view.constant_shape(gather.input[0]) or ()) == 2 else None


def keras_group_affine(step: Step) -> list[dict[str, Any]]:
    """Keras int4 with ``block_size``: ``(Cast(Gather(Q, ids)) - Cast(Z[ids][:, g])) * S[ids][:, g]``; every match.

    ``Z`` (int8) and ``S`` (float) are ``[rows, groups]`` constants, each read as
    ``Gather(Gather(P, ids), g_idx, axis=-1)`` with one constant ``g_idx`` (the group of each column).
    """
    found = []
    for sub, index, view, ids in _consumers_of_cast_rows(step):
        zero = _grouped_param(view, sub.input[1], ids) if sub.op_type == "Sub" and index == 0 else None
        if zero is None or not sub.output:
            continue
        for mul, m_index, mul_view in view.consumers(sub.output[0]):
            scale = _grouped_param(mul_view, mul.input[1 - m_index], ids) if mul.op_type == "Mul" else None
            if scale is not None and scale[1] == zero[1]:
                found.append({"scheme": "group_affine",
                              **params(step, scale=scale[0], zero_point=zero[0], g_idx=zero[1])})
    return found


_T = onnx.TensorProto
_INTEGER_TYPES = frozenset({_T.INT8, _T.UINT8, _T.INT16, _T.UINT16, _T.INT32, _T.UINT32, _T.INT64, _T.UINT64,
                            _T.INT4, _T.UINT4})
_FLOAT_NAMES = frozenset({"float16", "float32", "float64", "bfloat16"})
_ROW_PASSES = frozenset({"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Flatten"})
_FLOAT_ARITHMETIC = frozenset({"Mul", "Div", "Sub"})
_MAX_WALK = 32


def _gathers_integers(step: Step) -> bool:
    """Whether ``step.node`` gathers integers: an integer table whose links (``step.via``) are Identity nodes
    and Casts to integer types only."""
    if step.table_type not in _INTEGER_TYPES or not step.node.input:
        return False
    found = step.view.producer(step.node.input[0])
    for _ in step.via:
        if found is None or found[0].op_type not in ("Identity", "Cast") or not found[0].input:
            return False
        node, view = found
        if node.op_type == "Cast" and attr_int(node, "to", 0) not in _INTEGER_TYPES:
            return False
        found = view.producer(node.input[0])
    return True


def _dequantizes(node: onnx.NodeProto, index: int, casts: tuple[str, ...]) -> bool:
    """Whether ``node`` reading gathered integers (cast to ``casts`` on the way) at ``index`` dequantizes them."""
    if node.op_type == "DequantizeLinear":
        return index == 0
    return node.op_type in _FLOAT_ARITHMETIC and any(c in _FLOAT_NAMES for c in casts)


def unrecognized_dequantization(step: Step) -> dict[str, Any] | None:
    """An integer table whose gathered rows reach a ``DequantizeLinear``, or a ``Mul``/``Div``/``Sub`` after a
    Cast to a float type (through Identity, Cast and reshapes), that no after-gather pattern recognised.

    Scheme ``"unrecognized"`` (``op``, ``node``, ``casts``: the dtype names of the Casts on the way), which
    :mod:`bridge.quantization_onnx` refuses: storing the integers as the table would serve wrong vectors.
    """
    if not step.node.output or not _gathers_integers(step):
        return None
    stack: list[tuple[str, GraphView, tuple[str, ...]]] = [(step.node.output[0], step.view, ())]
    for _ in range(_MAX_WALK):
        if not stack:
            break
        name, view, casts = stack.pop()
        for node, index, node_view in view.consumers(name):
            if _dequantizes(node, index, casts):
                label = node.name or (node.output[0] if node.output else node.op_type)
                return {"scheme": "unrecognized", "op": node.op_type, "node": label, "casts": list(casts)}
            if node.op_type in _ROW_PASSES and index == 0 and node.output:
                cast = (onnx_type_name(attr_int(node, "to", 0)),) if node.op_type == "Cast" else ()
                stack.append((node.output[0], node_view, casts + cast))
    return None


#: Patterns that recognise dequantization of the rows a table Gather returns, each listing every match.
AFTER_GATHER_PATTERNS: tuple[Callable[[Step], list[dict[str, Any]]], ...] = (keras_row_scale, keras_group_affine)


def match_after_gather(step: Step) -> dict[str, Any] | None:
    """The quantization applied to the rows gathered by ``step.node``, or None.

    Rows dequantized more than once (tf2onnx merges the equal integer tables of two layers, and their
    lookups, keeping each layer's scale) list the other dequantizations under ``"also"``. An integer table
    whose rows no pattern recognises gets :func:`unrecognized_dequantization`'s mark where they are
    dequantized anyway.
    """
    found: list[dict[str, Any]] = []
    for pattern in AFTER_GATHER_PATTERNS:
        found.extend(q for q in pattern(step) if q not in found)
    if len(found) > 1:
        return {**found[0], "also": found[1:]}
    return found[0] if found else unrecognized_dequantization(step)


def gather_miss_reason(step: Step) -> str | None:
    """Why a ``Gather`` (or ``Slice``) reading the table as data is not a row lookup, or None if it is not
    such a node. Slices of constants other than rank 2 are not reported: shapes and biases are sliced too."""
    if _is(step, "Slice") and step.input_index == 0 and step.rank == 2:
        return slice_start_problem(step)
    if not _is(step, "Gather") or step.input_index != 0:
        return None
    if step.rank != 2:
        return f"rank-{step.rank} data of Gather {step.label!r}: a table must be rank 2 [rows, dim]"
    axis = attr_int(step.node, "axis", 0)
    return f"Gather {step.label!r} reads axis {axis}, not rows (axis 0)"
