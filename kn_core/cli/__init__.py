"""The `kn` command line. Every command that computes takes --model, --device, --dtype, --json and --project.

With --json exactly one JSON document goes to stdout; progress and messages go to stderr. Bad input ends with
a one-line error and exit status 2, never a traceback.

One module per verb group, each with `add_commands(subparsers)`; handlers are `cmd_*(args) -> int`. To add a
verb: write `cmd_x` and register it in its group's `add_commands` (or add a module and list it in VERB_GROUPS);
give every new argument a check in `checks.CHECKS` (kn_core.validation), so that bad input fails before any
model loads; raise `CliError` for a one-line user error; print with `common.emit` (strict JSON with --json).
"""

from __future__ import annotations

import argparse
import errno
import os

from . import attribution, bench, degeneracy, edit, facts, model, project, report, reproduce, trace
from ..jsonio import dumps
from .checks import Parser, check_args
from .common import CliError, say

VERB_GROUPS = (model, facts, attribution, project, report, edit, degeneracy, reproduce, bench, trace)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kn", description="Knowledge Neuron Studio on the command line")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in VERB_GROUPS:
        group.add_commands(sub)
    return parser


def _engine_errors() -> tuple[type[BaseException], ...]:
    """The engine's user-facing errors (imported only once something failed, so a bad argument costs no torch
    import)."""
    from ..attribution import NonFiniteScoresError, PromptError
    from ..fact_files import FactImportError
    from ..families import UnsupportedModelError
    from ..models import ModelLoadError
    from ..runner import NonFiniteRunError
    from ..store import ProjectError
    from ..tasks import Cancelled

    return (ModelLoadError, UnsupportedModelError, PromptError, NonFiniteScoresError, NonFiniteRunError,
            FactImportError, ProjectError, Cancelled)


def _fail(args, exc: BaseException) -> int:
    from ..validation import shortened

    message = shortened(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc))
    message = " ".join(message.splitlines()) or type(exc).__name__  # one line, whatever the library wrote
    if getattr(args, "json", False):
        print(dumps({"error": message, "error_type": type(exc).__name__}))
    say(f"error: {message}")
    return 2


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a one-line argparse error (checks.Parser)
        return exc.code if isinstance(exc.code, int) else 0
    try:
        check_args(args)  # before any model loads
        return args.func(args)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except (CliError, ValueError, KeyError, FileNotFoundError) as exc:  # ValidationError is a ValueError
        return _fail(args, exc)
    except _engine_errors() as exc:  # evaluated only when the clause above did not match
        return _fail(args, exc)
    except OSError as exc:  # the disk (full, read-only, gone) under an output: one line, exit 2
        where = f" ({exc.filename})" if exc.filename else ""
        fix = "free space on that drive and run again" if exc.errno == errno.ENOSPC else "check the drive and the path"
        return _fail(args, OSError(f"{exc.strerror or exc}{where}; {fix}"))
    except Exception as exc:  # a bug, or the hardware: still one line, and the type says which
        from ..validation import shortened

        message = " ".join(shortened(str(exc)).splitlines())
        if getattr(args, "json", False):
            print(dumps({"error": message, "error_type": type(exc).__name__}))
        say(f"error: {type(exc).__name__}: {message} (set KN_DEBUG=1 for the traceback)")
        if os.environ.get("KN_DEBUG"):
            raise
        return 1
