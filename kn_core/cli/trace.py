"""`kn trace`: causal tracing of one fact's prompt (kn_core.tracing, Meng et al. 2022): which (token, layer) states
carry the fact, for the residual stream, the MLP and the attention outputs; stored in the project as an
evaluation of kind "trace"; `--out` draws the heat maps."""

from __future__ import annotations

from .checks import whole_number
from .common import COMMON, CliError, emit, factset_of, find_fact, load, progress_bar, say, store_evaluation


def _inputs_given(args) -> str:
    """'fact' or 'prompt', or a one-line error naming the fix, before the model loads."""
    fact = args.relation is not None or args.subject is not None
    prompt = args.prompt is not None or args.subject_text is not None or args.answer is not None
    if fact and prompt:
        raise CliError("give either --relation and --subject (a fact of the fact set) or --prompt, --subject-text "
                       "and --answer, not both")
    if fact:
        if args.relation is None or args.subject is None:
            raise CliError("--relation and --subject go together: give both")
        return "fact"
    if args.prompt is None or args.subject_text is None or args.answer is None:
        raise CliError("give --relation R --subject S, or --prompt TEXT --subject-text S --answer A")
    if args.subject_text not in args.prompt:
        raise CliError(f"--subject-text {args.subject_text!r} does not occur in --prompt {args.prompt!r}; give the "
                       f"subject exactly as the prompt writes it")
    return "prompt"


def _text(result) -> str:
    from ..tracing import KIND_NAMES

    start, end = result.subject_span
    lines = [f"causal trace of {result.prompt!r} -> {result.answer!r} (subject {result.subject!r}: tokens "
             f"{start}..{end - 1})",
             f"  P(clean) {result.p_clean:.4f}, P(subject corrupted) {result.p_corrupted:.4f} "
             f"({result.params.samples} samples, noise {result.params.noise:g} x {result.embedding_std:.4g})"]
    for kind, grid in result.restored.items():
        effect = result.effect(kind)
        token, layer = divmod(int(effect.argmax()), effect.shape[1])
        last = result.last_subject_token()
        lines.append(f"  {KIND_NAMES[kind]}: largest indirect effect {effect[token, layer]:+.4f} at token {token} "
                     f"({result.tokens[token]!r}), layer {layer}; at the last subject token peak layer "
                     f"{result.peak_layer(kind)} ({effect[last].max():+.4f})")
    return "\n".join(lines)


def cmd_trace(args) -> int:
    from ..encoding import encode_answer
    from ..facts import render_prompts
    from ..tracing import KINDS, TraceParams, embedding_std, plot_trace, trace

    params = TraceParams(kinds=KINDS if args.kind == "all" else (args.kind,), samples=args.samples,
                         noise=args.noise, seed=args.seed, window=args.window)
    mode = _inputs_given(args)
    factset = factset_of(args)
    fact = find_fact(factset, args.relation, args.subject) if mode == "fact" else None
    lm = load(args)
    if fact is not None:
        prompts, skipped = render_prompts(fact, factset.relation(fact.relation), lm.tokenizer, lm.kind)
        if not prompts:
            raise CliError(f"{fact.relation} {fact.subject}: no template gives a prompt for this model ("
                           + "; ".join(s.reason for s in skipped[:2]) + ")")
        text, subject, answer_ids = prompts[0].text, fact.subject, prompts[0].answer_ids
        say(f"tracing the fact's first prompt {text!r} (template {prompts[0].template!r})")
    else:
        text, subject = args.prompt, args.subject_text
        answer_ids = encode_answer(lm, text, args.answer)
    subjects = [f.subject for f in factset.facts]
    noise_scale = embedding_std(lm, subjects)
    with progress_bar("trace") as task:
        result = trace(lm, text, subject, answer_ids, params, noise_scale=noise_scale, task=task)
    doc = {**({"fact": {"relation": fact.relation, "subject": fact.subject, "object": fact.object}} if fact else {}),
           **result.to_dict(), "embedding_std_note": f"ROME's rule: the standard deviation of the token embeddings "
                                                     f"of the {len(set(subjects))} subjects of fact set "
                                                     f"{factset.name!r}"}
    if args.figure:
        plot_trace(result, args.figure)
        doc["figure"] = str(args.figure)
        say(f"figure written to {args.figure}")
    store_evaluation(args, lm, "trace", doc, {**params.to_dict(), "facts": factset.name})
    emit(args, doc, _text(result))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("trace", parents=[COMMON],
                       help="causal tracing (Meng et al. 2022): corrupt the subject, restore one state at a time")
    p.add_argument("--relation", help="a fact of the fact set: its relation id (with --subject)")
    p.add_argument("--subject",
                   help="a fact of the fact set: its subject (with --relation); its first prompt is traced")
    p.add_argument("--prompt", help="or your own prompt (with --subject-text and --answer)")
    p.add_argument("--subject-text", help="the words of --prompt to corrupt, as the prompt writes them")
    p.add_argument("--answer", help="the answer to --prompt (its first token is traced)")
    p.add_argument("--facts", help="the fact set (builtin, a PARAREL folder, .csv or .jsonl): the fact, and the "
                                   "subjects whose embeddings set the noise's scale (default builtin)")
    p.add_argument("--kind", choices=["residual", "mlp", "attn", "all"], default="all",
                   help="which states to restore: the residual stream (block output), the MLP output, the "
                        "attention output, or all three (default)")
    p.add_argument("--samples", type=whole_number, default=10, help="noise samples (ROME: 10)")
    p.add_argument("--noise", type=float, default=3.0,
                   help="noise standard deviation as a multiple of the subject embeddings' (ROME: 3)")
    p.add_argument("--seed", type=whole_number, default=0, help="seed of the noise")
    p.add_argument("--window", type=whole_number, default=1,
                   help="MLP/attn layers restored around each layer (ROME's figures: 10; the residual: always 1)")
    p.add_argument("--out", dest="figure", help="write the heat maps to this image (.png, .svg or .pdf)")
    p.set_defaults(func=cmd_trace)
