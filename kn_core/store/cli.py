"""`kn project ...` sub-commands. The lead wires `add_project_commands(subparsers)` into kn_core/cli.py;
each handler is stored as `func` on the parsed namespace and returns an exit code."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ProjectError
from .export import export_project
from .project import open_project, recover_project


def add_project_commands(subparsers) -> argparse.ArgumentParser:
    """Registers `project info FILE [--json] [--check]`, `project export FILE --out DIR [--arrays] [--json]` and
    `project recover FILE [--json]`."""
    project = subparsers.add_parser("project", help="inspect or export a project file (.knproj)")
    sub = project.add_subparsers(dest="project_command", required=True)

    info = sub.add_parser("info", help="counts, schema version and file size of a project")
    info.add_argument("file", help="the .knproj project file")
    info.add_argument("--json", action="store_true", help="print one JSON document")
    info.add_argument("--check", action="store_true", help="also run a full integrity check (reads the whole file)")
    info.set_defaults(func=cmd_project_info)

    export = sub.add_parser("export", help="write facts, neuron sets, runs and edits as JSON/CSV")
    export.add_argument("file", help="the .knproj project file")
    export.add_argument("--out", required=True, help="output folder (created if needed)")
    export.add_argument("--arrays", action="store_true", help="also write every score array as a .npy file")
    export.add_argument("--json", action="store_true", help="print one JSON document")
    export.set_defaults(func=cmd_project_export)

    recover = sub.add_parser("recover", help="copy the changes a failed close left in FILE-wal into the file, "
                                             "then check it")
    recover.add_argument("file", help="the .knproj project file (its FILE-wal next to it)")
    recover.add_argument("--json", action="store_true", help="print one JSON document")
    recover.set_defaults(func=cmd_project_recover)
    return project


def _fail(args, exc: ProjectError) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": str(exc), "error_type": type(exc).__name__}))
    else:
        print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_project_info(args) -> int:
    import os

    try:
        with open_project(args.file, read_only=True) as proj:
            info = proj.info()
            counts = proj.counts()
            problems = proj.check_integrity() if args.check else None
    except ProjectError as exc:
        return _fail(args, exc)
    doc = {"ok": True, **info, "file_bytes": os.path.getsize(args.file), "counts": counts}
    if problems is not None:
        doc["integrity"] = problems or ["ok"]
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"{doc['file']}: project {doc['name']!r}, schema v{doc['schema_version']}, "
              f"last written by {doc['app_version']}, {doc['file_bytes'] / 1e6:.1f} MB")
        for key, value in counts.items():
            print(f"  {key}: {value}")
        if problems is not None:
            print("  integrity: " + ("; ".join(problems) if problems else "ok"))
    return 1 if problems else 0


def cmd_project_export(args) -> int:
    try:
        written = export_project(args.file, args.out, with_arrays=args.arrays)
    except ProjectError as exc:
        return _fail(args, exc)
    if args.json:
        print(json.dumps({"ok": True, "file": args.file, "out": args.out, "written": written}))
    else:
        for name, n in written.items():
            print(f"{args.out}/{name}: {n}")
    return 0


def cmd_project_recover(args) -> int:
    try:
        report = recover_project(args.file)
    except ProjectError as exc:
        return _fail(args, exc)
    ok = report["integrity"] == ["ok"]
    if args.json:
        print(json.dumps({"ok": ok, **report}))
    else:
        print(f"{args.file}: {report['wal_bytes'] / 1e6:.1f} MB of saved changes copied from its -wal; integrity: "
              + "; ".join(report["integrity"]) + f"; {report['counts']['facts']} facts, {report['counts']['runs']} runs")
    return 0 if ok else 1
