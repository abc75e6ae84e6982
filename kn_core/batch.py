"""Batch and sequential editing: many edit requests -> one undoable edit (`edits.Batch`), measured.

Requests come one per line of a JSON Lines file (docs: `kn edit batch --help`), in one of two forms:

* EasyEdit's: ``{"prompt": "The capital of France is", "subject": "France", "ground_truth": "Paris",
  "target_new": "Berlin", "rephrase_prompts": [...], "locality_prompts": [{"prompt": ..., "ground_truth": ...}]}``.
  The prompt (with the subject replaced by [X] and [Y] after it) and each rephrase become the templates of a
  relation of their own; the locality prompts are measured as a group of their own.
* ours: ``{"relation": "P36", "subject": "France", "new_object": "Berlin"}`` against a fact set.

Either form may say ``"kind"`` (suppress, amplify or update; the batch's default otherwise) and give explicit
``"neurons": [[layer, index], ...]``. `parse_requests` names every bad line with its number and reason before
any model work; `check_requests` adds what only the loaded model can tell (neurons outside it, prompts that do
not render), still before any forward pass.

Modes (`run_batch`):
* compound: every request is planned on the unedited model, all edits are applied as one, and every request is
  measured before and after, beside the batch of their random-neuron controls;
* sequential: request k is planned on the model edited by requests 1..k-1, applied, and measured (its control
  is its random-neuron edit in its place); after each step the earlier requests' first reliability prompts are
  measured again, so forgetting shows.
Both modes end with the same kind of edit: `Batch(edits)`, which applied in order is the model they leave.
Nothing here changes the model after it returns: the caller pushes `result.edit` on its `EditStack`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import edits as E
from .facts import Fact, FactSet, Prompt, Relation, render_prompts
from .tasks import Cancelled, as_task
from .validation import ValidationError, check_fraction, check_int, check_text

Neuron = tuple[int, int]
BATCH_KINDS = ("suppress", "amplify", "update")
MODES = ("compound", "sequential")
EASYEDIT_FIELDS = ("prompt", "subject", "ground_truth", "target_new", "rephrase_prompts", "locality_prompts",
                   "neurons", "kind")
OUR_FIELDS = ("relation", "subject", "new_object", "neurons", "kind")
_LISTED = 20  # bad lines named in the one-line refusal; --skip-bad lists every one


class BatchError(ValueError):
    """Bad requests; the message lists each bad line with its reason (one line per bad request)."""


@dataclass(frozen=True)
class BatchRequest:
    line: int
    kind: str
    fact: Fact
    relation: Relation  # EasyEdit form: the request's own relation (its prompt and rephrases)
    new_object: str | None = None
    neurons: tuple[Neuron, ...] | None = None  # explicit; None: from the project or attribution
    locality: tuple[tuple[str, str], ...] = ()  # (prompt, ground truth)
    main_template: str | None = None  # EasyEdit form: the prompt's own template (the rest are rephrases)
    left_out: tuple[tuple[str, str], ...] = ()  # parts of the line not used, with the reason

    def label(self) -> str:
        tail = f" -> {self.new_object}" if self.new_object else ""
        return f"line {self.line}: {self.kind} {self.fact.relation} {self.fact.subject} ({self.fact.object}{tail})"


@dataclass
class ParsedRequests:
    requests: list[BatchRequest]
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    factset: FactSet | None = None  # the given fact set plus the EasyEdit requests' relations and facts

    def refuse_or_skip(self, skip_bad: bool) -> None:
        """BatchError naming the bad lines (the first _LISTED of them, with their reasons) in one line unless
        `skip_bad` (then they stay listed in `bad`)."""
        if self.bad and not skip_bad:
            named = "; ".join(f"line {n}: {why}" for n, why in self.bad[:_LISTED])
            more = f"; and {len(self.bad) - _LISTED} more" if len(self.bad) > _LISTED else ""
            raise BatchError(f"{len(self.bad)} bad request(s); fix them, or skip them explicitly (--skip-bad): "
                             f"{named}{more}")
        if not self.requests:
            raise BatchError("no usable requests" + (f" ({len(self.bad)} bad)" if self.bad else " (empty file)"))


# --------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------

def parse_requests(source, factset: FactSet | None = None, default_kind: str = "update",
                   causal: bool = True) -> ParsedRequests:
    """Reads requests from a path or an iterable of lines. Every line is checked; bad ones are collected as
    (line number, reason), never raised one at a time. `causal`: EasyEdit prompts are continued ([Y] after
    the prompt); a masked model gets the same template, with the mask at the end."""
    if default_kind not in BATCH_KINDS:
        raise BatchError(f"unknown edit kind {default_kind!r}; use one of {', '.join(BATCH_KINDS)}")
    lines = _lines(source)
    requests, bad = [], []
    relations: dict[str, Relation] = {}
    for number, raw in lines:
        try:
            request = _parse_line(number, raw, factset, default_kind)
        except _BadLine as exc:
            bad.append((number, str(exc)))
            continue
        if request.relation.id not in (factset.relations if factset is not None else {}):
            relations[request.relation.id] = request.relation
        requests.append(request)
    combined = _combined_factset(factset, relations, requests)
    return ParsedRequests(requests, bad, combined)


class _BadLine(Exception):
    pass


def _lines(source) -> list[tuple[int, str]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BatchError(f"cannot read the requests file {str(path)!r}: {getattr(exc, 'strerror', None) or exc}")
        source = text.splitlines()
    elif isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise BatchError(f"requests must come from a file path or lines of text, not {type(source).__name__}")
    lines = list(source)
    if not all(isinstance(raw, str) for raw in lines):
        raise BatchError("requests given as lines must be lines of text (str), one JSON object each")
    return [(i, raw) for i, raw in enumerate(lines, 1) if raw.strip()]


def _parse_line(number: int, raw: str, factset: FactSet | None, default_kind: str) -> BatchRequest:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _BadLine("the JSON is nested too deeply to be a request") from None
    if not isinstance(record, dict):
        raise _BadLine("expected a JSON object ({...}) on each line")
    easyedit = "prompt" in record
    known = EASYEDIT_FIELDS if easyedit else OUR_FIELDS
    unknown = sorted(set(record) - set(known))
    if unknown:
        form = "EasyEdit form (it has 'prompt')" if easyedit else "relation/subject form (no 'prompt')"
        raise _BadLine(f"unknown field(s) {', '.join(map(repr, unknown))} for the {form}; known: {', '.join(known)}")
    kind = record.get("kind", default_kind)
    if kind not in BATCH_KINDS:
        raise _BadLine(f"kind {kind!r} is not a batch edit kind; use one of {', '.join(BATCH_KINDS)} (erase acts "
                       "on a whole relation: kn edit erase)")
    neurons = _neurons(record["neurons"]) if "neurons" in record else None
    try:
        if easyedit:
            return _easyedit(number, record, kind, neurons)
        return _ours(record, kind, neurons, factset, number)
    except ValueError as exc:  # a template or fact the data model refuses
        raise _BadLine(str(exc)) from None


def _text(record: dict, key: str, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _BadLine(f"{key!r} must be non-empty text" + ("" if key in record else " and is missing"))
    return _valid_text(key, value).strip()


def _valid_text(key: str, value: str) -> str:
    """Text a tokenizer takes (valid Unicode, no NULs), else the line is bad."""
    try:
        return check_text(key, value, allow_blank=True)
    except ValidationError as exc:
        raise _BadLine(str(exc)) from None


def _neurons(raw) -> tuple[Neuron, ...]:
    ok = isinstance(raw, list) and raw and all(
        isinstance(n, list) and len(n) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in n)
        for n in raw)
    if not ok:
        raise _BadLine("'neurons' must be a non-empty list of [layer, index] pairs of integers >= 0")
    return E._norm_neurons(raw)


def _new_object(record: dict, key: str, kind: str, current: str) -> str | None:
    new = _text(record, key, required=kind == "update")
    if kind == "update" and new == current:
        raise _BadLine(f"{key!r} equals the current object {current!r}; an update needs another object")
    if kind != "update" and new is not None:
        raise _BadLine(f"{key!r} is only used by update, not {kind}")
    return new


def _easyedit(number: int, record: dict, kind: str, neurons) -> BatchRequest:
    prompt, subject = _text(record, "prompt"), _text(record, "subject")
    truth = _text(record, "ground_truth")
    if "[X]" in prompt or "[Y]" in prompt:
        raise _BadLine("the prompt contains [X] or [Y]; EasyEdit prompts are plain text")
    if subject not in prompt:
        raise _BadLine(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    new = _new_object(record, "target_new", kind, truth)
    main = prompt.replace(subject, "[X]", 1) + " [Y]"
    templates, left_out = [main], []
    rephrases = record.get("rephrase_prompts", [])
    if isinstance(rephrases, str):
        rephrases = [rephrases]
    if not isinstance(rephrases, list) or not all(isinstance(r, str) for r in rephrases):
        raise _BadLine("'rephrase_prompts' must be a list of texts")
    for r in rephrases:
        r = _valid_text("rephrase_prompts", r).strip()
        if subject not in r or "[X]" in r or "[Y]" in r:
            left_out.append((f"rephrase {r!r}", "does not name the subject, so it is not a paraphrase of the fact"
                             if subject not in r else "contains [X] or [Y]"))
            continue
        template = r.replace(subject, "[X]", 1) + " [Y]"
        if template not in templates:
            templates.append(template)
    locality = _locality(record.get("locality_prompts", []))
    digest = hashlib.sha1(json.dumps([templates, subject, truth]).encode()).hexdigest()[:12]
    relation = Relation(f"easyedit-{digest}", f"EasyEdit request: {prompt}", tuple(templates))
    return BatchRequest(number, kind, Fact(relation.id, subject, truth), relation, new, neurons, locality, main,
                        tuple(left_out))


def _locality(raw) -> tuple[tuple[str, str], ...]:
    if isinstance(raw, dict):  # EasyEdit's {"prompt": [...], "ground_truth": [...]}
        prompts, truths = raw.get("prompt"), raw.get("ground_truth")
        if isinstance(prompts, str) and isinstance(truths, str):
            prompts, truths = [prompts], [truths]
        if not (isinstance(prompts, list) and isinstance(truths, list) and len(prompts) == len(truths)):
            raise _BadLine("'locality_prompts' as an object needs lists 'prompt' and 'ground_truth' of equal length")
        raw = [{"prompt": p, "ground_truth": t} for p, t in zip(prompts, truths)]
    if not isinstance(raw, list):
        raise _BadLine("'locality_prompts' must be a list of {\"prompt\": ..., \"ground_truth\": ...}")
    out = []
    for item in raw:
        if not (isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"].strip()
                and isinstance(item.get("ground_truth"), str) and item["ground_truth"].strip()):
            raise _BadLine("each locality prompt must be {\"prompt\": text, \"ground_truth\": text} (the answer to "
                           "keep); a bare prompt has no answer to measure")
        out.append((_valid_text("locality prompt", item["prompt"]).strip(),
                    _valid_text("locality ground_truth", item["ground_truth"]).strip()))
    return tuple(out)


def _ours(record: dict, kind: str, neurons, factset: FactSet | None, number: int) -> BatchRequest:
    rid, subject = _text(record, "relation"), _text(record, "subject")
    if factset is None:
        raise _BadLine("a relation/subject request needs a fact set (--facts)")
    if rid not in factset.relations:
        raise _BadLine(f"no relation {rid!r} in fact set {factset.name!r}")
    matches = [f for f in factset.facts_of(rid) if f.subject.lower() == subject.lower()]
    if not matches:
        raise _BadLine(f"no fact of {rid} with subject {subject!r} in fact set {factset.name!r}")
    fact = matches[0]
    return BatchRequest(number, kind, fact, factset.relation(rid), _new_object(record, "new_object", kind, fact.object),
                        neurons)


def _combined_factset(factset: FactSet | None, relations: dict[str, Relation], requests) -> FactSet:
    facts = list(factset.facts) if factset is not None else []
    seen = set(facts)
    for r in requests:
        if r.fact not in seen:
            seen.add(r.fact)
            facts.append(r.fact)
    base = dict(factset.relations) if factset is not None else {}
    return FactSet(factset.name if factset is not None else "batch", {**base, **relations}, facts)


def check_requests(lm, parsed: ParsedRequests) -> None:
    """Moves to `parsed.bad` the requests the loaded model cannot take (explicit neurons outside it, no
    renderable prompt, a prompt longer than the model's positions); tokenizing only, no forward pass."""
    from .encoding import encode_prompt

    keep = []
    for r in parsed.requests:
        try:
            if r.neurons is not None:
                E.check_neurons(lm, r.neurons)
            prompts, skipped = render_prompts(r.fact, r.relation, lm.tokenizer, lm.kind)
            if not prompts:
                reasons = "; ".join(dict.fromkeys(s.reason for s in skipped)) or "no templates"
                raise ValueError(f"no prompt renders for this {lm.kind} model: {reasons}")
            for prompt in prompts + _locality_prompts(lm, r.locality, []):
                encode_prompt(lm, prompt.text, prompt.answer_ids)  # what measuring will encode, checked now
        except ValueError as exc:
            parsed.bad.append((r.line, str(exc).splitlines()[0]))
            continue
        keep.append(r)
    parsed.bad.sort()
    parsed.requests = keep


# --------------------------------------------------------------------------------------------------------
# Neurons
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NeuronSource:
    t: float = 0.2
    p: float = 0.7
    params: object = None  # attribution.AttributionParams; None: the defaults

    def __post_init__(self):  # refused here, not after the first request's attribution
        check_fraction("t", self.t)
        check_fraction("p", self.p)


def resolve_neurons(lm, parsed: ParsedRequests, source: NeuronSource = NeuronSource(), project=None,
                    task=None) -> dict[int, tuple[tuple[Neuron, ...], str, tuple[str, ...] | None]]:
    """{line: (neurons, where they came from, the templates that found them)} for every request: explicit
    neurons; else the project's latest refined set of the fact made on these weights (same sha256); else
    attribution of the fact's prompts, whose refined set is stored in the project (so a rerun reuses it).

    The templates decide generality (docs/METRICS.md: measured on templates that did not find the neurons):
    attribution used every template of the fact (so none is held out); explicit neurons of an EasyEdit request
    count as found on its prompt, so its rephrases are held out, as EasyEdit measures generality; other
    explicit or stored neurons: not known (None)."""
    from .attribution import AttributionParams, attribute_fact
    from .neurons import refined_neurons

    task = as_task(task)
    params = source.params or AttributionParams()
    stored = _stored_sets(project, lm)
    out: dict[int, tuple[tuple[Neuron, ...], str]] = {}
    todo = [r for r in parsed.requests if r.neurons is None]
    done = 0
    for r in parsed.requests:
        task.check()
        if r.neurons is not None:
            out[r.line] = (r.neurons, "explicit", (r.main_template,) if r.main_template else None)
            continue
        found = stored(r.fact)
        if found is not None:
            out[r.line] = (found[1], f"project neuron set #{found[0]}", None)
        else:
            prompts, _ = render_prompts(r.fact, r.relation, lm.tokenizer, lm.kind)
            part = task.slice(done / len(todo), (done + 1) / len(todo))
            scores = attribute_fact(lm, prompts, params, task=part)
            neurons = tuple(refined_neurons([s.scores for s in scores], source.t, source.p))
            how = f"attribution ({params.method}, {params.steps} steps, t={source.t}, p={source.p}, {len(prompts)} prompts)"
            if project is not None:
                project.import_factset(FactSet("batch", {r.relation.id: r.relation}, [r.fact]))
                set_id = project.add_neuron_set("refined", neurons, fact=r.fact, model=lm, note="kn edit batch",
                                                params={"t": source.t, "p": source.p, **params.to_dict()})
                how += f", stored as project neuron set #{set_id}"
            out[r.line] = (neurons, how, tuple(p.template for p in prompts))
        done += 1
        task.progress(done / max(len(todo), 1), f"neurons of {done}/{len(todo)} requests")
    return out


def _stored_sets(project, lm):
    if project is None:
        return lambda fact: None
    model_ids = {m.id for m in project.list_models() if m.sha256 == lm.sha256}
    by_fact: dict[tuple, tuple[int, tuple[Neuron, ...]]] = {}
    facts = {f.id: (f.relation, f.subject, f.object) for f in project.list_facts()}
    for s in project.list_neuron_sets(kind="refined"):  # in id order: the latest set of a fact wins
        if s.model_id in model_ids and s.fact_id in facts:
            by_fact[facts[s.fact_id]] = (s.id, s.neurons)
    return lambda fact: by_fact.get((fact.relation, fact.subject, fact.object))


# --------------------------------------------------------------------------------------------------------
# Running a batch
# --------------------------------------------------------------------------------------------------------

@dataclass
class BatchResult:
    edit: E.Batch | None  # None when every request was left out
    control: E.Batch | None  # the requests' random-neuron controls, as one batch
    report: dict  # plain JSON: per request (and per step in sequential mode), the summary, what was left out


class _PlanningFacts:
    """The fact set as `plan_edit` sees it for one request: its control facts are never facts that this batch
    edits (in a compound batch they are edited too, so they would not control anything)."""

    def __init__(self, full: FactSet, edited: set[Fact]):
        self.name, self.relations = full.name, full.relations
        self._rest = [f for f in full.facts if f not in edited]
        self.facts: list[Fact] = self._rest

    def relation(self, rid: str) -> Relation:
        return self.relations[rid]

    def facts_of(self, rid: str) -> list[Fact]:
        return [f for f in self.facts if f.relation == rid]

    def for_request(self, fact: Fact) -> "_PlanningFacts":
        view = object.__new__(_PlanningFacts)
        view.name, view.relations, view._rest = self.name, self.relations, self._rest
        view.facts = self._rest + [fact]
        return view


def run_batch(lm, parsed: ParsedRequests, neurons: dict, mode: str = "compound",
              *, seed: int = 0, control_facts: int = 4, forgetting_prompts: int = 1, relation_exclusion: bool = True,
              max_prompts: int | None = None, options: dict | None = None, activation_stats=None,
              measure_sizes: bool = True, label: str = "", task=None) -> BatchResult:
    """Plans, applies and measures every request of `parsed` (see the module notes for the two modes) and
    leaves the model as it found it, also when cancelled (`tasks.Cancelled`) or on an error. Requests that
    cannot be planned (e.g. no neurons, an update no template can render) are left out and listed in
    report["left_out"] with their reason, as are the bad lines of `parsed`. `neurons`: `resolve_neurons`'s
    answer (a request's entry may omit the templates). `max_prompts`: measure at most this many prompts of each
    group of each request (the first ones, in template order; None: all), stated in the report, for batches
    too large to measure every template on this machine. `options`: EditRequest fields shared by every request
    (e.g. scope, factor, lambda1, lambda2, strength, to); `activation_stats`: for a suppress to the mean.
    `measure_sizes=False` leaves ‖Δa‖/‖ΔW‖ unmeasured (an activation edit's size costs a forward pass per request;
    the metrics then say "not measured")."""
    if mode not in MODES:
        raise BatchError(f"unknown mode {mode!r}; use compound or sequential")
    _check_settings(seed, control_facts, forgetting_prompts, max_prompts, options)
    task = as_task(task)
    left_out = [{"line": n, "reason": why} for n, why in parsed.bad]
    planning = _PlanningFacts(parsed.factset, {r.fact for r in parsed.requests})
    settings = dict(seed=seed, control_facts=control_facts, max_prompts=max_prompts, options=dict(options or {}),
                    stats=activation_stats, sizes=measure_sizes,
                    relation_sets=_relation_sets(parsed.requests, neurons) if relation_exclusion else {})
    runner = _compound if mode == "compound" else _sequential
    entries, steps = runner(lm, parsed.requests, neurons, planning, settings, left_out, forgetting_prompts, task)
    left_out.sort(key=lambda x: x["line"])
    edit = E.Batch(tuple(e["plan"].edit for e in entries), label) if entries else None
    control = E.Batch(tuple(e["plan"].control for e in entries), f"controls of {label}".strip()) if entries else None
    report = {"mode": mode, "requests_read": len(parsed.requests) + len(parsed.bad), "applied": len(entries),
              "max_prompts_per_group": max_prompts, "control_facts": control_facts,
              "left_out": left_out, "requests": [_request_report(e) for e in entries],
              "summary": _summary(entries, steps), "metrics_definition": METRICS_NOTE}
    if steps is not None:
        report["steps"] = steps
    return BatchResult(edit, control, report)


METRICS_NOTE = ("per request: kn_core.metrics.edit_metrics (docs/METRICS.md) of its edit and of its random-neuron "
                "control; summary: their means over the requests where a metric applies; 'holds' (sequential "
                "forgetting): update: o' greedy, suppress: the old answer no longer greedy, amplify: p above its "
                "value before the batch, on the request's first forgetting_prompts reliability prompts")


def _check_settings(seed, control_facts, forgetting_prompts, max_prompts, options) -> None:
    """run_batch's settings, refused in one line before any request is planned."""
    from dataclasses import fields

    from .edit_plan import EditRequest

    check_int("seed", seed, 0)
    check_int("control_facts", control_facts, 0)
    check_int("forgetting_prompts", forgetting_prompts, 1)
    if max_prompts is not None:
        check_int("max_prompts", max_prompts, 1, hint=" (or None for every prompt)")
    per_request = {"kind", "neurons", "fact", "new_object", "neuron_templates", "seed", "control_facts",
                   "control_prompts_per_fact"}  # set by run_batch itself
    shared = {f.name for f in fields(EditRequest)} - per_request
    unknown = sorted(set(options or {}) - shared)
    if unknown:
        raise BatchError(f"unknown option(s) {', '.join(map(repr, unknown))}; options are EditRequest fields "
                         f"shared by every request: {', '.join(sorted(shared))}")
    EditRequest("suppress", **(options or {}))  # their values (a NaN factor or lambda) fail here, not per request


def _relation_sets(requests, neurons) -> dict[str, dict[Fact, tuple[Neuron, ...]]]:
    out: dict[str, dict[Fact, tuple[Neuron, ...]]] = {}
    for r in requests:
        if r.line in neurons and neurons[r.line][0]:
            out.setdefault(r.fact.relation, {})[r.fact] = neurons[r.line][0]
    return out


def _plan(lm, planning: _PlanningFacts, r: BatchRequest, neurons, settings, left_out, task):
    """The request's EditPlan (groups split for EasyEdit's rephrases, plus its locality prompts), or None after
    listing why it was left out."""
    from .edit_plan import EditPlanError, EditRequest, plan_edit

    chosen, source, templates = (tuple(neurons.get(r.line, ())) + ((), "not resolved", None))[:3]
    if not chosen:
        left_out.append({"line": r.line, "reason": f"no neurons: {source} found none (give explicit neurons or "
                                                   "lower t or p)"})
        return None
    try:
        plan = plan_edit(lm, planning.for_request(r.fact),
                         EditRequest(r.kind, chosen, r.fact, new_object=r.new_object, seed=settings["seed"],
                                     control_facts=settings["control_facts"], control_prompts_per_fact=1,
                                     neuron_templates=templates, **settings["options"]),
                         settings["relation_sets"].get(r.fact.relation, {}), activation_stats=settings["stats"],
                         task=task)
    except EditPlanError as exc:
        left_out.append({"line": r.line, "reason": str(exc)})
        return None
    groups, skipped = dict(plan.prompts), list(plan.skipped) + list(r.left_out)
    if settings["max_prompts"] is not None:  # aligned groups (fact / new object) keep the same first prompts
        groups = {g: ps[: settings["max_prompts"]] for g, ps in groups.items()}
    if r.locality:
        groups["locality"] = _locality_prompts(lm, r.locality, skipped)
    return replace(plan, prompts=groups, skipped=skipped)


def _locality_prompts(lm, pairs, skipped) -> list[Prompt]:
    relation = Relation("locality", "locality prompt", ("[X] [Y]",))
    out = []
    for text, truth in pairs:
        prompts, left = render_prompts(Fact("locality", text, truth), relation, lm.tokenizer, lm.kind)
        out += prompts
        skipped.extend((f"locality prompt {text!r}", s.reason) for s in left)
    return out


MEASURE_CHUNK = 256  # prompts per answer_probabilities call: it holds every prompt's full-vocabulary log-probs


def _measure(lm, group_list: Sequence[dict[str, list[Prompt]]], task) -> list[dict[str, list[dict]]]:
    """answer_probabilities of every group of every plan, batched across plans, in chunks of MEASURE_CHUNK
    prompts so that memory does not grow with the number of requests."""
    from .evaluation import answer_probabilities

    flat = [p for groups in group_list for ps in groups.values() for p in ps]
    measured: list[dict] = []
    for start in range(0, len(flat), MEASURE_CHUNK):
        part = task.slice(start / len(flat), min(start + MEASURE_CHUNK, len(flat)) / len(flat))
        measured += answer_probabilities(lm, flat[start:start + MEASURE_CHUNK], task=part)
    rows = iter(measured)
    return [{g: [next(rows) for _ in ps] for g, ps in groups.items()} for groups in group_list]


def _metrics(lm, plan, before, after, control_after, sizes: bool = True) -> dict:
    """edit_metrics of the request (sizes measured on the model as it is: unedited, or before the step), and
    for EasyEdit locality prompts their own "locality_prompts" entry (kept top-1 and |Δp|, as locality)."""
    from .metrics import _kept, edit_metrics, edit_size, not_applicable

    prompts = plan.prompts.get("fact", [])
    out = edit_metrics(plan, before, after, control_after=control_after,
                       size=edit_size(lm, plan.edit, prompts) if sizes else None,
                       control_size=edit_size(lm, plan.control, prompts) if sizes else None)
    for side, rows in ((out, after), (out["control"], control_after)):
        given = before.get("locality") or []
        side["locality_prompts"] = (_kept(given, rows["locality"]) if given else
                                    not_applicable("the request gives no locality prompts"))
    return out


def _compound(lm, requests, neurons, planning, settings, left_out, forgetting_prompts, task):
    entries = []
    for i, r in enumerate(requests):
        task.check()
        plan = _plan(lm, planning, r, neurons, settings, left_out, None)
        if plan is not None:
            entries.append({"request": r, "plan": plan, "source": neurons[r.line][1]})
        task.progress(0.1 * (i + 1) / len(requests), f"planning {i + 1}/{len(requests)}")
    if not entries:
        return entries, None
    groups = [e["plan"].prompts for e in entries]
    before = _measure(lm, groups, task.slice(0.1, 0.4))
    after = _with(lm, E.Batch(tuple(e["plan"].edit for e in entries)), lambda: _measure(lm, groups, task.slice(0.4, 0.7)))
    control = _with(lm, E.Batch(tuple(e["plan"].control for e in entries)),
                    lambda: _measure(lm, groups, task.slice(0.7, 1.0)))
    for e, b, a, c in zip(entries, before, after, control):
        task.check()
        e["metrics"] = _metrics(lm, e["plan"], b, a, c, settings["sizes"])
    return entries, None


def _with(lm, edit, fn):
    handle = edit.apply(lm)
    try:
        return fn()
    finally:
        handle.revert()


def _sequential(lm, requests, neurons, planning, settings, left_out, forgetting_prompts, task):
    entries, steps, handles = [], [], []
    n = len(requests)
    try:
        for k, r in enumerate(requests):
            task.check()
            step = task.slice(k / n, (k + 1) / n)
            plan = _plan(lm, planning, r, neurons, settings, left_out, step.slice(0, 0.2))
            if plan is None:
                continue
            entry = {"request": r, "plan": plan, "source": neurons[r.line][1], "holds": []}
            (before,) = _measure(lm, [plan.prompts], step.slice(0.2, 0.4))
            (control,) = _with(lm, plan.control, lambda: _measure(lm, [plan.prompts], step.slice(0.4, 0.6)))
            handles.append(plan.edit.apply(lm))
            (after,) = _measure(lm, [plan.prompts], step.slice(0.6, 0.8))
            entry["metrics"] = _metrics(lm, plan, before, after, control, settings["sizes"])
            entry["probe"] = _probe(entry, before, forgetting_prompts)
            entries.append(entry)
            steps.append(_step_report(lm, entries, step.slice(0.8, 1.0)))
            task.progress((k + 1) / n, f"step {k + 1}/{n}")
    finally:
        for handle in reversed(handles):
            handle.revert()
    return entries, steps


def _probe(entry, before, count: int) -> dict:
    """The prompts re-measured after every later step, and what "the edit holds" means for them."""
    kind = entry["plan"].request.kind
    group = "new object" if kind == "update" else "fact"
    prompts = entry["plan"].prompts.get(group, [])[:count]
    return {"kind": kind, "prompts": prompts, "p_before": [row["prob"] for row in before.get(group, [])[:count]]}


def _holds(probe, rows) -> float:
    if not rows:
        return float("nan")
    if probe["kind"] == "update":
        ok = [row["correct"] for row in rows]
    elif probe["kind"] == "suppress":
        ok = [not row["correct"] for row in rows]
    else:
        ok = [row["prob"] > b for row, b in zip(rows, probe["p_before"])]
    return float(np.mean(ok))


def _step_report(lm, entries, task) -> dict:
    """After a sequential step: whether each edit so far still holds (the last is the one just applied)."""
    measured = _measure(lm, [{"probe": e["probe"]["prompts"]} for e in entries], task)
    holds = []
    for e, rows in zip(entries, measured):
        value = _holds(e["probe"], rows["probe"])
        e["holds"].append([len(entries), value])
        holds.append(value)
    earlier = [h for h in holds[:-1] if np.isfinite(h)]
    return {"step": len(entries), "line": entries[-1]["request"].line, "current_holds": holds[-1],
            "earlier_hold_rate": float(np.mean(earlier)) if earlier else None, "earlier_n": len(earlier)}


def _request_report(e) -> dict:
    r, plan = e["request"], e["plan"]
    out = {"line": r.line, "kind": r.kind, "fact": {"relation": r.fact.relation, "subject": r.fact.subject,
                                                    "object": r.fact.object},
           "new_object": r.new_object, "neurons_from": e["source"], "edit": plan.edit.to_dict(),
           "control": plan.control.to_dict(), "prompts": {g: len(ps) for g, ps in plan.prompts.items()},
           "skipped": [{"what": w, "reason": why} for w, why in plan.skipped], "metrics": e["metrics"]}
    if "holds" in e:
        out["holds_after_step"] = e["holds"]  # [[step, fraction of probe prompts where the edit holds], ...]
    return out


def _summary(entries, steps) -> dict:
    """The batch's metrics in edit_metrics' shape (so metrics.metrics_lines prints them): each number is the
    mean over the requests where the metric applies ("requests" says how many; the reasons of the others are
    counted), for the edits and for their random-neuron controls."""
    from .metrics import METRIC_NAMES

    def side(ms: list[dict]) -> dict:
        out = {name: _mean_metric([m[name] for m in ms]) for name in METRIC_NAMES + ("locality_prompts",)}
        out["flip_rate"] = _mean_of([m["flip_rate"] for m in ms])
        for key in ("rank_old", "rank_new"):
            ranks = [m[key] for m in ms if m[key].get("applicable", True)]
            out[key] = ({k: _mean_of([r[k] for r in ranks]) for k in ("before", "after", "median_before",
                                                                       "median_after")} | {"n": len(ranks)}
                        if ranks else {"applicable": False, "reason": "no request has a new object"})
        sizes = [m["edit_size"] for m in ms]
        out["edit_size"] = {k: _mean_of([z.get(k) for z in sizes]) for k in ("neurons", "weight_change",
                                                                             "activation_change")}
        return out

    out: dict = {"requests": len(entries), "metrics": side([e["metrics"] for e in entries])}
    out["metrics"]["control"] = side([e["metrics"]["control"] for e in entries])
    if steps:
        first = [e["holds"][0][1] for e in entries if e["holds"] and np.isfinite(e["holds"][0][1])]
        last = [e["holds"][-1][1] for e in entries if e["holds"] and np.isfinite(e["holds"][-1][1])]
        out["forgetting"] = {"holds_right_after_own_step": _mean_of(first), "holds_at_the_end": _mean_of(last),
                             "note": "mean over requests of the fraction of probe prompts where the edit holds"}
    return out


def _mean_of(values) -> float | None:
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _mean_metric(metrics: list[dict]) -> dict:
    used = [m for m in metrics if m.get("applicable", True)]
    if not used:
        reasons = sorted({m.get("reason", "") for m in metrics})
        return {"applicable": False, "reason": "; ".join(reasons) or "no requests"}
    out = {k: _mean_of([m.get(k) for m in used]) for k in ("rate", "mean_prob", "mean_rank")}
    if any("mean_abs_dp" in m for m in used):
        out["mean_abs_dp"] = _mean_of([m.get("mean_abs_dp") for m in used])
    out |= {"n": sum(m["n"] for m in used), "requests": len(used)}
    broken = sum(1 for m in used if m.get("mean_prob") is None or not np.isfinite(m["mean_prob"]))
    if broken:  # e.g. a compound batch of updates that overflowed the model: its probabilities are NaN
        out["non_finite_requests"] = broken
        out["note"] = f"{broken} request(s) gave a non-finite probability (the model's output overflowed); the " \
                      "means are over the others"
    skipped = len(metrics) - len(used)
    if skipped:
        out["not_applicable_requests"] = skipped
    return out
