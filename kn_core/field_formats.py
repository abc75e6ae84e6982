"""The knowledge-editing field's benchmark files read into one shape, `EditCase`.

Formats (detected from the first record's keys; named in every result, `FieldFile.format`):

* ``counterfact`` -- CounterFact / MultiCounterFact (Meng et al. 2022; ROME's ``dsets/counterfact.py``):
  ``{"case_id", "requested_rewrite": {"prompt": "{} ...", "subject", "relation_id", "target_new": {"str"},
  "target_true": {"str"}}, "paraphrase_prompts", "neighborhood_prompts", "attribute_prompts",
  "generation_prompts"}``.
* ``zsre`` -- zsRE in the MEND / EasyEdit evaluation form (``zsre_mend_eval.json``): ``{"subject", "src",
  "alt", "answers", "rephrase", "loc", "loc_ans"}``. As EasyEdit's ZsreDataset: the new target is ``alt``, the
  ground truth ``answers[0]``, the locality prompt ``loc`` with its answer ``loc_ans`` (group "neighborhood").
* ``knowedit`` -- KnowEdit (Zhang et al. 2024): EasyEdit's keys with nested ``portability`` / ``locality``
  objects of named groups, each ``[{"prompt", "ground_truth"}]``; every group is kept under its own name.
* ``mquake`` -- MQuAKE (Zhong et al. 2023; CF, CF-3k and T share the form): ``requested_rewrite`` is a list of
  rewrites (CounterFact's shape plus a ``question``), ``questions`` (the multi-hop questions), ``answer`` /
  ``answer_alias`` (before the edits), ``new_answer`` / ``new_answer_alias`` (after), ``single_hops`` /
  ``new_single_hops`` (``{"question", "cloze", "answer", "answer_alias"}``).
* ``easyedit`` -- EasyEdit's flat request keys: ``prompt``, ``target_new``, ``ground_truth``, ``subject``,
  ``rephrase_prompt`` (or ``rephrase_prompts``), ``locality_prompt`` / ``locality_ground_truth``,
  ``portability_prompt`` / ``portability_ground_truth``.

Containers: a JSON array, JSON Lines, or ``{"records": [...]}``. Nothing is dropped silently: every field of a
record that no protocol uses is listed in `FieldFile.left_out` with the reason (once per field name, with a
count), and a record that cannot be read is refused naming its number and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("counterfact", "zsre", "knowedit", "mquake", "easyedit")
Answers = tuple[str, ...]  # an answer and its aliases, the first one is the answer scored teacher-forced
Item = tuple[str, Answers]  # (prompt, answers)


class FieldFormatError(ValueError):
    """A benchmark file that cannot be read; the message names the file, the record and the problem."""


@dataclass
class EditCase:
    """One edit of a benchmark with everything the protocols measure. ``prompt`` is plain text that contains
    ``subject``; ``neighborhood`` holds prompts of other subjects whose answer must stay (CounterFact: with
    ``target_true`` as their answer); ``locality`` / ``portability`` map group names to (prompt, answers)."""
    case_id: str
    prompt: str
    subject: str
    target_true: str | None
    target_new: str | None
    relation_id: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Item, ...] = ()
    locality: dict[str, tuple[Item, ...]] = field(default_factory=dict)
    portability: dict[str, tuple[Item, ...]] = field(default_factory=dict)
    generation_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    reference_texts: tuple[str, ...] = ()
    extra_edits: tuple["EditCase", ...] = ()  # MQuAKE: the case's other rewrites, applied together
    questions: tuple[str, ...] = ()  # MQuAKE: multi-hop questions
    answers: Answers = ()  # MQuAKE: the multi-hop answer before the edits, with aliases
    new_answers: Answers = ()  # MQuAKE: after the edits, with aliases
    single_hops: tuple[Item, ...] = ()  # MQuAKE new_single_hops: (cloze, answers) after the edits
    rewrite_question: str | None = None  # MQuAKE: the rewrite asked as a question
    more_prompts: tuple[str, ...] = ()  # further rewrite prompts (a fact's other templates that found the neurons)

    def template(self) -> str:
        """The rewrite prompt as a template: the subject's first occurrence is [X], the answer [Y] after."""
        return self.prompt.replace(self.subject, "[X]", 1) + " [Y]"

    def edits(self) -> tuple["EditCase", ...]:
        return (self,) + self.extra_edits


@dataclass
class FieldFile:
    format: str
    cases: list[EditCase]
    left_out: list[dict]  # {"field": name, "records": count, "reason": why}
    container: str  # "json array", "json lines" or "records object"

    def summary(self) -> str:
        return f"{self.format} ({self.container}, {len(self.cases)} cases)"


# --------------------------------------------------------------------------------------------------------
# Containers and detection
# --------------------------------------------------------------------------------------------------------

def load_records(path) -> tuple[list[dict], str]:
    """The records of a JSON array, a ``{"records": [...]}`` object or a JSON Lines file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise FieldFormatError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    stripped = text.lstrip()
    records, container = None, "json lines"
    if stripped.startswith("["):
        records, container = _whole_json(path, text), "json array"
    elif stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None  # JSON Lines: one object per line (a line nested too deeply is named below)
        if isinstance(whole, dict) and isinstance(whole.get("records"), list):
            records, container = whole["records"], "records object"
        elif isinstance(whole, dict):
            records = [whole]
    if records is None:
        records = []
        for number, raw in enumerate(text.splitlines(), 1):
            if raw.strip():
                try:
                    records.append(json.loads(raw))
                except json.JSONDecodeError as exc:
                    raise FieldFormatError(f"{path}, line {number}: not valid JSON ({exc.msg} at column "
                                           f"{exc.colno})") from None
                except RecursionError:
                    raise FieldFormatError(f"{path}, line {number}: the JSON is nested too deeply") from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise FieldFormatError(f"{path}: record {number} is not a JSON object ({{...}})")
    if not records:
        raise FieldFormatError(f"{path}: no records (an empty file or an empty list)")
    return records, container


def _whole_json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FieldFormatError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") \
            from None
    except RecursionError:
        raise FieldFormatError(f"{path}: the JSON is nested too deeply") from None


def detect_format(record: dict) -> str | None:
    """The field format a record has, from its keys; None when it is none of them."""
    rewrite = record.get("requested_rewrite")
    if isinstance(rewrite, list) or "new_answer" in record or "single_hops" in record:
        return "mquake"
    if isinstance(rewrite, dict):
        return "counterfact"
    if "src" in record and ("alt" in record or "answers" in record):
        return "zsre"
    if "prompt" in record and (isinstance(record.get("portability"), dict) or isinstance(record.get("locality"), dict)):
        return "knowedit"
    if "prompt" in record and ("target_new" in record or "ground_truth" in record):
        return "easyedit"
    return None


def is_field_file(path) -> bool:
    """Whether ``path`` reads as one of the field's formats (cheap: the first record only)."""
    try:
        records, _ = load_records(path)
    except FieldFormatError:
        return False
    return detect_format(records[0]) is not None


def read_field_file(path, format: str | None = None) -> FieldFile:
    """Every record of ``path`` as an EditCase. ``format``: one of FORMATS, else detected from the first
    record (every record must then have the same format)."""
    records, container = load_records(path)
    fmt = format or detect_format(records[0])
    if fmt not in FORMATS:
        raise FieldFormatError(f"{path}: not a known benchmark format (keys {sorted(records[0])[:12]}); expected "
                               "CounterFact (requested_rewrite), zsRE (src, alt, answers), KnowEdit (prompt with "
                               "portability/locality groups), MQuAKE (requested_rewrite list, questions) or "
                               "EasyEdit (prompt, target_new, ground_truth)")
    reader = _READERS[fmt]
    cases, left = [], _LeftOut(_USED[fmt])
    for number, record in enumerate(records, 1):
        if format is None and detect_format(record) != fmt:
            raise FieldFormatError(f"{path}: record {number} is not {fmt} like the first record "
                                   f"(it reads as {detect_format(record) or 'no known format'})")
        try:
            cases.append(reader(record, number))
        except _Bad as exc:
            raise FieldFormatError(f"{path}: record {number} ({fmt}): {exc}") from None
        left.note(record)
    return FieldFile(fmt, cases, left.rows(fmt), container)


class _Bad(Exception):
    pass


class _LeftOut:
    def __init__(self, used: dict[str, str | None]):
        self.used, self.counts = used, {}

    def note(self, record: dict) -> None:
        for key in record:
            if self.used.get(key, "") is not None:
                self.counts[key] = self.counts.get(key, 0) + 1

    def rows(self, fmt: str) -> list[dict]:
        return [{"field": key, "records": n, "reason": self.used.get(key) or f"not a field of {fmt} that any "
                                                                              "protocol here measures"}
                for key, n in sorted(self.counts.items())]


# --------------------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------------------

def _text(value, what: str) -> str:
    if isinstance(value, dict) and "str" in value:  # CounterFact's {"str": ..., "id": ...}
        value = value["str"]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # a list of answers: the first is scored
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"{what} must be non-empty text, not {json.dumps(value)[:60]}")
    return value.strip()


def _texts(value, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _Bad(f"{what} must be a list of texts")
    return tuple(_text(v, what) for v in value)


def _answers(value, what: str) -> Answers:
    """An answer with its aliases: text, [text, ...] or KnowEdit's nested [[text, alias], ...]."""
    if isinstance(value, str):
        return (_text(value, what),)
    if isinstance(value, dict) and "str" in value:
        return (_text(value, what),)
    if isinstance(value, list) and value:
        flat = [a for v in value for a in (v if isinstance(v, list) else [v])]
        return tuple(dict.fromkeys(_text(a, what) for a in flat))
    raise _Bad(f"{what} must be an answer (text or a list of texts)")


def _subject_prompt(prompt: str, subject: str, what: str) -> str:
    if "{}" in prompt:
        prompt = prompt.replace("{}", subject, 1)
    if subject not in prompt:
        raise _Bad(f"the subject {subject!r} does not occur in the {what} {prompt!r}")
    return prompt


def _items(prompts, truths, what: str) -> tuple[Item, ...]:
    prompts = _texts(prompts, f"{what} prompt")
    if isinstance(truths, str) or (isinstance(truths, list) and len(prompts) == 1 and truths
                                   and not isinstance(truths[0], list) and len(truths) != 1):
        truths = [truths]
    truths = list(truths) if isinstance(truths, list) else [truths]
    if len(truths) != len(prompts):
        raise _Bad(f"{what}: {len(prompts)} prompt(s) but {len(truths)} ground truth(s)")
    return tuple((p, _answers(t, f"{what} ground truth")) for p, t in zip(prompts, truths))


def _groups(raw, what: str) -> dict[str, tuple[Item, ...]]:
    """KnowEdit's {"Group": [{"prompt", "ground_truth"}, ...] or {"prompt": [...], "ground_truth": [...]}}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _Bad(f"{what} must be an object of named groups")
    out = {}
    for name, group in raw.items():
        entries = group if isinstance(group, list) else [group]
        items = []
        for entry in entries:
            if not isinstance(entry, dict) or "prompt" not in entry:
                raise _Bad(f"{what} group {name!r}: each entry needs a prompt and a ground_truth")
            items += _items(entry["prompt"], entry.get("ground_truth"), f"{what} {name}")
        if items:
            out[str(name)] = tuple(items)
    return out


# --------------------------------------------------------------------------------------------------------
# The readers
# --------------------------------------------------------------------------------------------------------

_CF_REASONS = {"pararel_idx": "the PARAREL index is provenance, not measured",
               "pararel_relation": "provenance (kn facts to-counterfact): the relation id is in requested_rewrite",
               "requested_rewrite": None, "case_id": None, "paraphrase_prompts": None,
               "neighborhood_prompts": None, "generation_prompts": None, "attribute_prompts": None}


def _rewrite(rw: dict, what: str) -> tuple[str, str, str, str, str | None]:
    if not isinstance(rw, dict):
        raise _Bad(f"{what} must be an object")
    subject = _text(rw.get("subject"), f"{what}.subject")
    prompt = _subject_prompt(_text(rw.get("prompt"), f"{what}.prompt"), subject, f"{what}.prompt")
    return (prompt, subject, _text(rw.get("target_true"), f"{what}.target_true"),
            _text(rw.get("target_new"), f"{what}.target_new"), rw.get("relation_id"))


def _counterfact(record: dict, number: int) -> EditCase:
    prompt, subject, true, new, rid = _rewrite(record.get("requested_rewrite"), "requested_rewrite")
    return EditCase(str(record.get("case_id", number)), prompt, subject, true, new, rid,
                    paraphrases=_texts(record.get("paraphrase_prompts"), "paraphrase_prompts"),
                    neighborhood=tuple((p, (true,)) for p in _texts(record.get("neighborhood_prompts"),
                                                                    "neighborhood_prompts")),
                    generation_prompts=_texts(record.get("generation_prompts"), "generation_prompts"),
                    attribute_prompts=_texts(record.get("attribute_prompts"), "attribute_prompts"),
                    reference_texts=_texts(record.get("reference_texts"), "reference_texts"))


_ZSRE_REASONS = {"pred": "the original model's prediction recorded by MEND; the model here is measured itself",
                 "cond": "MEND's conditioning string (hypernetwork input), not a prompt",
                 "subject": None, "src": None, "alt": None, "answers": None, "rephrase": None, "loc": None,
                 "loc_ans": None, "case_id": None}


def _zsre(record: dict, number: int) -> EditCase:
    subject = _text(record.get("subject"), "subject")
    prompt = _subject_prompt(_text(record.get("src"), "src"), subject, "src")
    rephrase = _texts(record.get("rephrase"), "rephrase")
    locality = {}
    if record.get("loc") is not None:
        locality["neighborhood"] = _items(record["loc"], record.get("loc_ans"), "loc")
    return EditCase(str(record.get("case_id", number)), prompt, subject, _text(record.get("answers"), "answers"),
                    _text(record.get("alt"), "alt"), paraphrases=rephrase, locality=locality)


_FLAT_REASONS = {"prompt": None, "subject": None, "target_new": None, "ground_truth": None,
                 "rephrase_prompt": None, "rephrase_prompts": None, "rephrase": None, "locality_prompt": None,
                 "locality_ground_truth": None, "portability_prompt": None, "portability_ground_truth": None,
                 "portability": None, "locality": None, "case_id": None, "relation_id": None,
                 "cond": "MEND's conditioning string (hypernetwork input), not a prompt",
                 "neurons": "explicit neurons are read by kn edit batch, not by the benchmark protocols",
                 "kind": "the edit kind is read by kn edit batch, not by the benchmark protocols"}


def _flat(record: dict, number: int) -> EditCase:
    """EasyEdit's flat keys and KnowEdit (the same keys with nested portability/locality groups)."""
    subject = _text(record.get("subject"), "subject")
    prompt = _subject_prompt(_text(record.get("prompt"), "prompt"), subject, "prompt")
    rephrase = _texts(next((record[k] for k in ("rephrase_prompt", "rephrase_prompts", "rephrase") if k in record),
                           None), "rephrase_prompt")
    locality = _groups(record.get("locality"), "locality")
    portability = _groups(record.get("portability"), "portability")
    if record.get("locality_prompt") is not None:
        locality.setdefault("neighborhood", _items(record["locality_prompt"], record.get("locality_ground_truth"),
                                                   "locality_prompt"))
    if record.get("portability_prompt") is not None:
        portability.setdefault("portability", _items(record["portability_prompt"],
                                                     record.get("portability_ground_truth"), "portability_prompt"))
    truth = record.get("ground_truth")
    return EditCase(str(record.get("case_id", number)), prompt, subject,
                    _text(truth, "ground_truth") if truth not in (None, "", []) else None,
                    _text(record.get("target_new"), "target_new"), record.get("relation_id"),
                    paraphrases=tuple(r for r in rephrase), locality=locality, portability=portability)


_MQ_REASONS = {"orig": "the Wikidata triples behind the case (provenance); the questions and answers are measured",
               "single_hops": "single-hop questions about the unedited chain; MQuAKE's metrics use new_single_hops",
               "requested_rewrite": None, "questions": None, "answer": None, "answer_alias": None,
               "new_answer": None, "new_answer_alias": None, "new_single_hops": None, "case_id": None}


def _mquake(record: dict, number: int) -> EditCase:
    rewrites = record.get("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise _Bad("requested_rewrite must be a non-empty list of rewrites")
    edits = []
    for k, rw in enumerate(rewrites):
        prompt, subject, true, new, rid = _rewrite(rw, f"requested_rewrite[{k}]")
        edits.append(EditCase(f"{record.get('case_id', number)}.{k}", prompt, subject, true, new, rid,
                              rewrite_question=rw.get("question") if isinstance(rw.get("question"), str) else None))
    hops = record.get("new_single_hops") or []
    if not isinstance(hops, list):
        raise _Bad("new_single_hops must be a list")
    single = tuple((_text(h.get("cloze") or h.get("question"), "new_single_hops cloze"),
                    _answers([h.get("answer")] + list(h.get("answer_alias") or []), "new_single_hops answer"))
                   for h in hops if isinstance(h, dict))
    first = edits[0]
    first.extra_edits = tuple(edits[1:])
    first.case_id = str(record.get("case_id", number))
    first.questions = _texts(record.get("questions"), "questions")
    first.answers = _answers([record.get("answer")] + list(record.get("answer_alias") or []), "answer")
    first.new_answers = _answers([record.get("new_answer")] + list(record.get("new_answer_alias") or []),
                                 "new_answer")
    first.single_hops = single
    return first


_READERS = {"counterfact": _counterfact, "zsre": _zsre, "knowedit": _flat, "easyedit": _flat, "mquake": _mquake}
_USED = {"counterfact": _CF_REASONS, "zsre": _ZSRE_REASONS, "knowedit": _FLAT_REASONS, "easyedit": _FLAT_REASONS,
         "mquake": _MQ_REASONS}


# --------------------------------------------------------------------------------------------------------
# As a fact set (kn facts import, --facts)
# --------------------------------------------------------------------------------------------------------

def cases_to_factset(read: FieldFile, name: str):
    """The cases' facts as a FactSet, and what a fact set cannot hold (listed with the reason). A case with a
    relation id (CounterFact, MQuAKE) adds its rewrite prompt as a template of that relation; the others get a
    relation of their own whose templates are the prompt and the paraphrases that name the subject."""
    import hashlib

    from .facts import Fact, FactSet, Relation

    templates: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    facts: dict = {}
    left = list(read.left_out)
    counts = {"paraphrases": 0, "neighborhood": 0, "locality": 0, "portability": 0, "generation_prompts": 0,
              "multi-hop questions": 0, "no ground truth": 0}
    for case in read.cases:
        for edit in case.edits():
            if edit.target_true is None:
                counts["no ground truth"] += 1
                continue
            if edit.relation_id:
                rid, own = str(edit.relation_id), [edit.template()]
                counts["paraphrases"] += len(edit.paraphrases)
            else:
                own = [edit.template()] + [p.replace(edit.subject, "[X]", 1) + " [Y]" for p in edit.paraphrases
                                           if edit.subject in p]
                rid = f"{read.format}-" + hashlib.sha1(json.dumps([own, edit.subject]).encode()).hexdigest()[:12]
                names[rid] = f"{read.format} case {case.case_id}: {edit.prompt}"
            for t in own:
                if t not in templates.setdefault(rid, []):
                    templates[rid].append(t)
            facts[Fact(rid, edit.subject, edit.target_true)] = None
        counts["neighborhood"] += len(case.neighborhood)
        counts["locality"] += sum(len(v) for v in case.locality.values())
        counts["portability"] += sum(len(v) for v in case.portability.values())
        counts["generation_prompts"] += len(case.generation_prompts)
        counts["multi-hop questions"] += len(case.questions)
    reasons = {"paraphrases": "case-specific paraphrases (with their own prefixes) are not templates of the "
                              "relation; kn edit batch and kn bench measure them",
               "no ground truth": "a request with no ground_truth has no fact to hold",
               "multi-hop questions": "questions, not facts; kn edit batch --protocol mquake measures them"}
    for what, n in counts.items():
        if n:
            left.append({"field": what, "records": n, "reason": reasons.get(
                what, "a fact set holds relations, templates and facts; kn edit batch / kn bench measure these")})
    relations = {rid: Relation(rid, names.get(rid, rid), tuple(ts)) for rid, ts in templates.items()}
    return FactSet(name, relations, list(facts)), left


def import_field_facts(path):
    """(FactSet, the FieldFile read, what the fact set left out) of a benchmark file; FieldFormatError as the
    readers raise it."""
    read = read_field_file(path)
    factset, left = cases_to_factset(read, Path(path).stem)
    if not factset.facts:
        raise FieldFormatError(f"{path}: {read.summary()} gives no fact (every case lacks its ground truth)")
    return factset, read, left
