"""`kn reproduce`: the arguments of the reproduction pipeline (kn_core.reproduce) and its summary."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .attribution import causal_templates_option, quadrature_options
from .checks import whole_number
from .common import (COMMON, command_params, emit, factset_of, load, progress_bar, prompt_format_option,
                     say, store_evaluation)


def cmd_reproduce(args) -> int:
    from ..attribution import AttributionParams
    from ..reproduce import resolve_relations, run_reproduce

    AttributionParams(steps=args.steps, quadrature=args.quadrature, tolerance=args.tolerance)  # before loading
    factset = factset_of(args)
    relations = [r.strip() for r in args.relations.split(",") if r.strip()] if args.relations else None
    resolve_relations(factset, relations)  # an unknown relation fails before the model loads
    lm = load(args)
    with progress_bar("reproduce") as task:
        report = run_reproduce(lm, factset, Path(args.out), relations, args.facts_per_relation, args.seed,
                               args.steps, args.prompts_per_fact, args.select, args.control_prompts,
                               causal_templates=args.causal_templates, keep_massive=args.keep_massive, say=say,
                               task=task, command=shlex.join(["kn", *sys.argv[1:]]), quadrature=args.quadrature,
                               tolerance=args.tolerance, trace=args.trace,
                               subject_control=not args.no_subject_control, keep_template=args.keep_template)
    sa = report.get("suppress_amplify", {}).get("average", {})
    doc = {"out": str(args.out), "status": report["status"], "report": str(Path(args.out) / "report.json"),
           "html": str(Path(args.out) / "report.html"),
           "suppress": sa.get("knowledge", {}).get("suppress", {}).get("own"),
           "amplify": sa.get("knowledge", {}).get("amplify", {}).get("own"),
           "seconds": report["timings"].get("total"), "selection": report.get("selection"),
           "facts": report.get("fact_answers"),
           "subject_control": {k: v for k, v in (report.get("subject_control") or {}).items() if k != "per_fact"},
           "left_out": report.get("left_out")}
    store_evaluation(args, lm, "reproduce", report, command_params(args))
    emit(args, doc, (Path(args.out) / "report.md").read_text())
    return 0


def add_commands(sub) -> None:
    rep = sub.add_parser("reproduce", parents=[COMMON], help="the paper's experiments with controls")
    rep.add_argument("--facts", default="builtin", help="'builtin' or a PARAREL folder / .csv / .jsonl")
    rep.add_argument("--relations", help="comma-separated relation ids, or 'all' (default: 3 relations)")
    rep.add_argument("--facts-per-relation", type=whole_number, default=10)
    rep.add_argument("--seed", type=whole_number, default=0)
    rep.add_argument("--steps", type=whole_number, default=None,
                     help="integration steps: Riemann steps (paper: 20) or Gauss points per panel (default 4 gauss, "
                          "3 auto)")
    quadrature_options(rep)
    rep.add_argument("--prompts-per-fact", type=whole_number, default=None, help="use at most N templates per fact")
    rep.add_argument("--select", choices=["known", "random"], default="known",
                     help="known: facts the model knows (top-1 on most prompts), looked for in a seeded order, "
                          "up to 256 screened per relation, then the best-answered unknown ones, reported apart; "
                          "random: a seeded sample")
    rep.add_argument("--control-prompts", type=whole_number, default=20, help="prompts sampled per control group")
    causal_templates_option(rep)
    prompt_format_option(rep)
    rep.add_argument("--keep-massive", action="store_true",
                     help="keep massive/unspecific neurons in refined and relation-level neurons (default: left out)")
    rep.add_argument("--trace", action="store_true",
                     help="add localisation vs editing (Hase et al. 2023): causal tracing of every fact beside its "
                          "neurons' layers and band-wise edits (off by default: it costs time)")
    rep.add_argument("--no-subject-control", action="store_true",
                     help="skip the subject-specificity control (docs/SPECIFICITY.md; default: every fact's refined "
                          "neurons are re-scored with other subjects and its template neurons taken out)")
    rep.add_argument("--keep-template", action="store_true",
                     help="keep the neurons the subject control flags template in the facts' refined sets")
    rep.add_argument("--out", required=True, help="folder for report.json, report.md, report.html and the figures")
    rep.set_defaults(func=cmd_reproduce)
