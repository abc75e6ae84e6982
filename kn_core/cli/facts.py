"""`kn facts list|import|check`."""

from __future__ import annotations

from .bench import add_facts_command
from .common import COMMON, emit, factset_of, load, progress_bar, project_of, store_evaluation
from ..tasks import Task, as_task


def cmd_facts_list(args) -> int:
    factset = factset_of(args)
    relations = [factset.relation(args.relation)] if args.relation else list(factset.relations.values())
    doc = {"name": factset.name, "relations": [
        {"id": r.id, "name": r.name, "templates": list(r.templates),
         "facts": [{"subject": f.subject, "object": f.object} for f in factset.facts_of(r.id)]}
        for r in relations]}
    lines = []
    for r in doc["relations"]:
        lines.append(f"{r['id']} {r['name']}: {len(r['templates'])} templates, {len(r['facts'])} facts")
        lines += [f"    {t}" for t in r["templates"]]
    emit(args, doc, "\n".join(lines))
    return 0


def cmd_facts_import(args) -> int:
    from ..fact_files import import_facts_described

    factset, read, left = import_facts_described(args.path)
    with project_of(args) as project:
        if project is not None:
            project.import_factset(factset)
    doc = {"name": factset.name, "format": read.split(" ", 1)[0], "relations": len(factset.relations),
           "facts": len(factset.facts), "templates": sum(len(r.templates) for r in factset.relations.values()),
           "stored": bool(args.project), "left_out": left}
    lines = [f"{args.path}: " + (f"{read}; " if read != "kn" else "") + f"{doc['relations']} relations, "
             f"{doc['templates']} templates, {doc['facts']} facts" + (f" stored in {args.project}" if args.project else "")]
    lines += [f"  left out {x['field']} ({x['records']}): {x['reason']}" for x in left]
    emit(args, doc, "\n".join(lines))
    return 0


def fact_check(lm, factset, relation_ids, task: Task | None = None) -> list[dict]:
    """Per relation: which facts the model answers top-1 (per prompt), and the answer's probability."""
    from ..evaluation import answer_probabilities
    from ..experiments import answer_in_name, knows
    from ..facts import render_prompts

    task = as_task(task)
    report = []
    for n, rid in enumerate(relation_ids):
        task.check()
        relation = factset.relation(rid)
        facts, correct_prompts, total_prompts = [], 0, 0
        for fact in factset.facts_of(rid):
            prompts, skipped = render_prompts(fact, relation, lm.tokenizer, lm.kind)
            results = answer_probabilities(lm, prompts) if prompts else []
            hits = sum(r["correct"] for r in results)
            correct_prompts += hits
            total_prompts += len(results)
            facts.append({"subject": fact.subject, "object": fact.object, "prompts": len(results),
                          "correct": hits, "answer_in_name": answer_in_name(fact),
                          "known": bool(results) and knows(fact, hits / len(results)),
                          "mean_prob": sum(r["prob"] for r in results) / len(results) if results else None,
                          "skipped": [s.reason for s in skipped]})
        known = sum(f["known"] for f in facts)
        report.append({"relation": rid, "name": relation.name, "facts": facts, "facts_known": known,
                       "fact_accuracy": known / len(facts) if facts else None,
                       "prompt_accuracy": correct_prompts / total_prompts if total_prompts else None})
        task.progress((n + 1) / len(relation_ids), rid)
    return report


def cmd_facts_check(args) -> int:
    from ..experiments import KNOWN_RULE

    factset = factset_of(args)
    relation_ids = [args.relation] if args.relation else sorted(factset.relations)
    for rid in relation_ids:
        factset.relation(rid)
    lm = load(args)
    with progress_bar("checking facts") as task:
        report = fact_check(lm, factset, relation_ids, task)
    total = sum(len(r["facts"]) for r in report)
    known = sum(r["facts_known"] for r in report)
    doc = {"model": lm.source, "sha256": lm.sha256, "relations": report, "facts": total, "facts_known": known}
    store_evaluation(args, lm, "facts_check", doc, {"facts": args.facts, "relation": args.relation})
    lines = [f"{'relation':<8} {'facts known':>12} {'prompt top-1':>13}  name"]
    for r in report:
        lines.append(f"{r['relation']:<8} {r['facts_known']:>5}/{len(r['facts']):<6} "
                     f"{(r['prompt_accuracy'] or 0) * 100:>12.1f}%  {r['name']}")
    lines.append(f"known: {known}/{total} facts ({KNOWN_RULE})")
    unknown = [f"{r['relation']} {f['subject']} -> {f['object']}" for r in report for f in r["facts"] if not f["known"]]
    if unknown and not args.json:
        lines.append("not known (kept, flagged): " + "; ".join(unknown[:40]) + (" ..." if len(unknown) > 40 else ""))
    emit(args, doc, "\n".join(lines))
    return 0


def add_commands(sub) -> None:
    facts = sub.add_parser("facts", help="fact sets: list, import, check")
    facts_sub = facts.add_subparsers(dest="facts_command", required=True)
    for name, func, text in (("list", cmd_facts_list, "relations, templates and facts"),
                             ("check", cmd_facts_check, "which facts the model answers correctly, per relation")):
        p = facts_sub.add_parser(name, parents=[COMMON], help=text)
        p.add_argument("--relation")
        p.add_argument("--facts", default="builtin", help="'builtin' or a PARAREL folder / .csv / .jsonl")
        p.set_defaults(func=func)
    imp = facts_sub.add_parser("import", parents=[COMMON], help="validate a PARAREL folder, .csv or .jsonl "
                                                                  "(and store it with --project)")
    imp.add_argument("path")
    imp.set_defaults(func=cmd_facts_import)
    add_facts_command(facts_sub)
