"""``embridge``: the command-line interface.

Every sub-command prints human-readable output by default and one JSON document on stdout
with ``--json``; progress and logs go to stderr. A :class:`~bridge.errors.BridgeError`
becomes one line on stderr and a non-zero exit code, never a traceback; so does an error of the
machine (an ``OSError`` such as a full disk, or a ``MemoryError``), with exit code 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from bridge.cli import bench_cmds, model_cmds, serve_cmds, share_cmds
from bridge.errors import BridgeError

_COMMANDS = (model_cmds, serve_cmds, share_cmds, bench_cmds)


def build_parser() -> argparse.ArgumentParser:
    """The full ``embridge`` argument parser."""
    parser = argparse.ArgumentParser(
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
    try:
        return int(args.func(args) or 0)
    except BridgeError as exc:
        print(f"embridge {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"embridge {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (OSError, MemoryError) as exc:  # the machine, not the input: disk full, out of memory, ...
        what = "out of memory" if isinstance(exc, MemoryError) else _one_line(exc)
        print(f"embridge {args.command}: error: {what}; nothing was written", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


