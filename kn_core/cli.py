"""The `kn` command line. Every command takes --model, --device, --dtype, --json and --project.

With --json exactly one JSON document goes to stdout; progress and messages go to stderr. Bad input ends with
a one-line error and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager

from .tasks import Task

COMMON = argparse.ArgumentParser(add_help=False)
COMMON.add_argument("--model", default="default",
                    help="Hugging Face id, local folder, or 'default' (the embedded SmolLM2-135M-Instruct)")
COMMON.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
COMMON.add_argument("--dtype", default="auto", help="auto (float32), float32, bfloat16 or float16")
COMMON.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
COMMON.add_argument("--json", action="store_true", help="print one JSON document on stdout")
COMMON.add_argument("--project", help="a .knproj project file to store what this command computes")


class CliError(Exception):
    """A user-facing failure: one line, exit status 2."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(args, document: dict, text: str) -> None:
    print(json.dumps(document, ensure_ascii=False) if args.json else text, flush=True)


def load(args):
    from .models import load_model

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      task=Task(on_progress=lambda fraction, message: say(f"[model] {message}")))


@contextmanager
def project_of(args):
    """The project named by --project (created if missing), or None."""
    if not getattr(args, "project", None):
        yield None
        return
    from .store import open_or_create_project

    project = open_or_create_project(args.project)
    try:
        yield project
    finally:
        project.close()


def store_evaluation(args, lm, kind: str, report: dict, params: dict) -> None:
    with project_of(args) as project:
        if project is not None:
            project.add_model(lm)
            project.add_evaluation(kind, report, params=params, model=lm)


def tqdm_progress(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=desc, file=sys.stderr, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def update(fraction, partial=None):
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.refresh()

    update.close = bar.close
    return update


def bar_task(bar) -> Task:
    """A task whose progress drives a `tqdm_progress` bar."""
    return Task(on_progress=lambda fraction, message: bar(fraction) if fraction is not None else None)


def factset_of(args):
    from .facts import builtin_facts, import_facts

    name = getattr(args, "facts", None) or "builtin"
    return builtin_facts() if name == "builtin" else import_facts(name)


def find_fact(factset, relation: str, subject: str):
    try:
        factset.relation(relation)
    except KeyError:
        raise CliError(f"no relation {relation!r} in fact set {factset.name!r}; "
                       f"relations: {', '.join(sorted(factset.relations))}") from None
    for fact in factset.facts_of(relation):
        if fact.subject.lower() == subject.lower():
            return fact
    subjects = ", ".join(f.subject for f in factset.facts_of(relation)[:12])
    raise CliError(f"no fact with subject {subject!r} in relation {relation}; subjects include: {subjects}")


def neuron_list(neurons, scores=None) -> list[dict]:
    if scores is None:
        return [{"layer": int(l), "neuron": int(i)} for l, i in neurons]
    return [{"layer": int(l), "neuron": int(i), "score": float(scores[l, i])} for l, i in neurons]


# --- model ------------------------------------------------------------------------------------------------

def cmd_model_fetch(args) -> int:
    from .models import ensure_default_model

    path = ensure_default_model(Task(on_progress=lambda fraction, message: say(f"[default model] {message}")))
    emit(args, {"path": str(path)}, f"default model ready in {path}")
    return 0


def cmd_model_info(args) -> int:
    lm = load(args)
    info = lm.describe()
    with project_of(args) as project:
        if project is not None:
            project.add_model(lm)
    text = "\n".join(f"{key}: {value}" for key, value in info.items())
    emit(args, info, text)
    return 0


def cmd_predict(args) -> int:
    from .evaluation import predict

    if not args.prompt.strip():
        raise CliError("the prompt is empty; give the text whose next token (or mask) to predict")
    lm = load(args)
    predictions = predict(lm, args.prompt, args.top)
    doc = {"prompt": args.prompt, "predictions": [{"token": p["token"], "prob": p["prob"]} for p in predictions]}
    store_evaluation(args, lm, "predict", doc, {"top": args.top})
    emit(args, doc, "\n".join(f"{p['prob']:.4f}  {p['token']!r}" for p in predictions))
    return 0


# --- facts ------------------------------------------------------------------------------------------------

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
    from .facts import import_facts

    factset = import_facts(args.path)
    with project_of(args) as project:
        if project is not None:
            project.import_factset(factset)
    doc = {"name": factset.name, "relations": len(factset.relations), "facts": len(factset.facts),
           "templates": sum(len(r.templates) for r in factset.relations.values()), "stored": bool(args.project)}
    emit(args, doc, f"{args.path}: {doc['relations']} relations, {doc['templates']} templates, "
                    f"{doc['facts']} facts" + (f" stored in {args.project}" if args.project else ""))
    return 0


def fact_check(lm, factset, relation_ids, progress=None) -> list[dict]:
    """Per relation: which facts the model answers top-1 (per prompt), and the answer's probability."""
    from .evaluation import answer_probabilities
    from .facts import render_prompts

    report = []
    for n, rid in enumerate(relation_ids):
        relation = factset.relation(rid)
        facts, correct_prompts, total_prompts = [], 0, 0
        for fact in factset.facts_of(rid):
            prompts, skipped = render_prompts(fact, relation, lm.tokenizer, lm.kind)
            results = answer_probabilities(lm, prompts) if prompts else []
            hits = sum(r["correct"] for r in results)
            correct_prompts += hits
            total_prompts += len(results)
            facts.append({"subject": fact.subject, "object": fact.object, "prompts": len(results),
                          "correct": hits, "known": bool(results) and hits * 2 >= len(results),
                          "mean_prob": sum(r["prob"] for r in results) / len(results) if results else None,
                          "skipped": [s.reason for s in skipped]})
        known = sum(f["known"] for f in facts)
        report.append({"relation": rid, "name": relation.name, "facts": facts, "facts_known": known,
                       "fact_accuracy": known / len(facts) if facts else None,
                       "prompt_accuracy": correct_prompts / total_prompts if total_prompts else None})
        if progress:
            progress((n + 1) / len(relation_ids))
    return report


def cmd_facts_check(args) -> int:
    factset = factset_of(args)
    relation_ids = [args.relation] if args.relation else sorted(factset.relations)
    for rid in relation_ids:
        factset.relation(rid)
    lm = load(args)
    bar = tqdm_progress("checking facts")
    report = fact_check(lm, factset, relation_ids, bar)
    bar.close()
    total = sum(len(r["facts"]) for r in report)
    known = sum(r["facts_known"] for r in report)
    doc = {"model": lm.source, "sha256": lm.sha256, "relations": report, "facts": total, "facts_known": known}
    store_evaluation(args, lm, "facts_check", doc, {"facts": args.facts, "relation": args.relation})
    lines = [f"{'relation':<8} {'facts known':>12} {'prompt top-1':>13}  name"]
    for r in report:
        lines.append(f"{r['relation']:<8} {r['facts_known']:>5}/{len(r['facts']):<6} "
                     f"{(r['prompt_accuracy'] or 0) * 100:>12.1f}%  {r['name']}")
    lines.append(f"known: {known}/{total} facts (a fact is known when at least half of its prompts are top-1)")
    unknown = [f"{r['relation']} {f['subject']} -> {f['object']}" for r in report for f in r["facts"] if not f["known"]]
    if unknown and not args.json:
        lines.append("not known (kept, flagged): " + "; ".join(unknown[:40]) + (" ..." if len(unknown) > 40 else ""))
    emit(args, doc, "\n".join(lines))
    return 0


# --- attribution ------------------------------------------------------------------------------------------

def params_of(args):
    from .attribution import AttributionParams

    share = {"auto": None, "on": True, "off": False}[getattr(args, "share_prompts", "auto")]
    return AttributionParams(steps=args.steps, rule=args.rule, method=args.method, share_prompts=share)


def cmd_attribute(args) -> int:
    import numpy as np

    from .attribution import attribute, default_t, encode_answer
    from .neurons import coarse_neurons

    lm = load(args)
    params = params_of(args)
    t = args.t if args.t is not None else default_t(params.method)
    answer_ids = encode_answer(lm, args.prompt, args.answer)
    bar = tqdm_progress("attributing")
    with project_of(args) as project:
        if project is not None:
            project.add_model(lm)
            with project.recording_run(prompts=[{"text": args.prompt, "answer": args.answer}], params=params,
                                       model=lm) as rec:
                result = attribute(lm, args.prompt, params, task=bar_task(bar), answer_ids=answer_ids)
                result.answer = args.answer
                rec.add(0, result)
        else:
            result = attribute(lm, args.prompt, params, task=bar_task(bar), answer_ids=answer_ids)
    bar.close()
    if args.save:
        np.savez_compressed(args.save, scores=result.scores, activations=result.activations,
                            params=json.dumps(params.to_dict()), prompt=args.prompt, answer=args.answer)
    coarse = sorted(coarse_neurons(result.scores, t), key=lambda n: -result.scores[n])
    doc = {"prompt": args.prompt, "answer": args.answer, "answer_tokens": list(answer_ids), "prob": result.prob,
           "layers": lm.layout.layers, "neurons": lm.layout.neurons, "max": float(result.scores.max()), "t": t,
           "coarse": neuron_list(coarse, result.scores), "completeness": result.completeness,
           "params": params.to_dict(), "seconds": result.seconds}
    lines = [f"P({args.answer!r}) = {result.prob:.4f}; {len(coarse)} coarse neurons (score > {t} x max "
             f"{doc['max']:.4g}) in {result.seconds:.1f} s"]
    lines += [f"  L{n['layer']:>2} #{n['neuron']:<6} {n['score']:.4g}" for n in doc["coarse"][:30]]
    emit(args, doc, "\n".join(lines))
    return 0


def cmd_neurons(args) -> int:
    from .attribution import attribute_fact, default_t
    from .neurons import coarse_neurons, refined_neurons
    from .facts import render_prompts

    factset = factset_of(args)
    fact = find_fact(factset, args.relation, args.subject)
    lm = load(args)
    prompts, skipped = render_prompts(fact, factset.relation(args.relation), lm.tokenizer, lm.kind)
    if not prompts:
        raise CliError(f"no template of {args.relation} can be used with this {lm.kind} model: "
                       + "; ".join(s.reason for s in skipped))
    for s in skipped:
        say(f"skipped template {s.template!r}: {s.reason}")
    params = params_of(args)
    t = args.t if args.t is not None else default_t(params.method)
    started = time.perf_counter()
    bar = tqdm_progress(f"{args.relation} {fact.subject}")
    with project_of(args) as project:
        if project is not None:
            project.add_model(lm)
            project.import_factset(factset)
            with project.recording_run(fact=fact, prompts=prompts, params=params, model=lm) as rec:
                results = attribute_fact(lm, prompts, params, task=bar_task(bar), on_prompt=rec.add)
        else:
            results = attribute_fact(lm, prompts, params, task=bar_task(bar))
        bar.close()
        refined = refined_neurons([r.scores for r in results], t, args.p)
        if project is not None:
            project.add_neuron_set("refined", refined, params={"t": t, "p": args.p, **params.to_dict()}, fact=fact)
    coarse = [sorted(coarse_neurons(r.scores, t), key=lambda n, r=r: -r.scores[n]) for r in results]
    doc = {"fact": {"relation": fact.relation, "subject": fact.subject, "object": fact.object},
           "prompts": [{"text": p.text, "answer": p.answer, "prob": r.prob} for p, r in zip(prompts, results)],
           "skipped": [{"template": s.template, "reason": s.reason} for s in skipped],
           "coarse": [neuron_list(c, r.scores) for c, r in zip(coarse, results)],
           "refined": neuron_list(refined), "t": t, "p": args.p, "params": params.to_dict(),
           "seconds": time.perf_counter() - started}
    lines = [f"{fact.relation} {fact.subject} -> {fact.object}: {len(prompts)} prompts, {len(refined)} refined "
             f"neurons (t={t}, p={args.p}) in {doc['seconds']:.1f} s"]
    lines += [f"  {p.text!r} -> {p.answer!r} P={r.prob:.3f}, {len(c)} coarse" for p, r, c in zip(prompts, results, coarse)]
    lines += [f"  refined L{l} #{i}" for l, i in refined]
    emit(args, doc, "\n".join(lines))
    return 0


# --- parser -----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kn", description="Knowledge Neuron Studio on the command line")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the model: info, fetch the embedded default")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    model_sub.add_parser("info", parents=[COMMON], help="family, kind, layers, neurons, hidden size, weight sha256") \
        .set_defaults(func=cmd_model_info)
    model_sub.add_parser("fetch", parents=[COMMON], help="download and convert the embedded default model once") \
        .set_defaults(func=cmd_model_fetch)

    predict = sub.add_parser("predict", parents=[COMMON], help="next token (causal) or mask fill (masked)")
    predict.add_argument("prompt")
    predict.add_argument("--top", type=int, default=10)
    predict.set_defaults(func=cmd_predict)

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

    def attribution_options(p):
        p.add_argument("--steps", type=int, default=20, help="integration steps m (paper: 20)")
        p.add_argument("--rule", choices=["right", "left"], default="right",
                       help="right: alpha=k/m, k=1..m (paper); left: k=0..m-1 (authors' code)")
        p.add_argument("--method", choices=["ig", "activation"], default="ig",
                       help="ig (integrated gradients) or the activation baseline")
        p.add_argument("--t", type=float, default=None, help="coarse threshold: score > t x max (0.2; 0.5 activation)")

    attr = sub.add_parser("attribute", parents=[COMMON], help="attribution scores of every FFN neuron for one prompt")
    attr.add_argument("--prompt", required=True)
    attr.add_argument("--answer", required=True, help="causal: the continuation with its leading space, e.g. ' Paris'")
    attr.add_argument("--save", help="write scores and activations to this .npz")
    attribution_options(attr)
    attr.set_defaults(func=cmd_attribute)

    neurons = sub.add_parser("neurons", parents=[COMMON], help="coarse and refined knowledge neurons of one fact")
    neurons.add_argument("--relation", required=True)
    neurons.add_argument("--subject", required=True)
    neurons.add_argument("--facts", default="builtin")
    neurons.add_argument("--p", type=float, default=0.7, help="refined: coarse in >= max(p x prompts, 3) prompts")
    neurons.add_argument("--share-prompts", choices=["auto", "on", "off"], default="auto",
                         help="run the fact's prompts in shared passes (BERT-style masked LMs; auto: on GPUs)")
    attribution_options(neurons)
    neurons.set_defaults(func=cmd_neurons)

    from .store.cli import add_project_commands

    add_project_commands(sub)
    try:
        from .reproduce import add_edit_commands
    except ImportError:
        add_edit_commands = None
    if add_edit_commands is not None:
        add_edit_commands(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .attribution import PromptError
    from .facts import FactImportError
    from .families import UnsupportedModelError
    from .models import ModelLoadError
    from .store import ProjectError
    from .tasks import Cancelled

    return (CliError, ModelLoadError, UnsupportedModelError, PromptError, FactImportError, ProjectError,
            Cancelled, KeyError, ValueError, FileNotFoundError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except _user_errors() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        if getattr(args, "json", False):
            print(json.dumps({"error": message, "error_type": type(exc).__name__}))
        say(f"error: {message}")
        return 2
    except Exception as exc:  # a bug, or the hardware: still one line, and the type says which
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc), "error_type": type(exc).__name__}))
        say(f"error: {type(exc).__name__}: {exc} (set KN_DEBUG=1 for the traceback)")
        if os.environ.get("KN_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
