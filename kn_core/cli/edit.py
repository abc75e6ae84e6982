"""`kn edit suppress|amplify|update|erase` (each with a random-neuron control) and `kn neuron` (`kn edit batch`:
kn_core/cli/batch.py)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..selection import DEFAULT_P, DEFAULT_T
from .attribution import integration_options
from .checks import whole_number
from .batch import add_batch_command
from .common import (COMMON, CliError, command_params, emit, eval_option, factset_of, find_fact, load, neuron_list,
                     progress_bar, prompt_format_field, prompt_format_option, say, store_evaluation)


class FoundNeurons(NamedTuple):
    prompts: list  # the prompts that found the neurons (held-out templates left out)
    neurons: list  # refined, without flagged neurons unless --keep-massive
    scores: object  # attribution scores summed over `prompts`
    excluded: frozenset  # flagged (massive/unspecific) neurons left out; empty with --keep-massive
    selection: dict  # the rule that chose the neurons (neurons.case_neurons: refined, or few prompts)
    control: object = None  # specificity.SubjectControl with --subject-control, else None


def _fact_neurons(args, lm, factset, fact, held_out=None) -> FoundNeurons:
    """Attribution of one fact's prompts except those of the held-out templates (`args.hold_out` of them where the
    verb has the option, drawn with `args.seed`, unless `held_out` names them; kept for generality,
    docs/METRICS.md), and its refined neurons. Massive-activation neurons are left out as `kn neurons` leaves
    them out (`--keep-massive` keeps them), so an edit never rests on a neuron that fires on every prompt."""
    from ..attribution import attribute_fact
    from ..facts import render_prompts
    from ..metrics import held_out_templates
    from ..neurons import case_neurons, neuron_name, run_flags

    prompts, skipped = render_prompts(fact, factset.relation(fact.relation), lm.tokenizer, lm.kind)
    if not prompts:
        raise CliError(f"no template of {fact.relation} can be used with this {lm.kind} model: "
                       + "; ".join(s.reason for s in skipped))
    if held_out is None:
        try:
            held_out = held_out_templates([p.template for p in prompts], getattr(args, "hold_out", 0), args.seed)
        except ValueError as exc:
            raise CliError(f"{fact.relation} {fact.subject}: {exc} (--hold-out 0)") from None
    prompts = [p for p in prompts if p.template not in held_out]
    with progress_bar(f"attributing {fact.relation} {fact.subject}") as task:
        scores = attribute_fact(lm, prompts, neuron_params(args), task=task)
    keep = getattr(args, "keep_massive", False)
    excluded = frozenset() if keep else run_flags(lm, [s.activations for s in scores]).excluded
    neurons, selection = case_neurons([s.scores for s in scores], args.t, args.p, exclude=excluded)
    if excluded:
        say(f"{fact.relation} {fact.subject}: massive neurons left out (--keep-massive keeps them): "
            + ", ".join(neuron_name(l, i, lm.layout) for l, i in sorted(excluded)))
    if selection["rule"] != "refined":
        say(f"{fact.relation} {fact.subject}: {selection['text']}")
    control = None
    if getattr(args, "subject_control", False):
        neurons, control = _without_template(args, lm, factset, fact, prompts, neurons)
    return FoundNeurons(prompts, neurons, sum(s.scores for s in scores), excluded, selection, control)


def _without_template(args, lm, factset, fact, prompts, neurons) -> tuple[list, object]:
    """--subject-control: the subject control of `kn neurons` on the neurons that will be edited; its template
    neurons are left out of the edit unless --keep-template (docs/SPECIFICITY.md)."""
    from ..neurons import neuron_name, without_template
    from ..specificity import subject_control

    params = neuron_params(args)  # a non-Riemann quadrature is controlled with the Riemann sum (riemann_params)
    with progress_bar(f"subject control {fact.relation} {fact.subject}") as task:
        control = subject_control(lm, factset, fact, prompts, neurons, params, task=task)
    if not control.controlled:
        say(f"{fact.relation} {fact.subject}: subject control: {control.reason}")
        return neurons, control
    names = ", ".join(neuron_name(l, i, lm.layout) for l, i in sorted(control.template)) or "none"
    keep = getattr(args, "keep_template", False)
    say(f"{fact.relation} {fact.subject}: subject control ({len(control.subjects)} subjects, {control.prompts} "
        f"prompts): template neurons {names} " + ("kept (--keep-template)" if keep else
                                                  "left out of the edit (--keep-template keeps them)"))
    return (neurons if keep else without_template(neurons, control.template)), control


def _no_neurons(args, fact, found: FoundNeurons) -> CliError:
    """The refusal when a fact has no knowledge neurons, naming a fix that can help (neurons.empty_neurons_fix)."""
    from ..neurons import empty_neurons_fix

    fix = empty_neurons_fix(len(found.prompts), args.p).replace("lower t", "lower --t").replace("lower p", "lower --p")
    if found.control is not None and found.control.template:
        fix = (f"the subject control flagged all {len(found.control.template)} as template neurons (--keep-template "
               f"edits them anyway)")
    return CliError(f"{fact.relation} {fact.subject}: no knowledge neurons at t={args.t}, p={args.p} "
                    f"({found.selection['text']}); {fix}")


def neuron_params(args):
    """The attribution that finds a verb's knowledge neurons (--steps, --quadrature, --tolerance, --seed, --force);
    each verb builds it once before the model loads, so that a bad combination fails first."""
    from ..attribution import AttributionParams

    return AttributionParams(steps=args.steps, quadrature=args.quadrature, tolerance=args.tolerance, seed=args.seed,
                             force=args.force)


def _neuron_params_field(args, lm, selection: dict) -> dict:
    """How the knowledge neurons were found and how prompts were encoded and judged, for --json (as `kn edit
    batch` reports it)."""
    return {"neuron_params": {"t": args.t, "p": args.p, **neuron_params(args).to_dict(), "selection": selection},
            **prompt_format_field(lm), "eval": args.eval}


def _flags_field(excluded, args, lm, control=None) -> dict:
    """The flagged (massive/unspecific) neurons left out of the edit, and the subject control's result with
    --subject-control, for --json."""
    return {"flagged_excluded": neuron_list(sorted(excluded), layout=lm.layout),
            "keep_massive": getattr(args, "keep_massive", False),
            "subject_control": control.to_dict() if control is not None else None,
            "keep_template": getattr(args, "keep_template", False)}


def _templates(prompts) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.template for p in prompts))


def _planned(lm, factset, request, relation_neuron_sets=()):
    """The edit of `request` built by kn_core.edit_plan (as the GUI and the reproduction build it)."""
    from ..edit_plan import plan_edit

    return plan_edit(lm, factset, request, relation_neuron_sets)


def _measured(lm, plan, args) -> dict:
    """`metrics.measure_edit`: every prompt group evaluated once before, once with the edit, once with the control
    (--eval generate: correct = the greedy continuation matches the answer)."""
    from ..metrics import measure_edit

    with progress_bar("measuring the edit and its control") as task:
        return measure_edit(lm, plan, task=task, evaluation=args.eval)


def _plan_fields(lm, plan, args, measured: dict | None = None) -> dict:
    """The plan's skipped items and prompt groups; per group the edit's and the control's effect (`groups`);
    the field's metrics beside the control's (`metrics`, docs/METRICS.md). Measures the plan unless `measured`
    (`_measured`) is given."""
    from ..edit_plan import summarize_plan

    measured = measured if measured is not None else _measured(lm, plan, args)
    before = measured["before"]
    return {"skipped": [{"what": what, "reason": why} for what, why in plan.skipped],
            "prompt_groups": {g: [p.text for p in ps] for g, ps in plan.prompts.items()},
            "groups": {"edit": summarize_plan(plan, before, measured["after"]),
                       "control": summarize_plan(plan, before, measured["control_after"])},
            "metrics": measured["metrics"]}


def _metrics_text(doc: dict) -> list[str]:
    from ..metrics import metrics_lines

    judged = "by greedy generation" if doc["eval"] == "generate" else "teacher-forced"
    lines = [f"metrics (docs/METRICS.md; correct judged {judged}, {doc['prompt_format']} prompts):",
             *metrics_lines(doc["metrics"])]
    if doc.get("protocol", "kn") != "kn":
        from ..protocols import summary_lines

        lines += summary_lines(doc["protocol"], doc["protocol_scores"])
    return lines


def _protocol_fields(lm, plan, args) -> dict:
    """--protocol: the edit's fact scored by EasyEdit's or ROME's definitions too (kn_core.protocols), its
    held-out prompts as paraphrases and the control facts as neighbourhood/locality; kn: ours only."""
    protocol = getattr(args, "protocol", "kn")
    if protocol == "kn":
        return {"protocol": "kn"}
    from ..bench import protocol_scores
    from ..protocols import case_from_plan

    with progress_bar(f"{protocol} protocol"):
        return {"protocol": protocol,
                "protocol_scores": protocol_scores(lm, case_from_plan(plan), protocol, plan.edit, plan.control)}


def cmd_edit_activation(args) -> int:
    from .. import evaluation as ev
    from ..edit_plan import EditRequest
    from ..edit_stack import export_model

    factset = factset_of(args)
    fact = find_fact(factset, args.relation, args.subject)
    if args.export and args.scope != "all":
        raise CliError("--export needs --scope all (an answer-position edit is not a weight change)")
    neuron_params(args)
    lm = load(args)
    found = _fact_neurons(args, lm, factset, fact)
    if not found.neurons:
        raise _no_neurons(args, fact, found)
    plan = _planned(lm, factset, EditRequest(args.edit_kind, tuple(found.neurons), fact,
                                             factor=getattr(args, "factor", 2.0), scope=args.scope, seed=args.seed,
                                             neuron_templates=_templates(found.prompts),
                                             exclude=tuple(found.excluded)))
    prompts = plan.prompts["fact"]
    measured = _measured(lm, plan, args)  # the fact's prompts evaluated once per model state, for every figure below
    effect = ev.effect_between(measured["before"]["fact"], measured["after"]["fact"])
    control = ev.effect_between(measured["before"]["fact"], measured["control_after"]["fact"])
    if args.export:
        export_model(lm, [plan.edit], args.export)
    doc = {"fact": {"relation": fact.relation, "subject": fact.subject, "object": fact.object},
           "edit": plan.edit.to_dict(), "neurons": neuron_list(plan.edit.neurons, layout=lm.layout),
           "prompts": [p.text for p in prompts], "before": effect["before"], "after": effect["after"],
           "relative_change": effect["relative_change"], "flip_rate": effect["flip_rate"],
           "control": {"kind": "random neurons from the same layers", "neurons":
                       neuron_list(plan.control.neurons, layout=lm.layout),
                       "after": control["after"], "relative_change": control["relative_change"],
                       "flip_rate": control["flip_rate"]},
           "exported_to": args.export, **_plan_fields(lm, plan, args, measured),
           **_flags_field(found.excluded, args, lm, found.control),
           **_neuron_params_field(args, lm, found.selection),
           **_protocol_fields(lm, plan, args)}
    text = [f"{args.edit_kind} {len(plan.edit.neurons)} knowledge neurons of {fact.relation} {fact.subject} -> "
            f"{fact.object}:",
            *[f"  {p.text!r}: {b:.4f} -> {a:.4f}" for p, b, a in zip(prompts, effect["before"], effect["after"])],
            f"relative change {100 * effect['relative_change']:+.1f}% (random neurons: "
            f"{100 * control['relative_change']:+.1f}%)", *_metrics_text(doc)]
    store_evaluation(args, lm, f"edit {args.edit_kind}", doc, command_params(args))
    emit(args, doc, "\n".join(text))
    return 0


def cmd_edit_update(args) -> int:
    import numpy as np

    from .. import evaluation as ev
    from ..edit_plan import EditRequest
    from ..edit_stack import export_model

    factset = factset_of(args)
    fact = find_fact(factset, args.relation, args.subject)
    if args.new_object.strip() == fact.object:
        raise CliError(f"--new-object {args.new_object!r} is the fact's current object; choose another object")
    neuron_params(args)
    lm = load(args)
    found = _fact_neurons(args, lm, factset, fact)
    neurons = found.neurons
    others = [f for f in factset.facts_of(fact.relation) if f != fact][: args.relation_facts]
    # to leave out neurons shared by >10% of the relation's facts
    relation_sets = {other: _fact_neurons(args, lm, factset, other).neurons for other in others}
    if not neurons:
        raise _no_neurons(args, fact, found)
    plan = _planned(lm, factset, EditRequest("update", tuple(neurons), fact, new_object=args.new_object,
                                             lambda1=args.lambda1, lambda2=args.lambda2,
                                             sign_aware=args.sign_aware, strength=args.strength, seed=args.seed,
                                             neuron_templates=_templates(found.prompts),
                                             exclude=tuple(found.excluded)),
                    relation_sets)
    update = plan.edit
    own = plan.prompts["fact"]
    measured = _measured(lm, plan, args)  # the fact's and the new object's prompts evaluated once per model state
    before_old, before_new = measured["before"]["fact"], measured["before"]["new object"]
    after_old, after_new = measured["after"]["fact"], measured["after"]["new object"]
    if args.export:
        ev.with_edits(lm, [update], lambda: export_model(lm, [update], args.export))
    doc = {"fact": {"relation": fact.relation, "subject": fact.subject, "object": fact.object},
           "new_object": args.new_object, "edit": update.to_dict(), "neurons":
           neuron_list(update.neurons, layout=lm.layout), "excluded": neuron_list(update.excluded, layout=lm.layout),
           "flipped": neuron_list(update.flipped, layout=lm.layout),
           "exclusion": f"computed over {len(relation_sets)} other facts of {fact.relation}" if others else
           "not computed (use --relation-facts N to attribute N other facts of the relation)",
           "prompts": [p.text for p in own],
           "before": {"old": [r["prob"] for r in before_old], "new": [r["prob"] for r in before_new]},
           "after": {"old": [r["prob"] for r in after_old], "new": [r["prob"] for r in after_new]},
           "top1_after": [r["top1_token"] for r in after_old],
           "change_rate": ev.flip_rate(before_old, after_old),
           "success_rate": float(np.mean([r["correct"] for r in after_new])), "exported_to": args.export,
           **_flags_field(found.excluded, args, lm, found.control),
           **_neuron_params_field(args, lm, found.selection),
           "control": {"kind": "random neurons from the same layers", "edit": plan.control.to_dict()},
           **({"calibration": plan.calibration} if plan.calibration is not None else {}),
           **_plan_fields(lm, plan, args, measured), **_protocol_fields(lm, plan, args)}
    text = [f"update {fact.relation} {fact.subject}: {fact.object} -> {args.new_object} "
            f"({len(update.neurons)} neurons, {len(update.excluded)} left out"
            + (f", edit reversed on {len(update.flipped)} negatively active" if args.sign_aware else "") + ")",
            *[f"  {p.text!r}: P(old) {b['prob']:.4f} -> {a['prob']:.4f}, P(new) {bn['prob']:.4f} -> {an['prob']:.4f}, "
              f"top-1 {a['top1_token']!r}" for p, b, a, bn, an in zip(own, before_old, after_old, before_new, after_new)],
            f"change rate {doc['change_rate']:.2f}, success rate {doc['success_rate']:.2f}"]
    if plan.calibration is not None:
        cal = plan.calibration
        text.append(f"calibrated: {cal['scale']:.3g} x the lambdas (λ2 = {cal['lambda2']:.3g}); "
                    + ("o' is the top answer on every prompt" if cal["reached"] else
                       "FAILED: o' is not the top answer on every prompt even at the largest scale"))
    text += _metrics_text(doc)
    store_evaluation(args, lm, "edit update", doc, command_params(args))
    emit(args, doc, "\n".join(text))
    return 0


def cmd_edit_erase(args) -> int:
    from .. import evaluation as ev
    from ..edit_plan import EditRequest
    from ..edit_stack import export_model

    factset = factset_of(args)
    try:
        factset.relation(args.relation)
    except KeyError:
        raise CliError(f"no relation {args.relation!r}; relations: {', '.join(sorted(factset.relations))}") from None
    neuron_params(args)
    lm = load(args)
    facts = factset.facts_of(args.relation)[: args.max_facts]
    held_out = _relation_held_out(args, lm, factset, facts)
    found = {fact: _fact_neurons(args, lm, factset, fact, held_out) for fact in facts}
    sets = {fact: f.neurons for fact, f in found.items()}
    excluded = frozenset().union(*(f.excluded for f in found.values()))
    if not any(sets.values()):
        raise CliError(f"{args.relation}: no knowledge neurons found in {len(sets)} facts")
    plan = _planned(lm, factset, EditRequest("erase", relation=args.relation, k=args.k, fill=args.fill,
                                             allow_fewer=True, seed=args.seed, control_facts=args.control_facts,
                                             control_prompts_per_fact=None,
                                             neuron_templates=_templates(p for f in found.values() for p in f.prompts),
                                             exclude=tuple(excluded)),
                    sets)
    erase = plan.edit
    measured = _measured(lm, plan, args)  # the relation's and the other relations' prompts evaluated once per model state
    before, after, control = (_erase_figures(measured[state]) for state in ("before", "after", "control_after"))
    if args.export:
        ev.with_edits(lm, [erase], lambda: export_model(lm, [erase], args.export))
    doc = {"relation": args.relation, "facts": len(sets), "edit": erase.to_dict(), "neurons":
           neuron_list(erase.neurons, layout=lm.layout),
           "before": before, "after": after, "control": {"kind": "random neurons from the same layers", **control},
           "exported_to": args.export, **_plan_fields(lm, plan, args, measured), **_flags_field(excluded, args, lm),
           **_neuron_params_field(args, lm, {"per_fact": {f.subject: x.selection["text"] for f, x in found.items()}})}
    text = [f"erase {args.relation} ({len(erase.neurons)} neurons from {len(sets)} facts):",
            f"  accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f} (random {control['accuracy']:.2f})",
            f"  perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f} (random {control['perplexity']:.1f})"]
    if "other_perplexity" in before:
        text.append(f"  other relations' perplexity {before['other_perplexity']:.1f} -> {after['other_perplexity']:.1f}")
    text += _metrics_text(doc)
    store_evaluation(args, lm, "edit erase", doc, command_params(args))
    emit(args, doc, "\n".join(text))
    return 0


def _erase_figures(rows: dict) -> dict:
    """Erase's accuracy and answer perplexity of the relation's prompts (and of the other relations', when there
    are some) from one model state's `measure_plan` groups."""
    import numpy as np

    from .. import evaluation as ev

    own, other = rows["fact"], rows["other relations"]
    out = {"accuracy": float(np.mean([x["correct"] for x in own])), "perplexity": ev.perplexity_of(own)}
    if other:
        out |= {"other_accuracy": float(np.mean([x["correct"] for x in other])),
                "other_perplexity": ev.perplexity_of(other)}
    return out


def _relation_held_out(args, lm, factset, facts) -> tuple[str, ...]:
    """Erase: the same held-out templates for every fact of the relation (drawn from the first fact's), so that no
    template both found neurons for one fact and measures generality on another."""
    from ..facts import render_prompts
    from ..metrics import held_out_templates

    if not facts:
        return ()
    prompts, _ = render_prompts(facts[0], factset.relation(facts[0].relation), lm.tokenizer, lm.kind)
    try:
        return held_out_templates([p.template for p in prompts], args.hold_out, args.seed)
    except ValueError as exc:
        raise CliError(f"{facts[0].relation} {facts[0].subject}: {exc} (--hold-out 0)") from None


def cmd_neuron(args) -> int:
    from .. import evaluation as ev
    from ..neurons import neuron_name
    from ..validation import check_int

    if args.sign == "auto" and not args.prompt:
        raise CliError("--sign auto reads the sign of the activation on the --prompt texts; give at least one --prompt")
    sentences = _rank_sentences(args.rank_file) if args.rank_file else None
    lm = load(args)
    check_int("--layer", args.layer, 0, lm.layout.layers - 1, " (the model's layers)")
    check_int("--index", args.index, 0, lm.layout.neurons - 1, " (the neurons of a layer)")
    sign = {"none": None, "positive": 1, "negative": -1}.get(args.sign)
    if args.sign == "auto":
        sign = ev.activation_sign(lm, args.layer, args.index, args.prompt)
    info = ev.neuron_tokens(lm, args.layer, args.index, args.top_k, sign=sign)
    if args.prompt:
        acts = ev.neuron_activations(lm, [(args.layer, args.index)], args.prompt, position=args.position)[:, 0]
        info["activations"] = [{"text": t, "activation": float(a)} for t, a in zip(args.prompt, acts)]
    if sentences is not None:
        info["ranked"] = ev.rank_by_activation(lm, [(args.layer, args.index)], sentences, args.position)
    text = [f"{neuron_name(args.layer, args.index)} (|v| = {info['norm']:.3f})",
            f"{info['labels']['promotes']}: " + ", ".join(f"{r['token']!r} {r['logit']:+.2f}" for r in info["promotes"]),
            f"{info['labels']['suppresses']}: " + ", ".join(f"{r['token']!r} {r['logit']:+.2f}" for r in info["suppresses"])]
    text += [f"  {a['activation']:+.4f}  {a['text']!r}" for a in info.get("activations", [])]
    text += [f"  #{r['rank']} {r['activation']:+.4f}  {r['text']!r}" for r in info.get("ranked", [])]
    store_evaluation(args, lm, "neuron", info, command_params(args))
    emit(args, info, "\n".join(text))
    return 0


def _rank_sentences(path) -> list[str]:
    """The --rank-file's sentences (one a line), read before the model loads so that a bad file costs nothing."""
    from ..validation import check_text

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"--rank-file {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                       f"{exc.start}); save it as UTF-8") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    for number, line in lines:
        check_text(f"--rank-file line {number}", line)
    return [line for _, line in lines]


def neuron_options(p) -> None:
    """How a verb finds a fact's knowledge neurons (see `_fact_neurons`)."""
    p.add_argument("--facts", default="builtin", help="'builtin' or a PARAREL folder / .csv / .jsonl")
    integration_options(p)
    p.add_argument("--keep-massive", action="store_true",
                   help="keep massive-activation neurons among the knowledge neurons (the paper's method; default: "
                        "left out, as in kn neurons)")
    p.add_argument("--t", type=float, default=DEFAULT_T, help="coarse threshold (paper: 0.2)")
    p.add_argument("--p", type=float, default=DEFAULT_P, help="refinement share of prompts (paper: starts at 0.7)")
    p.add_argument("--seed", type=whole_number, default=0, help="seed of the random control neurons")
    prompt_format_option(p)


def _fact_edit_options(p) -> None:
    neuron_options(p)
    p.add_argument("--subject-control", action="store_true",
                   help="re-score the fact's neurons with the subject swapped for other subjects of the relation and "
                        "leave out of the edit those that keep half their effect without it (docs/SPECIFICITY.md)")
    p.add_argument("--keep-template", action="store_true",
                   help="with --subject-control: edit the template neurons too (default: left out)")
    eval_option(p)
    p.add_argument("--export", metavar="DIR", help="save the edited model (save_pretrained) to DIR")
    p.add_argument("--hold-out", type=whole_number, default=1, metavar="N",
                   help="templates per fact kept away from finding the neurons, to measure generality on "
                        "(drawn with --seed; 0: use every template, generality is then not measured)")


def protocol_option(p) -> None:
    p.add_argument("--protocol", choices=["kn", "easyedit", "rome"], default="kn",
                   help="also score the edit by EasyEdit's token accuracies or ROME's CounterFact scores "
                        "(docs/METRICS.md); kn: ours only")


def add_commands(sub) -> None:
    edit = sub.add_parser("edit", help="suppress, amplify, update or erase knowledge, with a control")
    edit_sub = edit.add_subparsers(dest="edit_kind", required=True)
    for kind in ("suppress", "amplify"):
        p = edit_sub.add_parser(kind, parents=[COMMON], help=f"{kind} a fact's knowledge neurons")
        p.add_argument("--relation", required=True)
        p.add_argument("--subject", required=True)
        p.add_argument("--scope", choices=["answer", "all"], default="answer",
                       help="answer: only at the answer position (the paper); all: every position")
        if kind == "amplify":
            p.add_argument("--factor", type=float, default=2.0)
        _fact_edit_options(p)
        protocol_option(p)
        p.set_defaults(func=cmd_edit_activation)
    p = edit_sub.add_parser("update", parents=[COMMON], help="move a fact's object to a new one")
    p.add_argument("--relation", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--new-object", required=True)
    p.add_argument("--lambda1", type=float, default=1.0)
    p.add_argument("--lambda2", type=float, default=8.0)
    p.add_argument("--relation-facts", type=whole_number, default=0,
                   help="attribute N other facts of the relation to leave out neurons shared by >10%% of them")
    p.add_argument("--sign-aware", action="store_true",
                   help="reverse the edit on neurons whose mean activation on the fact's prompts is negative "
                        "(gated FFNs; not in the paper)")
    p.add_argument("--strength", choices=["paper", "calibrated"], default="paper",
                   help="paper: the lambdas as given; calibrated: sign-aware, both lambdas scaled by the smallest "
                        "factor in [1/64, 4] at which o' becomes the top answer on the fact's prompts (not in the "
                        "paper; a failure is reported)")
    _fact_edit_options(p)
    protocol_option(p)
    p.set_defaults(func=cmd_edit_update)
    p = edit_sub.add_parser("erase", parents=[COMMON], help="erase a relation (its k most frequent knowledge neurons)")
    p.add_argument("--relation", required=True)
    p.add_argument("--k", type=whole_number, default=20)
    p.add_argument("--fill", choices=["zero", "unk"], default="zero")
    p.add_argument("--max-facts", type=whole_number, default=10, help="facts of the relation to attribute")
    p.add_argument("--control-facts", type=whole_number, default=10, help="facts of other relations to measure")
    _fact_edit_options(p)
    p.set_defaults(func=cmd_edit_erase)
    add_batch_command(edit_sub)

    neuron = sub.add_parser("neuron", parents=[COMMON], help="what one neuron's value vector promotes")
    neuron.add_argument("--layer", type=whole_number, required=True)
    neuron.add_argument("--index", type=whole_number, required=True)
    neuron.add_argument("--top-k", type=whole_number, default=10)
    neuron.add_argument("--prompt", action="append", help="show the activation on this text (repeatable)")
    neuron.add_argument("--rank-file", help="rank the sentences of this text file (one a line) by activation")
    neuron.add_argument("--position", choices=["answer", "max", "mean", "last"], default="answer")
    neuron.add_argument("--sign", choices=["none", "positive", "negative", "auto"], default="none",
                        help="read the value vector as the neuron acts when its activation has this sign (auto: "
                             "the sign of its mean activation on the --prompt texts; SwiGLU/GELU neurons fire "
                             "negative, and then promote what the value vector alone suppresses)")
    neuron.set_defaults(func=cmd_neuron)
