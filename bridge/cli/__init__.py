"""``embridge``: the command-line interface.

Every sub-command prints human-readable output by default and one JSON document on stdout
with ``--json``; progress and logs go to stderr. A :class:`~bridge.errors.BridgeError`
becomes one line on stderr and a non-zero exit code, never a traceback; so do usage errors (exit
code 2), a file the user named that cannot be read (2), an error of the machine (an ``OSError`` such
as a full disk, or a ``MemoryError``: 1) and Ctrl-C (130). The message says what the command had
already written completely (:func:`bridge.cli.common.wrote`), else that nothing was written.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from bridge.cli import bench_cmds, common, model_cmds, serve_cmds, share_cmds
from bridge.errors import BridgeError

_COMMANDS = (model_cmds, serve_cmds, share_cmds, bench_cmds)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit code 2), like every other error.

    Sub-command parsers are made with the parent's class, so they share it.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full ``embridge`` argument parser."""
    parser = _Parser(
        prog="embridge",
        description="Move embedding tables between Keras, ONNX, PyTorch and NumPy, and prove they match.",
    )
    from bridge import __version__

    parser.add_argument("--version", action="version", version=f"embridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS:
        module.register(sub)
    return parser


_NEGATIVE_LIST = re.compile(r"-\d[\d,\s-]*")


def _join_negative_ids(argv: Sequence[str]) -> list[str]:
    """``--ids -1,2`` -> ``--ids=-1,2`` (argparse would read ``-1,2`` as an option)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--ids" and _NEGATIVE_LIST.fullmatch(arg):
            out[-1] = f"--ids={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``embridge``; returns the exit code (also used as the console-script entry point)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(_join_negative_ids(sys.argv[1:] if argv is None else argv))
    common.WRITTEN.clear()
    with _interrupts() as interrupted:
        try:
            code = int(args.func(args) or 0)
        except BridgeError as exc:
            print(f"embridge {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            code = 130
        except BrokenPipeError:
            return 0
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:  # a path given
            print(f"embridge {args.command}: error: {_one_line(exc)}; check the path{_written()}", file=sys.stderr)
            return 2
        except (OSError, MemoryError) as exc:  # the machine, not the input: disk full, out of memory, ...
            what = "out of memory" if isinstance(exc, MemoryError) else _one_line(exc)
            print(f"embridge {args.command}: error: {what}{_written()}", file=sys.stderr)
            return 1
    if code == 130 or interrupted:
        print(f"embridge {args.command}: interrupted{_written()}", file=sys.stderr)
        return 130
    return code


def _written() -> str:
    """What the command had written completely before it stopped, for its last message."""
    if not common.WRITTEN:
        return "; nothing was written"
    return f"; {', '.join(map(repr, common.WRITTEN))} had already been written completely"


@contextmanager
def _interrupts() -> Iterator[list[bool]]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered (a non-empty list): an interrupt
    raised inside a garbage-collector callback is swallowed by Python (and reported as "Exception ignored",
    which is silenced here), and the run must still exit 130 with one line."""
    seen: list[bool] = []

    def handler(signum: int, frame: Any) -> None:
        seen.append(True)
        raise KeyboardInterrupt

    def unraisable(info: Any) -> None:  # Python's "Exception ignored in ..." report, a traceback on stderr
        if not isinstance(info.exc_value, KeyboardInterrupt):
            hook(info)

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started with Ctrl-C ignored (a background job)
        yield seen
        return
    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        yield seen
        return
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


