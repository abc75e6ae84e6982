"""`kn reproduce`: the paper's experiments with controls on any model and fact set. ``pipeline`` selects
facts, attributes them (cached, so an interrupted run resumes) and runs the experiments; ``report`` writes
report.json, report.md, report.html and the figures. Nothing here imports the CLI."""

from .pipeline import FactSelection, attribute_cached, default_relations, resolve_relations, run_reproduce, select_facts
from .report import PAPER, render_markdown, write_figures, write_html, write_report

__all__ = ["PAPER", "FactSelection", "attribute_cached", "default_relations", "render_markdown",
           "resolve_relations", "run_reproduce", "select_facts", "write_figures", "write_html", "write_report"]
