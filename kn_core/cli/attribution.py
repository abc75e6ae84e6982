"""`kn attribute` (one prompt, or with --facts a whole fact set into a project: kn_core.runner) and `kn neurons`
(one fact's coarse and refined knowledge neurons)."""

from __future__ import annotations

import time

from ..selection import DEFAULT_P
from .checks import whole_number
from .common import (COMMON, CliError, emit, factset_of, find_fact, load, neuron_list, progress_bar,
                     project_of, prompt_format_field, prompt_format_option, say)


def params_of(args):
    from ..attribution import AttributionParams

    share = {"auto": None, "on": True, "off": False}[getattr(args, "share_prompts", "auto")]
    return AttributionParams(steps=args.steps, rule=args.rule, method=args.method, share_prompts=share,
                             quadrature=args.quadrature, tolerance=args.tolerance, force=args.force)


def cmd_attribute(args) -> int:
    if args.facts is not None:
        return cmd_attribute_facts(args)
    if args.prompt is None or args.answer is None:
        raise CliError("kn attribute needs --prompt and --answer (one prompt), or --facts and --project (every "
                       "fact of a fact set)")
    from ..attribution import attribute, default_t, encode_answer
    from ..encoding import prompt_format_params
    from ..neurons import coarse_neurons
    from ..scores_file import save_scores

    params = params_of(args)  # a bad combination fails before the model loads
    lm = load(args)
    t = args.t if args.t is not None else default_t(params.method)
    answer_ids = encode_answer(lm, args.prompt, args.answer)
    with progress_bar("attributing") as task, project_of(args) as project:
        if project is not None:
            project.add_model(lm)
            with project.recording_run(prompts=[{"text": args.prompt, "answer": args.answer}],
                                       params={**params.to_dict(), **prompt_format_params(lm)}, model=lm) as rec:
                result = attribute(lm, args.prompt, params, task=task, answer_ids=answer_ids)
                result.answer = args.answer
                rec.add(0, result)
        else:
            result = attribute(lm, args.prompt, params, task=task, answer_ids=answer_ids)
    if args.save:
        save_scores(args.save, result, {**params.to_dict(), **prompt_format_params(lm)}, args.prompt, args.answer,
                    model=lm.describe(),
                    answer_ids=answer_ids)
    coarse = sorted(coarse_neurons(result.scores, t), key=lambda n: -result.scores[n])
    doc = {"prompt": args.prompt, "answer": args.answer, "answer_tokens": list(answer_ids), "prob": result.prob,
           "layers": lm.layout.layers, "neurons": lm.layout.neurons, "max": float(result.scores.max()), "t": t,
           "coarse": neuron_list(coarse, result.scores, layout=lm.layout), "completeness": result.completeness,
           "params": params.to_dict(), **prompt_format_field(lm), "seconds": result.seconds}
    lines = [f"P({args.answer!r}) = {result.prob:.4f}; {len(coarse)} coarse neurons (score > {t} x max "
             f"{doc['max']:.4g}) in {result.seconds:.1f} s"]
    lines += [f"  L{n['layer']:>2} #{n['neuron']:<6} {n['score']:.4g}" for n in doc["coarse"][:30]]
    lines += tolerance_lines([result], params)
    emit(args, doc, "\n".join(lines))
    return 0


def ray_backend(args):
    """The RayBackend of --cluster/--workers/--worker-threads, Ray and the address checked before the model loads;
    None without --cluster (then --workers and --worker-threads are refused: they size a cluster run)."""
    if args.cluster is None:
        if args.workers is not None or args.worker_threads != 1:
            raise CliError("--workers and --worker-threads size a cluster run: add --cluster ray (or leave them out)")
        return None
    from ..cluster import ClusterError, RayBackend, cluster_address

    backend = RayBackend(address=cluster_address(args.cluster), workers=args.workers, threads=args.worker_threads,
                         device=args.device, trust_remote_code=args.trust_remote_code)
    try:
        backend.check_available()
    except ClusterError as exc:
        raise CliError(str(exc)) from None
    return backend


def cluster_options(p) -> None:
    p.add_argument("--cluster", help="ray (a local Ray instance, or the cluster RAY_ADDRESS names) or "
                                     "ray:ADDRESS (e.g. ray:auto, ray:10.0.0.1:6379); needs pip install .[cluster]")
    p.add_argument("--workers", type=whole_number, help="Ray workers (default: one per GPU, else one per CPU core)")
    p.add_argument("--worker-threads", type=whole_number, default=1, help="torch threads per CPU worker (default 1)")


def _fact_set_backend(args):
    """The backend for --cluster (checked before the model loads), and the device the driver loads on: with a
    cluster the workers compute and the driver only renders prompts, hashes the weights and writes."""
    from ..runner import SerialBackend

    backend = ray_backend(args)
    return (SerialBackend(), args.device) if backend is None else (backend, "cpu")


def cmd_attribute_facts(args) -> int:
    from ..attribution import default_t
    from ..runner import attribute_factset, prompt_params
    from ..selection import NeuronSelection

    for flag, value in (("--prompt", args.prompt), ("--answer", args.answer), ("--save", args.save)):
        if value is not None:
            raise CliError(f"{flag} is for one prompt; with --facts every fact's prompts come from its templates "
                           f"(leave {flag} out)")
    if not args.project:
        raise CliError("kn attribute --facts stores every fact's scores in a project: add --project FILE.knproj")
    factset = factset_of(args)
    params = params_of(args)
    selection = NeuronSelection(t=args.t if args.t is not None else default_t(params.method), p=args.p,
                                keep_massive=args.keep_massive)
    backend, device = _fact_set_backend(args)
    from ..runner import select_relations

    select_relations(factset, args.relations)  # an unknown relation fails before the model loads
    args.device = device
    lm = load(args)
    with project_of(args, whole_set=True) as project, progress_bar("attributing facts") as task:
        setup = None if args.scores is None else (lambda: project.set_score_storage(args.scores))
        try:
            report = attribute_factset(project, lm, factset, params, relations=args.relations, selection=selection,
                                       backend=backend, task=task, causal_templates=args.causal_templates,
                                       before_first_store=setup)
        except RuntimeError as exc:
            if type(exc).__name__ != "ClusterError":  # cluster.py is imported only with --cluster
                raise
            raise CliError(str(exc)) from None
        storage = project.score_storage()
    doc = {"project": str(args.project), "params": params.to_dict(), **selection.to_dict(), "score_storage": storage,
           **prompt_params(lm.kind, args.causal_templates), **prompt_format_field(lm), **report.to_dict()}
    rate = f", {report.facts_per_hour:.3g} facts/h" if report.facts_per_hour else ""
    lines = [f"{report.attributed} fact(s) attributed ({report.prompts} prompts) in {report.seconds:.1f} s{rate} "
             f"[{report.backend['backend']}, {report.backend['workers']} worker(s)]; {report.already_stored} stored "
             f"before (same weights and parameters); {len(report.skipped)} without a usable prompt"]
    if report.failed:
        lines[0] += f"; {len(report.failed)} not stored (NaN or infinite scores; tried again when resumed)"
    lines += [f"  not stored {s.fact.relation} {s.fact.subject!r} -> {s.fact.object!r}: {s.reason}"
              for s in report.failed[:20]]
    lines += [f"  skipped {s.fact.relation} {s.fact.subject!r} -> {s.fact.object!r}: {s.reason}"
              for s in report.skipped[:20]]
    if len(report.skipped) > 20:
        lines.append(f"  ... and {len(report.skipped) - 20} more skipped (--json lists every one)")
    emit(args, doc, "\n".join(lines))
    return 0


def cmd_neurons(args) -> int:
    from ..attribution import attribute_fact, default_t
    from ..experiments import fact_answers
    from ..facts import render_prompts
    from ..encoding import prompt_format
    from ..neurons import case_neurons, coarse_neurons, run_flags, without_template
    from ..runner import prompt_params, run_params
    from ..specificity import control_summary

    params = params_of(args)
    factset = factset_of(args)
    fact = find_fact(factset, args.relation, args.subject)
    lm = load(args)
    prompts, skipped = render_prompts(fact, factset.relation(args.relation), lm.tokenizer, lm.kind,
                                      args.causal_templates)
    if not prompts:
        raise CliError(f"no template of {args.relation} can be used with this {lm.kind} model: "
                       + "; ".join(s.reason for s in skipped))
    for s in skipped:
        say(f"skipped template {s.template!r}: {s.reason}")
    t = args.t if args.t is not None else default_t(params.method)
    started = time.perf_counter()
    recorded = run_params(params, lm.kind, args.causal_templates, prompt_format(lm))  # as the runner and the GUI
    with project_of(args) as project:
        with progress_bar(f"{args.relation} {fact.subject}") as task:
            if project is not None:
                project.add_model(lm)
                project.import_factset(factset)
                with project.recording_run(fact=fact, prompts=prompts, params=recorded, model=lm) as rec:
                    results = attribute_fact(lm, prompts, params, task=task, on_prompt=rec.add)
                run_id = rec.run_id
            else:
                results = attribute_fact(lm, prompts, params, task=task)
        flags = run_flags(lm, [r.activations for r in results])  # massive neurons (kn_core.neurons)
        exclude = () if args.keep_massive else flags.excluded
        refined, selection = case_neurons([r.scores for r in results], t, args.p, exclude=exclude)
        control = None
        if args.subject_control:
            control = _subject_control(lm, factset, fact, prompts, refined, params, args)
            flags = flags.with_template(control.template, control_summary([control])["rule"])
            if not args.keep_template:
                refined = without_template(refined, control.template)
        if project is not None:
            if control is not None:  # where the app keeps a run's control: the app and `kn report` select as here
                project.add_run_params(run_id, {"subject_control": {**control.to_dict(), "t": t, "p": args.p,
                                                                    "keep_template": args.keep_template}})
            project.add_neuron_set("refined", refined, fact=fact,
                                   params={"t": t, "p": args.p, "keep_massive": args.keep_massive, **recorded,
                                           **({"selection": selection} if selection["rule"] != "refined" else {})})
    coarse = [sorted(coarse_neurons(r.scores, t, exclude), key=lambda n, r=r: -r.scores[n]) for r in results]
    answer = fact_answers(lm, [(fact, prompts)])[0]  # p, rank and whether the model knows the fact
    doc = {"fact": {"relation": fact.relation, "subject": fact.subject, "object": fact.object,
                    **{k: answer[k] for k in ("prob", "rank_median", "rank_best", "top1_share", "answer_in_name",
                                               "known")}},
           "prompts": [{"text": p.text, "answer": p.answer, "prob": r.prob} for p, r in zip(prompts, results)],
           "skipped": [{"template": s.template, "reason": s.reason} for s in skipped],
           "coarse": [neuron_list(c, r.scores, layout=lm.layout) for c, r in zip(coarse, results)],
           "refined": neuron_list(refined, layout=lm.layout), "selection": selection, "t": t, "p": args.p,
           "params": params.to_dict(), **prompt_params(lm.kind, args.causal_templates), **prompt_format_field(lm),
           "flags": {**flags.to_dict(), "excluded_from_neurons": not args.keep_massive},
           "subject_control": control.to_dict() if control is not None else None,
           "seconds": time.perf_counter() - started}
    for entry in doc["refined"] + [e for c in doc["coarse"] for e in c]:
        entry["flags"] = list(flags.of((entry["layer"], entry.get("index", entry["neuron"]))))
    lines = _neurons_text(args, lm, fact, prompts, results, coarse, refined, flags, control, answer, selection, t,
                          doc["seconds"])
    lines += tolerance_lines(results, params)
    emit(args, doc, "\n".join(lines))
    return 0


def _neurons_text(args, lm, fact, prompts, results, coarse, refined, flags, control, answer, selection, t,
                  seconds) -> list[str]:
    """`kn neurons`'s plain-text lines (the --json document holds the same)."""
    from ..experiments import known_verdict
    from ..neurons import empty_neurons_fix, neuron_name
    from ..specificity import kept_text

    verdict = known_verdict(answer["answer_in_name"], answer["known"])
    known = verdict.label.replace("not ", "NOT ", 1)
    lines = [f"{fact.relation} {fact.subject} -> {fact.object}: {len(prompts)} prompts, {len(refined)} refined "
             f"neurons (t={t}, p={args.p}) in {seconds:.1f} s; p(answer) {answer['prob']:.3g}, median rank "
             f"{answer['rank_median']:g}, {known} (top-1 on {answer['top1_share']:.0%} of prompts)",
             f"  neurons: {selection['text']}" + ("" if refined else f"; none: {empty_neurons_fix(len(prompts), args.p)}")]
    if verdict.lead:
        lines.append(f"  {verdict.lead}: {verdict.why}")
    lines += [f"  {p.text!r} -> {p.answer!r} P={r.prob:.3f}, {len(c)} coarse" for p, r, c in zip(prompts, results, coarse)]
    lines += [f"  refined {neuron_name(l, i, lm.layout)} {' '.join(flags.of((l, i)))}".rstrip() for l, i in refined]
    if flags.massive:
        kept = "kept (--keep-massive)" if args.keep_massive else "excluded (--keep-massive keeps them)"
        lines.append(f"  massive neurons {kept}: " + ", ".join(neuron_name(l, i, lm.layout)
                                                                   for l, i in sorted(flags.massive)))
    if control is not None:
        lines.append(f"  subject control: {control.reason}" if not control.controlled else
                     f"  subject control ({len(control.subjects)} subjects, {control.prompts} prompts): "
                     f"{len(control.template)} template neuron(s) "
                     + ("kept (--keep-template)" if args.keep_template else "left out (--keep-template keeps them)")
                     + "".join(f", {neuron_name(l, i, lm.layout)}" for l, i in sorted(control.template)))
        if control.controlled:
            lines += [f"    {neuron_name(*n, lm.layout)}: "
                      f"{kept_text(control.ratios.get(n), control.signed.get(n), n in control.template)}"
                      for n in control.candidates]
    return lines


def _subject_control(lm, factset, fact, prompts, refined, params, args):
    """`kn neurons --subject-control`: the fact's refined neurons re-scored with other subjects (docs/SPECIFICITY.md),
    with the Riemann sum whatever --quadrature was (the control compares two scores of one kind)."""
    from ..specificity import subject_control

    with progress_bar(f"subject control {fact.relation} {fact.subject}") as task:
        return subject_control(lm, factset, fact, prompts, refined, params, causal_templates=args.causal_templates,
                               task=task)


def attribution_options(p) -> None:
    integration_options(p)
    p.add_argument("--rule", choices=["right", "left"], default="right",
                   help="right: alpha=k/m, k=1..m (paper); left: k=0..m-1 (authors' code)")
    p.add_argument("--method", choices=["ig", "activation"], default="ig",
                   help="ig (integrated gradients) or the activation baseline")
    p.add_argument("--t", type=float, default=None, help="coarse threshold: score > t x max (0.2; 0.5 activation)")


def tolerance_lines(results, params) -> list[str]:
    """gauss/auto: the layers whose completeness error stayed above the tolerance (kept, and said so)."""
    over = sorted({(row["layer"], row["error"]) for r in results for row in r.completeness
                   if row.get("within_tolerance") is False})
    if not over:
        return []
    worst = max(error for _, error in over)
    layers = ", ".join(f"L{layer}" for layer in sorted({layer for layer, _ in over}))
    return [f"  completeness error above --tolerance {params.tolerance:g} in {layers} (worst {worst:.3g}); "
            f"the scores are kept: more --steps, or --quadrature auto, integrates them closer"]


def integration_options(p) -> None:
    """--steps, --quadrature, --tolerance, --force: how every verb that attributes integrates (AttributionParams)."""
    p.add_argument("--steps", type=whole_number, default=None,
                   help="integration steps m: Riemann steps (paper: 20) or Gauss points per panel (default 4 "
                        "gauss, 3 auto); at most 1000")
    quadrature_options(p)
    p.add_argument("--force", action="store_true", help="allow more than 1000 steps")


def quadrature_options(p) -> None:
    p.add_argument("--quadrature", choices=["riemann", "gauss", "auto"], default="riemann",
                   help="riemann: the paper's m-step sum; gauss: m Gauss-Legendre points per layer (dense where "
                        "needed); auto: points raised per layer until its completeness error is within --tolerance")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="gauss/auto: completeness error per layer that is good enough (relative; default 0.01)")


def add_commands(sub) -> None:
    attr = sub.add_parser("attribute", parents=[COMMON], help="attribution scores of every FFN neuron for one prompt")
    attr.add_argument("--prompt", help="one prompt (with --answer)")
    attr.add_argument("--answer", help="causal: the continuation with its leading space, e.g. ' Paris'")
    attr.add_argument("--save", help="write scores and activations to this .npz (opens in the app: File > Open scores)")
    attribution_options(attr)
    whole = attr.add_argument_group("a whole fact set (with --project; resumes where a killed run stopped)")
    whole.add_argument("--facts", help="every fact of this fact set (a file, a PARAREL folder, or 'builtin')")
    whole.add_argument("--relations", default="all", help="all, or relation ids R1,R2")
    whole.add_argument("--p", type=float, default=DEFAULT_P, help="refined: coarse in >= max(p x prompts, 3) prompts")
    causal_templates_option(whole)
    prompt_format_option(attr)
    whole.add_argument("--keep-massive", action="store_true",
                       help="keep the fact's massive-activation neurons in its refined set (the paper's method)")
    whole.add_argument("--scores", choices=["full", "float16", "top"], default=None,
                       help="how the project stores score arrays from now on (default: its setting, full at first); "
                            "top keeps per prompt the scores coarse selection needs at t >= 0.1 (PARAREL-size runs)")
    cluster_options(whole)
    attr.set_defaults(func=cmd_attribute)

    neurons = sub.add_parser("neurons", parents=[COMMON], help="coarse and refined knowledge neurons of one fact")
    neurons.add_argument("--relation", required=True)
    neurons.add_argument("--subject", required=True)
    neurons.add_argument("--facts", default="builtin")
    neurons.add_argument("--p", type=float, default=DEFAULT_P, help="refined: coarse in >= max(p x prompts, 3) prompts")
    neurons.add_argument("--keep-massive", action="store_true",
                         help="keep massive-activation neurons in the coarse and refined sets (the paper's method)")
    neurons.add_argument("--subject-control", action="store_true",
                         help="re-score the refined neurons with the subject swapped for other subjects of the relation "
                              "and flag those that keep half their effect without it 'template' (docs/SPECIFICITY.md)")
    neurons.add_argument("--keep-template", action="store_true",
                         help="with --subject-control: keep the template neurons in the refined set (default: left out)")
    neurons.add_argument("--share-prompts", choices=["auto", "on", "off"], default="auto",
                         help="run the fact's prompts in shared passes (BERT-style masked LMs; auto: on GPUs)")
    causal_templates_option(neurons)
    prompt_format_option(neurons)
    attribution_options(neurons)
    neurons.set_defaults(func=cmd_neurons)


def causal_templates_option(p) -> None:
    """--causal-templates: how a causal model's prompts are rendered from the templates (facts.render_prompts).
    Recorded with every stored run, and part of what resume matches on."""
    p.add_argument("--causal-templates", choices=["prefix", "end-only"], default="prefix",
                   help="causal models: prefix (default) uses the text before [Y] of every template; end-only "
                        "only templates that end in [Y] (recorded with the results)")
