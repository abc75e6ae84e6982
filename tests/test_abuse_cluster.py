"""Ray under abuse (issue 25), through the real `kn` CLI on a local Ray instance the driver starts itself: a
worker killed mid-run leaves `--json` one document on stdout (Ray's log lines go to stderr), and a driver
killed mid-run leaves none of the processes it started behind. Skipped without Ray (an optional extra)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from kn_core.fact_files import export_facts  # noqa: E402
from ray_sockets import NO_HTTP_OFF_MACHINE, outside_loopback, ray_processes  # noqa: E402
from runner_child import save_tiny, tiny_factset  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("abuse-cluster")
    return {"root": root, "model": save_tiny(root / "model"),
            "facts": str(export_facts(tiny_factset(), root / "facts.jsonl"))}


def start_driver(setup, project: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a local instance of its own
    env |= {"PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", **NO_HTTP_OFF_MACHINE}
    return subprocess.Popen([sys.executable, "-m", "kn_core.cli", "attribute", "--facts", setup["facts"], "--project",
                             str(project), "--model", setup["model"], "--steps", "1000", "--cluster", "ray",
                             "--workers", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _is_worker(process) -> bool:
    try:
        return "FactWorker" in " ".join(process.cmdline() or [process.name()])
    except psutil.Error:  # gone, or a zombie, since the listing
        return False


def wait_for_workers(driver: subprocess.Popen, n: int, timeout: float = 180) -> list:
    """The driver's Ray worker processes (its descendants named ray::FactWorker...), once n are up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        workers = [p for p in psutil.Process(driver.pid).children(recursive=True) if _is_worker(p)]
        if len(workers) >= n:
            return workers
        time.sleep(0.5)
    pytest.fail(f"no {n} Ray workers came up: {driver.stderr.read()[-2000:] if driver.poll() is not None else ''}")


def kill_a_live_worker(driver: subprocess.Popen, tries: int = 20) -> None:
    """SIGKILL to a worker that is alive now: Ray may have replaced a process listed a moment ago."""
    for _ in range(tries):
        for worker in wait_for_workers(driver, 1):
            try:
                os.kill(worker.pid, signal.SIGKILL)
                return
            except ProcessLookupError:
                continue
        time.sleep(0.2)
    pytest.fail("no live Ray worker to kill")


def test_a_killed_worker_leaves_json_one_document(setup, tmp_path):
    driver = start_driver(setup, tmp_path / "p.knproj")
    try:
        wait_for_workers(driver, 2)
        time.sleep(1)  # the workers load the model and start on their facts (a tiny model: done in seconds)
        kill_a_live_worker(driver)
        out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
        driver.wait()
    assert driver.returncode == 0, err[-3000:]
    doc = json.loads(out)  # the whole of stdout is one JSON document
    assert doc["attributed"] + doc["already_stored"] == 6


def test_a_killed_driver_leaves_no_ray_process_behind(setup, tmp_path):
    """A driver killed mid-run leaves none of the processes it started behind; before the kill, the local Ray
    instance it started itself (`kn --cluster ray`) listens on and connects to loopback addresses only."""
    driver = start_driver(setup, tmp_path / "p.knproj")
    started = []
    try:
        wait_for_workers(driver, 2)
        time.sleep(2)  # the workers connect to the raylet and the GCS, the agents report
        started = psutil.Process(driver.pid).children(recursive=True)
        bad = outside_loopback(ray_processes(driver.pid))
        assert bad == [], "\n".join(bad)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
        gone, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    finally:
        driver.kill()
        driver.wait()
        for process in started:  # whatever the driver started, by pid
            try:
                process.kill()
            except psutil.Error:
                pass
