"""`kn edit degeneracy`: the degeneracy test of one fact's knowledge neurons (kn_core.degeneracy), beside its
random-neuron control."""

from __future__ import annotations

from .checks import whole_number
from .common import COMMON, CliError, emit, factset_of, find_fact, load, neuron_list, say, store_evaluation


def _name(neurons) -> str:
    from ..neurons import neuron_name

    return " + ".join(neuron_name(l, i) for l, i in neurons)


def _row(label: str, r: dict) -> str:
    top1 = "-" if r["top1_rate"] is None else f"{r['top1_rate']:.2f}"
    mark = "REDUNDANT" if r.get("redundant") else ("removes" if r["removes"] else "leaves")
    return f"  {label:<28} p {r['mean_prob']:.4f} ({r['prob_ratio']['text']:>8})  top-1 {top1:>4}  {mark}"


def _text(fact, result: dict) -> str:
    lines = [f"degeneracy of {fact.relation} {fact.subject} -> {fact.object}: {len(result['neurons'])} knowledge "
             f"neurons, {result['prompts']} prompts ({result['known_prompts']} answered top-1 unedited)",
             f"  {result['params']['definition']}; ratios are to the unedited mean probability "
             f"{result['unedited']['mean_prob']:.4f}"]
    if not result["applicable"]:
        lines.append(f"  not applicable: {result['reason']}")
    lines += [_row(_name([n]), r) for n, r in zip(result["neurons"], result["singles"])]
    lines += [_row(_name(r["neurons"]), r) for r in result["pairs"] if r["removes"]]
    hidden = sum(not r["removes"] for r in result["pairs"])
    if hidden:
        lines.append(f"  ({hidden} of {len(result['pairs'])} pairs leave the fact; --json lists every pair)")
    lines.append(_row("all", result["all"]))
    lines += [f"  left out: {x['what']}: {x['reason']}" for x in result["left_out"]]
    from ..degeneracy import summary_line

    lines.append(summary_line(result))
    if result["redundant_pairs"]:
        lines.append("redundant pairs: " + ", ".join(_name(p) for p in result["redundant_pairs"]))
    return "\n".join(lines)


def cmd_edit_degeneracy(args) -> int:
    from ..degeneracy import DegeneracyParams, degeneracy_test
    from ..edit_plan import EditRequest, plan_edit
    from ..metrics import measure_edit, metrics_lines
    from .common import progress_bar
    from .edit import _fact_neurons, neuron_params

    params = DegeneracyParams(criterion=args.criterion, removed_below=args.removed_below,
                              max_neurons=args.max_neurons, control=not args.no_control, seed=args.seed)
    factset = factset_of(args)
    fact = find_fact(factset, args.relation, args.subject)
    integration = {k: v for k, v in neuron_params(args).to_dict().items() if k in ("steps", "quadrature", "tolerance")}
    lm = load(args)
    prompts, neurons, scores = _fact_neurons(args, lm, factset, fact)[:3]
    if not neurons:
        raise CliError(f"{fact.relation} {fact.subject}: no refined knowledge neurons at t={args.t}, p={args.p}; "
                       f"lower --p")
    if len(neurons) > params.max_neurons:
        say(f"{len(neurons)} neurons: pairs only among the {params.max_neurons} strongest (--max-neurons)")
    with progress_bar("degeneracy") as task:
        result = degeneracy_test(lm, prompts, neurons, params, scores=scores, task=task.slice(0.0, 0.8))
        # suppressing all of them as an ordinary edit, in the field's metrics (its control: the same random set)
        plan = plan_edit(lm, factset, EditRequest("suppress", tuple(map(tuple, result["neurons"])), fact,
                                                  seed=args.seed))
        metrics = measure_edit(lm, plan, task=task.slice(0.8, 1.0))["metrics"]
    doc = {"fact": {"relation": fact.relation, "subject": fact.subject, "object": fact.object},
           "neuron_scores": neuron_list(result["neurons"], scores, layout=lm.layout),
           "prompt_texts": [p.text for p in prompts],
           **result, "all_suppressed_metrics": metrics}
    store_evaluation(args, lm, "degeneracy", doc, {**params.to_dict(), "t": args.t, "p": args.p, **integration})
    emit(args, doc, "\n".join([_text(fact, result), "suppressing all of them (kn_core.metrics):",
                                *metrics_lines(metrics)]))
    return 0


def add_commands(sub) -> None:
    """`kn edit degeneracy`, under the `edit` verb that kn_core.cli.edit registers (listed before this module in
    VERB_GROUPS; this module uses its attribution helper, so edit cannot import it back)."""
    import argparse

    from .edit import neuron_options

    edit = sub.choices["edit"]
    edit_sub = next(a for a in edit._actions if isinstance(a, argparse._SubParsersAction))
    p = edit_sub.add_parser("degeneracy", parents=[COMMON],
                            help="suppress each knowledge neuron, each pair and all: which subsets carry the fact "
                                 "redundantly (Chen et al. 2024), beside a random control")
    p.add_argument("--relation", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--criterion", choices=["top1", "prob"], default="top1",
                   help="when a suppression removes the fact: top1 (default): the answer is no longer top-1 on "
                        "more than half of the prompts the model gets right; prob: its mean probability falls "
                        "below --removed-below x the unedited one")
    p.add_argument("--removed-below", type=float, default=0.5,
                   help="criterion prob: the fraction of the unedited probability below which the fact is removed")
    p.add_argument("--max-neurons", type=whole_number, default=20,
                   help="pairs among at most this many strongest neurons (20 -> 190 pairs); the rest are listed")
    p.add_argument("--no-control", action="store_true", help="skip the random-neuron control")
    neuron_options(p)
    p.set_defaults(func=cmd_edit_degeneracy)
