"""`kn bench`'s report: report.json, report.md and report.html (the reproduction's HTML writer, `reproduce.html`),
the table laid out as the editing papers lay theirs out: one row per condition (the unedited model, the paper's
update, the calibrated update, the random-neuron controls), columns the protocol's efficacy, paraphrase,
neighborhood, score and fluency."""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path

from .jsonio import dumps

# (column title, summary key, kind) per protocol: "rate" prints as a percentage, "diff" as a signed percentage
# point difference, "bits" as a number
COLUMNS = {
    "rome": [("Score S", "S", "rate"), ("Efficacy ES", "ES", "rate"), ("EM", "EM", "diff"),
             ("Paraphrase PS", "PS", "rate"), ("PM", "PM", "diff"), ("Neighborhood NS", "NS", "rate"),
             ("NM", "NM", "diff"), ("Fluency GE", "fluency", "bits"), ("Consistency RS", "consistency", "rate")],
    "easyedit": [("Reliability rewrite_acc", "rewrite_acc", "rate"), ("Generalization rephrase_acc", "rephrase_acc",
                                                                      "rate"),
                 ("Locality", "locality", "rate"), ("Portability", "portability", "rate")],
    "kn": [("Reliability", "reliability", "rate"), ("Generality", "generality", "rate"),
           ("Locality", "locality", "rate")],
    "mquake": [("Edit-wise", "edit_wise", "rate"), ("Instance-wise", "instance_wise", "rate"),
               ("Multi-hop", "multi_hop", "rate")],
}


def build_report(lm, read, results: list[dict], settings, params, *, source: str, command: str, timing: dict) -> dict:
    """Plain JSON: settings, provenance, per condition the protocol's summary over the edited cases, the cases,
    and what was left out."""
    from .protocols import n_gram_entropy, summarize

    edited = [r for r in results if "conditions" in r]
    for r in edited:  # fluency from the stored texts, so a report rewritten later uses the current tokenizer
        for condition in r["conditions"].values():
            if settings.protocol == "rome" and condition.get("generations"):
                condition["scores"]["fluency"] = n_gram_entropy(condition["generations"])
    labels = list(dict.fromkeys(label for r in edited for label in r["conditions"]))
    summary = {label: summarize(settings.protocol, [r["conditions"][label]["scores"] for r in edited
                                                    if label in r["conditions"]]) for label in labels}
    calibrated = [c for r in edited if "update (calibrated)" in r["conditions"]
                  for c in _as_list(r["conditions"]["update (calibrated)"].get("calibration"))]
    model = {"source": getattr(lm, "source", None), "sha256": lm.sha256, "kind": lm.kind,
             "layers": getattr(lm, "num_layers", None), "neurons": getattr(lm, "ffn_size", None)}
    resumed = sum(1 for r in results if r.get("resumed"))
    return {
        "kind": "kn bench", "protocol": settings.protocol, "edit": settings.edit, "source": source,
        "format": read.format, "container": read.container, "cases_in_file": len(read.cases),
        "status": "complete" if len(results) == timing["cases_total"] else
        f"partial: {len(results)} of {timing['cases_total']} cases (run the same command again to resume)",
        "parameters": {"cases": settings.cases, "seed": settings.seed, "t": settings.t, "p": settings.p,
                       "gen_tokens": settings.gen_tokens, "generation_prompts": settings.generation_prompts,
                       "keep_massive": settings.keep_massive, "attribution": params.to_dict()},
        "model": model, "provenance": {"command": command, "written": _now(),
                                       "started": _dt.datetime.fromtimestamp(timing["started"], _dt.timezone.utc)
                                       .strftime("%Y-%m-%d %H:%M:%S UTC")},
        "machine": {"cpus": _cpus(), "platform": platform.platform(), "load_at_start": timing["load_start"],
                    "load_at_end": timing["load_now"]},
        "timing": {"wall_seconds": timing["seconds"], "computed_seconds": timing["computed_seconds"],
                   "cases_run": len(results), "cases_resumed": resumed,
                   "seconds_per_computed_case": (timing["computed_seconds"] / (len(results) - resumed)
                                                 if len(results) > resumed else None)},
        "summary": summary, "cases_edited": len(edited),
        "calibration": {"reached": sum(1 for c in calibrated if c and c.get("reached")), "of": len(calibrated)},
        "left_out": {"fields": read.left_out,
                     "cases": [{"case_id": r["case_id"], "reason": r["left_out"]} for r in results if "left_out" in r]},
        "cases": results,
    }


def _as_list(calibration) -> list:
    """A case's calibration(s): one per rewrite (several for MQuAKE)."""
    return calibration if isinstance(calibration, list) else [calibration]


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cell(value, kind: str) -> str:
    if isinstance(value, dict):
        if value.get("applicable") is False:
            return "n/a"
        numbers = [v for k, v in value.items() if k != "n" and isinstance(v, (int, float))]
        value = sum(numbers) / len(numbers) if numbers else None  # groups (EasyEdit's locality): their mean
    if not isinstance(value, (int, float)):
        return "n/a"
    if kind == "rate":
        return f"{100 * value:.1f}"
    if kind == "diff":
        return f"{100 * value:+.1f}"
    return f"{value:.2f}"


def table(report: dict) -> list[str]:
    columns = COLUMNS[report["protocol"]]
    lines = ["| Editor | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, summary in report["summary"].items():
        lines.append(f"| {label} | " + " | ".join(_cell(summary.get(key), kind) for _, key, kind in columns) + " |")
    return lines


def render_markdown(report: dict) -> str:
    tm, mach = report["timing"], report["machine"]
    lines = [f"# Benchmark: knowledge-neuron {report['edit']} on {report['format']} cases ({report['protocol']} "
             "protocol)", "",
             f"Source: `{report['source']}` ({report['format']}, {report['container']}, {report['cases_in_file']} "
             f"cases); {report['timing']['cases_run']} sampled with seed {report['parameters']['seed']}, "
             f"{report['cases_edited']} edited. Status: {report['status']}.  ",
             f"Model: {report['model']['source']} (sha256 {str(report['model']['sha256'])[:12]}).  ",
             f"Wall time {tm['wall_seconds']:.0f} s on {mach['cpus']} CPU core(s) ({mach['platform']}); load "
             f"average {mach['load_at_start']} at the start, {mach['load_at_end']} at the end"
             + (f"; {tm['cases_resumed']} case(s) read from an earlier run, so the wall time covers only the "
                "others" if tm["cases_resumed"] else "")
             + (f"; {tm['seconds_per_computed_case']:.1f} s per computed case" if tm["seconds_per_computed_case"]
                else "") + ".", "",
             "Values in percent (EM/PM/NM: mean difference of probabilities, percentage points; fluency: weighted "
             "bi/tri-gram entropy in bits), means over the edited cases. Definitions: docs/METRICS.md.", ""]
    lines += table(report) + [""]
    lines += _notes(report)
    lines += ["## Left out", ""]
    lines += [f"- field `{x['field']}` ({x['records']} records): {x['reason']}" for x in report["left_out"]["fields"]]
    lines += [f"- case {x['case_id']}: {x['reason']}" for x in report["left_out"]["cases"]]
    if not report["left_out"]["fields"] and not report["left_out"]["cases"]:
        lines.append("- nothing")
    lines += ["", "## Parameters", "", "```", dumps(report["parameters"], indent=1), "```", ""]
    return "\n".join(lines)


def _notes(report: dict) -> list[str]:
    p = report["parameters"]
    out = ["## How to read it", "",
           f"- Neurons: integrated gradients on each case's rewrite prompt and paraphrases (with o), coarse at "
           f"t = {p['t']}, refined in >= max(p = {p['p']} x prompts, 3) prompts, massive-activation neurons left out"
           + (" (kept: --keep-massive)" if p["keep_massive"] else "") + ". The paraphrases help find the neurons "
           "(the paper's refinement needs >= 3 prompts), so the paraphrase score is not a held-out measure.",
           "- Random neurons: the same edit on as many random neurons of the same layers (seeded).",
           "- No relation-level exclusion: the paper leaves out neurons shared by > 10% of the relation's facts; a "
           "benchmark case has no other facts of its relation attributed."]
    if report["edit"] == "update":
        c = report["calibration"]
        out.append(f"- Calibrated update: both lambdas scaled by the smallest factor in [1/64, 4] at which o' is "
                   f"the greedy answer on the prompts that found the neurons; reached on {c['reached']} of {c['of']} "
                   "rewrites (the others use the factor 4).")
        out.append(f"- Fluency: {p['generation_prompts']} generation prompt(s) per case, {p['gen_tokens']} new tokens "
                   "sampled from the top 5 (as ROME's generate_fast), ROME's n-gram entropy of prompt + text.")
    return out + [""]


def write_bench_report(report: dict, out: Path) -> None:
    from .reproduce.html import provenance_rows, render_html

    out = Path(out)
    markdown = render_markdown(report)
    (out / "report.json").write_text(dumps(report, indent=1), encoding="utf-8")
    (out / "report.md").write_text(markdown, encoding="utf-8")
    (out / "report.html").write_text(render_html(markdown, {}, provenance_rows(report)), encoding="utf-8")
