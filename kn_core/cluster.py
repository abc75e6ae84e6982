"""Attributing a fact set on a Ray cluster: `RayBackend`, a backend of `kn_core.runner.attribute_factset`.

Ray is an optional extra (`pip install .[cluster]`). Each worker is a Ray actor that loads the model once (one
GPU per worker where the cluster has GPUs, else `threads` CPU cores) and attributes one fact per call with the
runner's `FactAttributor`, so its results are bitwise those of the serial run on the same hardware. Workers
only compute and return; the driver stores every fact (SQLite keeps one writer) and stores a fact that comes
back twice only once. A worker that dies (killed, out of memory, its node lost) is restarted by Ray and its
facts are retried (`max_restarts`, `max_task_retries`); a fact whose retries run out is handed to another
worker, and after `max_attempts` the run stops with the fact's name (everything stored stays; run again to
resume).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

from .runner import FactAttributor, FactOutcome, FactWork, Progress
from .selection import NeuronSelection
from .tasks import Cancelled, Task

RAY_RANGE = ">=2.40,<3"  # keep in step with pyproject's `cluster` extra
RAY_MISSING = (f"--cluster ray needs Ray, an optional extra: pip install 'knowledge-neuron-studio[cluster]' "
               f"(from a checkout: pip install '.[cluster]', or pip install 'ray{RAY_RANGE}')")
IN_FLIGHT = 2  # facts queued per worker: the next one starts while the driver stores the last


class ClusterError(RuntimeError):
    """A cluster run cannot start or go on; the message says why and what to do."""


def cluster_address(option: str) -> str | None:
    """`--cluster ray` -> None (a local instance, or the cluster RAY_ADDRESS names); `ray:ADDRESS` -> ADDRESS."""
    kind, _, address = option.partition(":")
    if kind != "ray":
        raise ClusterError(f"unknown cluster {option!r}: use ray or ray:ADDRESS")
    return address.strip() or None


ADDRESS_TIMEOUT_S = 3.0  # resolving the host and opening a TCP connection to the head node, each


def check_address(address: str | None, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """A cluster address HOST:PORT (or ray://HOST:PORT) must resolve and accept a TCP connection within
    `timeout` seconds; otherwise ray.init would retry for minutes. None and "auto" (a local instance, found
    through Ray's own files) and "local" (a new instance) are not checked here."""
    import socket
    import threading

    if not address or address in ("auto", "local"):
        return
    host, port = split_address(address)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"cluster address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379, or auto)")
    found: list = []

    def resolve():
        try:
            found.append(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    resolver = threading.Thread(target=resolve, daemon=True)  # getaddrinfo has no timeout of its own
    resolver.start()
    resolver.join(timeout)
    if not found or isinstance(found[0], OSError):
        why = f"{found[0].strerror or found[0]}" if found else f"no answer in {timeout:g} s"
        raise ClusterError(f"cannot resolve the cluster host {host!r} ({why}); check the address in --cluster "
                           f"ray:{address} (or RAY_ADDRESS)")
    family, kind, proto, _, sockaddr = found[0][0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(timeout)
            probe.connect(sockaddr)
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
                           f"`ray start --head` there (see docs/SCALE.md) or check the address") from None


RAY_QUIET = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning"}
RAY_CLUSTER_MODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's own switch (ray._private.ray_constants)


def init_ray(ray, address: str | None = None, **options) -> None:
    """ray.init as kn starts or joins Ray: no dashboard, the workers' output not copied to the driver, Ray's own
    messages from warnings up (`options` add to or override these, e.g. num_cpus=2). A Ray on this machine (a new
    local instance, "auto", or an address on 127.0.0.1 / ::1 / localhost) listens and connects on loopback only
    (`loopback_only`); a cluster elsewhere is joined at the address as given."""
    kwargs = {**RAY_QUIET, **options, **({"address": address} if address else {})}
    local = on_this_machine(address or os.environ.get("RAY_ADDRESS"))
    with loopback_only(ray) if local else nullcontext():
        ray.init(**kwargs)


def split_address(address: str) -> tuple[str, str]:
    """HOST:PORT, [IPV6]:PORT or ray://HOST:PORT -> (HOST, PORT), either "" where missing."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    return host.strip("[]"), port


def on_this_machine(address: str | None) -> bool:
    """None or "local" (a new instance), "auto" (the one running here), or HOST:PORT whose host is loopback."""
    import ipaddress

    if not address or address in ("auto", "local"):
        return True
    host = split_address(address)[0]
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


@contextmanager
def loopback_only(ray):
    """While ray.init runs, Ray's node address is 127.0.0.1, so its GCS, raylet, agents and workers listen and
    connect on 127.0.0.1 only (measured with tests/ray_sockets.py, Ray 2.60). Ray rewrites a loopback address,
    even `_node_ip_address="127.0.0.1"`, to the machine's network address and then listens on every interface,
    unless its multi-node mode is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default on macOS and Windows). The
    driver reads that switch from ray_constants (taken from the environment when ray was imported); the processes
    ray.init starts, and the agents and workers the raylet starts later, read the environment (an agent that finds
    its own address otherwise opens a socket towards a public address to learn it). Both restored afterwards."""
    constants = ray._private.ray_constants
    saved_flag, constants.ENABLE_RAY_CLUSTER = constants.ENABLE_RAY_CLUSTER, False
    try:
        with environment({RAY_CLUSTER_MODE: "0"}):
            yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved_flag


@contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set (for the processes started meanwhile), as it was afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError(RAY_MISSING) from None
    _ray_messages_to_stderr(ray)
    return ray


def _ray_messages_to_stderr(ray) -> None:
    """Ray's driver prints the cluster's messages about its workers ("(raylet) A worker died or was killed ...")
    on stdout, where they would land before `--json`'s one document: they are messages, so stderr. (Ray's
    `print_to_stdstream` is looked up at each call by its error listener; a Ray without it is left alone.)"""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "to_stderr", False):
        return

    def to_stderr(data, ignore_prefix):
        return original({**data, "is_err": True}, ignore_prefix)

    to_stderr.to_stderr = True
    worker.print_to_stdstream = to_stderr


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the driver's model, and the weights' hash it must find."""
    source: str
    dtype: str
    trust_remote_code: bool
    sha256: str
    device: str  # the workers' device: "auto" picks CUDA on a GPU worker
    prompt_format: str = "plain"  # the driver's (encoding.set_prompt_format): workers encode prompts as it does


def model_spec(lm, device: str = "auto", trust_remote_code: bool = False) -> ModelSpec:
    from .encoding import prompt_format

    return ModelSpec(source=lm.source, dtype=str(lm.dtype).replace("torch.", ""), trust_remote_code=trust_remote_code,
                     sha256=lm.sha256, device=device, prompt_format=prompt_format(lm))


def load_spec(spec: ModelSpec, threads: int):
    """The driver's model on a worker (`threads` CPU threads), its weights checked against the driver's and its
    prompts encoded as the driver encodes them."""
    import torch

    from .encoding import set_prompt_format
    from .models import load_model
    from .runner import worker_name

    torch.set_num_threads(threads)
    lm = load_model(spec.source, device=spec.device, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
    if lm.sha256 != spec.sha256:
        raise ClusterError(f"worker {worker_name()} loaded {spec.source!r} with weights {lm.sha256[:12]}..., the "
                           f"driver's are {spec.sha256[:12]}...: give every node the same model files")
    set_prompt_format(lm, spec.prompt_format)
    return lm


class FactWorker:
    """The body of a Ray actor: the model, loaded once, and the runner's attributor."""

    def __init__(self, spec: ModelSpec, params, selection: NeuronSelection, threads: int):
        self.attributor = FactAttributor(load_spec(spec, threads), params, selection)

    def attribute(self, work: FactWork) -> FactOutcome:
        return self.attributor(work)

    def pid(self) -> int:
        return os.getpid()


_WATCHDOG = """
import os, select, sys
import psutil
driver, seen = psutil.Process(int(sys.argv[1])), {}
while True:
    try:
        seen.update((p.pid, p) for p in driver.children(recursive=True) if p.pid != os.getpid())
    except psutil.Error:
        break
    if select.select([sys.stdin], [], [], 0.5)[0]:
        if sys.stdin.readline().strip() == "done":
            sys.exit(0)
        break
for process in seen.values():
    try:
        if process.is_running():  # psutil compares the start time too: never a reused pid
            process.kill()
    except psutil.Error:
        pass
"""


class RayWatchdog:
    """Ray's node processes die with a driver that is killed, but agents they start (DashboardAgent,
    RuntimeEnvAgent) do not. A small process watches the driver through a pipe: on a normal end the driver says
    "done"; when the pipe closes without it (the driver was killed), it kills the processes the driver started,
    by the pids it saw while the driver lived. Only for a Ray instance this driver started itself."""

    def __init__(self):
        import subprocess
        import sys

        try:
            self.process = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())],
                                            stdin=subprocess.PIPE, text=True)
        except OSError:
            self.process = None  # no watchdog: Ray's own fate sharing only

    def release(self) -> None:
        if self.process is not None:
            try:
                self.process.communicate("done\n", timeout=10)
            except Exception:  # noqa: BLE001 - it is gone already, or stuck: it must not outlive us either way
                self.process.kill()
            self.process = None


class RayBackend:
    """Facts sharded over Ray actors, one fact per task. `address`: None starts a local Ray instance, on loopback
    only (or joins the cluster RAY_ADDRESS names); "auto" or "HOST:PORT" joins a running cluster (`init_ray`). An
    already initialised Ray (e.g. a test's `init_ray(ray, num_cpus=2)`) is used as it is and left running."""
    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, threads: int = 1,
                 device: str = "auto", trust_remote_code: bool = False, max_retries: int = 3, max_attempts: int = 3):
        self.address, self.workers, self.threads, self.device = address, workers, threads, device
        self.trust_remote_code = trust_remote_code
        self.max_retries, self.max_attempts = max_retries, max_attempts
        self.actors: list = []  # the running workers' handles (tests kill one)
        self._gpus = None

    def check_available(self) -> None:
        """ClusterError (one line) when Ray is missing or the cluster's address does not answer within a few
        seconds: call before loading any model or opening the project."""
        import_ray()
        check_address(self.address or os.environ.get("RAY_ADDRESS"))

    def describe(self) -> dict:
        return {"backend": self.name, "address": self.address, "workers": self.workers,
                "threads_per_worker": self.threads, "gpus_per_worker": self._gpus}

    def _connect(self, ray) -> bool:
        if ray.is_initialized():
            return False
        try:
            init_ray(ray, self.address)
        except ConnectionError as exc:
            raise ClusterError(f"cannot reach the Ray cluster at {self.address or os.environ.get('RAY_ADDRESS')}: "
                               f"{exc}; start it with `ray start --head` (see docs/SCALE.md)") from exc
        return True

    def _start_workers(self, ray, lm, params, selection: NeuronSelection, n_facts: int) -> list:
        return self.start_actors(ray, lm, FactWorker, (params, selection, self.threads), n_facts)

    def start_actors(self, ray, lm, worker_class, args: tuple, n_items: int) -> list:
        """`workers` Ray actors of `worker_class(spec, *args)` (spec: how to load the driver's model), one GPU
        each where the cluster has GPUs, else `threads` CPU cores; never more than `n_items` of them."""
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self._gpus = 1 if gpus else 0
        capacity = gpus if gpus else max(1, int(resources.get("CPU", 1)) // self.threads)
        if self.workers is None:
            self.workers = capacity
        elif self.workers > capacity:
            raise ClusterError(f"--workers {self.workers} but the cluster has room for {capacity} "
                               f"({'GPUs' if gpus else f'CPU cores / {self.threads} threads each'}); ask for fewer")
        self.workers = max(1, min(self.workers, n_items))
        device = ("auto" if gpus else "cpu") if self.device == "auto" else self.device
        spec = model_spec(lm, device, self.trust_remote_code)
        actor = ray.remote(worker_class).options(num_cpus=0 if gpus else self.threads, num_gpus=self._gpus,
                                                 max_restarts=self.max_retries, max_task_retries=self.max_retries)
        self.actors = [actor.remote(spec, *args) for _ in range(self.workers)]
        return self.actors

    @contextmanager
    def connected(self):
        """Ray, initialised for the run (a local instance or the cluster), with the run's actors killed and a Ray
        this run started shut down at the end, whatever happens."""
        ray = import_ray()
        started_here = self._connect(ray)
        watchdog = RayWatchdog() if started_here else None
        try:
            yield ray
        finally:
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
            if started_here:
                ray.shutdown()
            if watchdog is not None:
                watchdog.release()

    def dispatch(self, ray, actors: list, items: Sequence, call, name, task: Task) -> Iterator:
        """Each of `items` computed once by `call(actor, item)` (an object ref), IN_FLIGHT per actor, results in
        the order they finish. An item whose worker died (Ray's restarts and retries ran out) goes to the next
        worker, up to `max_attempts` times, then ClusterError naming it (`name(item)`); an error in our code is
        raised as itself."""
        from ray.exceptions import RayActorError, RayTaskError

        queue = list(reversed(items))  # pop() takes them in order
        inflight: dict = {}  # object ref -> (item, actor index)
        attempts: dict[int, int] = {}

        def submit(i):
            item = queue.pop()
            attempts[id(item)] = attempts.get(id(item), 0) + 1
            inflight[call(actors[i], item)] = (item, i)

        for i in range(len(actors)):
            for _ in range(IN_FLIGHT):
                if queue:
                    submit(i)
        while inflight:
            if task.cancelled:
                raise Cancelled("cancelled")
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                item, i = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayActorError as exc:  # Ray's own restarts and retries ran out
                    if attempts[id(item)] >= self.max_attempts:
                        raise ClusterError(f"{name(item)} failed on {attempts[id(item)]} workers (the last: {exc}); "
                                           "everything stored so far stays: run again to resume") from None
                    queue.append(item)
                    i = (i + 1) % len(actors)
                except RayTaskError as exc:  # an error in our code (e.g. a prompt the model cannot take)
                    raise exc.as_instanceof_cause() from None
                else:
                    yield result
                if queue:
                    submit(i)

    def outcomes(self, lm, works: Sequence[FactWork], params, selection: NeuronSelection, progress: Progress,
                 task: Task) -> Iterator[FactOutcome]:
        with self.connected() as ray:
            actors = self._start_workers(ray, lm, params, selection, len(works))
            yield from self.dispatch(ray, actors, works, lambda actor, work: actor.attribute.remote(work),
                                     lambda work: f"{work.fact.relation} {work.fact.subject!r}", task)
