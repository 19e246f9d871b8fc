"""One exception hierarchy for everything embedding-bridge raises on purpose.

Every error a user can cause derives from :class:`BridgeError`. Its message names the
problem and, where there is one, the fix; the CLI prints it as a single line and exits
non-zero. Anything else that escapes is a bug in this package.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error raised deliberately by embedding-bridge."""

    exit_code: int = 1


class InputError(BridgeError):
    """A file or argument given by the user is missing, unreadable or malformed."""

    exit_code = 2


class ModelFormatError(InputError):
    """A model file is not a valid model of the expected format (not ONNX, truncated, ...)."""


class UnsafePathError(InputError):
    """A path inside a model or store points outside its directory (``..``, absolute, symlink)."""


class OutputExistsError(InputError):
    """The output directory exists and is not empty; pass ``force=True`` (``--force``) to replace it."""


class ConversionError(BridgeError):
    """A framework converter (tf2onnx, torch.onnx) failed or produced an unusable model."""


class UnsupportedError(BridgeError):
    """The input uses a feature embedding-bridge does not handle; the message says which."""


class StoreError(BridgeError):
    """An embedding store is missing, malformed, or inconsistent with its manifest."""


class ChecksumError(StoreError):
    """A file's sha256 does not match the manifest: the store is corrupt or was altered."""


class TableNotFoundError(StoreError, KeyError):
    """A table or vocabulary name is not in the store; the message lists the valid names."""

    exit_code = 2  # the name the user asked for is wrong: bad input

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BackendError(BridgeError):
    """A runtime backend is unknown, not installed, or failed to serve a lookup."""


class IdError(BridgeError, IndexError):
    """Ids are not integers, or an id is out of range under the ``error`` policy."""

    exit_code = 2  # the ids the user gave: bad input


class VocabularyError(BridgeError, KeyError):
    """A token cannot be mapped to an id (no vocabulary, or OOV without a rule)."""

    exit_code = 2  # the tokens (or vocabulary) the user gave: bad input

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ParityError(BridgeError):
    """A parity comparison could not be run (the comparison itself failing is a result, not an error)."""
