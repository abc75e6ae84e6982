"""The reproduction's report: report.json (everything, strict JSON by ``kn_core.jsonio``), report.md (tables beside the paper's
numbers, and a "Left out" section naming every template, fact and relation that was not used, with its
reason) and PNG figures. Pure functions of the report dict, so a report can be re-rendered from its JSON.

Perplexity changes are ratios after/before ("x3.2", "x1.2e26", from ``evaluation.ratio``): an edit that wrecks
the model multiplies perplexity by orders of magnitude, and a 30-digit difference reads as noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .. import experiments as ex
from ..attribution import integration_text
from ..jsonio import dumps, write_text_atomic
from ..neurons import neuron_name
from ..validation import markdown_safe
from .html import provenance_rows, read_figures, render_html
from .localisation import localisation_markdown
from .metrics_section import metrics_markdown
from .specificity_section import (UNKNOWN, by_known_markdown, facts_markdown, specificity_markdown,
                                  syntax_markdown)

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


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.floating)) and math.isfinite(float(x))


def _ratio_text(before, after) -> str:
    from ..evaluation import ratio

    return ratio(before, after)["text"] if _finite(before) and _finite(after) else "n/a"


def _pct(x) -> str:
    """A relative change: signed, or a ratio beyond a doubling (evaluation.change_text)."""
    from ..evaluation import change_text

    return change_text(x, 2) if _finite(x) else "n/a"


def _rate(x) -> str:
    """A share of prompts or facts: unsigned."""
    return f"{100 * x:.1f}%" if _finite(x) else "n/a"


def _num(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if _finite(x) else "n/a"


UPDATE_ARMS = (("knowledge", "knowledge neurons (paper)"), ("sign_aware", "sign-aware (ours)"),
               ("calibrated", "calibrated (ours)"), ("random", "random neurons"),
               ("calibrated_random", "random, calibrated scale"))


# --------------------------------------------------------------------------------------------------------
# Figures
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
        labels = {"knowledge": "knowledge neurons", "baseline": "activation baseline", "random": "random neurons"}
        for ax, op in zip(axes, ("suppress", "amplify")):
            for k, method in enumerate(("knowledge", "baseline", "random")):
                vals = [sa["per_relation"][r][method][op]["own"]["relative_change"] for r in rels[:-1]]
                vals.append(sa["average"][method][op]["own"])
                ax.bar(np.arange(len(rels)) + (k - 1) * width,
                       [100 * v if _finite(v) else 0.0 for v in vals], width, label=labels[method],
                       color=colors[method])
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


# --------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------

def _left_out_reason(report: dict, rid: str) -> str | None:
    for item in report.get("left_out", {}).get("relations", []):
        if item["relation"] == rid:
            return item["reason"]
    return None


def _header(report: dict) -> list[str]:
    m, par, tm = report["model"], report["parameters"], report["timings"]
    templates = (f", causal templates: {par['causal_templates']} (text after [Y] dropped)"
                 if par.get("causal_templates") == "prefix" else
                 f", causal templates: {par['causal_templates']}" if par.get("causal_templates") else "")
    templates += ", prompts through the chat template" if par.get("prompt_format") == "chat" else ""
    progress = report.get("attribution_progress") or {}
    done = (f" ({progress['done']} of {progress['prompts']} prompts attributed)"
            if progress and progress["done"] < progress["prompts"] else "")
    return [
        "# Knowledge neurons: reproduction report", "",
        f"Status: **{report['status']}**{done}.  ",
        f"Model: **{m.get('name', m.get('source'))}** ({m['family']}, {m['kind']}, {m['layers']} layers x "
        f"{m['neurons']} neurons), weights sha256 `{m['sha256'][:16]}...`, {m['dtype']} on {m['device']}.  ",
        f"Facts: `{report['facts']}`, relations {', '.join(report['relations'])}, up to "
        f"{par['facts_per_relation']} facts per relation (selection: {par['select']}"
        + (f", screened in a seeded order on their first {par['check_prompts']} prompts until enough are known, "
           f"at most {par['screen_cap']} per relation" if par["select"] == "known" and "screen_cap" in par else
           f", at most {par.get('sample_factor')}x as many checked per relation on their first "
           f"{par['check_prompts']} prompts" if par["select"] == "known" else "")
        + f"), seed {par['seed']}{templates}.  ",
        f"Attribution: integrated gradients, {integration_text(par['attribution'])}, t = {par['t']}, p adapted "
        f"per relation from {par['p_start']}; baseline: activation, "
        f"t = 0.5.  ",
        f"The paper: {PAPER['model']}. Different model, different facts, far fewer facts: compare the direction "
        f"and the gap to the controls, not the digits.", "",
        _timing_text(tm), "",
    ]


def _relations_table(report: dict) -> list[str]:
    sel, adapted = report.get("selection", {}), report.get("adapted_p", {})
    lines = ["## Relations", "",
             "Every selected relation, with how many of its facts were checked (screened for known facts) and chosen, "
             "and how many of the chosen the model knows; a relation without usable facts stays in this table with "
             "its reason.", "",
             "| relation | facts in set | checked | chosen | known chosen | prompts per fact | p | mean refined neurons | "
             "baseline p | baseline mean |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rid in report["relations"]:
        s, a = sel.get(rid), adapted.get(rid)
        reason = _left_out_reason(report, rid)
        if s is None:
            lines.append(f"| {rid} | not reached ({report['status']}) | | | | | | | | |")
            continue
        ppf = s.get("prompts_per_fact") or []
        prompts = f"{min(ppf)}-{max(ppf)}" if ppf and min(ppf) != max(ppf) else (str(ppf[0]) if ppf else "-")
        checked = s["checked"] if report["parameters"]["select"] == "known" else "-"
        row = f"| {rid} | {s['facts']} | {checked} | {s['chosen']} | {s.get('chosen_known', '-')} | {prompts} | "
        if reason:
            row += f"left out: {reason} | | | |"
        elif a:
            row += (f"{a['p']:.2f} | {a['mean_neurons']:.2f} | {a['baseline_p']:.2f} | "
                    f"{a['baseline_mean_neurons']:.2f} |")
        else:
            row += "| | | |"
        lines.append(row)
    notes = [f"- {rid}: {sel[rid]['note']}" for rid in report["relations"] if (sel.get(rid) or {}).get("note")]
    return lines + [""] + (notes + [""] if notes else [])


def _neurons_section(report: dict) -> list[str]:
    s = report.get("neuron_statistics")
    if not s:
        return []
    lines = ["## Knowledge neurons", ""] + by_known_markdown(report)
    flags, both = report.get("flags"), report.get("both_ways")
    if flags:
        rule = flags.get("rule", {})
        lines += [f"Flagged neurons (kept apart, beyond the paper): {len(flags['massive'])} massive "
                  f"({', '.join(neuron_name(l, i) for l, i in flags['massive'][:12]) or 'none'}), "
                  f"{len(flags['unspecific'])} unspecific. Massive: {rule.get('massive', '-')} "
                  f"({rule.get('stats_source', '')}). Unspecific: {rule.get('unspecific', '-')}. They are "
                  + ("**excluded** from refined and relation-level neurons (the default; `--keep-massive` keeps "
                     "them)." if flags.get("excluded_from_neurons") else "**kept** (`--keep-massive`)."), ""]
    if both:
        x, k = both["flagged_excluded"], both["flagged_kept"]
        lines += ["All chosen facts, known and unknown together, before the subject control:", "",
                  "| | flagged neurons excluded (default) | flagged neurons kept | paper |", "|---|---|---|---|",
                  f"| mean refined neurons per fact | {_num(x['mean_neurons_per_fact'])} | "
                  f"{_num(k['mean_neurons_per_fact'])} | {PAPER['mean_neurons_per_fact']} |",
                  f"| facts without neurons | {x['facts_without_neurons']} of {x['facts']} | "
                  f"{k['facts_without_neurons']} of {k['facts']} | - |",
                  f"| shared neurons, same relation | {_num(x['shared_intra_relation'])} | "
                  f"{_num(k['shared_intra_relation'])} | {PAPER['shared_intra_relation']} |",
                  f"| shared neurons, different relations | {_num(x['shared_inter_relation'])} | "
                  f"{_num(k['shared_inter_relation'])} | {PAPER['shared_inter_relation']} |",
                  f"| flagged neurons among refined | {x['flagged_among_refined']} of {x['refined_total']} | "
                  f"{k['flagged_among_refined']} of {k['refined_total']} | - |",
                  f"| refined neurons in layer 0 | {x['layer_histogram'][0]} | {k['layer_histogram'][0]} | - |", ""]
    else:
        lines += ["| | ours | paper |", "|---|---|---|",
                  f"| mean refined neurons per fact | {_num(s['mean_neurons_per_fact'])} | {PAPER['mean_neurons_per_fact']} |",
                  f"| facts without neurons | {s['facts_without_neurons']} of {s['facts']} | - |",
                  f"| shared neurons, same relation | {_num(s['shared_intra_relation'])} | {PAPER['shared_intra_relation']} |",
                  f"| shared neurons, different relations | {_num(s['shared_inter_relation'])} | {PAPER['shared_inter_relation']} |",
                  ""]
    return lines + ["Layer histogram (the neurons the experiments use, all facts): ![layers](layer_histogram.png)", "",
                    "Per layer, all facts: " + ", ".join(f"L{l}: {c}" for l, c in enumerate(s["layer_histogram"]) if c), ""]


def _activation_section(report: dict) -> list[str]:
    a = report.get("activation_by_prompt")
    if not a:
        return []
    lines = ["## Activation by prompt", "",
             f"Mean activation of a fact's knowledge neurons at the answer position, measured in the direction "
             f"that raises the answer ({a.get('direction', '')}); up to {a.get('prompts_per_group', '-')} prompts "
             f"per group and fact, {a.get('facts', 0)} facts. Expressing: the fact's own prompts; subject only: "
             f"other relations' templates with the same subject; random: "
             + (a.get("random_prompts") or "other relations' prompts about other subjects")
             + " (paper: open-domain sentences of each kind).", "",
             f"| | known facts | {UNKNOWN} | all facts | paper |", "|---|---|---|---|---|"]
    groups = ("expressing", "subject_only", "random") + (("corpus",) if "corpus" in a else ())
    split = ex.split_by_known(a.get("per_fact", []), ex.known_by_label(report.get("fact_answers")), groups)
    paper = {"expressing": PAPER["activation_expressing"], "subject_only": PAPER["activation_subject_only"],
             "random": PAPER["activation_random"], "corpus": "-"}
    names = {"expressing": "expressing the fact", "subject_only": "subject only", "random": "random",
             "corpus": "corpus"}
    lines.append(f"| facts | {split['known']['facts']} | {split['unknown']['facts']} | {a.get('facts', 0)} | |")
    for g in groups:
        lines.append(f"| {names[g]} | {_num(split['known'][g], '{:.3f}')} | {_num(split['unknown'][g], '{:.3f}')} | "
                     f"{_num(a.get(g), '{:.3f}')} | {paper[g]} |")
    lines.append("")
    for side, values in (("known facts", split["known"]), ("all facts", a)):
        order = [values.get(g) for g in ("expressing", "subject_only", "random")]
        if all(_finite(v) for v in order):
            holds = order[0] > order[1] > order[2]
            lines.append(f"Expressing > subject only > random, as in the paper, {side}: **{'yes' if holds else 'no'}**.")
    return lines + [""]


def _suppress_amplify_section(report: dict) -> list[str]:
    sa = report.get("suppress_amplify")
    if not sa:
        return []
    lines = ["## Suppressing and amplifying knowledge neurons", "",
             "Per relation mean(Δp)/mean(p) of the correct answer over the prompts of its facts, at the answer "
             "position. Controls: the activation baseline's neurons, and as many random neurons from the same "
             "layers. `flip` is the share of prompts whose top-1 token changed.", ""]
    if sa.get("by_known"):
        lines += ["Known facts (the headline) and facts the model does not know, pooled over their prompts:", "",
                  "| facts | n | suppress | random | amplify | random |", "|---|---|---|---|---|---|"]
        for side, label in (("known", "known"), ("unknown", "unknown (template-like by construction)")):
            k = sa["by_known"].get(side)
            if k:
                lines.append(f"| {label} | {k['facts']} | "
                             + " | ".join(_pct(k[arm][op]['own']['relative_change'])
                                          for op in ("suppress", "amplify") for arm in ("knowledge", "random"))
                             + " |")
        lines += ["", "Per relation, all chosen facts with neurons (known and unknown together):", ""]
    ops = [("suppress", PAPER["suppress"], PAPER["suppress_baseline"], "Suppress (activation -> 0)"),
           ("amplify", PAPER["amplify"], PAPER["amplify_baseline"], "Amplify (activation x 2)")]
    if "suppress_mean" in sa["average"]["knowledge"]:
        ops.append(("suppress_mean", None, None, "Mean-ablation (activation -> its mean; ours, beside zeroing)"))
    for op, paper, paper_base, title in ops:
        lines += [f"### {title}", "",
                  "| relation | facts | knowledge neurons | flip | baseline | random | KN: same relation | KN: other relations |",
                  "|---|---|---|---|---|---|---|---|"]
        for rid in report["relations"]:
            r = sa["per_relation"].get(rid)
            if r is None:
                reason = _left_out_reason(report, rid) or "no chosen fact has knowledge neurons"
                lines.append(f"| {rid} | 0 | left out: {reason} | | | | | |")
                continue
            k = r["knowledge"][op]
            lines.append(f"| {rid} | {r['facts']} | {_pct(k['own']['relative_change'])} | "
                         f"{_num(k['own']['flip_rate'], '{:.2f}')} | "
                         f"{_pct(r['baseline'][op]['own']['relative_change'])} | "
                         f"{_pct(r['random'][op]['own']['relative_change'])} | "
                         f"{_pct(k['same_relation']['relative_change'])} | "
                         f"{_pct(k['other_relations']['relative_change'])} |")
        av = sa["average"]
        lines.append(f"| **average** | {sa['facts_used']} | **{_pct(av['knowledge'][op]['own'])}** | "
                     f"{_num(sa['average_flip_rate']['knowledge'][op]['own'], '{:.2f}')} | "
                     f"{_pct(av['baseline'][op]['own'])} | {_pct(av['random'][op]['own'])} | "
                     f"{_pct(av['knowledge'][op]['same_relation'])} | {_pct(av['knowledge'][op]['other_relations'])} |")
        if paper is not None:
            lines.append(f"| paper (BERT) | | {_pct(paper)} | | {_pct(paper_base)} | | | barely moves |")
        lines.append("")
    figure = ["", "![suppress and amplify](suppress_amplify.png)"] if sa["per_relation"] else []  # write_figures
    return lines + figure + [""]


def _update_section(report: dict) -> list[str]:
    up = report.get("update")
    if not up:
        return []
    arms = [(arm, label) for arm, label in UPDATE_ARMS if up.get(arm)]
    lines = ["## Updating facts", "",
             f"λ1 = {up['lambda1']}, λ2 = {up['lambda2']}, {up['embedding']} embeddings ({up['multi_token']} token "
             f"of multi-token objects), neurons in >10% of the relation's other facts left out where at least 10 "
             f"other facts support that share ("
             + "; ".join(f"{rid}: {note}" for rid, note in (up.get("shared_rule") or {}).items())
             + f"); only known facts are updated; left out by the shared-neuron rule: "
             f"{up.get('left_out_by_shared_rule', 'n/a')}; {len(up['facts'])} "
             f"facts updated, {len(up['skipped'])} skipped (listed under Left out). Sign-aware: the edit reversed "
             f"on neurons whose activation on the fact's prompts is negative. Calibrated: sign-aware, with both λ "
             f"scaled by the smallest factor in {up.get('calibration_range')} at which o' becomes the answer on "
             f"the fact's prompts. Perplexity: median over updated facts of after/before.", ""]
    if not arms:
        return lines + ["No fact could be updated, so there are no update numbers (the reasons are under Left out).",
                        ""]
    lines += ["| | " + " | ".join(label for _, label in arms) + " | paper | paper random |",
              "|---" * (len(arms) + 3) + "|"]

    def row(name, key, paper="-", paper_random="-", fmt=_rate):
        return f"| {name} | " + " | ".join(fmt(up[arm].get(key)) for arm, _ in arms) + f" | {paper} | {paper_random} |"

    lines += [row("change rate", "change_rate", _rate(PAPER["update_change_rate"]),
                  _rate(PAPER["update_random_change_rate"])),
              row("success rate (argmax = o')", "success_rate", _rate(PAPER["update_success_rate"]),
                  _rate(PAPER["update_random_success_rate"])),
              row("o' in top 5", "top5_rate")]
    for kind in ("intra", "inter"):
        lines.append(f"| {kind}-relation perplexity, median ratio | "
                     + " | ".join((up[arm].get(f"ppl_{kind}_ratio_median") or {}).get("text", "n/a") for arm, _ in arms)
                     + f" | +{PAPER[f'update_ppl_{kind}']} (a difference) | - |")
    if up.get("calibrated"):
        lines.append(row("calibrated: median scale of λ", "scale", fmt=lambda v: _num(v, "{:.3g}")))
        lines.append(row("calibrated: facts where o' won every prompt at a scale in the range", "reached_rate"))
    lines += ["", "Per fact (a failed update says so: o' did not become the model's answer on most prompts):", "",
              "| fact | o -> o' | " + " | ".join(label for arm, label in arms if "random" not in arm) + " |",
              "|---|---" + "|---" * sum("random" not in arm for arm, _ in arms) + "|"]
    for r in up["facts"]:
        cells = []
        for arm, _ in arms:
            if "random" in arm:
                continue
            x = r.get(arm)
            if not x:
                cells.append("-")
                continue
            verdict = "succeeded" if x["success_rate"] >= 0.5 else "**failed**"
            scale = f", scale {x['scale']:.3g}" if _finite(x.get("scale")) else ""
            cells.append(f"{verdict} ({_rate(x['success_rate'])} of prompts{scale}); perplexity intra "
                         f"{_ratio_text(x['ppl_intra_before'], x['ppl_intra_after'])}, inter "
                         f"{_ratio_text(x['ppl_inter_before'], x['ppl_inter_after'])}")
        lines.append(f"| {r['fact']} | {r['object']} -> {r['new_object']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _erase_section(report: dict) -> list[str]:
    er = report.get("erase")
    if not er:
        return []
    lines = ["## Erasing relations", "",
             f"The relation's {er['k']} most frequent knowledge neurons: value vectors set to {er['fill']}; "
             f"random: as many random neurons from the same layers. Perplexity of the gold answer before, and "
             f"its ratio after/before.", "",
             "| relation | accuracy before | after (KN) | after (random) | perplexity before | after (KN) | "
             "after (random) | other relations' perplexity before | after (KN) | after (random) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rid in report["relations"]:
        e = er["per_relation"].get(rid)
        if e is None or "skipped" in e:
            reason = (e or {}).get("skipped") or _left_out_reason(report, rid) or "no facts"
            lines.append(f"| {rid} | left out: {reason} | | | | | | | | |")
            continue
        b, kn, rnd = e["before"], e["knowledge"], e["random"]
        lines.append(f"| {rid} | {_num(b['accuracy'])} | {_num(kn['accuracy'])} | {_num(rnd['accuracy'])} | "
                     f"{_num(b['perplexity'], '{:.3g}')} | {_ratio_text(b['perplexity'], kn['perplexity'])} | "
                     f"{_ratio_text(b['perplexity'], rnd['perplexity'])} | {_num(b['other_perplexity'], '{:.3g}')} | "
                     f"{_ratio_text(b['other_perplexity'], kn['other_perplexity'])} | "
                     f"{_ratio_text(b['other_perplexity'], rnd['other_perplexity'])} |"
                     + (f" ({e['fewer_neurons']})" if e.get("fewer_neurons") else ""))
    return lines + [f"| paper (BERT) | | | | | {PAPER['erase_ppl_increase']} | | | {PAPER['erase_other']} | |", ""]


def _degeneracy_section(report: dict) -> list[str]:
    dg = report.get("degeneracy")
    if not dg:
        return []
    lines = ["## Degeneracy (Chen et al., AAAI 2024)", "",
             "Each fact's knowledge neurons suppressed one at a time, in pairs and all together (activation -> 0 at "
             f"the answer position). {dg['params']['definition'].capitalize()}. A *redundant pair* leaves the fact "
             "when either neuron is suppressed and removes it when both are (either alone suffices: Chen et al.'s "
             "degenerate knowledge neurons); the *whole set* is redundant when all together remove the fact but no "
             f"single neuron does. Pairs among at most {dg['params']['max_neurons']} strongest neurons per fact. "
             "Random: as many random neurons from the same layers, tested the same way.", "",
             "| relation | facts | applicable | with redundant pairs | whole set redundant | degenerate | "
             "all removes | redundant / tested pairs | random: degenerate | random: all removes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(rid, dg["per_relation"].get(rid)) for rid in report["relations"]] + [("**total**", dg["total"])]
    for rid, r in rows:
        if r is None:
            lines.append(f"| {rid} | 0 | left out: {_left_out_reason(report, rid) or 'no fact has knowledge neurons'}"
                         " | | | | | | | |")
            continue
        k, rnd = r["knowledge"], r.get("random", {})
        lines.append(f"| {rid} | {k['facts']} | {k['applicable']} | {k['with_redundant_pairs']} | "
                     f"{k['whole_set_redundant']} | {k['degenerate']} | {k['all_removes']} | "
                     f"{k['redundant_pairs']} / {k['pairs_tested']} | {rnd.get('degenerate', '-')} | "
                     f"{rnd.get('all_removes', '-')} |")
    named = [f for f in dg["facts"] if f["redundant_pairs"] or f["all"]["redundant"]]
    if named:
        lines += ["", "Redundant subsets:", ""]
        for f in named:
            pairs = ", ".join(" + ".join(neuron_name(l, i) for l, i in p) for p in f["redundant_pairs"]) or "none"
            whole = "; the whole set (" + " + ".join(neuron_name(l, i) for l, i in f["neurons"]) + ")" \
                if f["all"]["redundant"] else ""
            lines.append(f"- {f['relation']} {f['subject']} -> {f['object']}: pairs {pairs}{whole}")
    skipped = [f"{f['relation']} {f['subject']}: {f['reason']}" for f in dg["facts"] if not f["applicable"]]
    skipped += [f"{x}: no knowledge neurons" for x in dg["facts_without_neurons"]]
    skipped += [f"{f['relation']} {f['subject']}: {x['what']} ({x['reason']})" for f in dg["facts"]
                for x in f["left_out"]]
    if skipped:
        lines += ["", "Not tested: " + "; ".join(skipped) + "."]
    return lines + [""]


def _left_out_section(report: dict) -> list[str]:
    lo = report.get("left_out")
    if lo is None:
        return []
    lines = ["## Left out", "",
             "Nothing is dropped silently: every relation, template and fact that was not used, with its reason.", ""]
    lines += ["### Relations", ""] + ([f"- {x['relation']}: {x['reason']}" for x in lo["relations"]] or ["- none"])
    lines += ["", "### Templates", "",
              "A template can be unusable for some facts only (e.g. an object the tokenizer cannot spell).", ""]
    if lo["templates"]:
        lines += ["| relation | template | reason | facts |", "|---|---|---|---|"]
        lines += [f"| {x['relation']} | `{x['template']}` | {x['reason']} | {x['facts']} of {x['of_facts']} |"
                  for x in lo["templates"]]
    else:
        lines.append("- none")
    lines += ["", "### Facts", ""]
    sel = report.get("selection", {})
    for rid in report["relations"]:
        s = sel.get(rid)
        if s is None:
            continue
        facts = [x for x in lo["facts"] if x["relation"] == rid]
        unchecked = s["facts"] - s["rendered"]
        lines.append(f"- {rid}: {len(facts)} left out"
                     + (f"; {unchecked} not checked (bounded random sample)" if unchecked else ""))
        if facts:
            lines += ["  <details><summary>list</summary>", ""]
            lines += [f"  - {x['subject']} -> {x['object']}: {x['reason']}" for x in facts]
            lines += ["", "  </details>"]
    skipped = [("update", x) for x in (report.get("update") or {}).get("skipped", [])]
    skipped += [("suppress/amplify", {"fact": f, "reason": "no knowledge neurons"})
                for f in (report.get("suppress_amplify") or {}).get("facts_without_neurons", [])]
    if skipped:
        lines += ["", "### Facts left out of an experiment", ""]
        lines += [f"- {where}: {x['fact']}: {x['reason']}" for where, x in skipped]
    return lines + [""]


def render_markdown(report: dict) -> str:
    versions = report["versions"]
    report = markdown_safe(report)  # fact texts may hold <script>, [x](javascript:...), | or newlines
    lines = _header(report) + _relations_table(report) + facts_markdown(report)
    for section in (_neurons_section, specificity_markdown, syntax_markdown, _activation_section,
                    _suppress_amplify_section, _update_section, _erase_section, _degeneracy_section,
                    metrics_markdown, localisation_markdown, _left_out_section):
        lines += section(report)
    lines += ["## Versions", "", "```", json.dumps(versions, indent=1), "```", ""]
    return "\n".join(lines)


def write_html(report: dict, out: Path) -> Path:
    """report.html: report.md's Markdown with the figures in ``out`` embedded and the run's provenance."""
    markdown = render_markdown(report)
    path = Path(out) / "report.html"
    write_text_atomic(path, render_html(markdown, read_figures(Path(out), markdown), provenance_rows(report)))
    return path


def write_report(report: dict, out: Path) -> None:
    """Derived numbers, figures, report.json, report.md and report.html (the same Markdown, self-contained) in
    ``out``."""
    out = Path(out)
    report["figures"] = write_figures(report, out)
    write_text_atomic(out / "report.json", dumps(report, indent=2))  # a full disk keeps the earlier file whole
    write_text_atomic(out / "report.md", render_markdown(report))
    write_html(report, out)


def _timing_text(tm: dict) -> str:
    """The run's times, saying which parts were read from the cache (an earlier run computed them, so they are
    not in these seconds and no time per fact can be given)."""
    select = f"fact selection {tm.get('select', 0):.0f} s, {tm.get('select_cpu', 0):.0f} CPU s"
    if tm.get("select_cached_relations"):
        select += f" (the check of {tm['select_cached_relations']} relation(s) read from the cache)"
    cached = tm.get("attribution_cached_prompts", 0)
    if cached or tm.get("attribution_per_fact", 0) is None:
        what = f"with {cached} prompt(s) read from the cache" if cached else "resumed from the cache"
        attribution = (f"attribution {tm.get('attribution', 0):.0f} s, {what} (computed by an earlier run), so no "
                       f"time per fact is given; run without the cache folder for one")
    else:
        attribution = f"attribution {tm.get('attribution', 0):.0f} s, {tm.get('attribution_per_fact', 0):.1f} s per fact"
    return f"Total time {tm.get('total', 0):.0f} s ({select}; {attribution}; paper: {PAPER['seconds_per_fact']})."
