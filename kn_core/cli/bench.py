"""`kn bench FILE`: knowledge-neuron edits on a benchmark file (CounterFact, zsRE, KnowEdit, MQuAKE, EasyEdit
requests), scored by a protocol beside random-neuron controls; and `kn facts to-counterfact`, which makes
CounterFact-form cases from a PARAREL fact set."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..selection import DEFAULT_P, DEFAULT_T
from .attribution import cluster_options, integration_options, ray_backend
from .checks import whole_number
from .common import COMMON, PROTOCOL_CHOICES, CliError, emit, factset_of, load, progress_bar, say


def read_benchmark(path, fmt=None):
    """The benchmark file read (kn_core.field_formats), a reader's refusal as a one-line CLI error."""
    from ..field_formats import FieldFormatError, read_field_file

    try:
        return read_field_file(path, fmt)
    except FieldFormatError as exc:
        raise CliError(str(exc)) from None


def cmd_bench(args) -> int:
    from ..bench import BenchSettings, run_bench
    from .edit import neuron_params

    params = neuron_params(args)  # a bad integration setting fails before the file is read or the model loads
    backend = ray_backend(args)  # Ray and the cluster's address checked before the file is read
    read = read_benchmark(args.bench_file, args.format)
    if args.protocol == "mquake" and read.format != "mquake":
        raise CliError(f"--protocol mquake needs MQuAKE cases (multi-hop questions); {args.bench_file} is {read.format}")
    if args.edit == "update" and any(not c.target_new or not c.target_true for c in read.cases):
        raise CliError(f"{args.bench_file}: an update needs target_new and the true answer in every case")
    say(f"{args.bench_file}: {read.summary()}")
    for x in read.left_out:
        say(f"left out field {x['field']} ({x['records']} records): {x['reason']}")
    settings = BenchSettings(args.edit, args.protocol, args.cases, args.seed, args.t, args.p, args.gen_tokens,
                             args.generation_prompts, args.keep_massive)
    lm = load(args)
    compute = cluster = None
    if backend is not None:
        from ..bench_cluster import on_ray

        compute, cluster = on_ray(backend, lm, params, settings), backend.describe
    with progress_bar("bench") as task:
        try:
            report = run_bench(lm, read, Path(args.out), params, settings, source=str(args.bench_file),
                               command=shlex.join(["kn", *sys.argv[1:]]), say=say, task=task, compute=compute,
                               cluster=cluster)
        except RuntimeError as exc:
            if type(exc).__name__ != "ClusterError":  # cluster.py is imported only with --cluster
                raise
            raise CliError(str(exc)) from None
    doc = {"protocol": report["protocol"], "summary": _summary(report), "format": report["format"],
           "status": report["status"], "out": str(args.out), "report": str(Path(args.out) / "report.json"),
           "timing": report["timing"], "machine": report["machine"], "left_out": report["left_out"]}
    emit(args, doc, (Path(args.out) / "report.md").read_text(encoding="utf-8"))
    return 0


def _summary(report: dict) -> dict:
    """{"pre", "post", "control"} as `kn edit batch --json` has them, plus every condition by its label."""
    s = report["summary"]
    post = "update (calibrated)" if "update (calibrated)" in s else report["edit"]
    control = "random neurons (calibrated λ)" if post == "update (calibrated)" else "random neurons"
    return {"pre": s.get("unedited"), "post": s.get(post), "control": s.get(control), "conditions": s,
            "post_is": post, "control_is": control}


def cmd_to_counterfact(args) -> int:
    from ..bench import pararel_to_counterfact

    factset = factset_of(args)
    records, left = pararel_to_counterfact(factset, args.per_relation, args.seed,
                                           max_paraphrases=args.max_paraphrases, min_prompts=args.min_prompts)
    if not records:
        raise CliError(f"no CounterFact case could be made from {args.facts}: "
                       + "; ".join(f"{x['relation']}: {x['reason']}" for x in left[:5]))
    out = Path(args.output)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    doc = {"cases": len(records), "output": str(out), "relations": len({r["pararel_relation"] for r in records}),
           "left_out": left}
    lines = [f"{out}: {len(records)} CounterFact-form cases from {doc['relations']} relations of {factset.name}"]
    lines += [f"  left out {x['relation']} {x['what']}: {x['reason']}" for x in left]
    emit(args, doc, "\n".join(lines))
    return 0




def add_commands(sub) -> None:
    b = sub.add_parser("bench", parents=[COMMON], help="knowledge-neuron edits on a benchmark file (CounterFact, "
                                                       "zsRE, KnowEdit, MQuAKE, EasyEdit), with controls")
    b.add_argument("bench_file", metavar="FILE", help="a benchmark file: JSON array, JSON Lines or {\"records\": [...]}")
    b.add_argument("--format", choices=["counterfact", "zsre", "knowedit", "mquake", "easyedit"], default=None,
                   help="the file's format (default: detected from its first record)")
    b.add_argument("--edit", choices=["suppress", "amplify", "update"], default="update")
    b.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="rome",
                   help="rome: CounterFact's ES/PS/NS, S, fluency; easyedit: token accuracies; mquake: multi-hop; "
                        "kn: ours (docs/METRICS.md)")
    b.add_argument("--cases", type=whole_number, default=100, help="cases sampled (seeded) from the file")
    b.add_argument("--seed", type=whole_number, default=0, help="seed of the sample, the controls and the text")
    integration_options(b)
    b.add_argument("--t", type=float, default=DEFAULT_T, help="coarse threshold (paper 0.2)")
    b.add_argument("--p", type=float, default=DEFAULT_P, help="refinement share of prompts (paper 0.7)")
    b.add_argument("--gen-tokens", type=whole_number, default=40, help="new tokens per generation prompt (fluency)")
    b.add_argument("--generation-prompts", type=whole_number, default=2, help="generation prompts per case (0: none)")
    b.add_argument("--keep-massive", action="store_true", help="keep massive-activation neurons (default: left out)")
    cluster_options(b)  # the cases computed on Ray workers, as kn attribute --facts --cluster
    b.add_argument("--out", required=True, help="folder for report.json/md/html, the case results and the cache "
                                                "(run the same command again to resume)")
    b.set_defaults(func=cmd_bench)


def add_facts_command(facts_sub) -> None:
    c = facts_sub.add_parser("to-counterfact", parents=[COMMON],
                             help="CounterFact-form cases from a fact set (PARAREL folder, .csv, .jsonl)")
    c.add_argument("--facts", default="builtin", help="'builtin' or a PARAREL folder / .csv / .jsonl")
    c.add_argument("--output", required=True, help="the .json file to write (a JSON array of cases)")
    c.add_argument("--per-relation", type=whole_number, default=None, help="a seeded sample of N facts per relation")
    c.add_argument("--seed", type=whole_number, default=0)
    c.add_argument("--max-paraphrases", type=whole_number, default=None,
                   help="the first N other templates of the relation as paraphrases (CounterFact has 2; default all)")
    c.add_argument("--min-prompts", type=whole_number, default=3,
                   help="leave out relations with fewer usable templates (refined neurons need 3 prompts)")
    c.set_defaults(func=cmd_to_counterfact)
