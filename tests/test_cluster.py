"""kn_core.cluster on a local Ray cluster (started once for the module, 2 CPUs): bitwise the serial run's
results, every fact exactly once when a worker is killed mid-run, resume after the driver is killed, and the
one-line error without Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kn_core.attribution import AttributionParams
from kn_core.fact_files import export_facts
from kn_core.models import load_model
from kn_core.runner import attribute_factset
from kn_core.store import create_project, open_project
from runner_child import save_tiny, tiny_factset

ray = pytest.importorskip("ray", reason="the cluster extra (pip install .[cluster]) is not installed")
from kn_core.cluster import (RAY_MISSING, ClusterError, RayBackend, cluster_address, loopback_only,  # noqa: E402
                             on_this_machine)
from ray_sockets import (exercise, init_test_ray, outside_loopback, ray_processes,  # noqa: E402 (Ray brings psutil)
                         strace_outside_loopback)

HERE = Path(__file__).resolve().parent
PARAMS = AttributionParams(steps=8)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    model = save_tiny(root / "model")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])
    init_test_ray(ray)  # on loopback only, as `kn --cluster ray` starts it
    try:
        yield {"root": root, "model": model, "lm": load_model(model, device="cpu"),
               "facts": str(export_facts(tiny_factset(), root / "facts.jsonl"))}
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def serial(cluster):
    """The serial run's stored scores and refined neurons: the reference every cluster run must equal bitwise."""
    with create_project(cluster["root"] / "serial.knproj") as project:
        attribute_factset(project, cluster["lm"], tiny_factset(), PARAMS)
        return stored(project)


def stored(project) -> dict:
    """{subject: ([scores per prompt], refined neurons)}, asserting each fact has exactly one done run."""
    subjects = {f.id: f.subject for f in project.list_facts()}
    runs = project.list_runs(status="done")
    assert sorted(subjects[r.fact_id] for r in runs) == sorted({subjects[r.fact_id] for r in runs})
    sets = {s.run_ids[0]: s.neurons for s in project.list_neuron_sets(kind="refined")}
    return {subjects[r.fact_id]: (project.load_scores(r.id), sets[r.id]) for r in runs}


def assert_bitwise(got: dict, want: dict) -> None:
    assert set(got) == set(want) and len(want) == 6
    for subject, (scores, refined) in want.items():
        assert sorted(got[subject][0]) == sorted(scores)
        assert all(np.array_equal(got[subject][0][k], scores[k]) for k in scores), subject
        assert got[subject][1] == refined, subject


def test_two_workers_give_the_serial_results_bitwise(cluster, serial, tmp_path):
    backend = RayBackend(workers=2)
    with create_project(tmp_path / "ray.knproj") as project:
        report = attribute_factset(project, cluster["lm"], tiny_factset(), PARAMS, backend=backend)
        assert (report.attributed, report.duplicates_ignored) == (6, 0)
        assert report.backend["backend"] == "ray" and report.backend["workers"] == 2
        workers = {r.info["runner"]["worker"] for r in project.list_runs(status="done")}
        assert len(workers) == 2  # both workers computed facts
        assert_bitwise(stored(project), serial)
    assert backend.actors == []  # the workers are gone when the run ends


def test_a_killed_worker_loses_no_fact_and_stores_none_twice(cluster, serial, tmp_path):
    backend = RayBackend(workers=2)
    killed = []

    def kill_one(work, run_id):
        if not killed:  # the first fact is stored: kill a worker while the others are in flight
            pid = ray.get(backend.actors[0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with create_project(tmp_path / "ray.knproj") as project:
        report = attribute_factset(project, cluster["lm"], tiny_factset(), PARAMS, backend=backend, on_fact=kill_one)
        assert killed and report.attributed == 6
        assert_bitwise(stored(project), serial)
        assert len(project.list_runs()) == 6  # no partial or repeated run either


def test_a_killed_driver_resumes(cluster, serial, tmp_path):
    path = tmp_path / "ray.knproj"
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(HERE / "runner_child.py"), cluster["model"], cluster["facts"],
                              str(path), str(PARAMS.steps), address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line.startswith("stored"), (line, child.stderr.read() if child.poll() is not None else "")
    finally:
        child.kill()
        child.wait()
    with open_project(path) as project:
        assert 1 <= len(project.list_runs(status="done")) < 6
        report = attribute_factset(project, cluster["lm"], tiny_factset(), PARAMS, backend=RayBackend(workers=2))
        assert report.already_stored >= 1 and report.attributed + report.already_stored == 6
        assert_bitwise(stored(project), serial)


def test_every_ray_socket_is_on_loopback(cluster):
    """The house rule: tests talk to 127.0.0.1 / ::1 only. Every process of the cluster (this driver, gcs_server,
    raylet, agents, log monitor, workers and an actor) listens on and connects to loopback addresses only; a
    listener on 0.0.0.0 or :: (every interface) breaks the rule too."""
    exercise(ray)
    processes = ray_processes()
    assert any("raylet" in " ".join(p.cmdline()) for p in processes)  # the cluster's processes are the listed ones
    bad = outside_loopback(processes)
    assert bad == [], "\n".join(bad)


def test_the_strace_listing_names_each_off_loopback_address_and_its_process():
    """tests/ray_sockets.py --strace (the sockets a snapshot misses), on lines as strace -f writes them."""
    log = """\
7 execve("/venv/bin/python", ["/venv/bin/python", "/venv/ray/dashboard/dashboard.py", "--host=127.0.0.1"], 0x1) = 0
7 clone3({flags=CLONE_VM|CLONE_THREAD, child_tid=0x7f, parent_tid=0x7f, exit_signal=0}, 88) = 8
8 connect(23, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("169.254.169.254")}, 16) = -1 EINPROGRESS
8 connect(24, {sa_family=AF_INET, sin_port=htons(6379), sin_addr=inet_addr("127.0.0.1")}, 16) = 0
9 bind(3, {sa_family=AF_INET6, sin6_port=htons(0), inet_pton(AF_INET6, "::", &sin6_addr), sin6_scope_id=0}, 28) = 0
9 bind(4, {sa_family=AF_INET6, sin6_port=htons(5), inet_pton(AF_INET6, "::ffff:127.0.0.1", &sin6_addr)}, 28) = 0
"""
    assert strace_outside_loopback(log) == ["dashboard/dashboard.py connect 169.254.169.254:80 (1x)",
                                            "pid 9 bind :::0 (1x)"]


def test_cancel_stops_the_workers(cluster, tmp_path):
    from kn_core.tasks import Cancelled, Task

    task, backend = Task(), RayBackend(workers=2)
    with create_project(tmp_path / "ray.knproj") as project:
        with pytest.raises(Cancelled):
            attribute_factset(project, cluster["lm"], tiny_factset(), PARAMS, backend=backend, task=task,
                              on_fact=lambda work, run_id: task.cancel())
        assert len(project.list_runs(status="done")) >= 1 and backend.actors == []


def test_more_workers_than_the_cluster_holds_is_one_line(cluster, tmp_path):
    with create_project(tmp_path / "ray.knproj") as project:
        with pytest.raises(ClusterError, match="room for 2"):
            attribute_factset(project, cluster["lm"], tiny_factset(), PARAMS, backend=RayBackend(workers=5))


def test_without_ray_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ClusterError) as info:
        RayBackend().check_available()
    assert str(info.value) == RAY_MISSING and "pip install" in RAY_MISSING and "[cluster]" in RAY_MISSING
    assert "\n" not in RAY_MISSING


def test_cli_without_ray_fails_before_the_model_loads(monkeypatch, capsys, tmp_path):
    from kn_core.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    argv = ["attribute", "--facts", "builtin", "--model", "/nonexistent", "--project", str(tmp_path / "x.knproj"),
            "--cluster", "ray"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0] and not (tmp_path / "x.knproj").exists()


def test_cluster_addresses():
    assert cluster_address("ray") is None
    assert cluster_address("ray:auto") == "auto"
    assert cluster_address("ray:10.0.0.1:6379") == "10.0.0.1:6379"
    with pytest.raises(ClusterError):
        cluster_address("spark")


def test_ray_on_this_machine_is_started_or_joined_on_loopback_only(monkeypatch):
    for address in (None, "local", "auto", "127.0.0.1:6379", "[::1]:6379", "localhost:6379", "ray://127.0.0.1:10001"):
        assert on_this_machine(address), address
    for address in ("10.0.0.1:6379", "head.example.org:6379", "ray://10.0.0.1:10001", "[fd00::2]:6379"):
        assert not on_this_machine(address), address
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    constants = ray._private.ray_constants
    before = constants.ENABLE_RAY_CLUSTER
    with loopback_only(ray):
        assert constants.ENABLE_RAY_CLUSTER is False  # the driver: Ray's node address is 127.0.0.1
        assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # the processes ray.init starts
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1" and constants.ENABLE_RAY_CLUSTER is before
