"""Project store benchmark: build a project with many facts and default-model-sized runs, then time a cold
open + listing the way the app does on start-up, and report file size per run.

    python benchmarks/bench_store.py                      # 10,000 facts, 1,000 runs x 7 prompts, scores only
    python benchmarks/bench_store.py --activations        # also store each prompt's activations
    python benchmarks/bench_store.py --runs 50 --keep DIR # smaller, and keep the file

Score arrays are 30 layers x 1536 neurons (SmolLM2-135M) float32, synthetic but shaped like attribution scores
(heavy-tailed around zero), so compression is realistic. The build writes each prompt in its own transaction
like the app; it uses synchronous=NORMAL to build quickly, and separately times saving a few runs with the
app's default synchronous=FULL.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kn_core import store  # noqa: E402
from kn_core.store import create_project, open_project  # noqa: E402

SHAPE = (30, 1536)
MODEL = {"source": "default", "sha256": "0" * 64, "dtype": "float32", "family": "llama", "kind": "causal",
         "layers": SHAPE[0], "neurons": SHAPE[1]}
PARAMS = {"steps": 20, "rule": "right", "method": "ig", "multi_token": "mean", "batch": 20}


def fake_scores(rng) -> np.ndarray:
    return (rng.standard_t(3, size=SHAPE) * 1e-4).astype(np.float32)


def fake_activations(rng) -> np.ndarray:
    x = rng.standard_normal(SHAPE).astype(np.float32)
    return (x / (1 + np.exp(-x))).astype(np.float32)  # SiLU-like


def save_run(proj, rng, fact_id, prompts, activations, float16):
    run = proj.start_run(fact=fact_id, prompts=[f"prompt {k} of fact {fact_id}" for k in range(prompts)],
                         params=PARAMS, model=MODEL, device="cpu")
    for k in range(prompts):
        proj.add_prompt_result(run, k, scores=fake_scores(rng),
                               activations=fake_activations(rng) if activations else None, prob=0.5,
                               completeness=[{"layer": l, "sum": 0.1, "target": 0.1} for l in range(SHAPE[0])],
                               seconds=1.3, float16=float16)
    proj.finish_run(run, elapsed_s=9.1)
    return run


def bytes_per_run(tmp: Path, prompts: int, activations: bool, float16: bool, n: int = 5) -> float:
    path = tmp / f"sample-{activations}-{float16}.knproj"
    rng = np.random.default_rng(1)
    with create_project(path) as proj:
        fact = proj.add_fact({"relation": "P1", "subject": "s", "object": "o"})
        save_run(proj, rng, fact, prompts, activations, float16)  # warm-up: table pages exist
    base = path.stat().st_size
    with open_project(path) as proj:
        for _ in range(n):
            save_run(proj, rng, fact, prompts, activations, float16)
    return (path.stat().st_size - base) / n


def timed_open_and_list(path: Path) -> dict:
    t0 = time.perf_counter()
    proj = open_project(path)
    t1 = time.perf_counter()
    facts = proj.list_facts()
    t2 = time.perf_counter()
    runs = proj.list_runs()
    t3 = time.perf_counter()
    sets = proj.list_neuron_sets()
    relations = proj.list_relations()
    counts = proj.counts()
    t4 = time.perf_counter()
    proj.close()
    t5 = time.perf_counter()
    return {"open_s": t1 - t0, "list_facts_s": t2 - t1, "list_runs_s": t3 - t2,
            "list_sets_relations_counts_s": t4 - t3, "open_and_list_s": t4 - t0, "close_s": t5 - t4,
            "facts": len(facts), "runs": len(runs), "neuron_sets": len(sets), "relations": len(relations),
            "score_arrays": counts["score_arrays"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=1_000)
    ap.add_argument("--prompts", type=int, default=7, help="prompts per run (the paper: ~8.6 templates)")
    ap.add_argument("--activations", action="store_true", help="store activations next to scores")
    ap.add_argument("--float16", action="store_true", help="store arrays as float16")
    ap.add_argument("--keep", metavar="DIR", help="build in DIR and keep the project")
    ap.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # a fresh process: nothing cached in Python, only the OS page cache
        print(json.dumps(timed_open_and_list(Path(args.child))))
        return 0

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kn-bench-store-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        print(f"bytes per run ({args.prompts} prompts of {SHAPE[0]}x{SHAPE[1]}; raw float32 array "
              f"{SHAPE[0] * SHAPE[1] * 4} bytes):")
        for act, f16 in ((False, False), (False, True), (True, False), (True, True)):
            label = ("scores" + (" + activations" if act else "")) + (" float16" if f16 else " float32")
            print(f"  {label:32s} {bytes_per_run(tmp, args.prompts, act, f16) / 1e6:7.2f} MB")

        store.database.SYNCHRONOUS = "FULL"
        path = tmp / "full-sync.knproj"
        with create_project(path) as proj:
            fact = proj.add_fact({"relation": "P1", "subject": "s", "object": "o"})
            rng = np.random.default_rng(2)
            save_run(proj, rng, fact, args.prompts, args.activations, args.float16)
            t = time.perf_counter()
            for _ in range(5):
                save_run(proj, rng, fact, args.prompts, args.activations, args.float16)
            per_run = (time.perf_counter() - t) / 5
        print(f"saving one run with synchronous=FULL ({args.prompts + 2} transactions, incl. compression): "
              f"{per_run * 1000:.0f} ms")

        path = tmp / "bench.knproj"
        path.unlink(missing_ok=True)
        store.database.SYNCHRONOUS = "NORMAL"
        t = time.perf_counter()
        rng = np.random.default_rng(0)
        with create_project(path, name="benchmark") as proj:
            relations = [{"id": f"P{r}", "name": f"relation {r}",
                          "templates": [f"[X] template {k} of relation {r} [Y]." for k in range(9)]}
                         for r in range(34)]
            fact_ids = proj.add_facts(({"relation": f"P{i % 34}", "subject": f"subject {i}", "object": f"object {i}"}
                                       for i in range(args.facts)), relations)
            for i in range(args.runs):
                fact = fact_ids[i % len(fact_ids)]
                run = save_run(proj, rng, fact, args.prompts, args.activations, args.float16)
                proj.add_neuron_set("refined", [(29, i % 1536), (28, 7)], {"t": 0.2, "p": 0.7}, fact=fact,
                                    run_ids=[run])
                if (i + 1) % 100 == 0:
                    print(f"  built {i + 1}/{args.runs} runs ({time.perf_counter() - t:.0f} s)", flush=True)
        build = time.perf_counter() - t
        size = path.stat().st_size
        print(f"built {args.facts} facts, {args.runs} runs in {build:.0f} s; file {size / 1e9:.2f} GB, "
              f"{size / max(args.runs, 1) / 1e6:.2f} MB per run")

        store.database.SYNCHRONOUS = "FULL"
        warm = timed_open_and_list(path)
        out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                             check=True)
        fresh = json.loads(out.stdout)
        for name, r in (("same process", warm), ("fresh process", fresh)):
            print(f"open + list ({name}): open {r['open_s'] * 1000:.0f} ms, list {r['facts']} facts "
                  f"{r['list_facts_s'] * 1000:.0f} ms, list {r['runs']} runs {r['list_runs_s'] * 1000:.0f} ms, "
                  f"sets/relations/counts {r['list_sets_relations_counts_s'] * 1000:.0f} ms; "
                  f"total {r['open_and_list_s'] * 1000:.0f} ms (close {r['close_s'] * 1000:.0f} ms)")
        ok = fresh["open_and_list_s"] < 1.0
        print("PASS: opens and lists in under a second" if ok else "FAIL: open + list took a second or more")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
