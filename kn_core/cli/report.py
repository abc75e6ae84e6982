"""`kn report PROJECT --out DIR`: the project's report (report.html, report.md, report.json and the run figures)
from a .knproj file, the same report as the app's File > Export > Report (kn_core.report)."""

from __future__ import annotations

import shlex

from .common import emit, progress_bar


def cmd_report(args) -> int:
    from ..report.document import read_project
    from ..report.write import write_report

    with progress_bar("report") as task:
        doc = read_project(args.file, task=task.slice(0.0, 0.3))
        command = shlex.join(["kn", "report", str(args.file), "--out", str(args.out)])
        written = write_report(doc, args.out, command, task=task.slice(0.3, 1.0))
    left_out = written["left_out"]
    text = (f"{written['out']}/report.html: {written['runs']} runs, {written['figures']} figures "
            f"(also report.md and report.json)" + (f"; {len(left_out)} item(s) left out, each with its reason under "
                                                    "'Left out'" if left_out else ""))
    emit(args, {"ok": True, "file": args.file, **written}, text)
    return 0


def add_commands(sub) -> None:
    """`report FILE --out DIR [--json]`."""
    report = sub.add_parser("report", help="the project's report: report.html (self-contained), report.md and "
                                           "report.json")
    report.add_argument("file", help="the .knproj project file")
    report.add_argument("--out", required=True, help="output folder (created if needed; an earlier report there is "
                                                     "replaced, a folder holding other files is refused)")
    report.add_argument("--json", action="store_true", help="print one JSON document")
    report.set_defaults(func=cmd_report)
