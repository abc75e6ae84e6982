"""Project store benchmark: build a project with many facts and default-model-sized runs, then time a cold
open + listing the way the app does on start-up, and report file size per run.

    python benchmarks/bench_store.py                      # 10,000 facts, 1,000 runs x 7 prompts, scores only
    python benchmarks/bench_store.py --activations        # also store each prompt's activations
    python benchmarks/bench_store.py --runs 50 --keep DIR # smaller, and keep the file
    python benchmarks/bench_store.py --form top --facts 27600 --runs 27600 --prompts 7-9   # all of PARAREL

Score arrays are 30 layers x 1536 neurons (SmolLM2-135M) float32, synthetic: Student-t scores (`--tail DF`,
default 1.5, whose kept counts in the "top" form, 380-790 of 46,080 at floor 0.1 and guard 16, match real
default-model scores: 326-793 on three prompts; DF 3 is a pessimistic, flatter tail). The big build cycles
through a pool of distinct arrays (`--pool`), each prompt still encoded and stored on its own. The build writes
each prompt in its own transaction like the app; it uses synchronous=NORMAL to build quickly, and separately
times saving a few runs with the app's default synchronous=FULL. `--form` is the project's score storage.
"""

from __future__ import annotations

import argparse
import json
import os
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


TAIL = 1.5


def fake_scores(rng) -> np.ndarray:
    return (rng.standard_t(TAIL, size=SHAPE) * 1e-4).astype(np.float32)


def fake_activations(rng) -> np.ndarray:
    x = rng.standard_normal(SHAPE).astype(np.float32)
    return (x / (1 + np.exp(-x))).astype(np.float32)  # SiLU-like


def save_run(proj, rng, fact_id, prompts, activations, float16, pool=None):
    run = proj.start_run(fact=fact_id, prompts=[f"prompt {k} of fact {fact_id}" for k in range(prompts)],
                         params=PARAMS, model=MODEL, device="cpu")
    for k in range(prompts):
        scores = fake_scores(rng) if pool is None else pool[int(rng.integers(len(pool)))]
        proj.add_prompt_result(run, k, scores=scores,
                               activations=fake_activations(rng) if activations else None, prob=0.5,
                               completeness=[{"layer": l, "sum": 0.1, "target": 0.1} for l in range(SHAPE[0])],
                               seconds=1.3, float16=float16)
    proj.finish_run(run, elapsed_s=9.1)
    return run


def bytes_per_run(tmp: Path, prompts: int, activations: bool, float16: bool, n: int = 5, form: str = "full",
                  floor: float = 0.1, guard: int = 16) -> float:
    path = tmp / f"sample-{activations}-{float16}-{form}-{floor}-{guard}.knproj"
    rng = np.random.default_rng(1)
    with create_project(path) as proj:
        proj.set_score_storage(form, floor, guard)
        fact = proj.add_fact({"relation": "P1", "subject": "s", "object": "o"})
        save_run(proj, rng, fact, prompts, activations, float16)  # warm-up: table pages exist
    base = path.stat().st_size
    with open_project(path) as proj:
        for _ in range(n):
            save_run(proj, rng, fact, prompts, activations, float16)
    return (path.stat().st_size - base) / n


def replicate(path: Path, api_runs: int, total: int) -> None:
    """Copies runs 1..api_runs (with their prompts, arrays and neuron sets) onto the next facts until `total` runs
    exist. Benchmark only: a full-size file in minutes instead of hours; the app writes through the store."""
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous=OFF")

    def columns(table):
        return [c[1] for c in con.execute(f"PRAGMA table_info({table})") if c[1] != "id"]

    shifted = {"runs": {"fact_id"}, "run_prompts": {"run_id"}, "score_arrays": {"run_id"}, "neuron_sets": {"fact_id"}}
    key = {"runs": "id", "run_prompts": "run_id", "score_arrays": "run_id", "neuron_sets": "fact_id"}
    first_run = con.execute("SELECT min(id) FROM runs").fetchone()[0]
    first_fact = con.execute("SELECT min(fact_id) FROM runs").fetchone()[0]
    with con:
        for block in range(1, -(-total // api_runs)):
            n = min(api_runs, total - block * api_runs)
            off = block * api_runs
            for table, cols in ((t, columns(t)) for t in shifted):
                pick = [f"{c} + {off}" if c in shifted[table] else c for c in cols]
                extra_cols, extra_vals = (["id"], [f"id + {off}"]) if table == "runs" else ([], [])
                base = first_fact if key[table] == "fact_id" else first_run
                con.execute(f"INSERT INTO {table} ({', '.join(extra_cols + cols)}) SELECT "
                            f"{', '.join(extra_vals + pick)} FROM {table} WHERE {key[table]} < {base + n}")
    con.close()


def timed_open_and_list(path: Path) -> dict:
    c0 = time.process_time()  # CPU time too: on a shared machine wall time mostly measures the other processes
    t0 = time.perf_counter()
    proj = open_project(path)
    t1 = time.perf_counter()
    facts = proj.list_facts()
    t2 = time.perf_counter()
    runs = proj.list_runs()
    t3 = time.perf_counter()
    sets = proj.list_neuron_sets()
    relations = proj.list_relations()
    t4 = time.perf_counter()
    c4 = time.process_time()
    counts = proj.counts()  # what `kn project info` adds (its byte total reads every array row's header)
    t45 = time.perf_counter()
    proj.close()
    t5 = time.perf_counter()
    return {"open_s": t1 - t0, "list_facts_s": t2 - t1, "list_runs_s": t3 - t2,
            "list_sets_relations_s": t4 - t3, "open_and_list_s": t4 - t0, "open_and_list_cpu_s": c4 - c0,
            "counts_s": t45 - t4, "close_s": t5 - t45,
            "facts": len(facts), "runs": len(runs), "neuron_sets": len(sets), "relations": len(relations),
            "score_arrays": counts["score_arrays"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=1_000)
    ap.add_argument("--prompts", default="7", help="prompts per run, N or LO-HI (the paper: ~8.6 templates)")
    ap.add_argument("--form", choices=["full", "float16", "top"], default="full", help="the project's score storage")
    ap.add_argument("--floor", type=float, default=0.1, help="top form: smallest exact t")
    ap.add_argument("--guard", type=int, default=16, help="top form: excluded neurons that keep t >= floor exact")
    ap.add_argument("--tail", type=float, default=1.5, help="Student-t degrees of freedom of the synthetic scores")
    ap.add_argument("--api-runs", type=int, default=0,
                    help="build only this many runs through the store API and the rest of --runs as SQL copies of "
                         "them with the next facts (same rows, bytes and tables to list; 0: all through the API)")
    ap.add_argument("--pool", type=int, default=0, help="cycle through this many distinct score arrays (0: new "
                                                          "ones for every prompt)")
    ap.add_argument("--activations", action="store_true", help="store activations next to scores")
    ap.add_argument("--float16", action="store_true", help="store arrays as float16")
    ap.add_argument("--keep", metavar="DIR", help="build in DIR and keep the project")
    ap.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global TAIL
    TAIL = args.tail
    lo, _, hi = args.prompts.partition("-")
    lo, hi = int(lo), int(hi or lo)
    args.prompts = lo
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
        for floor, guard in ((args.floor, args.guard), (0.2, 16), (0.05, 64)):
            label = f"scores top (floor {floor}, guard {guard})"
            print(f"  {label:32s} {bytes_per_run(tmp, args.prompts, False, False, 5, 'top', floor, guard) / 1e6:7.3f} MB")

        store.database.SYNCHRONOUS = "FULL"
        path = tmp / "full-sync.knproj"
        with create_project(path) as proj:
            proj.set_score_storage(args.form, args.floor, args.guard)
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
        pool = [fake_scores(rng) for _ in range(args.pool)] or None
        with create_project(path, name="benchmark") as proj:
            proj.set_score_storage(args.form, args.floor, args.guard)
            relations = [{"id": f"P{r}", "name": f"relation {r}",
                          "templates": [f"[X] template {k} of relation {r} [Y]." for k in range(9)]}
                         for r in range(34)]
            fact_ids = proj.add_facts(({"relation": f"P{i % 34}", "subject": f"subject {i}", "object": f"object {i}"}
                                       for i in range(args.facts)), relations)
            api_runs = args.api_runs or args.runs
            for i in range(api_runs):
                fact = fact_ids[i % len(fact_ids)]
                n_prompts = int(rng.integers(lo, hi + 1))
                run = save_run(proj, rng, fact, n_prompts, args.activations, args.float16, pool)
                proj.add_neuron_set("refined", [(29, i % 1536), (28, 7)], {"t": 0.2, "p": 0.7}, fact=fact,
                                    run_ids=[run])
                if (i + 1) % 1000 == 0:
                    print(f"  built {i + 1}/{args.runs} runs ({time.perf_counter() - t:.0f} s)", flush=True)
            if api_runs < args.runs:
                assert fact_ids == list(range(fact_ids[0], fact_ids[0] + len(fact_ids))), "facts are not contiguous"
        if api_runs < args.runs:
            replicate(path, api_runs, args.runs)
        build = time.perf_counter() - t
        size = path.stat().st_size
        print(f"built {args.facts} facts, {args.runs} runs (score storage {args.form}) in {build:.0f} s; file "
              f"{size / 1e9:.3f} GB, {size / max(args.runs, 1) / 1e6:.3f} MB per run")

        store.database.SYNCHRONOUS = "FULL"
        warm = timed_open_and_list(path)
        out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                             check=True)
        fresh = json.loads(out.stdout)
        for name, r in (("same process", warm), ("fresh process", fresh)):
            print(f"open + list ({name}): open {r['open_s'] * 1000:.0f} ms, list {r['facts']} facts "
                  f"{r['list_facts_s'] * 1000:.0f} ms, list {r['runs']} runs {r['list_runs_s'] * 1000:.0f} ms, "
                  f"sets/relations {r['list_sets_relations_s'] * 1000:.0f} ms; total "
                  f"{r['open_and_list_s'] * 1000:.0f} ms, CPU {r['open_and_list_cpu_s'] * 1000:.0f} ms (then counts "
                  f"{r['counts_s'] * 1000:.0f} ms, close {r['close_s'] * 1000:.0f} ms)")
        print(f"{fresh['score_arrays']} score arrays ({fresh['score_arrays'] / max(fresh['runs'], 1):.2f} prompts "
              f"per run), {size / max(fresh['score_arrays'], 1) / 1e3:.1f} kB per prompt")
        ok = fresh["open_and_list_s"] < 1.0
        print("PASS: opens and lists in under a second" if ok else "FAIL: open + list took a second or more "
              f"(CPU time {fresh['open_and_list_cpu_s']:.2f} s; uptime load: {os.getloadavg()[0]:.1f})")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
