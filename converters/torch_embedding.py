"""From an :class:`~bridge.table.EmbeddingTable` to ``torch.nn.Embedding`` / ``nn.EmbeddingBag``, and back.

Values are moved bit for bit: float32, float16 and float64 as they are, bfloat16 (held by NumPy
as ``ml_dtypes.bfloat16``) through its 16-bit pattern viewed as ``torch.bfloat16``. torch is
imported inside the functions only.
"""

from __future__ import annotations

import mmap
import warnings
from typing import Any

import ml_dtypes
import numpy as np

from bridge.errors import InputError, UnsupportedError
from bridge.table import EmbeddingTable
from converters.keras_map import same_bytes

#: table dtypes an nn.Embedding can hold, and the NumPy dtype torch reads their bits as
_CARRIERS: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "float64": np.dtype(np.float64),
    "bfloat16": np.dtype(np.int16),
}


def import_torch() -> Any:
    """The ``torch`` module, or :class:`UnsupportedError` saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise UnsupportedError(
            f"the PyTorch converter needs torch ({exc}); install it with pip install 'embedding-bridge[torch]'"
        ) from exc
    return torch


def tensor_from_array(data: np.ndarray, *, copy: bool) -> Any:
    """A torch tensor with the bits of ``data`` (a float32/float16/float64/bfloat16 array).

    ``copy=False`` shares memory with ``data``. torch has no read-only tensors, and a write through one
    made from a read-only memory map would crash the process (a write to a read-only page); such a map
    is therefore opened again copy-on-write (:func:`private_mapping`): the same pages, shared until
    written, and a write changes this process's pages only, never the file. Other read-only arrays
    cannot be shared safely and are an :class:`InputError` with ``copy=False``.
    """
    torch = import_torch()
    name = np.dtype(data.dtype).name
    if name not in _CARRIERS:
        raise UnsupportedError(
            f"a table of dtype {name} cannot become a torch embedding weight; supported: {', '.join(_CARRIERS)}"
        )
    if data.dtype.byteorder == ">":
        if not copy:
            raise InputError("a big-endian table cannot be shared with torch; pass copy=True")
        data = data.astype(data.dtype.newbyteorder("="))
    if not copy and not data.flags.writeable:
        data = private_mapping(data)
    bits = data.view(_CARRIERS[name])
    if copy:
        tensor = torch.from_numpy(np.array(bits, copy=True, order="C"))
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            tensor = torch.from_numpy(bits)
    return tensor.view(torch.bfloat16) if name == "bfloat16" else tensor


def array_from_tensor(tensor: Any) -> np.ndarray:
    """The values of a CPU torch tensor as a NumPy array (bfloat16 as ``ml_dtypes.bfloat16``), bit for bit."""
    torch = import_torch()
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def private_mapping(data: np.ndarray) -> np.ndarray:
    """A copy-on-write mapping of the file bytes under the read-only, C-contiguous memory map ``data``.

    The file position is found from the addresses (``data`` may be a view of a larger map, at an offset).
    :class:`InputError` when ``data`` is not backed by a file mapping.
    """
    mm = getattr(data, "_mmap", None)
    filename = getattr(data, "filename", None)
    if mm is None or filename is None or not data.flags.c_contiguous:
        raise InputError("this table is read-only and not a file mapping, so torch cannot share it safely (torch "
                         "has no read-only tensors); pass copy=True, or leave copy=None")
    offset = int(getattr(data, "offset", 0))
    map_start = offset - offset % mmap.ALLOCATIONGRANULARITY
    position = map_start + (data.ctypes.data - np.frombuffer(mm, np.uint8).ctypes.data)
    try:
        private = np.memmap(filename, dtype=data.dtype, mode="c", offset=position, shape=data.shape)
    except (OSError, ValueError) as exc:
        raise InputError(f"{filename!r} changed since this table was opened; open the store again") from exc
    if not same_bytes(private, data):  # the file was replaced (a store written again with --force)
        raise InputError(f"{filename!r} changed since this table was opened; open the store again")
    return private


def _share(table: EmbeddingTable, trainable: bool, copy: bool | None) -> bool:
    """Whether the weight shares memory with ``table.data`` (see :func:`to_torch_embedding`)."""
    data = table.data
    shareable = data.flags.c_contiguous and data.dtype.byteorder != ">"
    if copy is None:
        return not trainable and shareable and data.flags.writeable
    if copy:
        return False
    if not shareable:
        raise InputError(f"table {table.name!r} is not a C-contiguous little-endian array; it cannot be shared "
                         "with torch without a copy: pass copy=True (or leave copy=None)")
    if trainable and not data.flags.writeable:
        raise InputError(f"table {table.name!r} is read-only (e.g. a store's memory map): a trainable weight "
                         "sharing it would be written by the optimizer; pass copy=True or trainable=False")
    return True


def _weight(table: EmbeddingTable, trainable: bool, copy: bool | None) -> Any:
    if not isinstance(table, EmbeddingTable):
        raise InputError(f"expected an EmbeddingTable, got {type(table).__name__}; wrap an array as "
                         "EmbeddingTable(name, array)")
    if table.quantization is not None:
        raise UnsupportedError(f"table {table.name!r} is quantized; make its float table first with "
                               "bridge.quantization.dense(table) and wrap that as an EmbeddingTable")
    return tensor_from_array(table.data, copy=not _share(table, trainable, copy))


def to_torch_embedding(table: EmbeddingTable, *, trainable: bool = False, copy: bool | None = None) -> Any:
    """A ``torch.nn.Embedding`` whose weight holds ``table``'s values bit for bit.

    Memory: with ``copy=None`` (default) the weight shares memory with ``table.data``
    (``torch.from_numpy``, zero-copy) when the module is frozen and the data is writable;
    a trainable module, or a read-only table such as a store's memory map, gets a copy.
    ``copy=False`` always shares: a read-only table (a store's memory map) is mapped again
    copy-on-write, so the weight uses the file's pages until something writes to it, and a write
    changes this process's copy only, never the store; with ``trainable=True`` it is allowed only on
    writable data, and training then updates ``table.data`` in place.
    ``copy=True`` always copies.

    ``padding_idx`` is set only when ``table.padding_id`` is set: a Keras ``mask_zero`` table
    (``metadata["mask_zero"]``) has a mask, not a padding row, and torch's ``padding_idx`` would
    only zero that row's gradient, so it is not set for one. dtypes: float32, float16, float64,
    bfloat16; other dtypes raise :class:`UnsupportedError`.
    """
    torch = import_torch()
    weight = _weight(table, trainable, copy)
    return torch.nn.Embedding.from_pretrained(weight, freeze=not trainable, padding_idx=table.padding_id)


def to_torch_embedding_bag(
    table: EmbeddingTable, *, mode: str = "mean", trainable: bool = False, copy: bool | None = None
) -> Any:
    """A ``torch.nn.EmbeddingBag`` (``mode`` ``"sum"``, ``"mean"`` or ``"max"``) over ``table``'s values.

    Memory, dtypes and ``padding_idx`` follow :func:`to_torch_embedding`. The bag reduces rows with
    arithmetic, so its outputs equal another framework's only within that framework's rounding.
    """
    torch = import_torch()
    if mode not in ("sum", "mean", "max"):
        raise InputError(f"mode {mode!r} is not an EmbeddingBag mode; use 'sum', 'mean' or 'max'")
    weight = _weight(table, trainable, copy)
    return torch.nn.EmbeddingBag.from_pretrained(weight, freeze=not trainable, mode=mode,
                                                 padding_idx=table.padding_id)


__all__ = ["array_from_tensor", "import_torch", "tensor_from_array", "to_torch_embedding", "to_torch_embedding_bag"]
