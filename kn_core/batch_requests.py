"""Batch edit requests: reading them (EasyEdit's form or ours) and checking them against the loaded model.

Requests come one per line of a JSON Lines file (docs: `kn edit batch --help`), in one of two forms:

* EasyEdit's: ``{"prompt": "The capital of France is", "subject": "France", "ground_truth": "Paris",
  "target_new": "Berlin", "rephrase_prompts": [...], "locality_prompts": [{"prompt": ..., "ground_truth": ...}]}``.
  The prompt (with the subject replaced by [X] and [Y] after it) and each rephrase become the templates of a
  relation of their own; the locality prompts are measured as a group of their own.
* ours: ``{"relation": "P36", "subject": "France", "new_object": "Berlin"}`` against a fact set.

Either form may say ``"kind"`` (suppress, amplify or update; the batch's default otherwise) and give explicit
``"neurons": [[layer, index], ...]``. `parse_requests` names every bad line with its number and reason before
any model work; `check_requests` adds what only the loaded model can tell (neurons outside it, prompts that do
not render, prompts longer than the model's positions), still before any forward pass. `batch.run_batch` runs
them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from . import edits as E
from .facts import Fact, FactSet, Prompt, Relation, render_prompts
from .selection import Neuron
from .validation import ValidationError, check_text

BATCH_KINDS = ("suppress", "amplify", "update")
EASYEDIT_FIELDS = ("prompt", "subject", "ground_truth", "target_new", "rephrase_prompts", "locality_prompts",
                   "neurons", "kind")
OUR_FIELDS = ("relation", "subject", "new_object", "neurons", "kind")
_LISTED = 20  # bad lines named in the one-line refusal; --skip-bad lists every one


class BatchError(ValueError):
    """Bad requests; the one-line message names the bad lines with their reasons."""


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
    case: object = None  # field_formats.EditCase of a benchmark file: what the protocols (kn_core.protocols) measure

    def label(self) -> str:
        tail = f" -> {self.new_object}" if self.new_object else ""
        return f"line {self.line}: {self.kind} {self.fact.relation} {self.fact.subject} ({self.fact.object}{tail})"


@dataclass
class ParsedRequests:
    requests: list[BatchRequest]
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    factset: FactSet | None = None  # the given fact set plus the EasyEdit requests' relations and facts
    format: str = "kn"  # "easyedit" / "kn" line forms, or the benchmark format read (field_formats.FORMATS)
    left_out_fields: list = field(default_factory=list)  # a benchmark file's fields left out, with reasons

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
    if isinstance(source, (str, Path)) and _benchmark_file(source):
        return _parse_benchmark(source, factset, default_kind)
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
    requests = _without_repeats(requests, bad)
    combined = _combined_factset(factset, relations, requests)
    return ParsedRequests(requests, bad, combined)


def _without_repeats(requests: list, bad: list) -> list:
    """A second request for a fact already requested is a bad line: the same request twice would be applied
    (and counted) twice, and two different ones (another new object or kind) cannot both hold."""
    first: dict = {}
    keep = []
    for r in requests:
        earlier = first.setdefault(r.fact, r)
        if earlier is r:
            keep.append(r)
        elif (earlier.kind, earlier.new_object, earlier.neurons) == (r.kind, r.new_object, r.neurons):
            bad.append((r.line, f"repeats line {earlier.line} ({r.fact.relation} {r.fact.subject!r}); give each "
                                 f"request once"))
        else:
            bad.append((r.line, f"contradicts line {earlier.line}: both edit {r.fact.relation} {r.fact.subject!r} "
                                 f"({earlier.kind} -> {earlier.new_object!r} there, {r.kind} -> {r.new_object!r} "
                                 f"here); keep one"))
    bad.sort()
    return keep


class _BadLine(Exception):
    pass


def _lines(source) -> list[tuple[int, str]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark, as fact files accept
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
    if _as_word(subject, prompt) is None:
        raise _BadLine(f"the subject {subject!r} occurs in the prompt {prompt!r} only inside another word; give "
                       f"the whole word as the subject")
    new = _new_object(record, "target_new", kind, truth)
    main = _as_word(subject, prompt) + " [Y]"
    templates, left_out = [main], []
    rephrases = record.get("rephrase_prompts", [])
    if not isinstance(rephrases, list) or not all(isinstance(r, str) for r in rephrases):
        raise _BadLine("'rephrase_prompts' must be a list of texts" + (
            " (one text was given: write it as [\"...\"])" if isinstance(rephrases, str) else ""))
    for r in rephrases:
        r = _valid_text("rephrase_prompts", r).strip()
        if _as_word(subject, r) is None or "[X]" in r or "[Y]" in r:
            left_out.append((f"rephrase {r!r}", "does not name the subject, so it is not a paraphrase of the fact"
                             if _as_word(subject, r) is None else "contains [X] or [Y]"))
            continue
        template = _as_word(subject, r) + " [Y]"
        if template not in templates:
            templates.append(template)
    locality = _locality(record.get("locality_prompts", []))
    digest = hashlib.sha1(json.dumps([templates, subject, truth]).encode()).hexdigest()[:12]
    relation = Relation(f"easyedit-{digest}", f"EasyEdit request: {prompt}", tuple(templates))
    return BatchRequest(number, kind, Fact(relation.id, subject, truth), relation, new, neurons, locality, main,
                        tuple(left_out))


def _as_word(subject: str, text: str) -> str | None:
    """`text` with its first whole-word occurrence of `subject` replaced by [X]; None when the subject occurs
    only inside other words ("France" in "Francesca")."""
    import re

    pattern = re.compile(r"(?<!\w)" + re.escape(subject) + r"(?!\w)")
    return pattern.sub("[X]", text, count=1) if pattern.search(text) else None


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


def _benchmark_file(path) -> bool:
    """A benchmark file of the field (field_formats) rather than the line form read below: every record reads as
    a benchmark format, and the file is not all line-form requests (CounterFact, zsRE, KnowEdit, MQuAKE, a JSON
    array, or EasyEdit requests with keys the line form does not know, e.g. rephrase_prompt)."""
    from .field_formats import FieldFormatError, detect_format, load_records

    try:
        records, container = load_records(path)
    except FieldFormatError:
        return False

    def line_form(r):
        return set(r) <= set(EASYEDIT_FIELDS if "prompt" in r else OUR_FIELDS)

    if container == "json lines" and all(line_form(r) for r in records):
        return False
    return all(detect_format(r) is not None for r in records)


def _parse_benchmark(path, factset: FactSet | None, kind: str) -> ParsedRequests:
    """Every case of a benchmark file as requests (a MQuAKE case gives one request per rewrite; the first one
    carries the case's questions); `line` is the record's number. A file the reader refuses is one BatchError."""
    from .field_formats import FieldFormatError, read_field_file

    try:
        read = read_field_file(path)
    except FieldFormatError as exc:
        raise BatchError(str(exc)) from None
    requests, bad = [], []
    relations: dict[str, Relation] = {}
    for number, case in enumerate(read.cases, 1):
        for k, edit in enumerate(case.edits()):
            try:
                request = _case_request(number, edit, kind, case if k == 0 else None, read.format)
            except (_BadLine, ValueError) as exc:
                bad.append((number, str(exc)))
                continue
            relations[request.relation.id] = request.relation
            requests.append(request)
    parsed = ParsedRequests(requests, bad, _combined_factset(factset, relations, requests))
    parsed.format, parsed.left_out_fields = read.format, read.left_out
    return parsed


def _case_request(number: int, edit, kind: str, case, fmt: str) -> BatchRequest:
    """One rewrite of a benchmark case as a request of its own relation (the prompt and the paraphrases that
    name the subject, as the line form builds it); `case` (the whole case) rides along for the protocols."""
    if edit.target_true is None:
        raise _BadLine("no ground truth (the fact to edit); EasyEdit's ground_truth is needed")
    given = {"target_new": edit.target_new} if edit.target_new and kind == "update" else {}
    new = _new_object(given, "target_new", kind, edit.target_true)  # suppress/amplify: the case's o* unused
    templates, left_out = [edit.template()], []
    for r in (*edit.more_prompts, *edit.paraphrases):
        if edit.subject not in r or "[X]" in r or "[Y]" in r:
            left_out.append((f"paraphrase {r!r}", "does not name the subject, so it cannot find the fact's neurons "
                             "(it is still measured by the protocols)" if edit.subject not in r else "contains [X] or [Y]"))
        elif (t := r.replace(edit.subject, "[X]", 1) + " [Y]") not in templates:
            templates.append(t)
    locality = tuple((p, a[0]) for items in (edit.neighborhood, *edit.locality.values()) for p, a in items)
    digest = hashlib.sha1(json.dumps([templates, edit.subject, edit.target_true]).encode()).hexdigest()[:12]
    relation = Relation(f"{fmt}-{digest}", f"{fmt} case {edit.case_id}: {edit.prompt}", tuple(templates))
    return BatchRequest(number, kind, Fact(relation.id, edit.subject, edit.target_true), relation, new, None,
                        locality, templates[0], tuple(left_out), case)


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
            for prompt in prompts + locality_prompts(lm, r.locality, []):
                encode_prompt(lm, prompt.text, prompt.answer_ids)  # what measuring will encode, checked now
        except ValueError as exc:
            parsed.bad.append((r.line, str(exc).splitlines()[0]))
            continue
        keep.append(r)
    parsed.bad.sort()
    parsed.requests = keep


def locality_prompts(lm, pairs, skipped) -> list[Prompt]:
    """A request's locality (prompt, ground truth) pairs as prompts; the ones that do not render are added to
    `skipped` with the reason."""
    relation = Relation("locality", "locality prompt", ("[X] [Y]",))
    out = []
    for text, truth in pairs:
        prompts, left = render_prompts(Fact("locality", text, truth), relation, lm.tokenizer, lm.kind)
        out += prompts
        skipped.extend((f"locality prompt {text!r}", s.reason) for s in left)
    return out
