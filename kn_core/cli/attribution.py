"""`kn attribute` (one prompt) and `kn neurons` (one fact's coarse and refined knowledge neurons)."""

from __future__ import annotations

import json
import time

from .common import (COMMON, CliError, emit, factset_of, find_fact, load, neuron_list, progress_bar, project_of, say)


def params_of(args):
    from ..attribution import AttributionParams

    share = {"auto": None, "on": True, "off": False}[getattr(args, "share_prompts", "auto")]
    return AttributionParams(steps=args.steps, rule=args.rule, method=args.method, share_prompts=share,
                             quadrature=args.quadrature, tolerance=args.tolerance, force=args.force)


def cmd_attribute(args) -> int:
    import numpy as np

    from ..attribution import attribute, default_t, encode_answer
    from ..neurons import coarse_neurons

    params = params_of(args)  # a bad combination fails before the model loads
    lm = load(args)
    t = args.t if args.t is not None else default_t(params.method)
    answer_ids = encode_answer(lm, args.prompt, args.answer)
    with progress_bar("attributing") as task, project_of(args) as project:
        if project is not None:
            project.add_model(lm)
            with project.recording_run(prompts=[{"text": args.prompt, "answer": args.answer}], params=params,
                                       model=lm) as rec:
                result = attribute(lm, args.prompt, params, task=task, answer_ids=answer_ids)
                result.answer = args.answer
                rec.add(0, result)
        else:
            result = attribute(lm, args.prompt, params, task=task, answer_ids=answer_ids)
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
    from ..attribution import attribute_fact, default_t
    from ..facts import render_prompts
    from ..neurons import coarse_neurons, refined_neurons, run_flags

    params = params_of(args)
    factset = factset_of(args)
    fact = find_fact(factset, args.relation, args.subject)
    lm = load(args)
    prompts, skipped = render_prompts(fact, factset.relation(args.relation), lm.tokenizer, lm.kind)
    if not prompts:
        raise CliError(f"no template of {args.relation} can be used with this {lm.kind} model: "
                       + "; ".join(s.reason for s in skipped))
    for s in skipped:
        say(f"skipped template {s.template!r}: {s.reason}")
    t = args.t if args.t is not None else default_t(params.method)
    started = time.perf_counter()
    with project_of(args) as project:
        with progress_bar(f"{args.relation} {fact.subject}") as task:
            if project is not None:
                project.add_model(lm)
                project.import_factset(factset)
                with project.recording_run(fact=fact, prompts=prompts, params=params, model=lm) as rec:
                    results = attribute_fact(lm, prompts, params, task=task, on_prompt=rec.add)
            else:
                results = attribute_fact(lm, prompts, params, task=task)
        flags = run_flags(lm, [r.activations for r in results])  # massive neurons (kn_core.neurons)
        exclude = () if args.keep_massive else flags.excluded
        refined = refined_neurons([r.scores for r in results], t, args.p, exclude=exclude)
        if project is not None:
            project.add_neuron_set("refined", refined, fact=fact,
                                   params={"t": t, "p": args.p, "keep_massive": args.keep_massive, **params.to_dict()})
    coarse = [sorted(coarse_neurons(r.scores, t, exclude), key=lambda n, r=r: -r.scores[n]) for r in results]
    doc = {"fact": {"relation": fact.relation, "subject": fact.subject, "object": fact.object},
           "prompts": [{"text": p.text, "answer": p.answer, "prob": r.prob} for p, r in zip(prompts, results)],
           "skipped": [{"template": s.template, "reason": s.reason} for s in skipped],
           "coarse": [neuron_list(c, r.scores) for c, r in zip(coarse, results)],
           "refined": neuron_list(refined), "t": t, "p": args.p, "params": params.to_dict(),
           "flags": {**flags.to_dict(), "excluded_from_neurons": not args.keep_massive},
           "seconds": time.perf_counter() - started}
    for entry in doc["refined"] + [e for c in doc["coarse"] for e in c]:
        entry["flags"] = list(flags.of((entry["layer"], entry["neuron"])))
    lines = [f"{fact.relation} {fact.subject} -> {fact.object}: {len(prompts)} prompts, {len(refined)} refined "
             f"neurons (t={t}, p={args.p}) in {doc['seconds']:.1f} s"]
    lines += [f"  {p.text!r} -> {p.answer!r} P={r.prob:.3f}, {len(c)} coarse" for p, r, c in zip(prompts, results, coarse)]
    lines += [f"  refined L{l} #{i} {' '.join(flags.of((l, i)))}".rstrip() for l, i in refined]
    if flags.massive:
        kept = "kept (--keep-massive)" if args.keep_massive else "excluded (--keep-massive keeps them)"
        lines.append(f"  massive neurons {kept}: " + ", ".join(f"L{l} #{i}" for l, i in sorted(flags.massive)))
    emit(args, doc, "\n".join(lines))
    return 0


def attribution_options(p) -> None:
    p.add_argument("--steps", type=int, default=None,
                   help="integration steps m: Riemann steps (paper: 20) or Gauss points per panel (default 4 "
                        "gauss, 3 auto); at most 1000")
    quadrature_options(p)
    p.add_argument("--force", action="store_true", help="allow more than 1000 steps")
    p.add_argument("--rule", choices=["right", "left"], default="right",
                   help="right: alpha=k/m, k=1..m (paper); left: k=0..m-1 (authors' code)")
    p.add_argument("--method", choices=["ig", "activation"], default="ig",
                   help="ig (integrated gradients) or the activation baseline")
    p.add_argument("--t", type=float, default=None, help="coarse threshold: score > t x max (0.2; 0.5 activation)")


def quadrature_options(p) -> None:
    p.add_argument("--quadrature", choices=["riemann", "gauss", "auto"], default="riemann",
                   help="riemann: the paper's m-step sum; gauss: m Gauss-Legendre points per layer (dense where "
                        "needed); auto: points raised per layer until its completeness error is within --tolerance")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="gauss/auto: completeness error per layer that is good enough (relative; default 0.01)")


def add_commands(sub) -> None:
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
    neurons.add_argument("--keep-massive", action="store_true",
                         help="keep massive-activation neurons in the coarse and refined sets (the paper's method)")
    neurons.add_argument("--share-prompts", choices=["auto", "on", "off"], default="auto",
                         help="run the fact's prompts in shared passes (BERT-style masked LMs; auto: on GPUs)")
    attribution_options(neurons)
    neurons.set_defaults(func=cmd_neurons)
