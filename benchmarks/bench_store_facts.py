"""How fast the fact-set runner's driver stores facts: `runner._store` (what `kn attribute --facts` calls for
every fact that a worker returns) on synthetic default-model-sized results, into a fresh project with the app's
own settings (synchronous=FULL), counting SQLite commits on the project's engine.

    python benchmarks/bench_store_facts.py                       # 100 facts x 9 prompts, forms top and full
    python benchmarks/bench_store_facts.py --facts 300 --form top --json out.json

Scores are Student-t (as benchmarks/bench_store.py: kept counts in the "top" form like real default-model
scores), activations SiLU-like; both 30 layers x 1536 neurons float32. Only storing is timed: the results are
made before the clock starts. Prints commits per fact and seconds per fact (mean and median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kn_core import runner  # noqa: E402
from kn_core.attribution import AttributionParams  # noqa: E402
from kn_core.facts import Fact  # noqa: E402
from kn_core.selection import NeuronSelection  # noqa: E402
from kn_core.store import create_project  # noqa: E402

SHAPE = (30, 1536)
MODEL = {"source": "default", "sha256": "0" * 64, "dtype": "float32", "family": "llama", "kind": "causal",
         "layers": SHAPE[0], "neurons": SHAPE[1]}


def outcome(rng, index: int, prompts: int):
    results = []
    for _ in range(prompts):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        results.append(SimpleNamespace(scores=(rng.standard_t(1.5, size=SHAPE) * 1e-4).astype(np.float32),
                                       activations=(x / (1 + np.exp(-x))).astype(np.float32), prob=0.5,
                                       completeness=[{"layer": l, "error": 0.01} for l in range(SHAPE[0])],
                                       seconds=1.7))
    return runner.FactOutcome(index, results, refined=[(29, 7), (28, 100)], massive=[(0, 5)], seconds=15.3,
                              worker="bench:1", device="cpu")


def measure(form: str, facts: int, prompts: int, folder: Path) -> dict:
    from sqlalchemy import event

    rng = np.random.default_rng(0)
    works = [runner.FactWork(i, Fact("P36", f"country {i}", f"city {i}"),
                             tuple(f"prompt {k} of fact {i}" for k in range(prompts))) for i in range(facts)]
    outcomes = [outcome(rng, i, prompts) for i in range(facts)]
    params, selection = runner.run_params(AttributionParams(), "causal"), NeuronSelection()
    with create_project(folder / f"{form}.knproj") as project:
        project.set_score_storage(form)
        project.add_model(MODEL)
        project.add_facts([w.fact for w in works])
        runner._store(project, MODEL, works[0], outcomes[0], params, selection)  # warm-up: tables have pages
        commits = []
        event.listen(project._db._engine, "commit", lambda conn: commits.append(1))
        seconds = []
        for work, out in zip(works[1:], outcomes[1:]):
            started = time.perf_counter()
            runner._store(project, MODEL, work, out, params, selection)
            seconds.append(time.perf_counter() - started)
    stored = len(seconds)
    return {"form": form, "facts": stored, "prompts_per_fact": prompts, "commits_per_fact": len(commits) / stored,
            "seconds_total": sum(seconds), "seconds_per_fact_mean": statistics.mean(seconds),
            "seconds_per_fact_median": statistics.median(seconds)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=int, default=100, help="facts timed (one more is stored first, untimed)")
    ap.add_argument("--prompts", type=int, default=9, help="prompts per fact (PARAREL: about 9)")
    ap.add_argument("--form", choices=["top", "full", "both"], default="both", help="the project's score storage")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for form in (["top", "full"] if args.form == "both" else [args.form]):
            rows.append(measure(form, args.facts, args.prompts, Path(tmp)))
            r = rows[-1]
            print(f"{form:>4}: {r['facts']} facts x {r['prompts_per_fact']} prompts stored in {r['seconds_total']:.2f} s"
                  f" ({1000 * r['seconds_per_fact_mean']:.0f} ms a fact, median "
                  f"{1000 * r['seconds_per_fact_median']:.0f} ms), {r['commits_per_fact']:g} commits a fact",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
