"""`kn edit batch REQUESTS.jsonl --mode compound|sequential`: many edits as one undoable history entry."""

from __future__ import annotations

from ..selection import DEFAULT_P
from .attribution import integration_options
from .checks import whole_number
from .common import (COMMON, PROTOCOL_CHOICES, CliError, emit, eval_option, factset_of, load, progress_bar,
                     project_of, prompt_format_option, say)

REQUESTS_HELP = """one request a line, EasyEdit's form {"prompt", "subject", "ground_truth", "target_new",
"rephrase_prompts"?, "locality_prompts"?: [{"prompt", "ground_truth"}]} or ours {"relation", "subject",
"new_object"?} (against --facts); either may add "kind" (suppress|amplify|update) and "neurons": [[layer, index]]"""


def cmd_edit_batch(args) -> int:
    from ..attribution import AttributionParams, default_t
    from ..edit_stack import EditStack
    from ..batch import NeuronSource, resolve_neurons, run_batch
    from ..batch_requests import check_requests, parse_requests

    factset = factset_of(args)
    params = AttributionParams(steps=args.steps, method=args.method, seed=args.seed, quadrature=args.quadrature,
                               tolerance=args.tolerance, force=args.force)
    t = args.t if args.t is not None else default_t(args.method)
    parsed = parse_requests(args.requests, factset, args.kind)
    _refuse_or_skip(parsed, args.skip_bad)
    if parsed.format != "kn":
        say(f"{args.requests}: {parsed.format} file, {len(parsed.requests)} request(s)")
    for x in parsed.left_out_fields:
        say(f"left out field {x['field']} ({x['records']} records): {x['reason']}")
    if args.protocol == "mquake" and parsed.format != "mquake":
        raise CliError(f"--protocol mquake needs MQuAKE cases (multi-hop questions); {args.requests} is "
                       f"{parsed.format}")
    lm = load(args)
    check_requests(lm, parsed)  # explicit neurons inside the model, prompts that render: no forward pass yet
    _refuse_or_skip(parsed, args.skip_bad)
    for line, why in parsed.bad:
        say(f"skipped line {line}: {why}")
    with project_of(args) as project:
        state = _saved_history(project, lm)
        with progress_bar("neurons") as task:  # on the unedited weights, as stored neuron sets are
            neurons = resolve_neurons(lm, parsed, NeuronSource(t, args.p, params), project, task)
        stack = EditStack.from_dict(lm, state)  # the batch is measured and pushed on top of the saved edits
        with progress_bar(f"{args.mode} batch of {len(parsed.requests)}") as task:
            result = run_batch(lm, parsed, neurons, args.mode, seed=args.seed, control_facts=args.control_facts,
                               forgetting_prompts=args.forgetting_prompts,
                               relation_exclusion=not args.no_relation_exclusion, max_prompts=args.max_prompts,
                               label=f"{args.mode} batch of {args.requests}", evaluation=args.eval,
                               protocol=args.protocol, task=task)
        if result.edit is None:
            for x in result.report["left_out"]:
                say(f"left out line {x['line']}: {x['reason']}")
            raise CliError(f"every one of the {result.report['requests_read']} requests was left out (listed above)")
        doc = {**result.report, "format": parsed.format, "fields_left_out": parsed.left_out_fields,
               "neuron_params": {"t": t, "p": args.p, **params.to_dict()},
               "history_entry": None, "evaluation_id": None, "project": args.project}
        if project is not None:
            doc["evaluation_id"] = project.add_evaluation(
                "edit batch", result.report, params={"mode": args.mode, "requests": str(args.requests),
                                                     "evaluation": args.eval, "prompt_format": args.prompt_format},
                model=lm)
        entry = {"summary": result.report["summary"], "evaluation_id": doc["evaluation_id"], "mode": args.mode,
                 "evaluation": args.eval, "prompt_format": args.prompt_format}
        doc["history_entry"] = stack.push(result.edit, report={"batch": entry})
        if project is not None:
            project.save_edit_history(stack.to_dict(), model=lm)
    emit(args, doc, _text(doc))
    return 0


def _refuse_or_skip(parsed, skip_bad: bool) -> None:
    from ..batch_requests import BatchError

    try:
        parsed.refuse_or_skip(skip_bad)
    except BatchError as exc:  # one line naming the bad lines
        raise CliError(str(exc)) from None


def _saved_history(project, lm) -> dict:
    """The project's saved edit history (the batch goes on top of it), refused when made on other weights."""
    if project is None:
        return {"entries": []}
    project.add_model(lm)
    state, _ = project.load_edit_history()
    check = project.edit_history_applies(lm.sha256)
    if state["entries"] and not check:
        raise CliError(f"the project's edit history cannot go under this batch: {check.reason}")
    return state


def _fmt(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _text(doc: dict) -> str:
    from ..metrics import metric_text, metrics_lines

    summary = doc["summary"]
    lines = [f"{doc['mode']} batch: {doc['applied']} of {doc['requests_read']} requests applied as one edit"
             + (f" (history entry #{doc['history_entry']})" if doc["history_entry"] is not None else "")
             + "; means over the requests"
             + (f" (at most {doc['max_prompts_per_group']} prompts per group)" if doc["max_prompts_per_group"] else "")
             + f"; correct judged {'by greedy generation' if doc['evaluation'] == 'generate' else 'teacher-forced'}, "
               f"{doc['prompt_format']} prompts:"]
    sources: dict[str, int] = {}
    for r in doc["requests"]:
        key = r["neurons_from"].split(" #")[0].split(", stored")[0]
        sources[key] = sources.get(key, 0) + 1
    lines += [f"  neurons: {n} request(s) from {src}" for src, n in sources.items()]
    lines += metrics_lines(summary["metrics"])
    if doc.get("protocol", "kn") != "kn":
        from ..protocols import summary_lines

        lines += summary_lines(doc["protocol"], summary)
    if summary["metrics"]["locality_prompts"].get("applicable", True):
        lines.append(f"  (locality prompts given with EasyEdit requests: "
                     f"{metric_text(summary['metrics']['locality_prompts'])})")
    if "forgetting" in summary:
        f = summary["forgetting"]
        lines.append(f"  edits holding right after their step {_fmt(f['holds_right_after_own_step'])}, "
                     f"at the end {_fmt(f['holds_at_the_end'])}")
    lines += [f"  left out line {x['line']}: {x['reason']}" for x in doc["left_out"]]
    if doc["evaluation_id"] is not None:
        lines.append(f"metrics stored in {doc['project']} (evaluation #{doc['evaluation_id']}, kind 'edit batch')")
    return "\n".join(lines)


def add_batch_command(edit_sub) -> None:
    p = edit_sub.add_parser("batch", parents=[COMMON], help="apply many edit requests as one undoable edit")
    p.add_argument("requests", metavar="REQUESTS.jsonl", help=REQUESTS_HELP)
    p.add_argument("--mode", choices=["compound", "sequential"], default="compound",
                   help="compound: all edits at once, measured after; sequential: one after another, with the "
                        "earlier edits measured again after each step (forgetting)")
    p.add_argument("--kind", choices=["suppress", "amplify", "update"], default="update",
                   help="edit kind of requests that do not name one")
    p.add_argument("--skip-bad", action="store_true", help="skip bad lines (listed with their reason) instead of "
                                                           "refusing the whole file")
    p.add_argument("--facts", default="builtin", help="fact set for relation/subject requests: 'builtin' or a "
                                                      "PARAREL folder / .csv / .jsonl")
    p.add_argument("--method", choices=["ig", "activation"], default="ig",
                   help="attribution for requests without neurons (none stored in --project): ig (the paper) or "
                        "the activation baseline")
    integration_options(p)
    p.add_argument("--t", type=float, default=None, help="coarse threshold (0.2; 0.5 for the activation baseline)")
    p.add_argument("--p", type=float, default=DEFAULT_P, help="refinement share of prompts (paper: starts at 0.7)")
    p.add_argument("--seed", type=whole_number, default=0, help="seed of the random control neurons and control facts")
    p.add_argument("--control-facts", type=whole_number, default=4, help="facts per control group (same relation, others)")
    p.add_argument("--forgetting-prompts", type=whole_number, default=1,
                   help="sequential: prompts per earlier request measured again after each step")
    p.add_argument("--max-prompts", type=whole_number, default=None,
                   help="measure at most N prompts of each prompt group of each request (default: all; stated in "
                        "the output)")
    eval_option(p)
    prompt_format_option(p)
    p.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="kn",
                   help="score every request also by this protocol (docs/METRICS.md): easyedit (token accuracies), "
                        "rome (CounterFact ES/PS/NS, S), mquake (edit-wise, multi-hop); kn: ours only")
    p.add_argument("--no-relation-exclusion", action="store_true",
                   help="updates: keep neurons shared by more than 10%% of the batch's other facts of the relation "
                        "(the paper leaves them out)")
    p.set_defaults(func=cmd_edit_batch)
