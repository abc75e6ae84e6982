"""One edit kind applied to several facts at once (the Facts panel's "Edit selected"): a compound
`kn_core.batch` run on the worker (progress and Cancel as for attribution) that becomes ONE undoable entry of
the edit history, whose report (per fact, what was left out and why, the batch's metrics) is saved with it."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QObject, Signal

from kn_core.edit_stack import ModelEdit
from kn_core.facts import Fact
from kn_core.history import History

from ..session import Session, fact_key, fact_label
from ..worker import JobRunner
from . import UserError
from .edits import GROUP_LABELS, scoring_of, table_row

# the Edits panel's fields that every request of the batch shares, by kind
OPTIONS = {"suppress": ("scope", "to"), "amplify": ("factor", "scope"),
           "update": ("lambda1", "lambda2", "strength")}


@dataclass(frozen=True)
class BatchApplied:
    command: ModelEdit
    report: dict


@dataclass(frozen=True)
class BatchNotApplied:
    message: str  # every fact was left out (the reasons), or the job was cancelled
    cancelled: bool = False


class BatchController(QObject):
    event = Signal(object)

    def __init__(self, session: Session, runner: JobRunner, history: History, parent=None):
        super().__init__(parent)
        self.session, self.runner, self.history = session, runner, history

    def unattributed(self, facts: list[Fact]) -> list[Fact]:
        """The facts a batch edit would leave out for want of a run (said before it runs)."""
        runs = self.session.runs
        return [f for f in facts if runs.get(fact_key(f)) is None or not runs[fact_key(f)].scores]

    def apply(self, request: dict, facts: list[Fact]):
        """Plans, applies and measures the Edits panel's `request` on each of `facts` (with each fact's refined
        neurons) on the worker; UserError before any work when the batch cannot be built."""
        from kn_core.batch_requests import BatchRequest, ParsedRequests

        s = self.session
        if s.lm is None:
            raise UserError("No model loaded", "Load a model first: Model panel \u2192 Load model (Ctrl+L).")
        kind = request["kind"].split()[0].lower()
        if kind not in OPTIONS:
            raise UserError("Cannot edit several facts this way", "Erase acts on a whole relation; choose Suppress, "
                            "Amplify or Update in the Edits panel to edit each selected fact.")
        if not facts:
            raise UserError("No facts selected", "Select facts in the Facts panel (Ctrl- or Shift-click), then "
                            "press Edit selected.")
        new_object = (request.get("new_object") or "").strip() if kind == "update" else None
        if kind == "update" and not new_object:
            raise UserError("Cannot apply the edit", "Type the new object o' in the Edits panel; every selected "
                            "fact is updated to it.")
        requests, neurons, bad = [], {}, []
        for line, fact in enumerate(facts, 1):
            run = s.runs.get(fact_key(fact))
            found = tuple(s.refined(run)) if run is not None and run.scores else ()
            if run is None or not run.scores:
                bad.append((line, "not attributed yet (run attribution on the selection)"))
                continue
            requests.append(BatchRequest(line, kind, fact, s.factset.relation(fact.relation), new_object))
            # the prompts scored so far found the neurons; the fact's other templates are held out (generality)
            used = tuple(p.template for p in run.prompts[:len(run.scores)])
            neurons[line] = (found, f"the refined neurons of its run (t={s.t:g}, p={s.p:g})", used)
        if not requests:
            raise UserError("No attributed facts selected", "Run attribution on the selected facts first "
                            "(Attribution \u2192 Run selected); the edit uses each fact's refined neurons.")
        parsed = ParsedRequests(requests, bad, s.factset)
        options = {k: request[k] for k in OPTIONS[kind] if k in request}
        label = f"{kind} {len(facts)} facts" + (f" \u2192 {new_object!r}" if new_object else "")
        lm, stats = s.lm, s.activation_stats
        scoring = scoring_of(request, lm, kind)

        def job(task):
            from kn_core.batch import run_batch

            return run_batch(lm, parsed, neurons, "compound", options=options, activation_stats=stats, label=label,
                             evaluation=scoring["eval"], protocol=scoring["protocol"], task=task)

        self.runner.submit(f"Batch edit: {label}", job, on_done=lambda result: self._done(lm, result, facts, label),
                           on_cancel=lambda: self.event.emit(BatchNotApplied(
                               "Batch edit cancelled; the model and the history are unchanged.", cancelled=True)))

    def _done(self, lm, result, facts, label):
        if result.edit is None:
            reasons = "; ".join(f"{x['reason']}" for x in result.report["left_out"][:3])
            self.event.emit(BatchNotApplied(f"Every selected fact was left out: {reasons}."))
            return
        report = panel_report(result.report, facts, label, lm)
        command = ModelEdit(lm, result.edit, report, text=f"Batch: {label}")
        try:
            self.history.push(command)
        except Exception as exc:  # noqa: BLE001 (the edit was applied and reverted on the worker already)
            self.event.emit(BatchNotApplied(f"{exc}."))
            return
        self.event.emit(BatchApplied(command, report))


def _top1(kind: str, target: str, reliability: dict) -> str:
    """'Rome top-1 on 4/6': how many of the fact's prompts have the edit's target as their greedy answer (the
    reliability rate counts that for update, its complement for suppress; amplify's rate is 'p rose')."""
    n, rate = reliability["n"], reliability.get("rate")
    if rate is None:
        return ""
    if kind == "amplify":
        return f"p rose on {round(rate * n)}/{n}"
    top = rate if kind == "update" else 1 - rate
    return f"{target} top-1 on {round(top * n)}/{n}"


def panel_report(batch: dict, facts: list[Fact], label: str, lm) -> dict:
    """The Edits panel's before/after table for a batch: one row per fact, with the probability of the edit's
    target (o for suppress/amplify, o' for update) before and after, averaged over the fact's prompts, then the
    other-fact controls' rows (`control_rows`); the facts left out as skipped items; the whole batch report
    under "batch"."""
    rows = []
    for r in batch["requests"]:
        reliability = r["metrics"]["reliability"]
        if not reliability.get("applicable", True):
            continue
        fact = Fact(**r["fact"])
        target = r["new_object"] or fact.object
        rows.append({"group": "fact", "fact": fact_label(fact), "prompt": f"{reliability['n']} prompt(s), mean",
                     "answer": target, "before": reliability["before"]["mean_prob"],
                     "after": reliability["mean_prob"], "top_before": _top1(r["kind"], target, reliability["before"]),
                     "top_after": _top1(r["kind"], target, reliability)})
    rows += control_rows(batch)
    left = {x["line"]: x["reason"] for x in batch["left_out"]}
    skipped = [[fact_label(facts[line - 1]) if 0 < line <= len(facts) else f"fact {line}", why]
               for line, why in left.items()]
    info = lm.describe()
    return {"title": f"Batch: {label}: {batch['applied']} of {len(facts)} facts edited as one history entry "
                     f"(fact rows: p of the edit's target, mean over the fact's prompts; then the facts it must not move)",
            "rows": rows, "edit": {"kind": "batch"}, "summary": {}, "skipped": skipped,
            "model": {"name": info.get("name") or lm.source, "sha256": lm.sha256}, "batch": batch,
            # the engine's measurement (kn_core.batch): each metric the mean over the edited facts, beside the same
            # for their random-neuron controls; locality over other facts of the relations (control facts)
            "metrics": batch["summary"]["metrics"],
            # how it was scored, named as `kn edit batch --json` names it; the protocol's means over the facts
            "protocol": batch["protocol"], "eval": batch["evaluation"],
            **({"protocol_scores": {side: batch["summary"][side] for side in ("pre", "post", "control")}}
               if batch["protocol"] != "kn" else {})}


def control_rows(batch: dict) -> list[dict]:
    """The batch's other-fact controls (facts it does not edit: of the same relation, of other relations, the new
    object's) as rows of the single edit's table, one per prompt, with the engine's measurements before and with
    the whole batch (kn_core.batch's "control_rows"). Requests of one relation share control facts: measured under
    the same compound batch, a prompt is one row."""
    rows, seen = [], set()
    for request in batch["requests"]:
        for c in request.get("control_rows", ()):
            key = (c["group"], tuple(c["fact"].values()), c["prompt"])
            if batch["mode"] == "compound" and key in seen:
                continue
            seen.add(key)
            rows.append(table_row(GROUP_LABELS.get(c["group"], c["group"]), Fact(**c["fact"]), c["prompt"],
                                  c["answer"], c["before"], c["after"]))
    return rows
