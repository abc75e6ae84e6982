"""The field's evaluation protocols on already-measured results: ``kn`` (ours, docs/METRICS.md), ``easyedit``
(EasyEdit / KnowEdit), ``rome`` (CounterFact, Meng et al. 2022) and ``mquake`` (Zhong et al. 2023).

Nothing here runs a model. A caller renders a case's prompts by group (`case_prompts`), measures them with
`evaluation.answer_probabilities` (teacher-forced; a generation-based measurement can fill the same rows'
``correct`` later) before the edit, after it and under its random-neuron control, and `score_case` turns the
rows into the protocol's numbers; `summarize` averages cases as the protocol's own summary does. Every score
is a fraction in [0, 1] except magnitudes (differences of probabilities, in [-1, 1]) and fluency (bits).

Definitions, each following the named function (docs/METRICS.md puts them side by side):

* easyedit (``easyeditor/evaluate/evaluate_utils.py: test_prediction_acc``; ``compute_locality_quality``;
  ``compute_portability_quality``): teacher-forced token accuracy, the mean over the target's tokens of
  (argmax == target token), averaged over a case's prompts (``rewrite_acc``, ``rephrase_acc``,
  ``portability[group + "_acc"]``); ``locality[group + "_acc"]`` = mean over the locality target's positions
  of (argmax after == argmax before).
* rome (``experiments/py/eval_utils_counterfact.py: test_batch_prediction`` and ``experiments/summarize.py``):
  per prompt the mean per-token log-probability of o* and of o; ES / PS = share of rewrite / paraphrase prompts
  with mean log p(o*) > mean log p(o), EM / PM = mean of exp(mean log p(o*)) - exp(mean log p(o)); NS = share of
  neighborhood prompts with mean log p(o) > mean log p(o*), NM = mean exp(..o) - exp(..o*); S = harmonic mean
  of ES, PS, NS (the paper's; the released summarize.py takes PS and NS only). Fluency = `n_gram_entropy`
  (ROME's ``util/generate.py``: weights 2/3 and 4/3 on bi- and tri-gram entropies, in bits); consistency =
  `tfidf_similarity` of the generated text and the reference texts.
* mquake (``run_mquake.py`` / the paper, Sec. 4): edit-wise success = share of a case's rewrites whose prompt
  gives o* (every answer token, teacher-forced); instance-wise = every new single hop answered (any alias);
  multi-hop accuracy = a case counts when any of its questions yields the new answer or an alias.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

PROTOCOLS = ("kn", "easyedit", "rome", "mquake")


def not_applicable(reason: str) -> dict:
    return {"applicable": False, "reason": reason}


# --------------------------------------------------------------------------------------------------------
# The per-prompt quantities
# --------------------------------------------------------------------------------------------------------

def token_accuracy(greedy_ids: Sequence[int], target_ids: Sequence[int]) -> float:
    """EasyEdit's test_prediction_acc for one prompt: mean over the target's tokens of argmax == token."""
    if len(greedy_ids) != len(target_ids) or not target_ids:
        raise ValueError("token_accuracy needs one argmax per target token")
    return float(np.mean(np.equal(list(greedy_ids), list(target_ids))))


def argmax_kept(before_ids: Sequence[int], after_ids: Sequence[int]) -> float:
    """EasyEdit's locality for one prompt: share of the target's positions whose argmax is unchanged."""
    if len(before_ids) != len(after_ids) or not before_ids:
        raise ValueError("argmax_kept needs the same positions before and after")
    return float(np.mean(np.equal(list(before_ids), list(after_ids))))


def mean_token_logprob(row: dict) -> float:
    """ROME's per-prompt score: the mean over the target's tokens of log p(token) (teacher-forced)."""
    return float(row["logprob"]) / len(row["token_probs"])


def harmonic_mean(values: Sequence[float]) -> float | None:
    """scipy.stats.hmean of non-negative values (0 when any is 0); None when one is missing."""
    if not values or any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return float(len(values) / sum(1.0 / v for v in values))


# NLTK's Treebank splits: "don't" -> do n't, "France's" -> France 's, punctuation apart, decimals kept whole
_WORD = re.compile(r"[A-Za-z0-9]+?(?=n't)|n't|'[A-Za-z]+|[A-Za-z0-9]+(?:\.[0-9]+)?|[^\sA-Za-z0-9]")


def word_tokens(text: str) -> list[str]:
    """Words, numbers, clitics and punctuation marks, each its own token, as nltk.word_tokenize (which ROME uses)
    splits ordinary English; NLTK is not a dependency here, and rarer cases (abbreviations, quotes) may differ."""
    return _WORD.findall(text)


def compute_n_gram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's compute_n_gram_entropy: for n = 2, 3 the entropy (bits) of the n-gram frequency distribution,
    weighted 2/3 and 4/3, then the arithmetic mean of the two."""
    tokens = word_tokens(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        freqs = np.array(list(grams.values()), dtype=float)
        entropy = float(np.sum(-(freqs / freqs.sum()) * np.log2(freqs / freqs.sum()))) if freqs.size else 0.0
        values.append(entropy * w)
    return float(np.mean(values))


def n_gram_entropy(texts: Sequence[str]) -> float | None:
    """ROME's n_gram_entropy: the arithmetic mean of compute_n_gram_entropy over the generated texts."""
    return float(np.mean([compute_n_gram_entropy(t) for t in texts])) if texts else None


def tfidf_similarity(text_a: str, text_b: str, corpus: Sequence[str]) -> float:
    """Cosine of the TF-IDF vectors of two texts (ROME's tfidf_similarity). IDF as scikit-learn's default
    (ln((1 + n) / (1 + df)) + 1), fitted on `corpus`; ROME fits it on Wikipedia (its idf.npy), which we do not
    ship, so absolute values differ from ROME's: compare runs of this tool with each other."""
    docs = [Counter(w.lower() for w in word_tokens(d)) for d in corpus]
    df = Counter(w for d in docs for w in d)
    n = len(docs)

    def vector(text):
        tf = Counter(w.lower() for w in word_tokens(text))
        return {w: c * (math.log((1 + n) / (1 + df.get(w, 0))) + 1) for w, c in tf.items()}

    a, b = vector(text_a), vector(text_b)
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return float(sum(v * b.get(w, 0.0) for w, v in a.items()) / norm) if norm else 0.0


# --------------------------------------------------------------------------------------------------------
# A case's prompts by group
# --------------------------------------------------------------------------------------------------------

def case_pairs(case, protocol: str) -> dict[str, list[tuple[str, str]]]:
    """(prompt text, answer) pairs by group for `protocol`. Groups: ``rewrite:new|true``,
    ``paraphrase:new|true`` (aligned), ``neighborhood:true`` (each prompt's own answer) and
    ``neighborhood:new`` (o*), ``locality:<group>``, ``portability:<group>`` (the first answer, as EasyEdit
    scores it), and for MQuAKE ``edit:<k>``, ``hop:<k>:<alias>``, ``question:<k>:<alias>``."""
    out: dict[str, list[tuple[str, str]]] = {}
    prompts = {"rewrite": [case.prompt, *case.more_prompts], "paraphrase": list(case.paraphrases)}
    for group, texts in prompts.items():
        if case.target_new:
            out[f"{group}:new"] = [(t, case.target_new) for t in texts]
        if case.target_true:
            out[f"{group}:true"] = [(t, case.target_true) for t in texts]
    if case.neighborhood:
        out["neighborhood:true"] = [(p, a[0]) for p, a in case.neighborhood]
        if case.target_new:
            out["neighborhood:new"] = [(p, case.target_new) for p, _ in case.neighborhood]
    for name, items in case.locality.items():
        out[f"locality:{name}"] = [(p, a[0]) for p, a in items]
    for name, items in case.portability.items():
        out[f"portability:{name}"] = [(p, a[0]) for p, a in items]
    if protocol == "mquake":
        for k, edit in enumerate(case.edits()):
            out[f"edit:{k}"] = [(edit.prompt, edit.target_new)]
        for k, (cloze, answers) in enumerate(case.single_hops):
            for j, answer in enumerate(answers):
                out[f"hop:{k}:{j}"] = [(cloze, answer)]
        for k, question in enumerate(case.questions):
            for j, answer in enumerate(case.new_answers):
                out[f"question:{k}:{j}"] = [(question, answer)]
    return {g: ps for g, ps in out.items() if ps}


def case_prompts(lm, case, protocol: str) -> tuple[dict[str, list], list[tuple[str, str]]]:
    """`case_pairs` rendered for the loaded model (the answer continues the prompt after a space); pairs that do
    not render come back in the second list with the reason. A group loses a prompt only with its partner
    (``:new`` and ``:true`` stay aligned)."""
    from .batch_requests import locality_prompts

    if lm.kind != "causal":
        raise ValueError(f"the {protocol} protocol scores an answer continuing its prompt (EasyEdit, ROME and MQuAKE "
                         "evaluate causal models); this model is masked: use --protocol kn")
    skipped: list[tuple[str, str]] = []
    rendered = {g: [locality_prompts(lm, [pair], skipped) for pair in pairs]
                for g, pairs in case_pairs(case, protocol).items()}
    out = {}
    for g, per_pair in rendered.items():
        base = g.rsplit(":", 1)[0]
        partner = rendered.get(f"{base}:true" if g.endswith(":new") else f"{base}:new")
        keep = [p[0] for k, p in enumerate(per_pair) if p and (partner is None or partner[k])]
        if keep:
            out[g] = keep
    return out, skipped


def case_from_plan(plan):
    """A protocol case from an edit plan over a fact set (kn edit, our request form): the rewrite prompts are the
    fact's prompts that found the neurons, the paraphrases the held-out ones, the neighbourhood the relation's
    other facts (each with its own answer), locality the other relations' facts, portability (update) the facts
    about o'. Causal prompts only (a prompt's text is the prefix its answer continues)."""
    from .field_formats import EditCase

    request, fact = plan.request, plan.request.fact

    def items(group):
        return tuple((p.text, (p.answer.strip(),)) for p in plan.prompts.get(group, []))

    texts = [p.text for p in plan.prompts.get("fact", [])]
    if not texts:
        raise ValueError("the plan has no prompt of the fact to score")
    return EditCase(f"{fact.relation}:{fact.subject}", texts[0], fact.subject, fact.object, request.new_object,
                    fact.relation, paraphrases=tuple(p.text for p in plan.prompts.get("held-out", [])),
                    neighborhood=items("relation"),
                    locality={"other relations": items("other relations")} if items("other relations") else {},
                    portability={"facts about o'": items("portability")} if items("portability") else {},
                    more_prompts=tuple(texts[1:]))


# --------------------------------------------------------------------------------------------------------
# Scoring a case
# --------------------------------------------------------------------------------------------------------

def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


def score_case(protocol: str, prompts: dict[str, list], rows: dict[str, list[dict]],
               before: dict[str, list[dict]] | None = None, kind: str = "update",
               generations: Sequence[str] | None = None, reference_texts: Sequence[str] = (),
               idf_corpus: Sequence[str] = ()) -> dict:
    """The protocol's numbers for one case from its measured `rows` (group -> answer_probabilities rows,
    aligned with `prompts`). `before`: the unedited model's rows (locality compares with them; None when `rows`
    are the unedited model's own). `generations`: texts generated from the case's generation prompts (rome's
    fluency and consistency; None: not generated)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    scorer = {"kn": _kn, "easyedit": _easyedit, "rome": _rome, "mquake": _mquake}[protocol]
    out = scorer(prompts, rows, before, kind)
    if protocol == "rome":
        out["fluency"] = (n_gram_entropy(generations) if generations else
                          not_applicable("no text generated (no generation prompts, or generation not asked for)"))
        if generations and reference_texts:
            out["consistency"] = tfidf_similarity(" ".join(generations), " ".join(reference_texts),
                                                  list(idf_corpus) or list(reference_texts) + list(generations))
        else:
            out["consistency"] = not_applicable("no reference texts about o* (ROME reads them from its "
                                                "attribute_snippets.json; give them as reference_texts)")
    return out


def _kn(prompts, rows, before, kind) -> dict:
    """Ours, per prompt (docs/METRICS.md): all answer tokens must win; locality keeps the first top-1 token."""
    def success(group):
        if kind == "update":
            return [r["correct"] for r in rows.get(f"{group}:new", [])]
        if kind == "suppress":
            return [not r["correct"] for r in rows.get(f"{group}:true", [])]
        if before is None:
            return []
        return [a["prob"] > b["prob"] for a, b in zip(rows.get(f"{group}:true", []), before.get(f"{group}:true", []))]

    kept = [] if before is None else [
        a["top1_id"] == b["top1_id"] for g in rows if g == "neighborhood:true" or g.startswith("locality:")
        for a, b in zip(rows[g], before.get(g, []))]
    return {"reliability": _mean(success("rewrite")), "generality": _mean(success("paraphrase")),
            "locality": _mean(kept) if kept else not_applicable(
                "the unedited model's own rows" if before is None else "no neighborhood or locality prompts")}


def _accuracy(prompts, rows, group) -> float | None:
    return _mean(token_accuracy(r["greedy_ids"], p.answer_ids) for p, r in zip(prompts.get(group, []),
                                                                              rows.get(group, [])))


def _easyedit(prompts, rows, before, kind) -> dict:
    out = {"rewrite_acc": _accuracy(prompts, rows, "rewrite:new"),
           "rephrase_acc": _accuracy(prompts, rows, "paraphrase:new"), "locality": {}, "portability": {}}
    for g in rows:
        name = g.split(":", 1)[1] if ":" in g else g
        if g.startswith("portability:"):
            out["portability"][f"{name}_acc"] = _accuracy(prompts, rows, g)
        elif (g.startswith("locality:") or g == "neighborhood:true") and before is not None:
            out["locality"][f"{'neighborhood' if g == 'neighborhood:true' else name}_acc"] = _mean(
                argmax_kept(b["greedy_ids"], a["greedy_ids"]) for a, b in zip(rows[g], before.get(g, [])))
    if before is None and any(g.startswith("locality:") or g == "neighborhood:true" for g in rows):
        out["locality"] = not_applicable("locality compares the edited model with the unedited one")
    return out


def _pairs(rows, group) -> list[tuple[float, float]]:
    """(mean log p(o*), mean log p(o)) per prompt of a rewrite/paraphrase/neighborhood group."""
    new, true = rows.get(f"{group}:new", []), rows.get(f"{group}:true", [])
    return [(mean_token_logprob(n), mean_token_logprob(t)) for n, t in zip(new, true)]


def _rome(prompts, rows, before, kind) -> dict:
    out = {}
    for name, group, sign in (("ES", "rewrite", 1), ("PS", "paraphrase", 1), ("NS", "neighborhood", -1)):
        pairs = _pairs(rows, group)
        magnitude = name[0] + "M"
        if not pairs:
            out[name] = out[magnitude] = not_applicable(f"no {group} prompts with both o and o*")
            continue
        out[name] = _mean((new > true) if sign > 0 else (true > new) for new, true in pairs)
        out[magnitude] = _mean(sign * (math.exp(new) - math.exp(true)) for new, true in pairs)
    return out


def _mquake(prompts, rows, before, kind) -> dict:
    def answered(prefix, k):
        hits = [r["correct"] for g, rs in rows.items() if g.startswith(f"{prefix}:{k}:") for r in rs]
        return any(hits) if hits else None

    edits = [rows[g][0]["correct"] for g in sorted(rows) if g.startswith("edit:")]
    hops = [answered("hop", k) for k in range(len(rows)) if answered("hop", k) is not None]
    questions = [answered("question", k) for k in range(len(rows)) if answered("question", k) is not None]
    return {"edit_wise": _mean(edits) if edits else not_applicable("no rewrites"),
            "instance_wise": float(all(hops)) if hops else not_applicable("no new_single_hops"),
            "multi_hop": float(any(questions)) if questions else not_applicable("no multi-hop questions"),
            "edits": len(edits), "questions": len(questions)}


# --------------------------------------------------------------------------------------------------------
# Summaries over cases
# --------------------------------------------------------------------------------------------------------

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize(protocol: str, scores: Sequence[dict]) -> dict:
    """The mean over cases of every number (cases where it applies; ``n`` says how many), nested groups kept;
    rome adds S = harmonic mean of ES, PS and NS, computed on the means as ROME's summarize.py does."""
    out: dict = {}
    keys = list(dict.fromkeys(k for s in scores for k in s))
    for key in keys:
        values = [s.get(key) for s in scores]
        if any(isinstance(v, dict) and v.get("applicable", True) for v in values):
            out[key] = summarize(protocol, [v for v in values if isinstance(v, dict) and v.get("applicable", True)])
            continue
        nums = [v for v in values if _number(v)]
        if nums:
            out[key] = float(np.mean(nums))
            out.setdefault("n", {})[key] = len(nums)
        elif values:
            reasons = sorted({v.get("reason", "") for v in values if isinstance(v, dict)})
            out[key] = not_applicable("; ".join(r for r in reasons if r) or "no case")
    if protocol == "rome" and all(_number(out.get(k)) for k in ("ES", "PS", "NS")):
        out["S"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    return out


def flat_scores(d: dict, prefix: str = "") -> dict[str, object]:
    """One level: nested groups' numbers under "group.name" (e.g. "locality.neighborhood_acc"), counts left out."""
    out = {}
    for k, v in d.items():
        if k == "n":
            continue
        if isinstance(v, dict) and v.get("applicable", True):
            out.update(flat_scores(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def format_score(key: str, value) -> str:
    """A protocol's number as a reader reads it: fractions in percent, ROME's magnitudes (EM, PM, NM: differences
    of probabilities) in signed percentage points, fluency in bits, counts as counts; "n/a" otherwise."""
    if not _number(value):
        return "n/a"
    name = key.rsplit(".", 1)[-1]
    if name == "fluency":
        return f"{value:.2f} bits"
    if name in ("edits", "questions"):
        return f"{value:g}"
    if name in ("EM", "PM", "NM"):
        return f"{100 * value:+.1f} pp"
    return f"{100 * value:.1f}%"


def summary_lines(protocol: str, summary: dict) -> list[str]:
    """One line per number: pre -> post (random-neuron control), in percent (fluency in bits)."""
    pre, post, control = (flat_scores(summary.get(side) or {}) for side in ("pre", "post", "control"))
    lines = [f"  {protocol} protocol, means over the requests: before -> after (random-neuron control)"]
    for key, value in post.items():
        lines.append(f"    {key}: {format_score(key, pre.get(key))} -> {format_score(key, value)} "
                     f"({format_score(key, control.get(key))})")
    return lines
