"""`kn reproduce`: the paper's experiments with controls on any model and fact set, written as report.json,
report.md (tables beside the paper's numbers) and PNG figures; and the `kn edit ...` / `kn neuron` commands.

Pipeline of `run_reproduce`:
1. pick relations and facts (by default the facts the model answers best: knowledge neurons of a fact the
   model does not know mean little; `--select random` takes a seeded random sample instead);
2. integrated-gradients attribution of every prompt (cached under OUT/cache, so a re-run or an interrupted
   run resumes), and the activation baseline;
3. refined neurons per fact, with p adapted per relation as in the paper (separately for the baseline with
   its threshold 0.5);
4. neuron statistics, activation by prompt, suppress/amplify with controls, update, erase;
5. report.json, report.md, figures.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import evaluation as ev
from . import experiments as ex
from .cli import tqdm_progress

PAPER = {
    "model": "bert-base-cased on PARAREL (34 relations, 27,738 facts)",
    "mean_neurons_per_fact": 4.13, "shared_intra_relation": 1.23, "shared_inter_relation": 0.09,
    "suppress": -0.2903, "suppress_baseline": -0.0147, "amplify": 0.3117, "amplify_baseline": -0.0127,
    "activation_expressing": 0.485, "activation_subject_only": 0.019, "activation_random": -0.018,
    "update_change_rate": 0.485, "update_success_rate": 0.344, "update_ppl_intra": 8.4, "update_ppl_inter": 7.2,
    "update_random_change_rate": 0.047, "update_random_success_rate": 0.0,
    "erase_ppl_increase": "+36% to +141% (P19 1450 -> 2996, P106 2279 -> 5202)", "erase_other": "+1% to +10%",
    "seconds_per_fact": "about 13 s per fact (9 prompts) on a V100",
}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _versions() -> dict:
    from .store import library_versions

    return {**library_versions(), "platform": platform.platform()}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


# --------------------------------------------------------------------------------------------------------
# Attribution with a cache
# --------------------------------------------------------------------------------------------------------

@dataclass
class _Scores:
    scores: np.ndarray
    activations: np.ndarray
    prob: float


def _attribute_cached(lm, prompt, params, cache: Path | None, cancel=None) -> _Scores:
    from .attribution import attribute

    scoring = {k: v for k, v in params.to_dict().items() if k != "share_prompts"}  # sharing never changes scores
    key = hashlib.sha256(json.dumps([lm.sha256, prompt.text, list(prompt.answer_ids), scoring],
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = cache / f"{key}.npz" if cache is not None else None
    if path is not None and path.exists():
        with np.load(path) as data:
            return _Scores(data["scores"], data["activations"], float(data["prob"]))
    result = attribute(lm, prompt, params, task=cancel)
    out = _Scores(result.scores, result.activations, result.prob)
    if path is not None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, scores=out.scores, activations=out.activations, prob=np.float64(out.prob))
        tmp.replace(path)
    return out


def select_facts(lm, factset, relations, facts_per_relation: int, select: str, seed: int, min_prompts: int = 3,
                 prompts_per_fact: int | None = None) -> tuple[dict, list[dict]]:
    """{relation: [(fact, prompts)]} and the reasons facts or relations were left out."""
    from .facts import render_prompts

    rng = np.random.default_rng(seed)
    chosen, notes = {}, []
    for rid in relations:
        relation = factset.relation(rid)
        candidates = []
        for fact in factset.facts_of(rid):
            prompts, _ = render_prompts(fact, relation, lm.tokenizer, lm.kind)
            if prompts_per_fact:
                prompts = prompts[:prompts_per_fact]
            if len(prompts) >= min_prompts:
                candidates.append((fact, prompts))
        if not candidates:
            notes.append({"relation": rid, "reason": f"no fact has {min_prompts} usable prompts for a {lm.kind} model "
                                                     f"(refinement needs at least 3)"})
            continue
        if select == "known":
            probs = ev.answer_probabilities(lm, [p for _, ps in candidates for p in ps], batch_size=32)
            at, ranked = 0, []
            for k, (fact, ps) in enumerate(candidates):
                rows = probs[at:at + len(ps)]
                at += len(ps)
                ranked.append((-np.mean([r["correct"] for r in rows]), -np.mean([r["prob"] for r in rows]), k))
            order = [k for *_, k in sorted(ranked)]
        else:
            order = list(rng.permutation(len(candidates)))
        chosen[rid] = [candidates[k] for k in order[:facts_per_relation]]
    return chosen, notes


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------

def run_reproduce(lm, factset, out: Path, relations=None, facts_per_relation: int = 10, seed: int = 0,
                  steps: int = 20, prompts_per_fact: int | None = None, select: str = "known",
                  control_prompts: int = 20, t: float = 0.2, p: float = 0.7, erase_k: int = 20,
                  erase_fill: str = "zero", progress=None, say=_say, cancel=None) -> dict:
    from .attribution import AttributionParams
    from .neurons import adapt_p, refined_neurons

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    relations = list(relations or default_relations(factset))
    for rid in relations:
        factset.relation(rid)  # KeyError names the relation
    params = AttributionParams(steps=steps, seed=seed)
    base_params = AttributionParams(method="activation", seed=seed)
    report: dict = {
        "status": "running",
        "model": lm.describe(), "facts": factset.name, "relations": relations,
        "parameters": {"facts_per_relation": facts_per_relation, "seed": seed, "select": select,
                       "prompts_per_fact": prompts_per_fact, "control_prompts": control_prompts,
                       "t": t, "p_start": p, "baseline_t": 0.5, "attribution": params.to_dict(),
                       "baseline_attribution": base_params.to_dict(), "suppress_scope": "answer",
                       "amplify_factor": 2.0, "update": {"lambda1": 1.0, "lambda2": 8.0, "exclusion_fraction": 0.1},
                       "erase": {"k": erase_k, "fill": erase_fill}},
        "versions": _versions(), "paper": PAPER, "timings": timings,
    }

    def write():
        report["timings"]["total"] = time.perf_counter() - started
        (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2))

    def phase(name):
        say(f"[reproduce] {name}")

    try:
        t0 = time.perf_counter()
        phase("selecting facts")
        chosen, notes = select_facts(lm, factset, relations, facts_per_relation, select, seed,
                                     prompts_per_fact=prompts_per_fact)
        report["selection_notes"] = notes
        timings["select"] = time.perf_counter() - t0
        from tqdm import tqdm

        t0 = time.perf_counter()
        n_prompts = sum(len(ps) for facts in chosen.values() for _, ps in facts)
        phase(f"attributing {sum(len(v) for v in chosen.values())} facts, {n_prompts} prompts "
              f"({steps} steps; cached in {cache})")
        ig: dict = {}
        base: dict = {}
        bar = tqdm(total=n_prompts, desc="attribution", file=sys.stderr, unit="prompt")
        for rid, facts in chosen.items():
            for fact, prompts in facts:
                ig[fact] = [_attribute_cached(lm, q, params, cache, cancel) for q in _tick(prompts, bar)]
                base[fact] = [_attribute_cached(lm, q, base_params, cache, cancel) for q in prompts]
        bar.close()
        timings["attribution"] = time.perf_counter() - t0
        timings["attribution_per_fact"] = timings["attribution"] / max(len(ig), 1)

        # refined neurons with p adapted per relation
        records: list[ex.FactNeurons] = []
        adapted = {}
        for rid, facts in chosen.items():
            a = adapt_p([[s.scores for s in ig[f]] for f, _ in facts], t=t, p=p)
            b = adapt_p([[s.scores for s in base[f]] for f, _ in facts], t=0.5, p=p)
            adapted[rid] = {"p": a.p, "mean_neurons": a.mean_neurons, "history": a.history,
                            "baseline_p": b.p, "baseline_mean_neurons": b.mean_neurons}
            for fact, prompts in facts:
                records.append(ex.FactNeurons(
                    fact, prompts, refined_neurons([s.scores for s in ig[fact]], t, a.p),
                    refined_neurons([s.scores for s in base[fact]], 0.5, b.p),
                    [s.activations for s in ig[fact]]))
        report["adapted_p"] = adapted
        report["facts_detail"] = [
            {"relation": r.relation, "subject": r.fact.subject, "object": r.fact.object, "prompts": len(r.prompts),
             "prob": float(np.mean([s.prob for s in ig[r.fact]])),
             "neurons": [list(n) for n in r.neurons], "baseline_neurons": [list(n) for n in r.baseline_neurons]}
            for r in records]

        phase("neuron statistics")
        report["neuron_statistics"] = ex.neuron_statistics([r.neurons for r in records],
                                                           [r.relation for r in records], lm.layout.layers)
        report["baseline_neuron_statistics"] = ex.neuron_statistics(
            [r.baseline_neurons for r in records], [r.relation for r in records], lm.layout.layers)
        report["activation_by_prompt"] = ex.activation_by_prompt(lm, records, factset)
        write()

        t0 = time.perf_counter()
        phase("suppress and amplify, with controls")
        bar = tqdm_progress("suppress/amplify")
        report["suppress_amplify"] = ex.suppress_amplify_experiment(
            lm, records, seed=seed, control_prompts=control_prompts, task=_task(bar))
        bar.close()
        timings["suppress_amplify"] = time.perf_counter() - t0
        write()

        t0 = time.perf_counter()
        phase("update")
        bar = tqdm_progress("update")
        report["update"] = ex.update_experiment(lm, records, factset, seed=seed, facts_per_relation=10,
                                                control_prompts=control_prompts, task=_task(bar))
        bar.close()
        timings["update"] = time.perf_counter() - t0
        write()

        t0 = time.perf_counter()
        phase("erase")
        bar = tqdm_progress("erase")
        report["erase"] = ex.erase_experiment(lm, records, k=erase_k, fill=erase_fill, seed=seed,
                                              control_prompts=2 * control_prompts, task=_task(bar))
        bar.close()
        timings["erase"] = time.perf_counter() - t0
        report["status"] = "done"
    except BaseException as exc:  # KeyboardInterrupt / Cancelled: keep what is done
        report["status"] = f"interrupted ({type(exc).__name__})"
        write()
        say(f"[reproduce] stopped; partial report in {out / 'report.json'}")
        raise
    write()
    phase("figures and report.md")
    figures = write_figures(report, out)
    report["figures"] = figures
    write()
    (out / "report.md").write_text(render_markdown(report))
    say(f"[reproduce] done in {report['timings']['total']:.0f} s: {out / 'report.md'}")
    return report


def _task(bar):
    from .tasks import Task

    return Task(on_progress=lambda fraction, message: bar(fraction or 0.0))


def _tick(items, bar):
    for item in items:
        yield item
        bar.update(1)


def default_relations(factset, n: int = 3) -> list[str]:
    preferred = [r for r in ("P36", "P37", "P30", "P19", "P103", "P1412") if r in factset.relations]
    rest = [r for r in factset.relations if r not in preferred]
    return (preferred + rest)[:n]


# --------------------------------------------------------------------------------------------------------
# Figures and markdown
# --------------------------------------------------------------------------------------------------------

def write_figures(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    stats = report.get("neuron_statistics")
    if stats:
        hist = stats["layer_histogram"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(range(len(hist)), hist, color="#3b6ea8")
        ax.set_xlabel("layer")
        ax.set_ylabel("knowledge neurons")
        ax.set_title(f"Refined knowledge neurons per layer ({stats['facts']} facts)")
        fig.tight_layout()
        fig.savefig(out / "layer_histogram.png", dpi=120)
        plt.close(fig)
        files.append("layer_histogram.png")
    sa = report.get("suppress_amplify")
    if sa and sa["per_relation"]:
        rels = list(sa["per_relation"]) + ["average"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=False)
        width = 0.27
        colors = {"knowledge": "#c0392b", "baseline": "#7f8c8d", "random": "#bdc3c7"}
        for ax, op in zip(axes, ("suppress", "amplify")):
            for k, method in enumerate(("knowledge", "baseline", "random")):
                vals = [sa["per_relation"][r][method][op]["own"]["relative_change"] for r in rels[:-1]]
                vals.append(sa["average"][method][op]["own"])
                ax.bar(np.arange(len(rels)) + (k - 1) * width, [100 * v for v in vals], width,
                       label={"knowledge": "knowledge neurons", "baseline": "activation baseline",
                              "random": "random neurons"}[method], color=colors[method])
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks(range(len(rels)), rels)
            ax.set_ylabel("correct-answer probability change (%)")
            ax.set_title(f"{op.capitalize()} ({'x0' if op == 'suppress' else 'x2'}) at the answer position")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "suppress_amplify.png", dpi=120)
        plt.close(fig)
        files.append("suppress_amplify.png")
    return files


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:+.2f}%"


def _num(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def render_markdown(report: dict) -> str:
    m = report["model"]
    par = report["parameters"]
    lines = [
        "# Knowledge neurons: reproduction report", "",
        f"Model: **{m.get('name', m.get('source'))}** ({m['family']}, {m['kind']}, {m['layers']} layers x "
        f"{m['neurons']} neurons), weights sha256 `{m['sha256'][:16]}...`, {m['dtype']} on {m['device']}.  ",
        f"Facts: `{report['facts']}`, relations {', '.join(report['relations'])}, up to "
        f"{par['facts_per_relation']} facts per relation (selection: {par['select']}), seed {par['seed']}.  ",
        f"Attribution: integrated gradients, {par['attribution']['steps']} steps ({par['attribution']['rule']} "
        f"Riemann points), t = {par['t']}, p adapted per relation from {par['p_start']}; baseline: activation, t = 0.5.  ",
        f"The paper: {PAPER['model']}. Different model, different facts, far fewer facts: compare the direction and "
        f"the gap to the controls, not the digits.", "",
        f"Total time {report['timings'].get('total', 0):.0f} s (attribution {report['timings'].get('attribution', 0):.0f} s, "
        f"{report['timings'].get('attribution_per_fact', 0):.1f} s per fact; paper: {PAPER['seconds_per_fact']}).", "",
    ]
    if report.get("adapted_p"):
        lines += ["| relation | p | mean refined neurons | baseline p | baseline mean |", "|---|---|---|---|---|"]
        for rid, a in report["adapted_p"].items():
            lines.append(f"| {rid} | {a['p']:.2f} | {a['mean_neurons']:.2f} | {a['baseline_p']:.2f} | "
                         f"{a['baseline_mean_neurons']:.2f} |")
        lines.append("")
    s = report.get("neuron_statistics")
    if s:
        lines += ["## Knowledge neurons", "", "| | ours | paper |", "|---|---|---|",
                  f"| mean refined neurons per fact | {_num(s['mean_neurons_per_fact'])} | {PAPER['mean_neurons_per_fact']} |",
                  f"| facts without neurons | {s['facts_without_neurons']} of {s['facts']} | - |",
                  f"| shared neurons, same relation | {_num(s['shared_intra_relation'])} | {PAPER['shared_intra_relation']} |",
                  f"| shared neurons, different relations | {_num(s['shared_inter_relation'])} | {PAPER['shared_inter_relation']} |",
                  "", "Layer histogram: ![layers](layer_histogram.png)", "",
                  "Per layer: " + ", ".join(f"L{l}: {c}" for l, c in enumerate(s["layer_histogram"]) if c), ""]
    a = report.get("activation_by_prompt")
    if a:
        lines += ["## Activation by prompt", "",
                  "Mean activation of a fact's knowledge neurons at the answer position, in the direction that raises "
                  "the answer (ours: the fact's prompts, other relations' templates with the same subject, prompts of "
                  "other relations and subjects; paper: open-domain sentences expressing the fact, with the subject "
                  "only, random).", "",
                  "| | ours | paper |", "|---|---|---|",
                  f"| expressing the fact (its prompts) | {_num(a['expressing'], '{:.3f}')} | {PAPER['activation_expressing']} |",
                  f"| subject only (other relations' templates) | {_num(a['subject_only'], '{:.3f}')} | {PAPER['activation_subject_only']} |",
                  f"| random (other relations and subjects) | {_num(a['random'], '{:.3f}')} | {PAPER['activation_random']} |", ""]
    sa = report.get("suppress_amplify")
    if sa:
        lines += ["## Suppressing and amplifying knowledge neurons", "",
                  "Per relation mean(Δp)/mean(p) of the correct answer over the prompts of its facts, at the answer "
                  "position. Controls: the activation baseline's neurons, and as many random neurons from the same "
                  "layers. `flip` is the share of prompts whose top-1 token changed.", ""]
        for op, paper, paper_base in (("suppress", PAPER["suppress"], PAPER["suppress_baseline"]),
                                      ("amplify", PAPER["amplify"], PAPER["amplify_baseline"])):
            lines += [f"### {op.capitalize()}", "",
                      "| relation | facts | knowledge neurons | flip | baseline | random | KN: same relation | KN: other relations |",
                      "|---|---|---|---|---|---|---|---|"]
            for rid, r in sa["per_relation"].items():
                lines.append(f"| {rid} | {r['facts']} | {_pct(r['knowledge'][op]['own']['relative_change'])} | "
                             f"{_num(r['knowledge'][op]['own']['flip_rate'], '{:.2f}')} | "
                             f"{_pct(r['baseline'][op]['own']['relative_change'])} | "
                             f"{_pct(r['random'][op]['own']['relative_change'])} | "
                             f"{_pct(r['knowledge'][op]['same_relation']['relative_change'])} | "
                             f"{_pct(r['knowledge'][op]['other_relations']['relative_change'])} |")
            av = sa["average"]
            lines.append(f"| **average** | {sa['facts_used']} | **{_pct(av['knowledge'][op]['own'])}** | "
                         f"{_num(sa['average_flip_rate']['knowledge'][op]['own'], '{:.2f}')} | "
                         f"{_pct(av['baseline'][op]['own'])} | {_pct(av['random'][op]['own'])} | "
                         f"{_pct(av['knowledge'][op]['same_relation'])} | {_pct(av['knowledge'][op]['other_relations'])} |")
            lines.append(f"| paper (BERT) | | {_pct(paper)} | | {_pct(paper_base)} | | | barely moves |")
            lines.append("")
        lines += ["![suppress and amplify](suppress_amplify.png)", ""]
    up = report.get("update")
    if up:
        k, r, sa = up.get("knowledge") or {}, up.get("random") or {}, up.get("sign_aware") or {}
        n_flipped = sum(len(f.get("flipped", [])) for f in up["facts"])
        n_neurons = sum(len(f["neurons"]) for f in up["facts"])

        def ppl(arm, kind):
            return (f"{(arm.get(f'ppl_{kind}_ratio_median') or {}).get('text', '-')} "
                    f"({(arm.get(f'ppl_{kind}_ratio_geomean') or {}).get('text', '-')})")

        lines += ["## Updating facts", "",
                  f"λ1 = {up['lambda1']}, λ2 = {up['lambda2']}, {up['embedding']} embeddings ({up['multi_token']} token "
                  f"of multi-token objects), neurons in >10% of the relation's facts left out; {len(up['facts'])} "
                  f"facts updated, {len(up['skipped'])} skipped (not answered correctly, or no neurons left).", "",
                  "Sign-aware (ours, not in the paper): the same neurons, with the edit reversed on those whose mean "
                  f"activation on the fact's prompts is negative ({n_flipped} of {n_neurons} here), since such a "
                  "neuron adds activation × value vector to the residual stream.", "",
                  "| | knowledge neurons | sign-aware (ours) | random neurons | paper | paper random |",
                  "|---|---|---|---|---|---|",
                  f"| change rate | {_pct(k.get('change_rate'))} | {_pct(sa.get('change_rate'))} | {_pct(r.get('change_rate'))} | {_pct(PAPER['update_change_rate'])} | {_pct(PAPER['update_random_change_rate'])} |",
                  f"| success rate (argmax = o') | {_pct(k.get('success_rate'))} | {_pct(sa.get('success_rate'))} | {_pct(r.get('success_rate'))} | {_pct(PAPER['update_success_rate'])} | {_pct(PAPER['update_random_success_rate'])} |",
                  f"| o' in top 5 | {_pct(k.get('top5_rate'))} | {_pct(sa.get('top5_rate'))} | {_pct(r.get('top5_rate'))} | - | - |",
                  *(f"| {kind}-relation perplexity ratio, median (geometric mean) | {ppl(k, kind)} | {ppl(sa, kind)} | "
                    f"{ppl(r, kind)} | +{PAPER[f'update_ppl_{kind}']} | - |" for kind in ("intra", "inter")),
                  ""]
    er = report.get("erase")
    if er:
        lines += ["## Erasing relations", "",
                  f"The relation's {er['k']} most frequent knowledge neurons: value vectors set to {er['fill']}; "
                  f"random: as many random neurons from the same layers. Perplexity of the gold answer.", "",
                  "| relation | accuracy before | after (KN) | after (random) | perplexity before | after (KN) | after (random) | other relations' perplexity before | after (KN) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for rid, e in er["per_relation"].items():
            if "skipped" in e:
                lines.append(f"| {rid} | {e['skipped']} | | | | | | | |")
                continue
            b, kn, rnd = e["before"], e["knowledge"], e["random"]
            lines.append(f"| {rid} | {_num(b['accuracy'])} | {_num(kn['accuracy'])} | {_num(rnd['accuracy'])} | "
                         f"{_num(b['perplexity'], '{:.1f}')} | {_num(kn['perplexity'], '{:.1f}')} | "
                         f"{_num(rnd['perplexity'], '{:.1f}')} | {_num(b['other_perplexity'], '{:.1f}')} | "
                         f"{_num(kn['other_perplexity'], '{:.1f}')} |")
        lines += [f"| paper (BERT) | | | | | {PAPER['erase_ppl_increase']} | | | {PAPER['erase_other']} |", ""]
    lines += ["## Versions", "", "```", json.dumps(report["versions"], indent=1), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Command line: kn edit ..., kn neuron, kn reproduce
# --------------------------------------------------------------------------------------------------------

def _fact_neurons(args, lm, factset, fact, say, results: list | None = None):
    """Attribution of one fact's prompts -> (prompts, refined neurons); `results` receives each prompt's
    PromptScores."""
    from .attribution import AttributionParams, attribute_fact
    from .cli import CliError, bar_task, tqdm_progress
    from .neurons import refined_neurons
    from .facts import render_prompts

    prompts, skipped = render_prompts(fact, factset.relation(fact.relation), lm.tokenizer, lm.kind)
    if not prompts:
        raise CliError(f"no template of {fact.relation} can be used with this {lm.kind} model: "
                       + "; ".join(s.reason for s in skipped))
    bar = tqdm_progress(f"attributing {fact.relation} {fact.subject}")
    scores = attribute_fact(lm, prompts, AttributionParams(steps=args.steps, seed=args.seed), task=bar_task(bar))
    bar.close()
    if results is not None:
        results.extend(scores)
    return prompts, refined_neurons([s.scores for s in scores], args.t, args.p)


def _neurons_doc(neurons):
    return [{"layer": int(l), "neuron": int(i)} for l, i in neurons]


def cmd_edit_activation(args) -> int:
    from . import edits as E
    from .edit_stack import export_model
    from .cli import CliError, emit, factset_of, find_fact, load, say

    factset = factset_of(args)
    fact = find_fact(factset, args.relation, args.subject)
    lm = load(args)
    prompts, neurons = _fact_neurons(args, lm, factset, fact, say)
    if not neurons:
        raise CliError(f"{fact.relation} {fact.subject}: no refined knowledge neurons at t={args.t}, p={args.p}; "
                       f"lower --p")
    make = (lambda n: E.Suppress(tuple(n), args.scope)) if args.edit_kind == "suppress" else \
        (lambda n: E.Amplify(tuple(n), args.factor, args.scope))
    effect = ev.edit_effect(lm, [make(neurons)], prompts)
    control_neurons = E.random_neurons(lm, neurons, seed=args.seed)
    control = ev.edit_effect(lm, [make(control_neurons)], prompts)
    if args.export:
        if args.scope != "all":
            raise CliError("--export needs --scope all (an answer-position edit is not a weight change)")
        export_model(lm, [make(neurons)], args.export)
    doc = {"fact": {"relation": fact.relation, "subject": fact.subject, "object": fact.object},
           "edit": make(neurons).to_dict(), "neurons": _neurons_doc(neurons),
           "prompts": [p.text for p in prompts], "before": effect["before"], "after": effect["after"],
           "relative_change": effect["relative_change"], "flip_rate": effect["flip_rate"],
           "control": {"kind": "random neurons from the same layers", "neurons": _neurons_doc(control_neurons),
                       "after": control["after"], "relative_change": control["relative_change"],
                       "flip_rate": control["flip_rate"]},
           "exported_to": args.export}
    text = [f"{args.edit_kind} {len(neurons)} knowledge neurons of {fact.relation} {fact.subject} -> {fact.object}:",
            *[f"  {p.text!r}: {b:.4f} -> {a:.4f}" for p, b, a in zip(prompts, effect["before"], effect["after"])],
            f"relative change {100 * effect['relative_change']:+.1f}% (random neurons: "
            f"{100 * control['relative_change']:+.1f}%)"]
    emit(args, _jsonable(doc), "\n".join(text))
    return 0


def cmd_edit_update(args) -> int:
    from . import edits as E
    from .edit_stack import export_model
    from .cli import CliError, emit, factset_of, find_fact, load, say
    from .facts import Fact, render_prompts

    factset = factset_of(args)
    fact = find_fact(factset, args.relation, args.subject)
    lm = load(args)
    results: list = []
    prompts, neurons = _fact_neurons(args, lm, factset, fact, say, results)
    relation_sets = []
    others = [f for f in factset.facts_of(fact.relation) if f != fact][: args.relation_facts]
    for other in others:  # to leave out neurons shared by >10% of the relation's facts
        relation_sets.append(_fact_neurons(args, lm, factset, other, say)[1])
    new_prompts, _ = render_prompts(Fact(fact.relation, fact.subject, args.new_object),
                                    factset.relation(fact.relation), lm.tokenizer, lm.kind)
    pairs = [(p, q) for p in prompts for q in new_prompts if p.template == q.template]
    if not pairs:
        raise CliError(f"no template renders both {fact.object!r} and {args.new_object!r}")
    update = E.make_update(lm, neurons, pairs[0][0].answer_ids, pairs[0][1].answer_ids,
                           relation_sets if others else (), 0.1, args.lambda1, args.lambda2,
                           activations=[r.activations for r in results] if args.sign_aware else None)
    if not update.neurons:
        raise CliError("no knowledge neurons left to update" + (" (all shared by >10% of the relation's facts)"
                                                                  if update.excluded else ""))
    own, new = [p for p, _ in pairs], [q for _, q in pairs]

    def measure():
        return ev.answer_probabilities(lm, own, top_k=5), ev.answer_probabilities(lm, new, top_k=5)

    before_old, before_new = measure()
    after_old, after_new = ev.with_edits(lm, [update], measure)
    if args.export:
        ev.with_edits(lm, [update], lambda: export_model(lm, [update], args.export))
    doc = {"fact": {"relation": fact.relation, "subject": fact.subject, "object": fact.object},
           "new_object": args.new_object, "edit": update.to_dict(), "neurons": _neurons_doc(update.neurons),
           "excluded": _neurons_doc(update.excluded), "flipped": _neurons_doc(update.flipped),
           "exclusion": f"computed over {len(relation_sets)} other facts of {fact.relation}" if others else
           "not computed (use --relation-facts N to attribute N other facts of the relation)",
           "prompts": [p.text for p in own],
           "before": {"old": [r["prob"] for r in before_old], "new": [r["prob"] for r in before_new]},
           "after": {"old": [r["prob"] for r in after_old], "new": [r["prob"] for r in after_new]},
           "top1_after": [r["top1_token"] for r in after_old],
           "change_rate": float(np.mean([a["top1_id"] != b["top1_id"] for a, b in zip(after_old, before_old)])),
           "success_rate": float(np.mean([r["correct"] for r in after_new])), "exported_to": args.export}
    text = [f"update {fact.relation} {fact.subject}: {fact.object} -> {args.new_object} "
            f"({len(update.neurons)} neurons, {len(update.excluded)} left out"
            + (f", edit reversed on {len(update.flipped)} negatively active" if args.sign_aware else "") + ")",
            *[f"  {p.text!r}: P(old) {b['prob']:.4f} -> {a['prob']:.4f}, P(new) {bn['prob']:.4f} -> {an['prob']:.4f}, "
              f"top-1 {a['top1_token']!r}" for p, b, a, bn, an in zip(own, before_old, after_old, before_new, after_new)],
            f"change rate {doc['change_rate']:.2f}, success rate {doc['success_rate']:.2f}"]
    emit(args, _jsonable(doc), "\n".join(text))
    return 0


def cmd_edit_erase(args) -> int:
    from . import edits as E
    from .edit_stack import export_model
    from .cli import CliError, emit, factset_of, load, say

    factset = factset_of(args)
    try:
        factset.relation(args.relation)
    except KeyError:
        raise CliError(f"no relation {args.relation!r}; relations: {', '.join(sorted(factset.relations))}") from None
    lm = load(args)
    facts = factset.facts_of(args.relation)[: args.max_facts]
    records = []
    for fact in facts:
        prompts, neurons = _fact_neurons(args, lm, factset, fact, say)
        records.append(ex.FactNeurons(fact, prompts, neurons, []))
    others = [f for f in factset.facts if f.relation != args.relation]
    rng = np.random.default_rng(args.seed)
    from .facts import render_prompts

    other_prompts = []
    for k in rng.permutation(len(others))[: args.control_facts]:
        f = others[k]
        other_prompts += render_prompts(f, factset.relation(f.relation), lm.tokenizer, lm.kind)[0]
    neurons = E.erase_neurons([r.neurons for r in records], args.k)
    if not neurons:
        raise CliError(f"{args.relation}: no knowledge neurons found in {len(records)} facts")
    erase = E.Erase(tuple(neurons), args.fill, E.default_embedding(lm))
    own = [p for r in records for p in r.prompts]

    def measure():
        a = ev.answer_probabilities(lm, own)
        out = {"accuracy": float(np.mean([x["correct"] for x in a])), "perplexity": ev.answer_perplexity(lm, own)}
        if other_prompts:
            b = ev.answer_probabilities(lm, other_prompts)
            out |= {"other_accuracy": float(np.mean([x["correct"] for x in b])),
                    "other_perplexity": ev.answer_perplexity(lm, other_prompts)}
        return out

    before = measure()
    after = ev.with_edits(lm, [erase], measure)
    control = ev.with_edits(lm, [E.Erase(tuple(E.random_neurons(lm, neurons, seed=args.seed)), args.fill,
                                         E.default_embedding(lm))], measure)
    if args.export:
        ev.with_edits(lm, [erase], lambda: export_model(lm, [erase], args.export))
    doc = {"relation": args.relation, "facts": len(records), "edit": erase.to_dict(), "neurons": _neurons_doc(neurons),
           "before": before, "after": after, "control": {"kind": "random neurons from the same layers", **control},
           "exported_to": args.export}
    text = [f"erase {args.relation} ({len(neurons)} neurons from {len(records)} facts):",
            f"  accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f} (random {control['accuracy']:.2f})",
            f"  perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f} (random {control['perplexity']:.1f})"]
    if "other_perplexity" in before:
        text.append(f"  other relations' perplexity {before['other_perplexity']:.1f} -> {after['other_perplexity']:.1f}")
    emit(args, _jsonable(doc), "\n".join(text))
    return 0


def cmd_neuron(args) -> int:
    from .cli import emit, load

    lm = load(args)
    info = ev.neuron_tokens(lm, args.layer, args.index, args.top_k)
    if args.prompt:
        acts = ev.neuron_activations(lm, [(args.layer, args.index)], args.prompt, position=args.position)[:, 0]
        info["activations"] = [{"text": t, "activation": float(a)} for t, a in zip(args.prompt, acts)]
    if args.rank_file:
        sentences = [s.strip() for s in Path(args.rank_file).read_text(encoding="utf-8").splitlines() if s.strip()]
        info["ranked"] = ev.rank_by_activation(lm, [(args.layer, args.index)], sentences, args.position)
    text = [f"L{args.layer} #{args.index} (|v| = {info['norm']:.3f})",
            "promotes:   " + ", ".join(f"{r['token']!r} {r['logit']:+.2f}" for r in info["promotes"]),
            "suppresses: " + ", ".join(f"{r['token']!r} {r['logit']:+.2f}" for r in info["suppresses"])]
    text += [f"  {a['activation']:+.4f}  {a['text']!r}" for a in info.get("activations", [])]
    text += [f"  #{r['rank']} {r['activation']:+.4f}  {r['text']!r}" for r in info.get("ranked", [])]
    emit(args, _jsonable(info), "\n".join(text))
    return 0


def cmd_reproduce(args) -> int:
    from .cli import emit, factset_of, load, say

    factset = factset_of(args)
    lm = load(args)
    relations = [r.strip() for r in args.relations.split(",") if r.strip()] if args.relations else None
    report = run_reproduce(lm, factset, Path(args.out), relations, args.facts_per_relation, args.seed, args.steps,
                           args.prompts_per_fact, args.select, args.control_prompts, say=say)
    sa = report.get("suppress_amplify", {}).get("average", {})
    doc = {"out": str(args.out), "status": report["status"], "report": str(Path(args.out) / "report.json"),
           "suppress": sa.get("knowledge", {}).get("suppress", {}).get("own"),
           "amplify": sa.get("knowledge", {}).get("amplify", {}).get("own"),
           "seconds": report["timings"].get("total")}
    emit(args, _jsonable(doc), (Path(args.out) / "report.md").read_text())
    return 0


def add_edit_commands(subparsers) -> None:
    """Adds `kn edit suppress|amplify|update|erase`, `kn neuron` and `kn reproduce` (handlers: func(args))."""
    from .cli import COMMON

    def attribution_options(p):
        p.add_argument("--facts", default="builtin", help="'builtin' or a PARAREL folder / .csv / .jsonl")
        p.add_argument("--steps", type=int, default=20, help="integration steps (paper: 20)")
        p.add_argument("--t", type=float, default=0.2, help="coarse threshold (paper: 0.2)")
        p.add_argument("--p", type=float, default=0.7, help="refinement share of prompts (paper: starts at 0.7)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random control neurons")
        p.add_argument("--export", metavar="DIR", help="save the edited model (save_pretrained) to DIR")

    edit = subparsers.add_parser("edit", help="suppress, amplify, update or erase knowledge, with a control")
    edit_sub = edit.add_subparsers(dest="edit_kind", required=True)
    for kind in ("suppress", "amplify"):
        p = edit_sub.add_parser(kind, parents=[COMMON], help=f"{kind} a fact's knowledge neurons")
        p.add_argument("--relation", required=True)
        p.add_argument("--subject", required=True)
        p.add_argument("--scope", choices=["answer", "all"], default="answer",
                       help="answer: only at the answer position (the paper); all: every position")
        if kind == "amplify":
            p.add_argument("--factor", type=float, default=2.0)
        attribution_options(p)
        p.set_defaults(func=cmd_edit_activation)
    p = edit_sub.add_parser("update", parents=[COMMON], help="move a fact's object to a new one")
    p.add_argument("--relation", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--new-object", required=True)
    p.add_argument("--lambda1", type=float, default=1.0)
    p.add_argument("--lambda2", type=float, default=8.0)
    p.add_argument("--relation-facts", type=int, default=0,
                   help="attribute N other facts of the relation to leave out neurons shared by >10%% of them")
    p.add_argument("--sign-aware", action="store_true",
                   help="reverse the edit on neurons whose mean activation on the fact's prompts is negative "
                        "(gated FFNs; not in the paper)")
    attribution_options(p)
    p.set_defaults(func=cmd_edit_update)
    p = edit_sub.add_parser("erase", parents=[COMMON], help="erase a relation (its k most frequent knowledge neurons)")
    p.add_argument("--relation", required=True)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--fill", choices=["zero", "unk"], default="zero")
    p.add_argument("--max-facts", type=int, default=10, help="facts of the relation to attribute")
    p.add_argument("--control-facts", type=int, default=10, help="facts of other relations to measure")
    attribution_options(p)
    p.set_defaults(func=cmd_edit_erase)

    neuron = subparsers.add_parser("neuron", parents=[COMMON], help="what one neuron's value vector promotes")
    neuron.add_argument("--layer", type=int, required=True)
    neuron.add_argument("--index", type=int, required=True)
    neuron.add_argument("--top-k", type=int, default=10)
    neuron.add_argument("--prompt", action="append", help="show the activation on this text (repeatable)")
    neuron.add_argument("--rank-file", help="rank the sentences of this text file (one a line) by activation")
    neuron.add_argument("--position", choices=["answer", "max", "mean", "last"], default="answer")
    neuron.set_defaults(func=cmd_neuron)

    rep = subparsers.add_parser("reproduce", parents=[COMMON], help="the paper's experiments with controls")
    rep.add_argument("--facts", default="builtin", help="'builtin' or a PARAREL folder / .csv / .jsonl")
    rep.add_argument("--relations", help="comma-separated relation ids (default: 3 relations)")
    rep.add_argument("--facts-per-relation", type=int, default=10)
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--steps", type=int, default=20, help="integration steps (paper: 20)")
    rep.add_argument("--prompts-per-fact", type=int, default=None, help="use at most N templates per fact")
    rep.add_argument("--select", choices=["known", "random"], default="known",
                     help="known: the facts the model answers best; random: a seeded sample")
    rep.add_argument("--control-prompts", type=int, default=20, help="prompts sampled per control group")
    rep.add_argument("--out", required=True, help="folder for report.json, report.md and the figures")
    rep.set_defaults(func=cmd_reproduce)
