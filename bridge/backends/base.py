"""The shared half of every backend: validate ids and apply the index policy once, then gather.

A backend subclasses :class:`Lookup` and implements two hooks (Polygraphy's ``infer`` / ``infer_impl``
split): ``_setup(threads)`` binds the framework to ``table.data`` without copying it, and
``_gather(ids, out)`` copies rows into a C-contiguous NumPy buffer. ``_gather`` is only ever called with
int64 or int32 ids that are all in ``[0, rows)``, at least one of them, and ``out`` of shape
``ids.shape + (dim,)`` and the table's served dtype; ``_wrap(out)`` turns that buffer into the framework's own
type without a copy (for :meth:`Lookup.native`). ``_fresh(ids)`` (same contract) returns a new array
of those rows; the default allocates one and calls ``_gather``, a backend overrides it where it has a
cheaper way. The framework is imported inside ``_setup`` (:func:`require`), so importing an adapter
module is free.

Per-call cost: the serving call, a few valid int32/int64 ids as an ndarray, skips :func:`as_ids` and
the policy; :meth:`IndexPolicy.fits` recognizes it in about 0.2 us, and anything else takes the general
path, so results and errors are those of the general path. At one id (10,000 x 64 float32 table, this
2-core machine) ``lookup(ids)`` costs about 1.1 us on numpy, 3.2 us on torch and 4.8 us on onnxruntime,
against 1.4 us for ``np.take(out=, mode="clip")``, 2.4 us for ``torch.index_select(out=)`` and 2.6 us
for onnxruntime's ``run_with_ortvaluevector``. Without ``out=`` a large batch pays for its new output:
the kernel zeroes every fresh page on first touch, so the call costs 1.4-4x one into a reused buffer
(1M ids x 256 float32: 0.31-0.37 s instead of 0.23-0.25 s). Callers serving large batches should pass a
reused ``out=``; with it every backend runs within a few percent of its framework's own call. The
difference is the policy's pass over the ids: one read of them from memory, 6-11% of a gather from a
cached table at 65,536 ids. A backend that refuses out-of-range ids itself as it gathers (torch's
``index_select`` for large batches; numpy through the C kernel :mod:`bridge._kernels`, where it is built;
onnxruntime's Gather for large batches under the ``wrap`` policy, which is its own rule) skips that pass for
int32/int64 ids (:meth:`Lookup._try_unchecked`).

Errors: a call that raises :class:`IdError` may leave ``out=`` partly written (as torch and onnxruntime
do themselves); every other outcome is the same on every backend.

A quantized table (``table.quantization`` set) is served as dequantized vectors of
``table.served_dtype``: each backend gathers the integer rows and the scale (and zero point) rows and
computes :mod:`bridge.quantization`'s formula with its own framework's operations. A backend's
``_setup`` binds ``self._gather`` to its quantized variant for such a table, so the plain path keeps
its one method call and no per-call test.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from bridge.errors import BackendError, InputError, VocabularyError
from bridge.policy import IndexPolicy, as_ids, gatherable_dtype
from bridge.table import EmbeddingTable

MAX_THREADS = 1024  # more than any machine's cores; onnxruntime's option is a C int
SMALL_BYTES = 1 << 16  # outputs up to this size go through per-thread staging buffers (see ThreadBuffers)
T = TypeVar("T")


def require(module: str, *, backend: str, extra: str | None) -> ModuleType:
    """Import ``module`` for ``backend`` or raise :class:`BackendError` saying what to install.

    ``extra`` is the pip extra of embedding-bridge that installs it, or ``None`` for a core dependency.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        fix = f"pip install 'embedding-bridge[{extra}]'" if extra else f"pip install {module} (a core dependency)"
        raise BackendError(
            f"backend {backend!r} needs the {module!r} package, which cannot be imported ({exc}); "
            f"install it with: {fix}"
        ) from exc


def as_table(table: EmbeddingTable | np.ndarray) -> EmbeddingTable:
    """Accept an :class:`EmbeddingTable` or a bare 2-D array (named ``"array"``)."""
    if isinstance(table, EmbeddingTable):
        return table
    if isinstance(table, np.ndarray):
        return EmbeddingTable(name="array", data=table)
    raise InputError(f"expected an EmbeddingTable or a 2-D numpy array, got {type(table).__name__}")


def contiguous_data(table: EmbeddingTable, backend: str) -> np.ndarray:
    """``table.data`` as a C-contiguous native-order array; copies (with a warning) only if it is not one."""
    data = table.data
    if not data.dtype.isnative:
        raise BackendError(
            f"table {table.name!r} has non-native byte order ({data.dtype.str}); convert it once with "
            "data.astype(data.dtype.newbyteorder('='))"
        )
    if data.flags.c_contiguous:
        return data
    warnings.warn(
        f"table {table.name!r} is not C-contiguous; backend {backend!r} copies it ({data.nbytes} bytes). "
        "Store tables contiguously (np.ascontiguousarray) to serve them without a copy.",
        ResourceWarning,
        stacklevel=5,  # contiguous_data < _setup < Lookup.__init__ < backends.lookup < caller
    )
    return np.ascontiguousarray(data)


def read_only_map(data: np.ndarray) -> bool:
    """True if ``data`` lies in a memory map opened read-only (``np.memmap`` mode ``"r"``, as a store's tables are).

    No ``out=`` can then share the table's memory: NumPy keeps every array over such a map read-only, and
    ``out=`` must be writable. A lookup skips its overlap check for such a table: ``np.may_share_memory``
    costs 3 us when a large gather has just evicted its code from the caches (0.2 us warm).
    """
    node: Any = data
    while isinstance(node, np.ndarray):
        if isinstance(node, np.memmap) and node.mode == "r":
            return True
        node = node.base
    return False


def _never(ids: Any) -> bool:
    """Stands in for :meth:`IndexPolicy.fits` where nothing can be gathered."""
    return False


class ThreadBuffers(Generic[T]):
    """Per-thread buffers built once per ids shape by ``build(shape)`` and reused by later calls.

    For small batches, wrapping the caller's arrays as framework objects (two ``torch.from_numpy`` or
    two OrtValues) costs more than copying a few ids in and a few rows out of buffers wrapped once. Each
    thread has its own set, so calls from several threads never share a buffer; a thread keeps at most
    ``max_shapes`` sets (SMALL_BYTES of output each), and drops them all when it needs a new one beyond that.
    """

    def __init__(self, build: Callable[[tuple[int, ...]], T], max_shapes: int = 16) -> None:
        self._build = build
        self._local = threading.local()
        self._max_shapes = max_shapes

    def get(self, shape: tuple[int, ...]) -> T:
        cache: dict[Any, Any] = self._local.__dict__  # this thread's own attributes: shape -> buffers
        found: T | None = cache.get(shape)
        if found is None:
            if len(cache) >= self._max_shapes:
                cache.clear()
            found = cache[shape] = self._build(shape)
        return found


class Lookup(ABC):
    """Ids -> vectors for one table on one backend, with one index policy.

    Call it with ids of any integer dtype and shape to get an ndarray of shape ``ids.shape + (dim,)`` and
    the table's served dtype (dequantized vectors for a quantized table); :meth:`native` returns the
    framework's own type and :meth:`tokens` looks tokens up through ``table.vocab``. Instances hold no
    per-call state and may be shared between threads.
    """

    backend: ClassVar[str]
    framework: ClassVar[str | None] = None  # module the backend imports, None for numpy
    extra: ClassVar[str | None] = None  # pip extra of embedding-bridge that installs it (None: core dependency)

    def __init__(
        self,
        table: EmbeddingTable | np.ndarray,
        policy: str = "error",
        *,
        oov_id: int | None = None,
        threads: int = 1,
    ) -> None:
        self.table = as_table(table)
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise InputError(f"threads must be an integer from 1 to {MAX_THREADS}, got {threads!r}")
        chosen_oov = oov_id if oov_id is not None else self.table.oov_id
        self.index_policy = IndexPolicy.create(policy, self.table.rows, oov_id=chosen_oov, table=self.table.name)
        self.threads = threads
        self.dtype: np.dtype[Any] = self.table.served_dtype
        self._tail = (self.table.dim,)
        self._gatherable = self.table.rows > 0 and self.table.dim > 0
        # ids gatherable as they are (see IndexPolicy.fits); a table without rows or columns has nothing
        # to gather, so all its calls take the general path
        self._fits = self.index_policy.fits if self._gatherable else _never
        # from this many int32/int64 ids on, a backend whose framework checks bounds itself may gather
        # without the policy's pass over the ids (see _try_unchecked); 0 = never. Set by _setup.
        self._unchecked_from = 0
        # whether an out= may share the table's memory (see _gather_large)
        self._may_alias = not read_only_map(self.table.data)
        self._setup(threads)

    @property
    def policy(self) -> str:
        """Name of the index policy (``error``, ``clip``, ``zero``, ``oov`` or ``wrap``)."""
        return self.index_policy.name

    @property
    def oov_id(self) -> int | None:
        """The row the ``oov`` policy returns for bad ids (``None`` under the other policies)."""
        return self.index_policy.oov_id

    def __call__(self, ids: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Look up ``ids``; write into ``out`` (C-contiguous, right shape and dtype) and return it if given.

        ``out`` may overlap the table as a view of the same array; it must not share memory with ``ids`` (as
        for ``np.take``), nor be a second memory map of the table's file (no backend can see that overlap).
        """
        if self._fits(ids):  # a few valid int32/int64 ids, the serving call: no conversion, no policy
            if out is None:
                return self._fresh(ids)
            self._check_out(out, ids.shape)
            self._gather(ids, out)
            return out
        if gatherable_dtype(ids):  # int32/int64 ids as they are: no conversion (see _output)
            if self._unchecked_from and ids.size >= self._unchecked_from:
                done = self._try_unchecked(ids, out)
                if done is not None:
                    return done
            elif self.index_policy.in_range(ids):  # the policy's one pass: nothing to change
                return self._output(ids, out)
            else:
                return self._finish(*self.index_policy.repair(ids), out)
        return self._finish(*self.index_policy.apply(as_ids(ids)), out)

    def native(self, ids: Any, out: np.ndarray | None = None) -> Any:
        """Like calling the lookup, but return the framework's type (torch.Tensor, OrtValue, ndarray).

        The result shares memory with the NumPy output buffer (``out`` if given); no copy is made.
        """
        return self._wrap(self(ids, out=out))

    def tokens(self, tokens: Iterable[str] | str, out: np.ndarray | None = None) -> np.ndarray:
        """Look up tokens through ``table.vocab``.

        An unknown token maps to the vocabulary's ``oov_id`` when it has one (Keras ``StringLookup``);
        otherwise the index policy decides: ``zero`` gives a zero vector, ``oov`` the OOV row, and
        ``error``/``clip``/``wrap`` raise :class:`VocabularyError` naming the token. A vocabulary with
        several hashed OOV buckets (Keras ``num_oov_indices > 1``) raises for an unknown token: the
        bridge does not reproduce Keras's hash (see :attr:`bridge.vocab.Vocabulary.oov_buckets`).
        """
        vocab = self.table.vocab
        if vocab is None:
            raise VocabularyError(
                f"table {self.table.name!r} has no vocabulary, so tokens cannot be looked up; "
                "look up ids with lookup(ids) or attach a Vocabulary to the table"
            )
        if vocab.oov_id is None and vocab.oov_buckets <= 1 and self.policy in ("zero", "oov"):
            ids = vocab.ids(tokens, missing=-1)  # -1 is out of range: the policy maps it
        else:
            ids = vocab.ids(tokens)
        return self(ids, out=out)

    def _finish(self, safe: np.ndarray, zero: np.ndarray | None, out: np.ndarray | None) -> np.ndarray:
        """:meth:`_output` for the policy's ``(safe, zero)``, with the ``zero`` policy's rows cleared."""
        out = self._output(safe, out)
        if zero is not None:
            out[zero] = 0
        return out

    def _output(self, safe: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """``out`` (checked) or a new array, filled with rows ``safe`` unless there is nothing to gather.

        Valid int32/int64 ids come here straight from :meth:`__call__`, without :func:`as_ids` and
        :meth:`IndexPolicy.apply`: each call on the way costs 2-4 us when a large gather has just evicted
        the interpreter's own code and data from the caches, about 10 us in all at 65,536 ids (measured
        with onnxruntime, whose adapter pays the policy's pass).
        """
        gather = safe.size and self._gatherable
        if out is None:
            return self._fresh(safe) if gather else np.empty(safe.shape + self._tail, self.dtype)
        self._check_out(out, safe.shape)
        if gather:
            self._gather(safe, out)
        return out

    def _try_unchecked(self, ids: np.ndarray, out: np.ndarray | None) -> np.ndarray | None:
        """Gather many int32/int64 ids with the framework's own bounds check instead of the policy's pass.

        A separate pass over a large batch of ids reads them from memory once more (6-11% of a gather from
        a cached table). A framework that refuses every id outside ``[0, rows)`` itself, negative ones
        included, and never reads outside the table, makes that pass redundant for valid ids; so does, under
        the ``wrap`` policy, one that refuses ids outside ``[-rows, rows)`` and serves row ``id + rows`` for a
        negative id (onnxruntime's Gather). :meth:`_gather_or_refuse` returns False when it refused one, and
        the call then takes the general path, which applies the policy and gathers again, so results and
        errors are the general path's. The one difference: an :class:`IdError` may leave rows for the other
        ids already written to ``out=``.
        """
        if out is None:
            out = np.empty(ids.shape + self._tail, self.dtype)
        elif not self._out_fits(out, ids.shape):
            return None  # the general path says so, after the ids: a bad id is reported before a bad out=
        return out if self._gather_or_refuse(ids, out) else None

    def _gather_or_refuse(self, ids: np.ndarray, out: np.ndarray) -> bool:
        """Gather unvalidated int32/int64 ids into ``out``; False if the framework refused an id as out of range.

        Only called by backends that set ``_unchecked_from``; they must override it.
        """
        raise NotImplementedError(f"backend {self.backend!r} does not check ids itself")

    def _dtype_entry(self, supported: Mapping[str, T]) -> T:
        """This table's entry in a backend's dtype map; :class:`BackendError` listing the supported dtypes."""
        name = self.dtype.name  # ">f4" is float32 here; contiguous_data explains the byte order
        if name not in supported:
            raise BackendError(
                f"table {self.table.name!r} has dtype {name}, which the {self.backend} backend does not serve; "
                f"supported: {', '.join(supported)}"
            )
        return supported[name]

    def _out_fits(self, out: Any, shape: tuple[int, ...]) -> bool:
        """True if ``out`` is a writable C-contiguous ndarray of shape ``shape + (dim,)`` and the served dtype."""
        if not isinstance(out, np.ndarray) or out.shape != shape + self._tail or out.dtype != self.dtype:
            return False
        flags = out.flags
        return flags.c_contiguous and flags.writeable

    def _check_out(self, out: Any, shape: tuple[int, ...]) -> None:
        """:meth:`_bad_out` unless :meth:`_out_fits`."""
        if not self._out_fits(out, shape):
            self._bad_out(out, shape)

    def _bad_out(self, out: Any, shape: tuple[int, ...]) -> None:
        """Raise the :class:`InputError` for an ``out=`` that :meth:`_out_fits` refused (ids of shape ``shape``)."""
        want = shape + self._tail
        got = f"{type(out).__name__} {getattr(out, 'shape', '?')} {getattr(out, 'dtype', '?')}"
        if isinstance(out, np.ndarray):
            got += f" (C-contiguous={out.flags.c_contiguous}, writable={out.flags.writeable})"
        raise InputError(
            f"out= must be a writable C-contiguous numpy array of shape {want} and dtype {self.dtype}, "
            f"got {got}; allocate it with np.empty({want}, dtype=lookup.dtype)"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(table={self.table.name!r}, shape={self.table.shape}, "
            f"dtype={self.dtype}, policy={self.policy!r})"
        )

    @abstractmethod
    def _setup(self, threads: int) -> None:
        """Import the framework and bind it to ``self.table.data`` without copying it."""

    @abstractmethod
    def _gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Copy rows ``ids`` (int64/int32, all valid, non-empty) into ``out`` (``ids.shape + (dim,)``)."""

    def _fresh(self, ids: np.ndarray) -> np.ndarray:
        """A new output holding rows ``ids`` (same contract as :meth:`_gather`); backends may do it faster."""
        out = np.empty(ids.shape + self._tail, self.dtype)
        self._gather(ids, out)
        return out

    def _wrap(self, out: np.ndarray) -> Any:
        """The framework's own view of an output buffer (no copy); NumPy returns it unchanged."""
        return out


class StagedLookup(Lookup):
    """A backend that gathers small batches through per-thread staging buffers, large ones directly.

    Up to ``SMALL_BYTES`` of output, :meth:`_stage` gathers into this thread's buffers for the ids' shape
    (:class:`ThreadBuffers`, wrapped as framework objects once) and the rows are copied out: cheaper than
    wrapping the caller's two arrays on every call. Larger batches go straight into the output with
    :meth:`_gather_direct`. ``_setup`` sets ``_carrier`` (the dtype the framework reads the table as),
    ``_same`` (whether that is the served dtype) and ``_row_bytes`` (bytes of one output row).
    """

    _carrier: np.dtype[Any]
    _same: bool
    _row_bytes: int

    @property
    def _direct_from(self) -> int:
        """The fewest ids whose output skips the staging buffers (more than ``SMALL_BYTES`` of rows)."""
        return SMALL_BYTES // self._row_bytes + 1

    def _gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        if out.nbytes <= SMALL_BYTES:
            (out if self._same else out.view(self._carrier))[...] = self._stage(ids)
        else:
            self._gather_large(ids, out)

    def _gather_large(self, ids: np.ndarray, out: np.ndarray) -> None:
        """:meth:`_gather_direct`, through a new array where ``out`` shares memory with the table.

        A framework gathering straight into such an ``out`` would read rows it has already overwritten
        (NumPy's ``take`` buffers this case itself); the bounds check costs about 0.2 us, and is skipped for a
        read-only memory map (:func:`read_only_map`).
        """
        if self._may_alias and np.may_share_memory(out, self.table.data):
            out[...] = Lookup._fresh(self, ids)  # the staging-free default: a new array, gathered directly
        else:
            self._gather_direct(ids, out)

    def _fresh(self, ids: np.ndarray) -> np.ndarray:
        if ids.size * self._row_bytes > SMALL_BYTES:
            return super()._fresh(ids)
        rows = self._stage(ids).copy()  # one copy of the staged rows beats np.empty plus an assignment
        return rows if self._same else rows.view(self.dtype)

    @abstractmethod
    def _stage(self, ids: np.ndarray) -> np.ndarray:
        """Gather ``ids`` into this thread's staging output for their shape and return it (reused: copy it out)."""

    @abstractmethod
    def _gather_direct(self, ids: np.ndarray, out: np.ndarray) -> None:
        """:meth:`_gather` for a batch larger than ``SMALL_BYTES`` of output, straight into ``out``."""
