"""Child process for tests/test_store.py: writes into a project through the store API until killed, or holds a
project open, or reports what opening does under another user, or fills a WAL that closing cannot checkpoint.
Prints one line per committed step."""

import json
import signal
import sys
import time

import numpy as np

from kn_core.store import ProjectError, create_project, open_or_create_project, open_project

SHAPE = (30, 1536)  # the default model: 30 layers x 1536 FFN neurons
MODEL = {"source": "default", "sha256": "5" * 64, "dtype": "float32", "family": "llama", "kind": "causal",
         "layers": 30, "neurons": 1536}


def scores(run: int, prompt: int) -> np.ndarray:
    return np.random.default_rng(run * 1000 + prompt).standard_normal(SHAPE).astype(np.float32)


def say(line: str) -> None:
    print(line, flush=True)


def attribute(path: str) -> None:
    proj = open_or_create_project(path)
    fact = proj.add_fact({"relation": "P36", "subject": "France", "object": "Paris"})
    prompts = [f"The capital of France is (paraphrase {k})" for k in range(5)]
    with proj.recording_run(fact=fact, prompts=prompts, params={"steps": 20, "rule": "right"}, model=MODEL) as rec:
        for k in range(5):
            rec.add(k, scores=scores(1, k), activations=scores(1, k) * 2, prob=0.5, completeness=[{"layer": 0}])
    say("run1 done")
    run = proj.start_run(fact=fact, prompts=[f"prompt {k}" for k in range(200)], params={"steps": 20}, model=MODEL)
    say(f"run2 started {run}")
    for k in range(200):  # like attribution: each prompt's scores committed in its own transaction
        proj.add_prompt_result(run, k, scores=scores(2, k), prob=0.1 * (k % 10), seconds=0.01)
        say(f"committed {k}")
        time.sleep(0.02)
    proj.finish_run(run)  # never reached: the test kills us first


def hold(path: str) -> None:
    proj = open_project(path)
    say("open")
    time.sleep(60)
    proj.close()


def try_open(path: str) -> None:
    out = {}
    for read_only in (False, True):
        try:
            with open_project(path, read_only=read_only) as proj:
                out[str(read_only)] = {"ok": True, "facts": len(proj.list_facts())}
        except ProjectError as exc:
            out[str(read_only)] = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    say(json.dumps(out))


def fill_wal(path: str) -> None:
    """A project of 3000 facts, then 2000 more under a file-size limit that the WAL fits in but the grown file
    does not: the import commits, the checkpoint at close fails (a full disk, without needing root)."""
    import resource  # POSIX only, like this case
    with create_project(path) as proj:
        proj.add_facts([{"relation": "P1", "subject": f"before {i}", "object": "o" * 40} for i in range(3000)])
    proj = open_project(path)
    size = proj._con.execute("PRAGMA page_count").fetchone()[0] * proj._con.execute("PRAGMA page_size").fetchone()[0]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100_000, resource.RLIM_INFINITY))
    ids = proj.add_facts([{"relation": "P1", "subject": f"after {i}", "object": "o" * 40} for i in range(2000)])
    say(f"stored {len(ids)}")
    try:
        proj.close()
        say(json.dumps({"closed": True}))
    except ProjectError as exc:
        say(json.dumps({"closed": False, "type": type(exc).__name__, "message": str(exc)}))


if __name__ == "__main__":
    {"attribute": attribute, "hold": hold, "try_open": try_open, "fill_wal": fill_wal}[sys.argv[1]](sys.argv[2])
