"""What does not carry over when a Keras ``Embedding`` becomes a ``torch.nn.Embedding``.

The values move bit for bit; behaviour around them does not. :class:`SemanticsReport` lists each
difference with what Keras does, what the torch module does, and what to do about it. It is a
value (``to_text()``, ``to_json()``); building one needs no framework: a Keras layer is read by
its attributes, a table by its metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bridge.table import EmbeddingTable
from converters.keras_precision import COMPUTE_DTYPE, DTYPE_POLICY

#: every difference code a report may hold, in report order
CODES = ("mask_zero", "negative_ids", "quantized", "dtype_policy", "lora", "constraint", "regularizer")


@dataclass(frozen=True)
class SemanticDifference:
    """One behaviour that differs: ``code`` (one of :data:`CODES`), each side's behaviour, the remedy."""

    code: str
    keras: str
    torch: str
    action: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "keras": self.keras, "torch": self.torch, "action": self.action}


@dataclass(frozen=True)
class SemanticsReport:
    """The semantic differences of one Keras -> PyTorch embedding transfer.

    ``source`` names the Keras layer (or table); ``rows``, ``dim`` and ``dtype`` describe the torch
    weight. ``code in report`` tells whether a difference applies.
    """

    source: str
    rows: int
    dim: int
    dtype: str
    differences: tuple[SemanticDifference, ...] = ()

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(d.code for d in self.differences)

    def __contains__(self, code: object) -> bool:
        return code in self.codes

    def get(self, code: str) -> SemanticDifference | None:
        """The difference with ``code``, or None."""
        return next((d for d in self.differences if d.code == code), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {"source": self.source, "target": "torch.nn.Embedding", "rows": self.rows, "dim": self.dim,
                "dtype": self.dtype, "differences": [d.to_json() for d in self.differences]}

    def to_text(self) -> str:
        """A plain-text report, one block per difference."""
        head = (f"Keras -> PyTorch: {self.source} -> nn.Embedding({self.rows}, {self.dim}), weight {self.dtype}\n"
                f"Carried over: the weight, bit for bit (lookups of ids in [0, {self.rows}) are equal).")
        if not self.differences:
            return head + "\nNo semantic differences."
        lines = [head, f"{len(self.differences)} semantic difference(s) do not carry over:"]
        for d in self.differences:
            lines += [f"- {d.code}", f"    Keras:   {d.keras}", f"    PyTorch: {d.torch}", f"    Do:      {d.action}"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def to_json_text(self) -> str:
        """:meth:`to_json` serialized with indentation."""
        return json.dumps(self.to_json(), indent=2)


# ----------------------------------------------------------------------------- differences


def mask_zero() -> SemanticDifference:
    return SemanticDifference(
        "mask_zero",
        keras="mask_zero=True: the layer also emits a mask (ids != 0) that downstream layers (RNNs, attention, "
              "pooling) use to skip padded positions; row 0 is an ordinary, trainable row",
        torch="nn.Embedding returns vectors only, no mask; padding_idx is not a mask (it zeroes row 0's gradient, "
              "not its output), so padding_idx is left unset",
        action="build the mask yourself, mask = ids != 0, and pass it on (e.g. key_padding_mask=~mask, "
               "pack_padded_sequence, or a masked mean)",
    )


def negative_ids(rows: int) -> SemanticDifference:
    return SemanticDifference(
        "negative_ids",
        keras=f"Keras 3 wraps negative ids: id -1 returns row {rows - 1}, ids in [-{rows}, -1] read row id + {rows}; "
              f"ids below -{rows} raise",
        torch="nn.Embedding raises IndexError for any negative id",
        action=f"wrap ids before the lookup (torch.where(ids < 0, ids + {rows}, ids)) or reject them; "
               "bridge.lookup(..., policy='wrap') reproduces Keras",
    )


def quantized(mode: str, dtype: str, *, blocks: bool = True) -> SemanticDifference:
    formula = {"int8": "int8 rows / per-row scale",
               "int4": "(int4 rows - zero point) * block scale" if blocks else "int4 rows / per-row scale"}.get(
        mode, f"{mode} rows dequantized")
    return SemanticDifference(
        "quantized",
        keras=f"quantization_mode={mode!r}: the table is stored quantized and each lookup computes {formula}",
        torch=f"the weight holds the dequantized rows as {dtype} (taken from the Keras layer's own output for every "
              "id, so lookups are bitwise equal), at full size",
        action="quantize the torch module separately if you need the compact table; the bridge store keeps "
               "the quantized table with its scale",
    )


def dtype_policy(policy: str, variable: str, compute: str) -> SemanticDifference:
    return SemanticDifference(
        "dtype_policy",
        keras=f"dtype policy {policy!r}: the table is {variable}; Keras casts the looked-up rows to {compute}",
        torch=f"nn.Embedding returns {variable} rows: no cast after the lookup",
        action=f"cast the output, emb(ids).to(torch.{compute}), to get Keras's values bit for bit, or run the "
               "surrounding model under torch.autocast",
    )


def lora(rank: int) -> SemanticDifference:
    return SemanticDifference(
        "lora",
        keras=f"LoRA enabled (rank {rank}): the layer trains two low-rank adapters, the base table is frozen",
        torch="the adapters are folded into the weight; the torch module has a plain full-size table",
        action="add LoRA adapters in torch (e.g. peft) if you keep fine-tuning with them",
    )


def constraint(name: str) -> SemanticDifference:
    return SemanticDifference(
        "constraint",
        keras=f"embeddings_constraint={name} is applied to the table after every optimizer step",
        torch="nn.Embedding has no weight constraint (max_norm renormalizes looked-up rows instead)",
        action="apply the constraint yourself after optimizer.step() (e.g. under torch.no_grad())",
    )


def regularizer(names: dict[str, str]) -> SemanticDifference:
    listed = ", ".join(f"{k}={v}" for k, v in names.items())
    return SemanticDifference(
        "regularizer",
        keras=f"{listed}: a penalty added to the training loss",
        torch="nn.Embedding carries no regularizer",
        action="add the penalty to your loss (or weight_decay in the optimizer for an L2 on the table)",
    )


# ----------------------------------------------------------------------------- builders


def _describe(obj: Any) -> str:
    if obj is None:
        return ""
    config = getattr(obj, "get_config", None)
    params = ""
    if callable(config):
        try:
            params = ", ".join(f"{k}={v}" for k, v in config().items())
        except (TypeError, ValueError, NotImplementedError):
            params = ""
    return f"{type(obj).__name__}({params})"


def keras_layer_semantics(layer: Any, *, weight_dtype: str, source: str | None = None) -> SemanticsReport:
    """The report for a built Keras ``Embedding`` ``layer`` whose torch weight has ``weight_dtype``."""
    rows, dim = int(layer.input_dim), int(layer.output_dim)
    diffs: list[SemanticDifference] = []
    if getattr(layer, "mask_zero", False):
        diffs.append(mask_zero())
    diffs.append(negative_ids(rows))
    mode = getattr(layer, "quantization_mode", None)
    if mode:
        diffs.append(quantized(str(mode), weight_dtype, blocks=hasattr(layer, "embeddings_zero")))
    policy = getattr(layer, "dtype_policy", None)
    compute, variable = getattr(policy, "compute_dtype", None), getattr(policy, "variable_dtype", None)
    if policy is not None and compute != variable and weight_dtype == str(variable):  # the torch weight is
        diffs.append(dtype_policy(str(policy.name), str(variable), str(compute)))  # the table, uncast
    if getattr(layer, "lora_enabled", False):
        diffs.append(lora(int(getattr(layer, "lora_rank", 0) or 0)))
    if getattr(layer, "embeddings_constraint", None) is not None:
        diffs.append(constraint(_describe(layer.embeddings_constraint)))
    regs = {k: _describe(getattr(layer, k, None)) for k in ("embeddings_regularizer", "activity_regularizer")}
    regs = {k: v for k, v in regs.items() if v}
    if regs:
        diffs.append(regularizer(regs))
    return SemanticsReport(source=source or f"layer {layer.name!r}", rows=rows, dim=dim, dtype=weight_dtype,
                           differences=tuple(diffs))


def table_semantics(table: EmbeddingTable, *, weight_dtype: str | None = None) -> SemanticsReport:
    """The report for a table extracted from a Keras model, from what its metadata records (mask, quantization,
    the compute dtype Keras casts rows to, LoRA); constraints and regularizers are not recorded there."""
    meta = table.metadata
    diffs: list[SemanticDifference] = []
    if meta.get("mask_zero"):
        diffs.append(mask_zero())
    if any(s.framework == "keras" for s in table.sources):
        diffs.append(negative_ids(table.rows))
    blocks = table.quantization is None or table.quantization.scheme != "row_div"
    for mode in meta.get("keras_quantization") or ():
        diffs.append(quantized(str(mode), weight_dtype or str(table.dtype), blocks=blocks))
    compute = meta.get(COMPUTE_DTYPE)  # Keras casts the stored rows (converters.keras_precision)
    if compute and compute != (weight_dtype or str(table.dtype)):
        diffs.append(dtype_policy(str(meta.get(DTYPE_POLICY) or "?"), weight_dtype or str(table.dtype), str(compute)))
    lora_info = meta.get("lora")
    if isinstance(lora_info, dict):
        diffs.append(lora(int(lora_info.get("rank") or 0)))
    layers = ", ".join(s.layer for s in table.sources)
    source = f"table {table.name!r}" + (f" (layer {layers})" if layers else "")
    return SemanticsReport(source=source, rows=table.rows, dim=table.dim, dtype=weight_dtype or str(table.dtype),
                           differences=tuple(diffs))


__all__ = ["CODES", "SemanticDifference", "SemanticsReport", "keras_layer_semantics", "table_semantics"]
