"""`kn bench --cluster ray`: the cases computed on Ray workers (a local Ray on loopback only, 2 CPUs) give the serial
run's results, the driver writes every case so a second run resumes them all, and the report names the cluster.
Skipped without the cluster extra (pip install .[cluster])."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kn_core.cli import main
from test_cli_bench import pararel  # noqa: F401 (fixture: a PARAREL folder of 4 capitals)
from tiny import make_tiny

ray = pytest.importorskip("ray", reason="the cluster extra (pip install .[cluster]) is not installed")
from ray_sockets import init_test_ray  # noqa: E402 (Ray brings psutil)

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory, pararel):  # noqa: F811
    root = tmp_path_factory.mktemp("bench-cluster")
    assert main(["facts", "to-counterfact", "--facts", str(pararel), "--output", str(root / "cf.json")]) == 0
    lm = make_tiny("gpt2")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])
    init_test_ray(ray)  # on loopback only, as `kn --cluster ray` starts it
    try:
        yield root
    finally:
        ray.shutdown()


def bench(capsys, root, out, *extra):
    argv = ["bench", root / "cf.json", "--model", root / "model", "--cases", "3",
            "--steps", "2", "--quadrature", "gauss", "--t", "0.1", "--p", "0.5", "--gen-tokens", "4",
            "--out", out, "--json", *extra]
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def cases(out: Path) -> dict:
    """Each case's neurons and every condition's scores and texts, by case id (what must not depend on where a
    case ran; its seconds and cache hits may)."""
    report = json.loads((out / "report.json").read_text())
    return {c["case_id"]: {"neurons": c.get("neurons"), "left_out": c.get("left_out"),
                           "conditions": {k: (v["scores"], v.get("generations"))
                                          for k, v in c.get("conditions", {}).items()}}
            for c in report["cases"]}


def test_ray_workers_give_the_serial_results_and_resume(capsys, local_ray, tmp_path):
    bench(capsys, local_ray, tmp_path / "serial")
    doc = bench(capsys, local_ray, tmp_path / "ray", "--cluster", "ray", "--workers", "2")
    assert doc["status"] == "complete" and doc["machine"]["cluster"]["workers"] == 2
    assert cases(tmp_path / "ray") == cases(tmp_path / "serial") and len(cases(tmp_path / "ray")) == 3
    again = bench(capsys, local_ray, tmp_path / "ray", "--cluster", "ray", "--workers", "2")
    assert again["timing"]["cases_resumed"] == 3  # the driver wrote every case the workers computed


def test_more_workers_than_the_cluster_holds_is_one_line(capsys, local_ray, tmp_path):
    argv = ["bench", local_ray / "cf.json", "--model", local_ray / "model", "--cases", "2",
            "--steps", "2", "--out", tmp_path / "b", "--cluster", "ray", "--workers", "9"]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code != 0 and "--workers 9" in err and "Traceback" not in err
