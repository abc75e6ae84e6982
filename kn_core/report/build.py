"""The project's report as data and text: `build_report` / `report_data` (report.json: plain data, written strict)
and `render_markdown` (report.md, from that data only; report.html is rendered from it by `write.write_report`).
`kn report` and the app's File > Export > Report both come here with a `ProjectDocument` (document.py).

Nothing is dropped silently: a run whose refined set cannot be decided, a run with no finished prompt, an edit
with no before/after measurement, a figure not drawn, runs beyond the figure limit: each is listed under "Left
out" with its reason.
"""

from __future__ import annotations

import datetime
import math

from ..evaluation import change_text, ratio
from ..neurons import neuron_name
from ..specificity import stored_control, template_neurons
from .document import ProjectDocument, drawn_runs, run_neurons
from .figures import FIGURE_RUNS, FIGURES, run_figure_data

REPORT_KIND = "kn project report"
GROUP_ORDER = ("fact", "relation", "other relations", "new object")  # edit_plan.summarize_plan's groups
TITLE = "Knowledge Neuron Studio: project report"


def _utc(seconds: float) -> str | None:
    if not seconds:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pairs(neurons) -> list[list[int]]:
    return [[int(layer), int(index)] for layer, index in neurons]


def _run_entry(index: int, run, doc: ProjectDocument) -> dict:
    refined, rule, undecided = (run.selection if run.selection is not None
                                else run_neurons(run, doc.t, doc.p, doc.excluded))
    fact = run.fact
    return {"index": index, "relation": fact.relation, "subject": fact.subject, "object": fact.object,
            "name": run.name, "state": run.state, "current": run.current, "prompts": len(run.prompts),
            "prompts_done": run.done, "started": _utc(run.started), "seconds": run.seconds,
            "model": run.model.get("name") or run.model.get("source"), "model_sha256": run.model.get("sha256"),
            "edits_active": list(run.edits), "params": dict(run.params),
            "refined": None if refined is None else _pairs(refined),
            "refined_count": None if refined is None else len(refined), "rule": rule,
            "subject_control": _control_entry(run.params),
            **({"not_decided": undecided} if undecided else {})}


def _control_entry(params: dict) -> dict | None:
    """What a run's subject control found (docs/SPECIFICITY.md), or None when none was run on it."""
    control = stored_control(params)
    if not control:
        return None
    return {"controlled": bool(control.get("controlled")), "reason": control.get("reason"),
            "control_subjects": len(control.get("control_subjects") or ()),
            "control_prompts": int(control.get("control_prompts") or 0),
            "candidates": len(control.get("candidates") or ()),
            "template": _pairs(sorted(template_neurons(params))), "left_out": not control.get("keep_template")}


def _models(doc: ProjectDocument) -> list[dict]:
    """The weights the runs were made on, each once (in the order first used)."""
    seen: dict[str, dict] = {}
    for run in doc.runs:
        m = run.model
        key = m.get("sha256") or m.get("name") or m.get("source") or "unknown"
        if key not in seen:
            seen[key] = {k: m.get(k) for k in ("name", "source", "sha256", "family", "kind", "layers", "neurons")}
            seen[key]["runs"] = 0
        seen[key]["runs"] += 1
    return list(seen.values())


def _edit_entries(doc: ProjectDocument) -> list[dict]:
    from ..edits import edit_from_dict

    state = doc.edit_state or {}
    entries = state.get("entries") or []
    cursor = int(state.get("cursor", len(entries)))
    out = []
    for i, entry in enumerate(entries):
        try:
            description = edit_from_dict(entry["edit"]).describe()
        except (KeyError, TypeError, ValueError) as exc:  # a damaged entry: named, never a crash
            description = f"unreadable edit ({exc})"
        enabled = entry.get("enabled", True)
        status = "in force" if i < cursor and enabled else ("switched off" if i < cursor else "undone")
        out.append({"index": i + 1, "description": description, "status": status, "edit": entry.get("edit"),
                    "measurement": entry.get("report")})
    return out


def _evaluation_entry(record) -> dict:
    """A stored evaluation (`kn edit ... --project` stores one per edit): its summary by prompt group (the edit's
    and the random-neuron control's), metrics and what it left out; other kinds are named, not summarised."""
    report = record.report if isinstance(record.report, dict) else {}
    groups = report.get("groups") if isinstance(report.get("groups"), dict) else {}
    fact = report.get("fact") if isinstance(report.get("fact"), dict) else {}
    return {"id": record.id, "kind": record.kind, "started": record.started_at, "status": record.status,
            "fact": fact or None, "edit": report.get("edit"), "summary": groups.get("edit"),
            "control_summary": groups.get("control"), "metrics": report.get("metrics"),
            "skipped": report.get("skipped") or [], "protocol": report.get("protocol"),
            "protocol_scores": report.get("protocol_scores")}


def build_report(doc: ProjectDocument) -> tuple[dict, list[dict]]:
    """(the report as plain data: report.json, which kn_core.jsonio writes strict; the figures to draw, each
    {run, figure, file, title, data}). The data names each figure file; `left_out` lists every item the report
    could not show, with its reason."""
    runs = [_run_entry(k, run, doc) for k, run in enumerate(doc.runs, 1)]
    left_out = list(doc.left_out)
    for entry in runs:
        what = f"run {entry['index']} ({entry['relation']}: {entry['subject']} \u2192 {entry['object']})"
        if entry["prompts_done"] == 0:
            left_out.append({"what": what, "reason": "no finished prompt: no scores to select neurons from"})
        elif entry["refined"] is None:
            left_out.append({"what": f"{what}: refined neurons", "reason": entry["not_decided"]})
    edits = _edit_entries(doc)
    for e in edits:
        if not e["measurement"]:
            left_out.append({"what": f"edit {e['index']} ({e['description']})",
                             "reason": "not measured: no before/after evaluation was stored with it"})
    evaluations = [_evaluation_entry(e) for e in doc.evaluations]
    for e in evaluations:
        if e["summary"] is None:
            left_out.append({"what": f"stored evaluation {e['id']} ({e['kind']})", "reason": "a kind this report "
                             "does not summarise: `kn project export` writes it in full (evaluations.json)"})
    figures, refused = plan_figures(doc, runs)
    left_out += refused
    flags = doc.flags
    data = {"report": REPORT_KIND, "version": 1, "title": TITLE,
            "project": {"path": doc.path, "fact_set": doc.factset_name, "facts": doc.facts,
                        "relations": doc.relations, "facts_with_runs": len({(r["relation"], r["subject"], r["object"])
                                                                            for r in runs})},
            "models": _models(doc),
            "selection": {"t": doc.t, "p": doc.p, "keep_flagged": doc.keep_flagged,
                          "flags": None if flags is None else {
                              "massive": _pairs(sorted(flags.massive)), "unspecific": _pairs(sorted(flags.unspecific)),
                              "left_out_of_sets": len(doc.excluded)},
                          "flags_note": doc.flags_note},
            "runs": runs, "neuron_sets": [{**s, "neurons": _pairs(s["neurons"]), "count": len(s["neurons"])}
                                          for s in doc.neuron_sets],
            "edits": {"model_sha256": doc.edit_sha256, "in_force": sum(e["status"] == "in force" for e in edits),
                      "entries": edits},
            "evaluations": evaluations,
            "figures": [{k: v for k, v in f.items() if k != "data"} for f in figures], "left_out": left_out}
    return data, figures


def report_data(doc: ProjectDocument) -> dict:
    """report.json's content (`build_report` without the figures' arrays)."""
    return build_report(doc)[0]


def plan_figures(doc: ProjectDocument, runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The figures of each fact's current run, up to FIGURE_RUNS runs: ([{run, figure, file, title, data}],
    [{what, reason}] for each one not drawn)."""
    figures, refused = [], []
    drawn = {id(run) for run in drawn_runs(doc.runs)}
    for entry, run in zip(runs, doc.runs):
        if not run.current:
            continue
        what = f"figures of run {entry['index']} ({entry['relation']}: {entry['subject']} \u2192 {entry['object']})"
        if id(run) not in drawn:
            refused.append({"what": what, "reason": f"the report draws the first {FIGURE_RUNS} facts' runs; "
                                                    "File > Export > Export figure in the app draws any run"})
            continue
        title = (f"{run.fact.subject} \u2192 {run.fact.object} ({run.fact.relation}) \u2014 "
                 f"{entry['model'] or 'unknown model'}, mean over {len(run.tops)} prompts")
        neurons = entry["refined"] or []
        score_list = [top.dense(math.nan) for top in run.tops]
        datas, why = run_figure_data(title, score_list, [tuple(n) for n in neurons], doc.t, doc.p,
                                     doc.flags)
        if entry["refined"] is None:
            why = {**why, "prompts": "its refined set is not decided at this t (see above)"}
            datas.pop("prompts", None)
        for which, data in datas.items():
            figures.append({"run": entry["index"], "figure": which, "file": f"run{entry['index']}-{which}.png",
                            "title": f"{FIGURES[which]}: {title}", "data": data})
        refused += [{"what": f"{what}: {FIGURES[w].lower()}", "reason": reason} for w, reason in why.items()]
    return figures, refused


# ------------------------------------------------------------------------------------------------- Markdown
def _cell(value) -> str:
    """A table cell: pipes escaped and no line breaks (either would split the Markdown row)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(value, fmt) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _pct(value) -> str:
    return change_text(value, 2) if isinstance(value, (int, float)) else "n/a"


def _neurons(neurons, limit=12) -> str:
    if not neurons:
        return "none"
    text = ", ".join(neuron_name(layer, index) for layer, index in list(neurons)[:limit])
    return text + (f" and {len(neurons) - limit} more" if len(neurons) > limit else "")


def _fact(entry) -> str:
    return _cell(f"{entry['subject']} \u2192 {entry['object']}")


def _header(data: dict) -> list[str]:
    project = data["project"]
    models = data["models"]
    model_text = "; ".join(f"**{_cell(m['name'] or m['source'] or 'unknown')}**"
                           + (f", weights sha256 `{m['sha256'][:16]}...`" if m.get("sha256") else "")
                           + f" ({m['runs']} run{'s' if m['runs'] != 1 else ''})" for m in models)
    return [f"# {TITLE}", "",
            f"Project: `{project['path'] or 'untitled (not saved)'}`.  ",
            f"Facts: `{_cell(project['fact_set'])}`, {project['facts']} facts in {project['relations']} relations; "
            f"{project['facts_with_runs']} with an attribution run.  ",
            f"Model: {model_text or 'no run yet'}.", ""]


def _runs_section(data: dict) -> list[str]:
    sel = data["selection"]
    flags = sel["flags"]
    lines = ["## Attribution runs", "",
             f"Refined neurons at t = {sel['t']}, p = {sel['p']}"
             + ("" if flags is None or sel["keep_flagged"] else
                f", {flags['left_out_of_sets']} flagged (massive/unspecific) neurons left out") + ". "
             f"Flags: {_cell(sel['flags_note'])}.", ""]
    if not data["runs"]:
        return lines + ["No attribution run yet.", ""]
    lines += _control_lines(data["runs"])
    lines += ["| run | relation | fact | prompts | state | refined neurons | count | template (subject control) "
              "| seconds | weights |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        neurons = (_neurons(r["refined"]) if r["refined"] is not None
                   else _cell(f"not decided: {r['not_decided']}"))
        count = r["refined_count"] if r["refined_count"] is not None else "n/a"
        weights = f"edited ({len(r['edits_active'])})" if r["edits_active"] else "original"
        lines.append(f"| {r['index']}{' (current)' if r['current'] else ''} | {_cell(r['relation'])} | {_fact(r)} | "
                     f"{r['prompts_done']} of {r['prompts']} | {r['state']} | {neurons} | {count} | "
                     f"{_control_cell(r['subject_control'])} | {_num(r['seconds'], '{:.1f}')} | {weights} |")
    return lines + [""]


def _control_lines(runs: list[dict]) -> list[str]:
    """The subject control over the runs: how many were controlled and how many template neurons it flagged."""
    controls = [r["subject_control"] for r in runs if r["subject_control"]]
    if not controls:
        return ["Subject control (docs/SPECIFICITY.md): not run on any run; template neurons of a relation's wording "
                "are not told from the facts' (the app's *Subject control*, `kn neurons --subject-control`).", ""]
    done = [c for c in controls if c["controlled"]]
    flagged = sum(len(c["template"]) for c in done)
    out = sum(len(c["template"]) for c in done if c["left_out"])
    return [f"Subject control (docs/SPECIFICITY.md): {len(done)} of {len(runs)} runs controlled"
            + (f", {len(controls) - len(done)} tried and not controlled (reasons in the table)"
               if len(controls) > len(done) else "")
            + f"; {flagged} of {sum(c['candidates'] for c in done)} candidate neurons flagged template, {out} of them "
              "left out of the refined sets.", ""]


def _control_cell(control: dict | None) -> str:
    if control is None:
        return "not run"
    if not control["controlled"]:
        return _cell(f"not controlled: {control['reason']}")
    kept = "left out" if control["left_out"] else "kept (--keep-template)"
    return _cell(f"{len(control['template'])} of {control['candidates']} flagged ({kept})"
                 + (f": {_neurons(control['template'], 6)}" if control["template"] else ""))


def _figures_section(data: dict) -> list[str]:
    current = [r for r in data["runs"] if r["current"]]
    if not current:
        return []
    lines = ["## Current runs", "", "Each fact's current run (the one its sets come from): scores averaged over its "
             "finished prompts, refined neurons circled.", ""]
    drawn: dict[int, list[dict]] = {}
    for f in data["figures"]:
        drawn.setdefault(f["run"], []).append(f)
    for r in current:
        if r["index"] not in drawn:
            continue
        params = ", ".join(f"{k} {v}" for k, v in r["params"].items() if v is not None and k != "subject_control")
        control = ("" if r["subject_control"] is None else
                   f" Subject control: {_control_cell(r['subject_control'])}.")
        lines += [f"### Run {r['index']}: {_fact(r)} ({_cell(r['relation'])})", "",
                  f"{r['prompts_done']} of {r['prompts']} prompts ({r['state']}); parameters: {_cell(params)}."
                  + control, ""]
        lines += [f"![{f['title']}]({f['file']})" for f in drawn[r["index"]]] + [""]
    return lines


def _sets_section(data: dict) -> list[str]:
    if not data["neuron_sets"]:
        return []
    lines = ["## Neuron sets", "", "| name | kind | from | neurons | count |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(s['name'])} | {s['kind']} | {_cell(s['source']) or '-'} | {_neurons(s['neurons'])} | "
              f"{s['count']} |" for s in data["neuron_sets"]]
    return lines + [""]


def _summary_table(summary: dict) -> list[str]:
    """Per prompt group: probabilities before and after, their ratio, the paper's relative change, flips and
    accuracy (edit_plan.summarize_plan's fields)."""
    groups = [g for g in GROUP_ORDER if g in summary] + [g for g in summary if g not in GROUP_ORDER
                                                          and isinstance(summary[g], dict)]
    if not groups:
        return []
    lines = ["| prompts | n | p before | p after | p after / p before | mean(\u0394p)/mean(p) | top-1 flips | "
             "accuracy before | accuracy after |", "|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        s = summary[g]
        change = ratio(s.get("p_before") or 0.0, s.get("p_after") or 0.0)["text"]
        lines.append(f"| {g} | {s.get('n', '-')} | {_num(s.get('p_before'), '{:.4g}')} | "
                     f"{_num(s.get('p_after'), '{:.4g}')} | {change} | {_pct(s.get('relative_change'))} | "
                     f"{_num(s.get('flip_rate'), '{:.2f}')} | {_num(s.get('accuracy_before'), '{:.2f}')} | "
                     f"{_num(s.get('accuracy_after'), '{:.2f}')} |")
    if "success_rate" in summary:
        lines += ["", f"Update success rate (o' is the answer): {_pct(summary['success_rate'])}."]
    return lines + [""]


def _metrics_and_skipped(metrics, skipped) -> list[str]:
    lines = []
    if metrics:  # the field's metrics beside the random-neuron control (docs/METRICS.md)
        from ..metrics import metrics_rows

        lines += ["| metric (docs/METRICS.md) | this edit | random neurons |", "|---|---|---|"]
        lines += [f"| {name} | {_cell(value)} | {_cell(control)} |" for name, value, control in metrics_rows(metrics)]
        lines.append("")
    if skipped:  # the app stores [what, ..., reason] lists, `kn edit` {"what", "reason"} objects
        lines += ["Left out of this evaluation:", ""]
        texts = [": ".join(map(str, item.values())) if isinstance(item, dict) else " ".join(map(str, item))
                 for item in skipped]
        lines += [f"- {_cell(text)}" for text in texts] + [""]
    return lines


def _protocol_table(protocol, scores) -> list[str]:
    """The edit scored by the field's protocol it was asked for (`kn edit --protocol`, the app's *Scored by*), in
    that protocol's own names: before, after and under the random-neuron control (docs/METRICS.md)."""
    if protocol in (None, "kn") or not isinstance(scores, dict):
        return []
    from ..protocols import flat_scores, format_score

    pre, post, control = (flat_scores(scores.get(side) or {}) for side in ("pre", "post", "control"))
    lines = [f"Scored by the {_cell(protocol)} protocol:", "", "| score | before | after | random neurons |",
             "|---|---|---|---|"]
    lines += [f"| {_cell(key)} | {format_score(key, pre.get(key))} | {format_score(key, value)} | "
              f"{format_score(key, control.get(key))} |" for key, value in post.items()]
    return lines + [""]


def _edit_lines(edit: dict) -> list[str]:
    report = edit["measurement"] or {}
    lines = [f"### {edit['index']}. {_cell(report.get('title') or edit['description'])} ({edit['status']})", ""]
    lines += _summary_table(report.get("summary") or {})
    lines += _metrics_and_skipped(report.get("metrics"), report.get("skipped") or [])
    lines += _protocol_table(report.get("protocol"), report.get("protocol_scores"))
    if not report:
        lines += ["Not measured (no before/after evaluation stored with it).", ""]
    return lines


def _evaluations_section(data: dict) -> list[str]:
    shown = [e for e in data["evaluations"] if e["summary"] is not None]
    if not shown:
        return []
    lines = ["## Stored evaluations", "", "Edits measured by `kn edit ... --project` (each on a fresh copy of the "
             "model, beside its random-neuron control).", ""]
    for e in shown:
        fact = e["fact"] or {}
        about = f" on {fact.get('subject')} \u2192 {fact.get('object')} ({fact.get('relation')})" if fact else ""
        lines += [f"### Evaluation {e['id']}: {_cell(e['kind'] + about)}", "", f"Started {e['started']}; "
                  f"{e['status']}.", ""]
        lines += _summary_table(e["summary"])
        if e["control_summary"]:
            lines += ["Random-neuron control:", ""] + _summary_table(e["control_summary"])
        lines += _metrics_and_skipped(e["metrics"], e["skipped"])
        lines += _protocol_table(e["protocol"], e["protocol_scores"])
    return lines


def _edits_section(data: dict) -> list[str]:
    edits = data["edits"]
    if not edits["entries"]:
        return []
    lines = ["## Edits", "", f"Edits in force: {edits['in_force']} of the {len(edits['entries'])} in the history, "
             "in the order applied; each with its evaluation before and after.", ""]
    for edit in edits["entries"]:
        lines += _edit_lines(edit)
    return lines


def _left_out_section(data: dict) -> list[str]:
    if not data["left_out"]:
        return ["## Left out", "", "Nothing: every stored run, set and edit is shown above.", ""]
    return ["## Left out", ""] + [f"- {_cell(item['what'])}: {_cell(item['reason'])}" for item in data["left_out"]] \
        + [""]


def render_markdown(data: dict) -> str:
    """report.md, from report.json's data only (so the two never disagree; report.html is rendered from it)."""
    return "\n".join(_header(data) + _runs_section(data) + _figures_section(data) + _sets_section(data)
                     + _edits_section(data) + _evaluations_section(data) + _left_out_section(data)).rstrip("\n") + "\n"
