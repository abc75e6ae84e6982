"""Fact-set throughput: facts per hour of `kn attribute --facts` in this process (one thread) against 1 and 2
local Ray workers (one thread each), all in one run so the ratios hold on a busy machine.

    python benchmarks/bench_cluster.py                          # 4 built-in P36 facts per setting, default model
    python benchmarks/bench_cluster.py --facts 8 --relations P36,P19 --steps 20 --json out.json
    python benchmarks/bench_cluster.py --device cuda --facts 20     # on a GPU node: one worker per GPU (up to 2)

Each setting attributes the same facts into its own new project (every fact's prompts, scores and refined
neurons stored, as the CLI does). "end to end" includes starting the workers and loading the model in each;
"steady" is the rate after every worker's first fact, what a long run approaches (give it several facts per
worker). Efficiency is the
steady rate over (workers x the single-process rate). Needs the cluster extra (pip install .[cluster]).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def measure(lm, factset, params, relations, backend, folder: Path, name: str, workers: int = 1) -> dict:
    from kn_core.runner import attribute_factset
    from kn_core.store import create_project

    stamps = []
    with create_project(folder / f"{name}.knproj") as project:
        started = time.perf_counter()
        report = attribute_factset(project, lm, factset, params, relations=relations, backend=backend,
                                   on_fact=lambda work, run_id: stamps.append(time.perf_counter()))
        wall = time.perf_counter() - started
    # steady: after every worker's first fact (which includes starting it and loading its model)
    warm = stamps[workers - 1] if len(stamps) > workers else None
    steady = 3600 * (len(stamps) - workers) / (stamps[-1] - warm) if warm is not None and stamps[-1] > warm else None
    return {"setting": name, "facts": report.attributed, "prompts": report.prompts, "seconds": wall,
            "facts_per_hour_end_to_end": 3600 * report.attributed / wall, "facts_per_hour_steady": steady,
            "first_fact_after_s": stamps[0] - started if stamps else None,
            "stored_at_s": [t - started for t in stamps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--facts", type=int, default=4, help="facts per setting (the first N of the relations)")
    ap.add_argument("--relations", default="P36")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu (one thread per process) or cuda")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import ray
    import torch

    from kn_core.attribution import AttributionParams
    from kn_core.cluster import RayBackend, init_ray
    from kn_core.fact_files import builtin_facts
    from kn_core.models import load_model
    from kn_core.runner import select_relations

    torch.set_num_threads(1)  # the single process gets one thread, as each worker does (on GPUs: feeding it)
    full = builtin_facts()
    chosen = select_relations(full, args.relations)
    facts = [f for f in full.facts if f.relation in chosen][:args.facts]
    factset = type(full)(full.name, {r: full.relation(r) for r in chosen}, facts)
    lm = load_model(args.model, device=args.device)
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    settings = (1, 2) if not gpus else tuple(range(1, min(gpus, 2) + 1))
    params = AttributionParams(steps=args.steps)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows.append(measure(lm, factset, params, chosen, None, folder, "single process"))
        init_ray(ray, num_cpus=2, num_gpus=gpus)
        try:
            for workers in settings:
                backend = RayBackend(workers=workers, threads=1, device=args.device if gpus else "cpu")
                rows.append(measure(lm, factset, params, chosen, backend, folder,
                                    f"ray, {workers} worker{'s' if workers > 1 else ''}", workers))
        finally:
            ray.shutdown()
    base = rows[0]["facts_per_hour_steady"] or rows[0]["facts_per_hour_end_to_end"]
    for row, workers in zip(rows, (1,) + settings):
        rate = row["facts_per_hour_steady"] or row["facts_per_hour_end_to_end"]
        row["vs_single_process"] = rate / base
        row["efficiency"] = rate / (workers * base)
    doc = {"model": args.model, "device": str(lm.device), "steps": args.steps, "facts": len(facts), "relations": chosen,
           "prompts_per_fact": sum(r["prompts"] for r in rows[:1]) / max(len(facts), 1),
           "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "rows": rows}
    print(f"{args.model} on {lm.device}, {len(facts)} facts of {','.join(chosen)} ({doc['prompts_per_fact']:.1f} prompts each), "
          f"{args.steps} steps; {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
          f"{doc['load_average_after'][0]:.1f} after")
    print(f"{'setting':<18} {'facts/h steady':>15} {'end to end':>11} {'first fact':>11} {'x single':>9} {'efficiency':>11}")
    for r in rows:
        steady = f"{r['facts_per_hour_steady']:.1f}" if r["facts_per_hour_steady"] else "-"
        print(f"{r['setting']:<18} {steady:>15} {r['facts_per_hour_end_to_end']:>11.1f} "
              f"{r['first_fact_after_s']:>10.1f}s {r['vs_single_process']:>9.2f} {r['efficiency']:>10.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
