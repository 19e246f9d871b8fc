"""PyTorch module -> ONNX (torch.onnx, legacy or dynamo exporter) -> embedding store.

    from converters.torch import extract_torch
    store = extract_torch(model, (ids,), "out/")            # legacy exporter
    store = extract_torch(model, (ids,), "out/", dynamo=True)

What the exporters produce on this stack (DESIGN.md): ``Gather`` on ``<module>.weight``; an
``nn.EmbeddingBag``'s Gather inside a ``Loop`` body (legacy); a tied head as a separate ``[D, V]``
initializer (``onnx::MatMul_N`` legacy, ``val_N`` dynamo) or, on 2-D activations, ``Gemm(transB=1)``
on the table itself; the dynamo exporter names a tied table after the head. Tables are therefore
mapped to ``state_dict`` keys by value (:mod:`converters.torch_map`) and ties found by value
(:mod:`bridge.ties`).

Both exporters name the graph inputs after ``forward``'s parameters (the legacy exporter's own
``input.1`` is replaced), so ``dynamic_axes={"ids": {0: "batch"}}`` means the same on both. The legacy
exporter runs ``forward`` and exports the weights as they are afterwards: an ``nn.Embedding(max_norm=...)``
would renormalize the looked-up rows of the user's weight in place and export those; it runs with
``max_norm`` off instead (its graph is a plain Gather either way), so the module is left untouched and
both exporters store the same table; buffers its ``forward`` updates (a counter, a running statistic, a
cache) are put back afterwards (:func:`converters.torch_inputs.buffers_kept`). Before exporting,
``forward`` runs once with a check on the ids each embedding gets, so bad example ids are reported as
such rather than as an exporter failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bridge.atomic import check_output_dir
from bridge.errors import BridgeError, ConversionError, InputError
from bridge.extract import read_tables
from bridge.onnx_io import external_data_info, iter_graphs, load_model
from bridge.scan import TableRef
from bridge.store import Store, write_store
from bridge.table import EmbeddingTable, SourceRef
from bridge.ties import Tie, find_ties, ties_json
from converters.keras_map import Candidate
from converters.torch_embedding import import_torch
from converters.torch_inputs import (
    as_args,
    buffers_kept,
    check_ids,
    check_types,
    dynamic_axes_for,
    eval_mode,
    graph_input_names,
    max_norm_off,
)
from converters.torch_map import (
    conflicts,
    embedding_keys,
    embedding_settings,
    map_tables,
    module_metadata,
    opaque_embeddings,
    table_names,
)

ONNX_FILE = "model.onnx"
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")
_MESSAGE_LIMIT = 300
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_onnx(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    dynamo: bool = False,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
) -> Path:
    """Export ``module`` called on ``example_inputs`` (a tensor or a tuple of tensors) to ONNX at ``path``.

    ``dynamo=False`` uses the TorchScript-based (legacy) exporter, ``dynamo=True`` the
    ``torch.export``-based one (needs onnxscript). Graph inputs are named ``input_names``, by default
    after ``forward``'s parameters, on both exporters. ``dynamic_axes`` (``{input or output name: {axis:
    name}}``) marks dimensions as dynamic; a key naming no input or output is an :class:`InputError`;
    without it shapes are those of the example inputs.

    The example inputs are checked first: each must be a tensor, and ``forward`` runs once on them (no
    grad) with a check before every embedding (integer ids, in range); bad inputs are an
    :class:`InputError` saying what is wrong, not an exporter failure. The module is exported in eval
    mode and left as it was: its training flag and its buffers (which ``forward`` may update: a counter,
    a running statistic, a cache) are restored, and the legacy exporter, which would
    renormalize the looked-up rows of an ``nn.Embedding(max_norm=...)`` weight in place (and export
    that), runs with ``max_norm`` switched off (its graph never renormalizes anyway). Exporter messages
    are silenced; a failure raises :class:`ConversionError` with the exporter's message.
    """
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"export_onnx takes a torch.nn.Module, not {type(module).__name__}")
    args = as_args(example_inputs, torch)
    check_types(args, torch)
    target = Path(path)
    if not target.parent.is_dir():
        raise InputError(f"the directory of {str(target)!r} does not exist; create it first")
    if all(isinstance(a, torch.Tensor) for a in args):  # one graph input per example input: name them
        named = graph_input_names(module, args, input_names)
        names: list[str] | None = named
        axes = dynamic_axes_for(dynamic_axes, named, output_names, dynamo)
    else:  # nested inputs (a tuple, keyword args in a trailing dict): the exporter flattens and names them
        if dynamic_axes:
            raise InputError("dynamic_axes needs one tensor per example input; with nested example inputs (a "
                             "tuple, or keyword arguments in a trailing dict) pass each tensor as its own "
                             "positional input, or export without dynamic_axes")
        names = list(input_names) if input_names is not None else None
        axes = None
    options: dict[str, Any] = {"dynamo": dynamo, "input_names": names,
                               "output_names": list(output_names) if output_names else None,
                               "opset_version": opset, "dynamic_axes": axes}
    if dynamo:
        options["verbose"] = False
    with eval_mode(module), buffers_kept(module, torch):  # the legacy exporter runs forward: it may update buffers
        check_ids(module, args, torch, partial(_quiet, torch))
        with contextlib.nullcontext() if dynamo else max_norm_off(module):
            _run_export(torch, module, args, target, options)
    if not target.is_file():
        raise ConversionError(f"torch.onnx.export wrote no file at {str(target)!r}")
    return target


def _run_export(torch: Any, module: Any, args: tuple[Any, ...], target: Path, options: dict[str, Any]) -> None:
    """``torch.onnx.export``, quiet; its failures become :class:`ConversionError`."""
    try:
        with _quiet(torch), torch.no_grad():
            torch.onnx.export(module, args, str(target), **options)
    except BridgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.onnx raises many unrelated exception types
        raise ConversionError(_failure(module, options["dynamo"], exc)) from exc


def extract_torch(
    module: Any,
    example_inputs: Any,
    out_dir: str | os.PathLike[str],
    *,
    dynamo: bool = False,
    force: bool = False,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
    input_names: Sequence[str] | None = None,
    opset: int | None = None,
    keep_onnx: bool = True,
) -> Store:
    """Export ``module`` to ONNX, find its embedding tables, and write them as a store at ``out_dir``.

    Each table is named after its ``state_dict`` key exactly (``"tok.weight"``, ``"feats.user/tok.weight"``),
    with one ``SourceRef("torch", layer=<module path>, weight=<key>)`` per key holding the same values
    (a tied weight has several). A key with a comma, an unprintable character or surrounding spaces
    cannot be a table name as it is: such characters become ``_`` (with a ``_2``, ... suffix rather than
    a name another table's exact key owns), and a warning names the key. A tied output projection is
    found by value and recorded in the table's ``metadata["ties"]``; the table is stored once.
    ``padding_id`` is the embedding's ``padding_idx``. With ``keep_onnx`` the exported model is stored
    as ``model.onnx`` (parity runs its Gathers). Warnings (unmapped tables, embeddings missing from the
    graph, renamed keys) go to the manifest's ``provenance["warnings"]``.

    Export follows :func:`export_onnx`: graph inputs are named ``input_names`` (default: ``forward``'s
    parameters), the keys ``dynamic_axes`` may use; the example inputs are checked before exporting; the
    module is never modified (an ``nn.Embedding(max_norm=...)`` is stored as it was, by both exporters,
    and buffers that ``forward`` updates are restored). A TorchScript module is accepted where the exporter
    takes it: a scripted embedding keeps its ``padding_idx``; a traced one has none (a warning says so).
    Embeddings sharing one table give it a ``padding_id`` only where their ``padding_idx`` agree (a
    warning names them where they do not); each one with ``max_norm`` adds a warning.
    """
    check_output_dir(out_dir, force)
    with tempfile.TemporaryDirectory(prefix="embridge-torch-") as tmp:
        path = export_onnx(module, example_inputs, Path(tmp) / ONNX_FILE, dynamo=dynamo,
                           dynamic_axes=dynamic_axes, input_names=input_names, opset=opset)
        model = load_model(path)
        tables, warns = torch_tables(model, path.parent, module)
        files = _model_files(model, path) if keep_onnx else {}
        provenance = _provenance(module, model, dynamo, warns, keep_onnx)
        return write_store(out_dir, tables, provenance=provenance, force=force, files=files)


def torch_tables(model: onnx.ModelProto, base_dir: Path | None, module: Any) -> tuple[list[EmbeddingTable], list[str]]:
    """The tables of ``model`` (exported from ``module``), mapped to state_dict keys, with ties; and warnings."""
    pairs = read_tables(model, base_dir)
    matches = map_tables([data for _, data in pairs], module)
    ties = find_ties(model, [ref for ref, _ in pairs], base_dir, arrays={ref.key: d for ref, d in pairs})
    names, warns = table_names([cands[0].weight if cands else None for cands in matches],
                               [ref.initializer for ref, _ in pairs])
    tables = [_table(name, ref, data, cands, ties.get(ref.key, ()), warns)
              for name, (ref, data), cands in zip(names, pairs, matches, strict=True)]
    found = {c.weight for cands in matches for c in cands}
    warns += [f"embedding {key!r} has no table in the exported model (unused by forward(), or folded)"
              for key in embedding_keys(module) if key not in found]
    return tables, warns


def _table(name: str, ref: TableRef, data: np.ndarray, cands: list[Candidate], ties: Sequence[Tie],
           warns: list[str]) -> EmbeddingTable:
    meta: dict[str, Any] = {"onnx": ref.to_json(), "ties": ties_json(ties)}
    padding = None
    if cands:
        meta["torch"] = module_metadata(cands)
        padding = meta["torch"].get("padding_idx")
        warns += _setting_warnings(name, embedding_settings(cands))
        warns += [f"table {name!r}: {layer!r} is a traced embedding (torch.jit.trace), which keeps no padding_idx "
                  "or max_norm, so none is recorded; pass the nn.Module itself to record them"
                  for layer in opaque_embeddings(cands)]
    else:
        warns.append(f"table {name!r} (initializer {ref.initializer!r}, shape {list(ref.shape)}) matches no "
                     "state_dict entry: it is stored unmapped")
    return EmbeddingTable(
        name=name, data=data, sources=tuple(SourceRef("torch", c.layer, c.weight) for c in cands),
        initializer=ref.initializer, padding_id=padding, metadata=meta,
    )


def _setting_warnings(name: str, settings: dict[str, dict[str, Any]]) -> list[str]:
    """A warning for each embedding of table ``name`` with ``max_norm``, and one when they disagree on
    ``padding_idx`` (then none is recorded)."""
    warns = [f"table {name!r}: {layer!r} has nn.Embedding(max_norm={s['max_norm']}), which renormalizes "
             "looked-up rows in place on every forward; the store holds the weight as it was before export, and "
             "neither the store's lookups nor the legacy exporter's model.onnx renormalize: torch's forward "
             "differs from both wherever a looked-up row's norm exceeds max_norm"
             for layer, s in settings.items() if s["max_norm"] is not None]
    padding = conflicts(settings, "padding_idx")
    if padding:
        named = ", ".join(f"{layer!r} padding_idx={idx}" for layer, idx in padding.items())
        warns.append(f"table {name!r}: the embeddings sharing it disagree on padding_idx ({named}); "
                     "no padding_id is recorded")
    return warns


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet(torch: Any) -> Iterator[None]:
    """Silence exporter warnings and log records, and send the legacy exporter's C++ log (which it
    writes to stdout when an export fails) to stderr, so stdout stays clean; all restored on exit."""
    saved = []
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.CRITICAL)
    set_stream = getattr(torch._C, "_jit_set_onnx_log_output_stream", None)  # noqa: SLF001 - no public API
    if set_stream is not None:
        set_stream("stderr")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if set_stream is not None:
            set_stream("stdout")
        for logger, level in saved:
            logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _clip(text: str) -> str:
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + " ..."


def _failure(module: Any, dynamo: bool, exc: Exception) -> str:
    """One line: the exporter, the error's first line and its root cause's, and what to try."""
    exporter = "dynamo" if dynamo else "legacy (TorchScript)"
    root: BaseException = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = _clip(_first_line(exc))
    if root is not exc:
        text += f"; caused by {_clip(_first_line(root))}"
    other = "dynamo=False" if dynamo else "dynamo=True"
    hint = "install onnxscript" if isinstance(root, ImportError) else f"try {other}"
    return f"torch.onnx.export with the {exporter} exporter failed for {type(module).__name__}: {text}; {hint}"


def _model_files(model: onnx.ModelProto, path: Path) -> dict[str, bytes | Path]:
    """The exported model file and its external data files, for the store."""
    files: dict[str, bytes | Path] = {ONNX_FILE: path}
    for _, graph in iter_graphs(model):
        for tensor in graph.initializer:
            ext = external_data_info(tensor)
            if ext is not None:
                files[ext.location] = path.parent / ext.location
    return files


def _provenance(module: Any, model: onnx.ModelProto, dynamo: bool, warns: list[str], keep_onnx: bool
                ) -> dict[str, Any]:
    torch = import_torch()
    tools = {"torch": torch.__version__, "onnx": onnx.__version__}
    if dynamo:
        with contextlib.suppress(ImportError):
            import onnxscript

            tools["onnxscript"] = onnxscript.__version__
    opsets = {o.domain or "ai.onnx": int(o.version) for o in model.opset_import}
    return {
        "converter": "converters.torch",
        "source": {"framework": "torch", "module": f"{type(module).__module__}.{type(module).__qualname__}"},
        "onnx": {"file": ONNX_FILE if keep_onnx else None, "exporter": "dynamo" if dynamo else "legacy",
                 "ir_version": int(model.ir_version), "opsets": opsets},
        "tools": tools,
        "warnings": warns,
    }


__all__ = ["ONNX_FILE", "export_onnx", "extract_torch", "torch_tables"]
