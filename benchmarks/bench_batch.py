"""Batch editing at scale on the default model (issue 15's targets): 100 update requests together and one after
another, and 100 / 1,000 suppress requests together; undo must give bitwise the original weights, metrics go
into a project, and peak RSS should not grow with the batch.

    python benchmarks/bench_batch.py                          # all scenarios (each in its own process)
    python benchmarks/bench_batch.py --one suppress 1000 compound --max-prompts 1 --no-sizes
    python benchmarks/bench_batch.py --scenarios suppress:100:compound,suppress:1000:compound --max-prompts 1 --no-sizes

Requests are PARAREL dev facts (/work/shared/pararel-dev), drawn with a fixed seed from relations with at least
3 prompts for the model; an update's new object is another object of the same relation (seeded). They are
written to a REQUESTS.jsonl in our relation/subject form and read back through `kn_core.batch_requests.parse_requests`.

Neurons: integrated gradients for 1,000 facts would take hours on this shared 2-core CPU, so the requests carry
explicit neurons from the paper's activation baseline (score = the neuron's activation at the answer; coarse
> 0.5 x max, refined = coarse in all of the fact's first 3 prompts, massive-activation neurons excluded through
kn_core.neurons.run_flags), computed in batched forward passes. Every group of every request is measured on its
first --max-prompts prompts (default 2) with --control-facts 1 fact per control group: both printed.

Each scenario runs in a fresh process, so its peak RSS (ru_maxrss) is its own; the batch's own peak (VmHWM reset
just before it, Linux) and the RSS before it are printed too, apart from the neuron step's. Timings are printed beside a
reference measured in the same process (seconds per prompt of one plain `answer_probabilities` pass) and the
load average, because this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCENARIOS = [("update", 100, "compound+sequential"), ("suppress", 100, "compound"), ("suppress", 1000, "compound")]
FACTS = "/work/shared/pararel-dev"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str) -> float | None:
    """VmRSS (now) or VmHWM (peak since the last reset_peak) from /proc (Linux), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the batch's own peak can be read after it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def choose_facts(lm, factset, n: int, seed: int):
    from kn_core.facts import render_prompts

    rng = np.random.default_rng(seed)
    chosen = []
    for k in rng.permutation(len(factset.facts)):
        fact = factset.facts[int(k)]
        prompts, _ = render_prompts(fact, factset.relation(fact.relation), lm.tokenizer, lm.kind)
        if len(prompts) >= 3:
            chosen.append((fact, prompts[:3]))
        if len(chosen) == n:
            return chosen
    raise SystemExit(f"only {len(chosen)} facts with 3 prompts")


def activation_neurons(lm, chosen, chunk: int = 64):
    """The activation baseline's refined neurons per fact (see the module notes), batched in chunks of facts so
    that their activations (184 KB per prompt on the default model) are not all held at once; the massive
    neurons are flagged on the first chunk's prompts."""
    from kn_core.neurons import answer_activations, refined_neurons, run_flags

    out, excluded = [], None
    for start in range(0, len(chosen), chunk):
        part = chosen[start:start + chunk]
        acts = answer_activations(lm, [p for _, ps in part for p in ps])
        if excluded is None:
            excluded = run_flags(lm, acts).excluded
        out += [refined_neurons(acts[3 * i:3 * i + 3], t=0.5, p=0.7, exclude=excluded) for i in range(len(part))]
    return out, sorted(excluded)


def one(kind: str, n: int, modes: list[str], max_prompts: int, control_facts: int, seed: int, sizes: bool,
        keep_shared: bool = False) -> dict:
    import torch

    from kn_core.batch import run_batch
    from kn_core.batch_requests import check_requests, parse_requests
    from kn_core.edit_stack import EditStack
    from kn_core.evaluation import answer_probabilities
    from kn_core.fact_files import import_facts
    from kn_core.models import load_model, weights_sha256
    from kn_core.store import create_project

    torch.set_num_threads(1)
    out = {"kind": kind, "requests": n, "max_prompts": max_prompts, "control_facts": control_facts,
           "edit_sizes_measured": sizes, "relation_exclusion": not keep_shared, "load_average_start": os.getloadavg()}
    lm = load_model("default")
    factset = import_facts(FACTS)
    out["rss_after_load_mb"] = peak_rss_mb()
    chosen = choose_facts(lm, factset, n, seed)
    started = time.perf_counter()
    reference = [p for _, ps in chosen[:48] for p in ps[:1]]
    answer_probabilities(lm, reference)
    out["reference_s_per_prompt"] = (time.perf_counter() - started) / len(reference)
    started = time.perf_counter()
    neurons, massive = activation_neurons(lm, chosen)
    out["neurons_s"] = time.perf_counter() - started
    out["massive_excluded"] = len(massive)
    out["facts_without_neurons"] = sum(1 for x in neurons if not x)
    rng = np.random.default_rng(seed + 1)
    folder = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    with open(folder / "requests.jsonl", "w") as handle:
        for (fact, _), ns in zip(chosen, neurons):
            record = {"relation": fact.relation, "subject": fact.subject, "kind": kind}
            if ns:
                record["neurons"] = [list(x) for x in ns]
            if kind == "update":
                others = [o for o in factset.objects_of(fact.relation) if o != fact.object]
                record["new_object"] = others[int(rng.integers(len(others)))]
            handle.write(json.dumps(record) + "\n")
    parsed = parse_requests(folder / "requests.jsonl", factset)
    check_requests(lm, parsed)
    # requests without neurons get an explicit reason from run_batch (no attribution is run for them here)
    resolved = {r.line: (r.neurons or (), "activation baseline (explicit in the request)", None)
                for r in parsed.requests}
    original = lm.sha256
    edits = {}
    for mode in modes:
        out[f"rss_before_{mode}_mb"] = status_mb("VmRSS")
        peak_reset = reset_peak()
        started = time.perf_counter()
        result = run_batch(lm, parsed, resolved, mode, control_facts=control_facts, max_prompts=max_prompts,
                           measure_sizes=sizes, relation_exclusion=not keep_shared, label=f"bench {kind} x{n}")
        elapsed = time.perf_counter() - started
        out[f"peak_rss_during_{mode}_mb"] = status_mb("VmHWM") if peak_reset else None
        measured = sum(sum(r["prompts"].values()) for r in result.report["requests"])
        project_path = folder / f"{mode}.knproj"
        with create_project(project_path) as project:
            project.add_model(lm)
            eval_id = project.add_evaluation("edit batch", result.report, params={"mode": mode}, model=lm)
            stack = EditStack(lm)
            stack.push(result.edit, report={"batch": {"evaluation_id": eval_id}})
            project.save_edit_history(stack.to_dict(), model=lm)
            edited = weights_sha256(lm.model)
            stack.undo()
            stored = len(project.get_evaluation(eval_id).report["requests"])
        restored = weights_sha256(lm.model)
        edits[mode] = result.edit
        summary = result.report["summary"]["metrics"]
        out[mode] = {"seconds": elapsed, "applied": result.report["applied"],
                     "left_out": len(result.report["left_out"]),
                     "left_out_reasons": sorted({x["reason"].split(":")[0] for x in result.report["left_out"]})[:5],
                     "prompts_per_pass": measured,
                     "seconds_in_reference_prompts": elapsed / out["reference_s_per_prompt"],
                     "weights_changed_by_batch": edited != original,
                     "undo_bitwise_original": restored == original, "requests_stored_in_project": stored,
                     "project_mb": project_path.stat().st_size / 2 ** 20,
                     "reliability": summary["reliability"], "control_reliability": summary["control"]["reliability"],
                     "locality": summary["locality"],
                     **({"forgetting": result.report["summary"]["forgetting"]} if mode == "sequential" else {})}
    if len(edits) == 2:
        out["compound_equals_sequential_edit"] = edits["compound"] == edits["sequential"]
    out["peak_rss_mb"] = peak_rss_mb()
    out["load_average_end"] = os.getloadavg()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("KIND", "N", "MODES"))
    parser.add_argument("--max-prompts", type=int, default=2)
    parser.add_argument("--control-facts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sizes", action="store_true", help="leave the edits' sizes unmeasured (an activation "
                                                                   "edit's size costs a forward pass per request)")
    parser.add_argument("--keep-shared", action="store_true", help="updates: keep neurons shared by more than 10%% "
                                                                     "of the batch's facts of a relation (the paper "
                                                                     "leaves them out)")
    parser.add_argument("--scenarios", help="e.g. suppress:100:compound,suppress:1000:compound (default: all)")
    parser.add_argument("--out", help="write all results as JSON here")
    args = parser.parse_args()
    if args.one:
        kind, n, modes = args.one
        print(json.dumps(one(kind, int(n), modes.split("+"), args.max_prompts, args.control_facts, args.seed,
                             not args.no_sizes, args.keep_shared)))
        return
    results = []
    scenarios = SCENARIOS if not args.scenarios else [tuple(x.split(":")) for x in args.scenarios.split(",")]
    for kind, n, modes in scenarios:
        cmd = [sys.executable, __file__, "--one", kind, str(n), modes, "--max-prompts", str(args.max_prompts),
               "--control-facts", str(args.control_facts), "--seed", str(args.seed)] + \
            (["--no-sizes"] if args.no_sizes else []) + (["--keep-shared"] if args.keep_shared else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)
    print(f"\n{'scenario':<22}{'mode':<12}{'applied':>8}{'seconds':>9}{'x ref prompt':>13}{'undo bitwise':>14}"
          f"{'peak RSS MB':>13}")
    for r in results:
        for mode in ("compound", "sequential"):
            if mode in r:
                m = r[mode]
                print(f"{r['kind'] + ' x' + str(r['requests']):<22}{mode:<12}{m['applied']:>8}{m['seconds']:>9.0f}"
                      f"{m['seconds_in_reference_prompts']:>13.0f}{str(m['undo_bitwise_original']):>14}"
                      f"{r['peak_rss_mb']:>13.0f}")
    print(f"(max {args.max_prompts} prompts per group, {args.control_facts} control fact(s) per group; load "
          f"average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
