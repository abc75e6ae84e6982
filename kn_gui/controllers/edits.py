"""Knowledge edits: planned, measured and applied as model-edit commands of the session's one undo history
(kn_core.history.History, whose MODEL lane is the loaded model's kn_core.edit_stack.EditStack). An edit's
evaluation report travels with its history entry and is saved with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from PySide6.QtCore import QObject, Signal

from kn_core.edit_stack import ModelEdit
from kn_core.facts import Fact
from kn_core.history import MODEL, History

from ..commands import factset_change, sets_change
from ..session import Session, fact_label
from ..worker import JobRunner
from . import UserError

GROUP_LABELS = {"fact": "fact", "held-out": "held-out template", "relation": "same relation",
                "other relations": "other relations", "portability": "new object's facts"}
NEW_OBJECT_GROUPS = {"fact": "new object", "held-out": "held-out new object"}  # an update's o' rows, aligned


@dataclass(frozen=True)
class EditEvaluated:
    command: ModelEdit
    report: dict


@dataclass(frozen=True)
class EditFailed:
    message: str


@dataclass(frozen=True)
class DegeneracyTested:
    result: dict  # kn_core.degeneracy.degeneracy_test
    fact: str
    edits_in_force: int


@dataclass(frozen=True)
class HistoryRestored:
    applied: int
    total: int


class EditsController(QObject):
    event = Signal(object)

    def __init__(self, session: Session, runner: JobRunner, history: History, parent=None):
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.history = history
        self.edit_stack = None  # kn_core.edit_stack.EditStack of the loaded model: the MODEL lane of `history`
        self.pending = None  # (state, sha256) of an opened project's edits, waiting for their model

    # ----------------------------------------------------------------------------------------- model
    def set_model(self, lm) -> None:
        """A new model: the old model's edits leave the history (reverted; an unsaved change if they were saved),
        the new model's EditStack is the history's MODEL lane."""
        from kn_core.edit_stack import EditStack

        self.history.clear(MODEL)
        self.edit_stack = EditStack(lm, self.history)

    def active_descriptions(self) -> list[str]:
        return [e.describe() for e in self.edit_stack.active_edits()] if self.edit_stack is not None else []

    def commands(self) -> list[ModelEdit]:
        return self.edit_stack.entries if self.edit_stack is not None else []

    def push_factset(self, text: str, factset):
        self.history.push(factset_change(self.session, factset, text))

    def push_sets(self, text: str, sets: dict):
        """The project's neuron sets after a user's save, rename or delete, as one undoable change."""
        self.history.push(sets_change(self.session, text, sets))

    # ----------------------------------------------------------------------------------------- applying
    def request(self, request: dict, fact: Fact | None, neurons: list):
        """The kn_core.edit_plan.EditRequest of a request from the Edits panel (EditPlanError: what to change)."""
        from kn_core.edit_plan import EditRequest

        kind = request["kind"].split()[0].lower()
        options = {"suppress": ("scope", "to"), "amplify": ("factor", "scope"),
                   "update": ("new_object", "lambda1", "lambda2", "strength"), "erase": ("k", "fill")}[kind]
        return EditRequest(kind, tuple(neurons), fact, allow_fewer=True,
                           neuron_templates=self._neuron_templates(kind, fact),
                           causal_templates=self._causal_templates(kind, fact),
                           **{name: request[name] for name in options if name in request})

    def _runs_of(self, kind: str, fact: Fact | None) -> list:
        """The runs that found the neurons: the fact's run (erase: the relation's runs)."""
        if fact is None:
            return []
        return [r for r in self.session.relation_runs(fact.relation) if kind == "erase" or r.fact == fact]

    def _neuron_templates(self, kind: str, fact: Fact | None) -> tuple[str, ...] | None:
        """The templates whose prompts found the neurons, so that the fact's other templates measure generality;
        None when no run of the fact says so."""
        runs = self._runs_of(kind, fact)
        if not runs:
            return None
        return tuple(dict.fromkeys(p.template for r in runs for p in r.prompts[: len(r.scores)]))

    def _causal_templates(self, kind: str, fact: Fact | None) -> str:
        """How the evaluation prompts are rendered: as the runs that found the neurons rendered theirs (their
        params' causal_templates); the window's choice when no run says; prefix (every template) when runs of
        an erased relation disagree."""
        chosen = {r.params.get("causal_templates") for r in self._runs_of(kind, fact)} - {None}
        if not chosen:
            return self.session.causal_templates
        return chosen.pop() if len(chosen) == 1 else "prefix"

    def planner(self, edit_request):
        """A function of a task returning the edit plan of an EditRequest on the loaded model, its inputs read from
        the session now (it may run on the worker: a calibrated update runs the model). Erase takes the k most
        frequent neurons there are and says in the report when there were fewer."""
        from kn_core.edit_plan import plan_edit

        s, fact = self.session, edit_request.fact
        runs = s.relation_runs(fact.relation) if fact is not None else []
        lm, factset, stats, sets = s.lm, s.factset, s.activation_stats, {r.fact: s.refined(r) for r in runs}
        return lambda task=None: plan_edit(lm, factset, edit_request, relation_neuron_sets=sets,
                                           activation_stats=stats, task=task)

    def apply(self, request: dict, fact: Fact | None, neurons: list):
        """Measures the plan's evaluation prompts, applies the edit (one undoable command), measures again, and
        sends EditEvaluated with the before/after report. Raises UserError before any work when the request is
        bad."""
        if self.session.lm is None:
            raise UserError("No model loaded", "Load a model first: Model panel \u2192 Load model (Ctrl+L). The "
                            "embedded default works offline.")
        lm = self.session.lm
        if request["kind"] == "Degeneracy":
            return self.test_degeneracy(request, fact, neurons)
        try:
            edit_request = self.request(request, fact, neurons)
            calibrated = edit_request.kind == "update" and edit_request.strength == "calibrated"
            planner = self.planner(edit_request)
            # a calibrated update's plan runs the model: its request is first checked as a paper update (no model
            # run), so a bad request is refused at once with the engine's one-line message
            plan = self.planner(replace(edit_request, strength="paper"))() if calibrated else planner()
        except ValueError as exc:  # EditPlanError: one line naming the problem and the fix
            raise UserError("Cannot apply the edit", f"{exc}.") from exc
        scoring = scoring_of(request, lm, edit_request.kind)
        if calibrated:  # the line search evaluates the model several times: on the worker
            self.runner.submit("Calibrating the update", planner,
                               on_done=lambda result: self._measure(lm, result, scoring))
        else:
            self._measure(lm, plan, scoring)

    def test_degeneracy(self, request: dict, fact: Fact | None, neurons: list):
        """Runs kn_core.degeneracy on the worker (cancelable) for the fact's prompts and the chosen neurons, on the
        model as it is now (edits in force included), and sends DegeneracyTested. Bad requests: UserError first."""
        from kn_core.degeneracy import DegeneracyParams, degeneracy_test
        from kn_core.edits import check_neurons

        from ..session import fact_key

        s, lm = self.session, self.session.lm
        if fact is None:
            raise UserError("No fact chosen", "Select a fact in the Facts panel: the test runs on its prompts.")
        prompts, _ = s.prompts_for(fact)
        try:
            if not neurons:
                raise ValueError("no neurons chosen: select neurons in the map or choose a neuron set")
            check_neurons(lm, neurons)
            if not prompts:
                raise ValueError(f"no template of {fact.relation} renders {fact_label(fact)} for this model")
            params = DegeneracyParams(criterion=request["criterion"], removed_below=float(request["removed_below"]),
                                      max_neurons=int(request["max_neurons"]))
        except ValueError as exc:
            raise UserError("Cannot test degeneracy", f"{exc}.") from exc
        run = s.runs.get(fact_key(fact))
        scores = run.mean_scores() if run is not None and run.scores else None
        exclude, label, in_force = s.excluded(), fact_label(fact), len(self.active_descriptions())
        self.runner.submit("Degeneracy test", lambda task: degeneracy_test(
            lm, prompts, neurons, params, scores=scores, exclude=exclude, task=task),
            on_done=lambda result: self.event.emit(DegeneracyTested(result, label, in_force)))

    def _measure(self, lm, plan, scoring: dict | None = None):
        """Measures the plan's prompts (and, in the same job, under the random-neuron control, with both edits'
        sizes, and the chosen protocol's scores: `scoring_of`), applies its edit as one undoable command,
        measures again, reports with the metrics."""
        from kn_core.edit_plan import measure_plan

        scoring = scoring or {"protocol": "kn", "eval": "forced"}
        evaluation = scoring["eval"]

        def before_done(measured):
            before = measured["before"]
            command = ModelEdit(lm, plan.edit)
            try:  # applied on the real model (the worker is idle now); one that cannot be leaves no trace
                self.history.push(command)
            except Exception as exc:  # noqa: BLE001
                self.event.emit(EditFailed(f"{exc}."))
                return
            self.runner.submit("Evaluating the edit (after)",
                               lambda task: measure_plan(lm, plan, task, evaluation=evaluation),
                               on_done=lambda after: after_done(command, measured, after))

        def after_done(command, measured, after):
            from kn_core.metrics import edit_metrics

            info = lm.describe()
            model = {"name": info.get("name") or lm.source, "sha256": lm.sha256}
            metrics = edit_metrics(plan, measured["before"], after, control_after=measured["control_after"],
                                   size=measured["size"], control_size=measured["control_size"])
            report = edit_report(plan, measured["before"], after, model, metrics)
            # named as `kn edit --json` names them: the protocol, how "correct" was judged, the protocol's scores
            report.update(scoring, **({"protocol_scores": measured["protocol"]} if "protocol" in measured else {}))
            command.report = report
            self.event.emit(EditEvaluated(command, command.report))

        self.runner.submit("Evaluating the edit (before) and its random control",
                           lambda task: measure_with_protocol(lm, plan, task, scoring), on_done=before_done)

    def report_shown(self) -> dict | None:
        """The report of the newest edit in force (what the before/after table shows)."""
        command = self.history.next_undo(MODEL)
        return command.report if command is not None else None

    # ----------------------------------------------------------------------------------------- saving
    def saved_state(self) -> tuple[dict | None, dict | None]:
        """(history with each entry's report, the un-edited model it applies to) for the project file."""
        if self.edit_stack is not None and len(self.edit_stack):
            return self.edit_stack.to_dict(), self.session.lm.describe()
        if self.pending:
            return self.pending[0], {"sha256": self.pending[1], "source": "?"}
        return None, None

    def restore(self, state: dict, sha: str | None) -> HistoryRestored | None:
        """Re-applies an opened project's edits to the loaded model (or keeps them pending until one is loaded).
        Raises UserError when they were made on other weights or cannot be applied."""
        self.pending = (state, sha) if state and state.get("entries") else None
        lm = self.session.lm
        if self.pending is None or lm is None:
            return None
        if sha is not None and sha != lm.sha256:
            raise UserError("Saved edits not applied", "The project's edits were made on another model (weights "
                            f"sha256 {sha[:12]}\u2026, loaded {lm.sha256[:12]}\u2026). They are kept in the file; load "
                            "the model they were made on to re-apply them.")
        self.pending = None
        try:  # all or nothing; the MODEL lane is empty here (a project was just opened or a model loaded)
            self.edit_stack.load_dict(state)
        except ValueError as exc:
            raise UserError("Saved edits not applied", f"{exc}. The history was left out; the model is unedited.") \
                from exc
        return HistoryRestored(self.edit_stack.cursor, len(self.edit_stack))
        return HistoryRestored(cursor, len(entries))


def scoring_of(request: dict, lm, kind: str) -> dict:
    """{"protocol", "eval"} of a request from the Edits panel (`kn edit --protocol/--eval`); a protocol the edit
    cannot be scored by is refused here, before any work, as the CLI refuses it."""
    from kn_core.evaluation import EVALUATIONS
    from kn_core.protocols import PROTOCOLS

    protocol, evaluation = request.get("protocol") or "kn", request.get("eval") or "forced"
    if protocol not in PROTOCOLS or evaluation not in EVALUATIONS:
        raise UserError("Cannot score the edit", f"unknown protocol {protocol!r} or evaluation {evaluation!r}; "
                        f"choose one of {', '.join(PROTOCOLS)} and one of {', '.join(EVALUATIONS)}.")
    if protocol != "kn" and kind == "erase":
        raise UserError("Cannot score the edit", f"the {protocol} protocol scores an edit of one fact (suppress, "
                        "amplify, update), as `kn edit --protocol` does; score an erase with the kn protocol.")
    if protocol != "kn" and lm.kind != "causal":
        raise UserError("Cannot score the edit", f"the {protocol} protocol scores an answer continuing its prompt "
                        "(EasyEdit, ROME and MQuAKE evaluate causal models); this model is masked: choose kn.")
    return {"protocol": protocol, "eval": evaluation}


def measure_with_protocol(lm, plan, task, scoring: dict) -> dict:
    """The plan before the edit and under its random control (`metrics.measure_edit`), then the protocol's
    pre/post/control scores of the plan's fact (bench.protocol_scores on protocols.case_from_plan, as `kn edit
    --protocol`; teacher-forced as there)."""
    from kn_core.metrics import measure_edit

    if scoring["protocol"] == "kn":
        return measure_edit(lm, plan, task, evaluation=scoring["eval"], states=("before", "control_after"))
    from kn_core.bench import protocol_scores
    from kn_core.protocols import case_from_plan

    measured = measure_edit(lm, plan, task.slice(0.0, 0.8), evaluation=scoring["eval"],
                            states=("before", "control_after"))
    task.progress(0.8, f"scoring the edit by the {scoring['protocol']} protocol")
    measured["protocol"] = protocol_scores(lm, case_from_plan(plan), scoring["protocol"], plan.edit, plan.control)
    return measured


def table_row(group: str, fact: Fact, prompt: str, answer: str, before: dict, after: dict) -> dict:
    """One prompt's row of the Edits panel's before/after table (a single edit's, a batch's control facts) from its
    measurements before and after the edit (`evaluation.answer_probabilities` rows: prob, top1_token, top1_id)."""
    return {"group": group, "fact": fact_label(fact), "prompt": prompt, "answer": answer, "before": before["prob"],
            "after": after["prob"], "top_before": before["top1_token"], "top_after": after["top1_token"],
            "top_before_id": before["top1_id"], "top_after_id": after["top1_id"]}


def edit_report(plan, before: dict, after: dict, model: dict, metrics: dict | None = None) -> dict:
    """The before/after table of an edit: one row per evaluated prompt (an update's rows also carry the new
    object's probability), the engine's per-group summary, the field's metrics beside the random control
    (`metrics`, kn_core.metrics) and what the plan left out, with reasons."""
    from kn_core.edit_plan import summarize_plan

    request, edit = plan.request, plan.edit
    rows = []
    for group, label in GROUP_LABELS.items():
        new_before = before.get(NEW_OBJECT_GROUPS.get(group, ""), [])
        new_after = after.get(NEW_OBJECT_GROUPS.get(group, ""), [])
        for i, (p, b, a) in enumerate(zip(plan.prompts.get(group, []), before.get(group, []), after.get(group, []))):
            rows.append(table_row(label, p.fact, p.text, p.answer, b, a))
            if i < min(len(new_before), len(new_after)):
                rows[-1]["new_before"], rows[-1]["new_after"] = new_before[i]["prob"], new_after[i]["prob"]
    if request.kind == "erase":
        title = f"{edit.describe()} ({request.fact.relation})"  # describe() already starts with "Erase"
    else:
        title = f"{edit.describe()} \u2014 evaluated on {fact_label(request.fact)}"
    return {"title": title, "rows": rows, "edit": edit.to_dict(), "summary": summarize_plan(plan, before, after),
            "skipped": [list(item) for item in plan.skipped], "model": model,
            "requested": request.k if request.kind == "erase" else None,
            "relation": request.relation or (request.fact.relation if request.fact is not None else None),
            "new_object": request.new_object if request.kind == "update" else None,
            "request": {"to": request.to, "strength": request.strength}, "calibration": plan.calibration,
            **({"metrics": metrics} if metrics is not None else {})}
