"""The example inputs of a torch export: checked, named, and run once with each embedding's ids checked.

Both exporters get graph inputs named after ``forward``'s parameters (or ``input_names``), so
``dynamic_axes`` keyed by those names means the same on both. ``forward`` runs once before the export,
in eval mode, without gradients and with ``max_norm`` off, with a hook on every embedding that refuses
ids of a non-integer dtype or out of range: bad example ids are reported as such, not as an exporter
failure.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import numpy as np

from bridge.errors import BridgeError, InputError
from converters.torch_embedding import import_torch
from converters.torch_map import ROOT, is_embedding


def as_args(example_inputs: Any, torch: Any) -> tuple[Any, ...]:
    """The example inputs as a tuple of tensors; anything else is an :class:`InputError`."""
    if isinstance(example_inputs, (tuple, list)):
        if example_inputs:
            return tuple(example_inputs)
    elif example_inputs is not None:
        return (example_inputs,)
    raise InputError("example_inputs must be a tensor or a non-empty tuple of the module's positional inputs")


def check_types(args: tuple[Any, ...], torch: Any) -> None:
    """Refuse example inputs torch.onnx cannot trace as tensors: NumPy arrays, Python numbers and lists.

    Tensors, and tuples or dicts of them (a trailing dict holds keyword arguments, torch.onnx's own
    convention), are accepted; what is inside a container is left to the exporter.
    """
    for i, arg in enumerate(args):
        if isinstance(arg, (torch.Tensor, tuple, dict)) or arg is None:
            continue
        kind = type(arg).__qualname__
        kind = kind if type(arg).__module__ == "builtins" else f"{type(arg).__module__}.{kind}"
        fix = "torch.from_numpy(array)" if isinstance(arg, np.ndarray) else "torch.tensor(...)"
        raise InputError(f"example input {i} is of type {kind}, not a torch.Tensor; pass {fix} "
                         "(example_inputs is a tensor or a tuple of tensors)")


def graph_input_names(module: Any, args: tuple[Any, ...], given: Sequence[str] | None) -> list[str]:
    """The graph input names: ``given`` (one per example input), or ``forward``'s parameter names."""
    if given is not None:
        names = [str(name) for name in given]
        if len(names) != len(args) or len(set(names)) != len(names):
            raise InputError(f"input_names {names} must name each of the {len(args)} example inputs once")
        return names
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # no signature (a C++ or scripted forward)
        params = []
    names = []
    for param in params:
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
        elif param.kind is param.VAR_POSITIONAL:
            names += [f"{param.name}_{i}" for i in range(len(args) - len(names))]
    names = names[:len(args)]
    return names + [f"input_{i}" for i in range(len(names), len(args))]


def dynamic_axes_for(dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None, names: Sequence[str],
                  output_names: Sequence[str] | None, dynamo: bool) -> dict[str, Any] | None:
    """``dynamic_axes`` checked against the input and output names, in input order (the dynamo exporter
    matches its entries to the inputs by position, so it gets every input, ``None`` for a static one)."""
    if not dynamic_axes:
        return None
    outputs = list(output_names or ())
    unknown = [key for key in dynamic_axes if key not in names and key not in outputs]
    if unknown:
        also = f", the outputs {outputs}" if outputs else ""
        raise InputError(f"dynamic_axes key(s) {unknown} name no graph input or output; the inputs are "
                         f"{list(names)} (named after forward's parameters unless input_names is given){also}")
    axes = {key: dict(value) if isinstance(value, Mapping) else list(value) for key, value in dynamic_axes.items()}
    if dynamo:
        return {**{name: axes.get(name) for name in names}, **{o: axes[o] for o in outputs if o in axes}}
    return {key: axes[key] for key in [*names, *outputs] if key in axes}


@contextlib.contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """``module`` in eval mode; its training flag restored on exit.

    A module that cannot switch modes (a ``torch.export`` ``ExportedProgram``'s ``.module()``) is an
    :class:`InputError` asking for the ``nn.Module`` itself.
    """
    was_training = module.training
    try:
        module.eval()
    except NotImplementedError as exc:
        raise InputError(f"{type(module).__name__} cannot be switched to eval mode ({exc}); this is the case of "
                         "a torch.export ExportedProgram's .module(): pass the original nn.Module instead") from exc
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def buffers_kept(module: Any, torch: Any) -> Iterator[None]:
    """Every buffer of ``module`` restored on exit, as it was on entry, even where ``forward`` updated it in
    place (a counter, a running statistic), replaced it (a growing cache) or registered a new one.

    Each buffer is the same tensor object again; only a buffer whose bytes changed is written to.
    """
    saved = [(m, _own_buffers(m)) for m in module.modules()]
    copies = [{name: b.detach().clone() for name, b in buffers.items() if b is not None} for _, buffers in saved]
    try:
        yield
    finally:
        for (m, buffers), values in zip(saved, copies, strict=True):
            _restore_buffers(m, buffers, values, torch)


def _own_buffers(m: Any) -> dict[str, Any]:
    """``{name: tensor or None}`` of the buffers registered on ``m`` itself (a buffer may be None)."""
    return dict(m._buffers)  # noqa: SLF001 - named_buffers() leaves out the None ones


def _restore_buffers(m: Any, buffers: dict[str, Any], values: dict[str, Any], torch: Any) -> None:
    """Put back ``m``'s own ``buffers`` (the same tensors, holding ``values``); drop those registered since."""
    for name in set(_own_buffers(m)) - set(buffers):
        with contextlib.suppress(AttributeError, RuntimeError):  # a TorchScript module cannot drop one
            delattr(m, name)
    for name, tensor in buffers.items():
        restored = tensor if tensor is None or _put_back(tensor, values[name], torch) else values[name]
        if _own_buffers(m).get(name) is not restored:
            setattr(m, name, restored)


def _put_back(tensor: Any, value: Any, torch: Any) -> bool:
    """Write ``value`` into ``tensor`` where its bytes differ; False when that cannot be done (its shape
    changed in place, an inference tensor): the caller then puts the copy ``value`` in its place."""
    try:
        if tensor.shape != value.shape:
            return False
        if not torch.equal(tensor.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)):
            with torch.no_grad():
                tensor.copy_(value)
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def max_norm_off(module: Any) -> Iterator[None]:
    """Every ``max_norm`` of ``module``'s embeddings set to None (no in-place renormalization); restored on exit."""
    renorm = [m for m in module.modules() if is_embedding(m) and m.max_norm is not None]
    saved = [m.max_norm for m in renorm]
    try:
        for m in renorm:
            m.max_norm = None
        yield
    finally:
        for m, max_norm in zip(renorm, saved, strict=True):
            m.max_norm = max_norm


def check_ids(module: Any, args: tuple[Any, ...], torch: Any,
              quiet: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext) -> None:
    """Run ``forward`` once on the example inputs (no grad, no renormalization, buffers restored after,
    :func:`buffers_kept`), checking the ids each embedding gets: integer dtype and in range, else
    :class:`InputError`. Other failures of ``forward`` are left to the exporter, which reports them."""
    hooks = [m.register_forward_pre_hook(partial(ids_hook, path or ROOT), with_kwargs=True)
             for path, m in module.named_modules() if is_embedding(m)]
    if not hooks:
        return
    positional, keywords = (args[:-1], args[-1]) if args and isinstance(args[-1], dict) else (args, {})
    try:
        with buffers_kept(module, torch), max_norm_off(module), torch.no_grad(), quiet():
            module(*positional, **keywords)
    except BridgeError:
        raise
    except Exception:  # noqa: BLE001 - not the ids: torch.onnx.export fails on it too and says why
        return
    finally:
        for hook in hooks:
            hook.remove()


def ids_hook(path: str, emb: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: :class:`InputError` when the ids given to embedding ``emb`` (at ``path``) are bad."""
    torch = import_torch()
    ids = args[0] if args else kwargs.get("input")
    if not isinstance(ids, torch.Tensor):
        return
    what = f"example inputs: {type(emb).__name__} {path!r} ({emb.num_embeddings} rows) gets ids"
    if ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{what} of dtype {ids.dtype}; ids must be an integer tensor (torch.int64 or torch.int32)")
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < emb.num_embeddings):
        raise InputError(f"{what} from {int(ids.min())} to {int(ids.max())}; they must be in "
                         f"[0, {emb.num_embeddings})")
