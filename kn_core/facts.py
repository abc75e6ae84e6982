"""Relations, templates and facts, and rendering them into prompts (their files: `fact_files`).

A relation (e.g. P36 "capital") has paraphrased templates with the slots ``[X]`` (subject) and ``[Y]``
(object). A fact fills ``[X]`` and names the expected ``[Y]``. ``render_prompts`` turns one fact into one
prompt per usable template for a masked or a causal model, and says why it skipped the others.

All data classes are frozen: a ``FactSet`` is changed by methods that return a new set (``with_fact``,
``without_template``, ...), so the GUI can keep the old one for undo and nothing changes behind a caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .validation import check_text

X, Y = "[X]", "[Y]"
KINDS = ("masked", "causal")
# How a causal model uses a template with text after [Y]. "prefix": the text before [Y] is the prompt and the
# rest is dropped (a causal model predicts [Y] from what precedes it, so nearly every template gives a prompt);
# "end-only": only templates that end in [Y] (plus closing punctuation) are used, the others are skipped.
CAUSAL_TEMPLATES = ("prefix", "end-only")
# What may follow [Y] in an end-only causal template: closing punctuation and spaces only.
_DROPPABLE_TAIL = re.compile(r"^[\s.!?,;:]*$")


# ---------------------------------------------------------------- data model

def validate_template(template: str) -> str:
    """Returns the template unchanged, or raises ValueError saying what is wrong with it."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("a template must be non-empty text with the slots [X] and [Y]")
    check_text("template", template)  # a tokenizer cannot take lone surrogates; NULs are no text
    if X not in template:
        raise ValueError(f"template {template!r} has no [X] (the subject's slot)")
    if Y not in template:
        raise ValueError(f"template {template!r} has no [Y] (the object's slot)")
    if template.count(Y) > 1:
        raise ValueError(f"template {template!r} has [Y] more than once; the object has one slot")
    return template


@dataclass(frozen=True)
class Relation:
    id: str
    name: str
    templates: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id.strip():
            raise ValueError("a relation needs a non-empty id (e.g. P36)")
        check_text("relation id", self.id)
        object.__setattr__(self, "templates", tuple(self.templates))  # accept lists; keep it immutable
        for template in self.templates:
            validate_template(template)
        if len(set(self.templates)) != len(self.templates):
            raise ValueError(f"relation {self.id} lists a template twice")

    def with_template(self, template: str) -> Relation:
        return replace(self, templates=self.templates + (validate_template(template),))

    def without_template(self, template: str) -> Relation:
        if template not in self.templates:
            raise ValueError(f"relation {self.id} has no template {template!r}")
        return replace(self, templates=tuple(t for t in self.templates if t != template))

    def replacing_template(self, old: str, new: str) -> Relation:
        if old not in self.templates:
            raise ValueError(f"relation {self.id} has no template {old!r}")
        validate_template(new)
        return replace(self, templates=tuple(new if t == old else t for t in self.templates))


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    object: str

    def __post_init__(self):
        for name in ("relation", "subject", "object"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"a fact needs a non-empty {name}")
            if value != value.strip():
                raise ValueError(f"the {name} {value!r} has leading or trailing spaces")
            check_text(name, value)  # every prompt is rendered from these: valid Unicode, no NULs


@dataclass(frozen=True)
class FactSet:
    name: str
    relations: dict[str, Relation] = field(default_factory=dict)
    facts: list[Fact] = field(default_factory=list)

    def __post_init__(self):
        # Copies, so that a caller mutating its own dict or list cannot change this (frozen) set.
        object.__setattr__(self, "relations", dict(self.relations))
        object.__setattr__(self, "facts", list(self.facts))
        for key, relation in self.relations.items():
            if key != relation.id:
                raise ValueError(f"relation stored under {key!r} has id {relation.id!r}")
        seen = set()
        for fact in self.facts:
            if fact.relation not in self.relations:
                raise ValueError(f"fact {fact.subject!r} -> {fact.object!r} names an unknown relation {fact.relation!r}")
            if fact in seen:
                raise ValueError(f"fact {fact.subject!r} -> {fact.object!r} of {fact.relation} is listed twice")
            seen.add(fact)

    # queries
    def relation(self, rid: str) -> Relation:
        try:
            return self.relations[rid]
        except KeyError:
            raise KeyError(f"no relation {rid!r} in fact set {self.name!r}") from None

    def facts_of(self, rid: str) -> list[Fact]:
        return [fact for fact in self.facts if fact.relation == rid]

    def objects_of(self, rid: str) -> list[str]:
        return sorted({fact.object for fact in self.facts if fact.relation == rid})

    def __len__(self) -> int:
        return len(self.facts)

    # changes: each returns a new FactSet
    def with_relation(self, relation: Relation) -> FactSet:
        """Adds a relation, or replaces the one with the same id (its facts stay)."""
        return replace(self, relations={**self.relations, relation.id: relation})

    def without_relation(self, rid: str) -> FactSet:
        """Removes a relation and all of its facts."""
        self.relation(rid)
        return replace(self, relations={k: v for k, v in self.relations.items() if k != rid},
                       facts=[f for f in self.facts if f.relation != rid])

    def with_template(self, rid: str, template: str) -> FactSet:
        return self.with_relation(self.relation(rid).with_template(template))

    def without_template(self, rid: str, template: str) -> FactSet:
        return self.with_relation(self.relation(rid).without_template(template))

    def replacing_template(self, rid: str, old: str, new: str) -> FactSet:
        return self.with_relation(self.relation(rid).replacing_template(old, new))

    def with_fact(self, fact: Fact) -> FactSet:
        return self.with_facts([fact])

    def with_facts(self, facts) -> FactSet:
        """Adds several facts with one check of the whole set (one `with_fact` each re-checks it every time: an
        import of PARAREL's 22,425 facts took many minutes)."""
        return replace(self, facts=self.facts + list(facts))

    def without_fact(self, fact: Fact) -> FactSet:
        return self.without_facts([fact])

    def without_facts(self, facts) -> FactSet:
        """Removes several facts with one check of the set (one `without_fact` each is quadratic)."""
        gone = set(facts)
        missing = gone.difference(self.facts)
        if missing:
            raise ValueError(f"fact {next(iter(missing))} is not in fact set {self.name!r}")
        return replace(self, facts=[f for f in self.facts if f not in gone])

    def replacing_fact(self, old: Fact, new: Fact) -> FactSet:
        """Edits a fact in place (keeps its position in the list)."""
        if old not in self.facts:
            raise ValueError(f"fact {old} is not in fact set {self.name!r}")
        return replace(self, facts=[new if f == old else f for f in self.facts])

    def renamed(self, name: str) -> FactSet:
        return replace(self, name=name)


# ---------------------------------------------------------------- rendering

@dataclass(frozen=True)
class Prompt:
    """masked: ``text`` has one mask token per answer token where [Y] was; causal: ``text`` is the prefix
    before [Y] and ``answer`` the continuation, with its leading space. ``answer_ids`` are all the answer's
    tokens as the model sees them in context (never truncated)."""
    text: str
    answer: str
    answer_ids: tuple[int, ...]
    template: str
    fact: Fact
    kind: str


@dataclass(frozen=True)
class Skipped:
    template: str
    reason: str


def render_text(template: str, subject: str, obj: str | None = None) -> str:
    """Fills [X] (and [Y] when ``obj`` is given): the plain sentence, e.g. for display."""
    text = template.replace(X, subject)
    return text if obj is None else text.replace(Y, obj)


def _split_at_object(template: str, subject: str) -> tuple[str, str]:
    """The filled text before and after [Y]."""
    before, after = template.split(Y, 1)
    return before.replace(X, subject), after.replace(X, subject)


def _ids(tokenizer, text: str) -> list[int]:
    # No special tokens: BOS/CLS/EOS are the caller's business when it builds the model input.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _unknown(tokenizer, ids, answer: str) -> bool:
    unk = getattr(tokenizer, "unk_token_id", None)
    return unk is not None and unk in ids and (tokenizer.unk_token or "") not in answer


def _render_causal(fact: Fact, template: str, tokenizer, causal_templates: str) -> Prompt | Skipped:
    before, after = _split_at_object(template, fact.subject)
    if causal_templates == "end-only" and not _DROPPABLE_TAIL.match(after):
        # The template's own text in the reason (not the filled one), so it reads the same for every fact.
        return Skipped(template, f"[Y] is not at the end (followed by {template.split(Y, 1)[1].strip()!r}); "
                                 "a causal model can only predict the object as a continuation "
                                 "(causal_templates='prefix' would use the text before [Y])")
    text = before.rstrip(" ")
    if not text.strip():
        return Skipped(template, "[Y] comes first: nothing comes before it for a causal model to continue")
    if X not in template.split(Y, 1)[0]:
        # e.g. "the [Y] debut of [X]." -> "the": the same prompt for every fact, which asks nothing about it
        return Skipped(template, "[X] comes after [Y]: the text before [Y] does not name the subject")
    # The leading space belongs to the answer: BPE vocabularies spell " Paris" as one token.
    answer = (" " if before != text else "") + fact.object
    prefix, full = _ids(tokenizer, text), _ids(tokenizer, text + answer)
    if full[:len(prefix)] == prefix and len(full) > len(prefix):
        answer_ids = full[len(prefix):]
    else:  # the prompt's last token merges with the answer; fall back to the answer on its own
        answer_ids = _ids(tokenizer, answer)
    if not answer_ids:
        return Skipped(template, f"the answer {answer!r} tokenizes to nothing")
    if _unknown(tokenizer, answer_ids, answer):
        return Skipped(template, f"the answer {answer!r} contains a token unknown to the tokenizer "
                                 f"({tokenizer.unk_token})")
    return Prompt(text, answer, tuple(answer_ids), template, fact, "causal")


def _object_span_ids(tokenizer, text: str, start: int, end: int) -> list[int] | str:
    """Token ids of text[start:end] as tokenized inside ``text``, or the reason they cannot be separated."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = []
        for token_id, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if b <= start or a >= end or a == b:
                continue
            # A token that reaches outside the object (other than over spaces) mixes the object with context.
            if text[a:start].strip() or text[end:b].strip():
                return f"a token spans the object and the text next to it ({text[a:b]!r})"
            ids.append(token_id)
        return ids
    # Slow tokenizers have no offsets: take the tokens the object adds to the text before it.
    prefix, upto = _ids(tokenizer, text[:start]), _ids(tokenizer, text[:end])
    if upto[:len(prefix)] != prefix:
        return "the object's tokens merge with the text before it"
    return upto[len(prefix):]


def _render_masked(fact: Fact, template: str, tokenizer) -> Prompt | Skipped:
    before, after = _split_at_object(template, fact.subject)
    text = before + fact.object + after
    span = _object_span_ids(tokenizer, text, len(before), len(before) + len(fact.object))
    if isinstance(span, str):
        return Skipped(template, span)
    if not span:
        return Skipped(template, f"the object {fact.object!r} tokenizes to nothing")
    if _unknown(tokenizer, span, fact.object):
        return Skipped(template, f"the object {fact.object!r} contains a token unknown to the tokenizer "
                                 f"({tokenizer.unk_token}); it would be predicted as that token")
    masked = before + tokenizer.mask_token * len(span) + after
    # Check that the model will see exactly one mask per answer token (e.g. the mask is not split).
    if _ids(tokenizer, masked).count(tokenizer.mask_token_id) != len(span):
        return Skipped(template, f"the masked text does not tokenize to {len(span)} mask token(s)")
    return Prompt(masked, fact.object, tuple(span), template, fact, "masked")


def render_prompts(fact: Fact, relation: Relation, tokenizer, kind: str,
                   causal_templates: str = "prefix") -> tuple[list[Prompt], list[Skipped]]:
    """One prompt per usable template of ``relation`` for ``fact``; the others come back as Skipped, each with
    its reason. ``causal_templates`` (causal models only, see CAUSAL_TEMPLATES) says whether a template with
    text after [Y] is used as its prefix or skipped. Two templates that give the same prompt (e.g. once the
    text after [Y] is dropped) are used once: a repeated prompt would count twice in the refinement."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use 'masked' or 'causal'")
    if causal_templates not in CAUSAL_TEMPLATES:
        raise ValueError(f"unknown causal_templates {causal_templates!r}; use 'prefix' or 'end-only'")
    if fact.relation != relation.id:
        raise ValueError(f"fact of {fact.relation} rendered with relation {relation.id}")
    if kind == "masked" and getattr(tokenizer, "mask_token", None) is None:
        raise ValueError("this tokenizer has no mask token, so it cannot render masked prompts")
    prompts, skipped, seen = [], [], {}
    for template in relation.templates:
        if kind == "masked":
            result = _render_masked(fact, template, tokenizer)
        else:
            result = _render_causal(fact, template, tokenizer, causal_templates)
        if isinstance(result, Prompt):
            first = seen.setdefault((result.text, result.answer_ids), template)
            if first != template:
                result = Skipped(template, f"gives the same prompt {result.text!r} as the template {first!r}")
        (prompts if isinstance(result, Prompt) else skipped).append(result)
    return prompts, skipped


def render_factset(factset: FactSet, tokenizer, kind: str,
                   causal_templates: str = "prefix") -> tuple[list[Prompt], list[Skipped]]:
    """All prompts of a fact set (a convenience for checks and batch runs)."""
    prompts, skipped = [], []
    for fact in factset.facts:
        p, s = render_prompts(fact, factset.relation(fact.relation), tokenizer, kind, causal_templates)
        prompts += p
        skipped += s
    return prompts, skipped
