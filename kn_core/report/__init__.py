"""The project's report (`kn report PROJECT --out DIR`, the app's File > Export > Report): report.json,
report.md and a self-contained report.html with the runs' figures, built from a project without Qt or a model.

`document` reads a project into plain data (or the app builds the same from its session), `build` turns it into
the report's data and Markdown, `figures` draws with matplotlib, `write` writes the folder all or nothing.
"""

from .build import build_report, render_markdown, report_data
from .document import ProjectDocument, RunRecord, read_project, run_neurons
from .write import ReportError, write_report

__all__ = ["ProjectDocument", "ReportError", "RunRecord", "build_report", "read_project", "render_markdown",
           "report_data", "run_neurons", "write_report"]
