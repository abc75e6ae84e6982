"""Fewer integration points at the same neurons: Riemann-20 (the paper), Gauss-Legendre and `auto` quadratures
(kn_core/quadrature.py) against a Riemann-200 reference, in one run.

    nice -n 10 python benchmarks/bench_quadrature.py --prompts 20                      # the full size
    python benchmarks/bench_quadrature.py --prompts 3 --models default --sets builtin  # a quick look

For each model (the embedded default model; the BERT-base architecture built from its config with random
weights, seed 0, and a word-level tokenizer over the benchmark's own words, since no BERT checkpoint is
downloaded) and each prompt set (the built-in facts; PARAREL dev, /work/shared/pararel-dev or --pararel), facts
are taken one per relation in turn, up to --prompts-per-fact templates each, until --prompts prompts. Every
prompt is attributed by every setting, one after another (so the machine's load hits all alike), and compared
with the reference:
- refined neurons per fact (t = 0.2, p = 0.7; massive neurons excluded as the app does by default, and kept):
  mean Jaccard with the reference's; coarse neurons per prompt likewise;
- scores: the largest |score - reference| per prompt over the reference's largest |score|, median over prompts;
- cost: seconds per prompt, as CPU time of this process (with one thread, what the work costs however loaded
  the machine is) and wall time, and, machine-independent, integrand evaluations (rows: one per layer and point) and
  block evaluations (a row of layer l runs the L - l blocks above it), each as a ratio to Riemann-20's.
Timings on a shared CPU are pessimistic; only the ratios within one run mean something. The load average is
printed. The one-time measurement of massive neurons (gauss/auto need it, once per model) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kn_core import attribution as kn_attribution  # noqa: E402
from kn_core.attribution import AttributionParams, attribute  # noqa: E402
from kn_core.fact_files import builtin_facts, import_facts  # noqa: E402
from kn_core.facts import render_prompts  # noqa: E402
from kn_core.models import load_model, pick_device, wrap_model  # noqa: E402
from kn_core.neurons import coarse_neurons, flag_massive, refined_neurons, run_stats  # noqa: E402

PARAREL = Path(os.environ.get("KN_PARAREL", "/work/shared/pararel-dev"))
T, P = 0.2, 0.7


def parse_setting(text: str) -> tuple[str, AttributionParams]:
    """riemann:20, gauss:4, auto:3:0.01 (quadrature:points[:tolerance])."""
    parts = text.split(":")
    quadrature, steps = parts[0], int(parts[1])
    tolerance = float(parts[2]) if len(parts) > 2 else 0.01
    params = AttributionParams(quadrature=quadrature, steps=steps, tolerance=tolerance, force=steps > 1000)
    label = f"{quadrature}-{steps}" + (f" tol {tolerance:g}" if quadrature == "auto" else "")
    return label, params


def bert_base(words: list[str], device):
    """BERT-base's architecture (bert-base-cased's shapes) with random weights and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=28996)).to(device).eval()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + words))}
    for i in range(len(vocab), 28996):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    return wrap_model(model, fast, source="bert-base architecture, random weights")


def words_of(factset) -> list[str]:
    text = " ".join([f.subject + " " + f.object for f in factset.facts]
                    + [t for r in factset.relations.values() for t in r.templates])
    return sorted(set(re.findall(r"\w+|[^\w\s]", text.replace("[X]", " ").replace("[Y]", " "))))


def choose(factset, lm, n_prompts: int, per_fact: int) -> list[tuple[object, list]]:
    """Facts one per relation in turn (relations sorted, facts in file order), each with up to `per_fact` of
    its usable prompts (at least 3, so refinement means something), until `n_prompts` prompts."""
    queues = {rid: list(factset.facts_of(rid)) for rid in sorted(factset.relations)}
    chosen, total = [], 0
    while total < n_prompts and any(queues.values()):
        for rid in list(queues):
            if total >= n_prompts or not queues[rid]:
                continue
            fact = queues[rid].pop(0)
            prompts, _ = render_prompts(fact, factset.relation(rid), lm.tokenizer, lm.kind)
            if len(prompts) >= 3:
                chosen.append((fact, prompts[:per_fact]))
                total += len(prompts[:per_fact])
    return chosen


def jaccard(a, b) -> float:
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def rows_of(result, params, L) -> tuple[int, int]:
    """(integrand evaluations, block evaluations) of one prompt, every answer token counted."""
    tokens = len(result.answer_ids) if params.multi_token != "first" else 1
    if params.quadrature == "riemann":
        per_layer = [(params.steps + (params.rule == "right")) * tokens] * L
    else:
        per_layer = [row["points"] for row in result.completeness]
    return sum(per_layer), sum(n * (L - layer) for layer, n in enumerate(per_layer))


def run_set(lm, facts, settings, reference, say) -> dict:
    L = lm.layout.layers
    labels = [label for label, _ in settings] + ["reference"]
    out = {label: {"seconds": [], "cpu_seconds": [], "rows": [], "blocks": [], "score_error": [], "coarse_jaccard": [],
                   "completeness_error": [], "points_per_layer": []} for label in labels}
    scores = {label: [] for label in labels}
    acts = []
    for f, (fact, prompts) in enumerate(facts):
        for k, prompt in enumerate(prompts):
            for label, params in settings + [("reference", reference)]:
                started, cpu = time.perf_counter(), time.process_time()
                result = attribute(lm, prompt, params)
                out[label]["seconds"].append(time.perf_counter() - started)
                out[label]["cpu_seconds"].append(time.process_time() - cpu)
                rows, blocks = rows_of(result, params, L)
                out[label]["rows"].append(rows)
                out[label]["blocks"].append(blocks)
                out[label]["completeness_error"].append(max(
                    abs(c["sum"] - c["delta"]) / max(result.prob, abs(c["delta"]), 1e-30) for c in result.completeness))
                scores[label].append((f, result.scores))
                if params.quadrature != "riemann":
                    out[label]["points_per_layer"].append([row["points"] for row in result.completeness])
                if label == "reference":
                    acts.append(result.activations)
            say(f"  fact {f + 1}/{len(facts)} prompt {k + 1}/{len(prompts)}: "
                + ", ".join(f"{label} {out[label]['cpu_seconds'][-1]:.1f}s" for label in labels) + " (CPU)")
    massive = flag_massive(run_stats(lm, acts))
    ref = scores["reference"]
    for label in labels:
        mine = scores[label]
        for (_, s), (_, r) in zip(mine, ref):
            out[label]["score_error"].append(float(np.abs(s - r).max() / np.abs(r).max()))
            out[label]["coarse_jaccard"].append(jaccard(coarse_neurons(s, T, massive), coarse_neurons(r, T, massive)))
        for keep, key in ((False, "refined_jaccard"), (True, "refined_jaccard_keep_massive")):
            exclude = () if keep else massive
            out[label][key] = [jaccard(refined_neurons([s for g, s in mine if g == f], T, P, exclude),
                                       refined_neurons([s for g, s in ref if g == f], T, P, exclude))
                               for f in range(len(facts))]
    return {"massive": sorted(massive), "n_prompts": len(ref), "n_facts": len(facts), "per_setting": out}


def summary(result: dict, baseline: str) -> list[dict]:
    rows = []
    base = result["per_setting"][baseline]
    for label, d in result["per_setting"].items():
        rows.append({"setting": label, "refined_jaccard": statistics.mean(d["refined_jaccard"]),
                     "refined_jaccard_keep_massive": statistics.mean(d["refined_jaccard_keep_massive"]),
                     "coarse_jaccard": statistics.mean(d["coarse_jaccard"]),
                     "score_error_median": statistics.median(d["score_error"]),
                     "score_error_max": max(d["score_error"]),
                     "completeness_error_median": statistics.median(d["completeness_error"]),
                     "seconds_per_prompt": statistics.mean(d["seconds"]),
                     "cpu_seconds_per_prompt": statistics.mean(d["cpu_seconds"]),
                     "speedup_vs_riemann20": sum(base["seconds"]) / sum(d["seconds"]),
                     "cpu_speedup_vs_riemann20": sum(base["cpu_seconds"]) / sum(d["cpu_seconds"]),
                     "rows_ratio": sum(d["rows"]) / sum(base["rows"]),
                     "blocks_ratio": sum(d["blocks"]) / sum(base["blocks"])})
    return rows


def chosen_points(result: dict) -> str:
    """What gauss/auto chose: mean rows per layer over prompts, the layers above the fewest listed."""
    lines = []
    for label, d in result["per_setting"].items():
        if not d["points_per_layer"]:
            continue
        mean = np.mean(d["points_per_layer"], axis=0)
        low = mean.min()
        more = ", ".join(f"L{layer} {mean[layer]:.1f}" for layer in np.argsort(-mean) if mean[layer] > low)
        lines.append(f"- {label}: {low:.1f} rows per layer" + (f"; more in {more}" if more else ""))
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| setting | refined Jaccard (massive out / kept) | coarse Jaccard | score error median (max) | "
            "CPU s/prompt (wall) | faster than R-20: CPU (wall) | rows | block evals |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['refined_jaccard']:.3f} / {r['refined_jaccard_keep_massive']:.3f} | "
                     f"{r['coarse_jaccard']:.3f} | {r['score_error_median']:.2%} ({r['score_error_max']:.2%}) | "
                     f"{r['cpu_seconds_per_prompt']:.2f} ({r['seconds_per_prompt']:.1f}) | "
                     f"x{r['cpu_speedup_vs_riemann20']:.2f} (x{r['speedup_vs_riemann20']:.2f}) | "
                     f"{r['rows_ratio']:.2f} | {r['blocks_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=20, help="prompts per model and set (the full size: 20)")
    ap.add_argument("--prompts-per-fact", type=int, default=5)
    ap.add_argument("--models", default="default,bert-base")
    ap.add_argument("--sets", default="builtin,pararel")
    ap.add_argument("--settings", default="riemann:20,gauss:4,auto:3:0.01,auto:2:0.05",
                    help="quadrature:points[:tolerance], comma-separated; the first is the baseline (Riemann-20)")
    ap.add_argument("--reference", default="riemann:200")
    ap.add_argument("--pararel", default=str(PARAREL))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "last_run_quadrature.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    settings = [parse_setting(s) for s in args.settings.split(",")]
    _, reference = parse_setting(args.reference)
    sets = {"builtin": builtin_facts}
    if "pararel" in args.sets:
        sets["pararel"] = lambda: import_facts(args.pararel)
    say = lambda text: print(text, flush=True)  # noqa: E731
    report = {"command": " ".join(sys.argv), "device": str(device), "threads": torch.get_num_threads(),
              "load_average_start": os.getloadavg(), "settings": [s for s in args.settings.split(",")],
              "reference": args.reference, "results": {}}
    markdown = []
    for model_name in args.models.split(","):
        for set_name in args.sets.split(","):
            factset = sets[set_name]()
            if model_name == "default":
                lm = load_model("default", device=str(device))
            else:
                lm = bert_base(words_of(factset), device)
            facts = choose(factset, lm, args.prompts, args.prompts_per_fact)
            attribute(lm, facts[0][1][0], AttributionParams(steps=2))  # warm-up
            started = time.perf_counter()
            dense = kn_attribution.dense_layers(lm, AttributionParams(quadrature="auto"))
            flag_seconds = time.perf_counter() - started
            say(f"{model_name} / {set_name}: {sum(len(p) for _, p in facts)} prompts of {len(facts)} facts; "
                f"massive-neuron layers {list(dense)} ({flag_seconds:.1f} s, once per model)")
            result = run_set(lm, facts, settings, reference, say)
            rows = summary(result, settings[0][0])
            key = f"{model_name}/{set_name}"
            report["results"][key] = {**result, "summary": rows, "dense_layers": list(dense),
                                      "flag_seconds": flag_seconds,
                                      "facts": [f"{f.relation} {f.subject} -> {f.object}" for f, _ in facts]}
            text = (f"### {key}: {result['n_prompts']} prompts, {result['n_facts']} facts, reference "
                    f"{args.reference}\n\n{table(rows)}\n\nRows per layer (mean over prompts; one row = one point of "
                    f"one layer, alpha = 0 included):\n{chosen_points(result)}")
            markdown.append(text)
            say(text)
    report["load_average_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
    say(f"load average {report['load_average_start']} at the start, {report['load_average_end']} at the end; "
        f"written {args.out}")


if __name__ == "__main__":
    main()
