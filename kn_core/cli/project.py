"""`kn project info|export|recover`: look at, export or recover a .knproj file."""

from __future__ import annotations

import argparse
import os
import sys

from ..jsonio import dumps


def cmd_project_info(args) -> int:
    from ..store import ProjectError, open_project

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
        print(dumps(doc))
    else:
        print(f"{doc['file']}: project {doc['name']!r}, schema v{doc['schema_version']}, "
              f"last written by {doc['app_version']}, {doc['file_bytes'] / 1e6:.1f} MB"
              + (" (open in another process that writes it: shown as of its last commit)"
                 if doc["read_while_written"] else ""))
        for key, value in counts.items():
            print(f"  {key}: {value}")
        if problems is not None:
            print("  integrity: " + ("; ".join(problems) if problems else "ok"))
    return 1 if problems else 0


def cmd_project_export(args) -> int:
    from ..store import ProjectError, export_project

    try:
        written = export_project(args.file, args.out, with_arrays=args.arrays)
    except ProjectError as exc:
        return _fail(args, exc)
    if args.json:
        print(dumps({"ok": True, "file": args.file, "out": args.out, "written": written}))
    else:
        for name, n in written.items():
            print(f"{args.out}/{name}: {n}")
    return 0


def cmd_project_recover(args) -> int:
    from ..store import ProjectError, recover_project

    try:
        report = recover_project(args.file)
    except ProjectError as exc:
        return _fail(args, exc)
    ok = report["integrity"] == ["ok"]
    if args.json:
        print(dumps({"ok": ok, **report}))
    else:
        print(f"{args.file}: {report['wal_bytes'] / 1e6:.1f} MB of saved changes copied from its -wal; integrity: "
              + "; ".join(report["integrity"]) + f"; {report['counts']['facts']} facts, {report['counts']['runs']} runs")
    return 0 if ok else 1


def _fail(args, exc) -> int:
    if getattr(args, "json", False):
        print(dumps({"ok": False, "error": str(exc), "error_type": type(exc).__name__}))
    print(f"error: {exc}", file=sys.stderr)
    return 2


def add_commands(sub) -> argparse.ArgumentParser:
    """`project info FILE [--json] [--check]`, `project export FILE --out DIR [--arrays] [--json]` and
    `project recover FILE [--json]`."""
    project = sub.add_parser("project", help="inspect or export a project file (.knproj)")
    project_sub = project.add_subparsers(dest="project_command", required=True)

    info = project_sub.add_parser("info", help="counts, schema version and file size of a project")
    info.add_argument("file", help="the .knproj project file")
    info.add_argument("--json", action="store_true", help="print one JSON document")
    info.add_argument("--check", action="store_true", help="also run a full integrity check (reads the whole file)")
    info.set_defaults(func=cmd_project_info)

    export = project_sub.add_parser("export", help="write facts, neuron sets, runs and edits as JSON/CSV")
    export.add_argument("file", help="the .knproj project file")
    export.add_argument("--out", required=True, help="output folder (created if needed)")
    export.add_argument("--arrays", action="store_true", help="also write every score array as a .npy file")
    export.add_argument("--json", action="store_true", help="print one JSON document")
    export.set_defaults(func=cmd_project_export)

    recover = project_sub.add_parser("recover", help="copy the changes a failed close left in FILE-wal into the "
                                                     "file, then check it")
    recover.add_argument("file", help="the .knproj project file (its FILE-wal next to it)")
    recover.add_argument("--json", action="store_true", help="print one JSON document")
    recover.set_defaults(func=cmd_project_recover)
    return project
