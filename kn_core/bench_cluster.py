"""`kn bench --cluster ray`: the benchmark's cases computed on Ray workers (kn_core.cluster's backend, as
`kn attribute --cluster`). Each worker loads the driver's model once (`cluster.load_spec`: same weights, same
prompt format) and runs `bench.run_case` on one case per call, so a case's result is the serial run's on the same
hardware; the driver writes every case file and the report (`bench.run_bench`), so resuming works as without Ray.
The attribution cache (OUT/cache) is shared where the workers share the driver's file system, else each node
computes what it needs."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from .bench import run_case
from .cluster import RayBackend, load_spec


class BenchWorker:
    """The body of a Ray actor: the model, loaded once, and `run_case`."""

    def __init__(self, spec, threads: int):
        self.lm = load_spec(spec, threads)

    def run(self, k: int, case, params, settings, cache: str) -> tuple[int, dict]:
        return k, run_case(self.lm, case, params, settings, Path(cache))


def on_ray(backend: RayBackend, lm, params, settings):
    """`bench.run_bench`'s `compute` on `backend`'s workers."""
    return lambda chosen, pending, cache, task: ray_case_results(backend, lm, chosen, pending, params, settings,
                                                                 cache, task)


def ray_case_results(backend: RayBackend, lm, chosen: Sequence, pending: Sequence[int], params, settings,
                     cache: Path, task) -> Iterator[tuple[int, dict]]:
    """(index into `chosen`, run_case's result) for each pending case, in the order the workers finish them."""
    if not pending:
        return
    with backend.connected() as ray:
        actors = backend.start_actors(ray, lm, BenchWorker, (backend.threads,), len(pending))
        yield from backend.dispatch(
            ray, actors, list(pending), lambda actor, k: actor.run.remote(k, chosen[k], params, settings, str(cache)),
            lambda k: f"case {chosen[k].case_id} ({chosen[k].subject})", task)
