"""The house rule for tests: network traffic on 127.0.0.1 / ::1 only. This lists what a local Ray does outside it.

`outside_loopback(ray_processes())` lists, with psutil, every listening socket and every connection of this process
and all its descendants (gcs_server, raylet, workers, dashboard and runtime env agents, log monitor ...) whose local
or remote address is not loopback; a listener on 0.0.0.0 or :: (every interface) is not loopback either. A snapshot
misses sockets that live a moment only: run as a script with --strace to list every connect, bind and sendto of
every process of the run (needs strace). tests/test_cluster.py and tests/test_abuse_cluster.py assert the snapshot
is empty. As a script, it starts Ray, runs tasks and an actor, and prints what is outside loopback:

    PYTHONPATH=$PWD python tests/ray_sockets.py backend          # RayBackend's own local Ray (kn --cluster ray)
    PYTHONPATH=$PWD python tests/ray_sockets.py tests --strace   # the tests' Ray (init_test_ray), every syscall
    PYTHONPATH=$PWD python tests/ray_sockets.py plain --init _node_ip_address='"127.0.0.1"' --env NAME=VALUE
                                                                 # bare ray.init(num_cpus=2, ...) with a lever to try
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil

from kn_core.cluster import environment, init_ray

# Ray 2.60's dashboard process (its UsageStatsHead) asks the cloud metadata services which cloud it runs on, whatever
# the settings: plain-HTTP GETs to 169.254.169.254 and a DNS lookup of metadata.google.internal, once, at the start
# (ray._common.usage.usage_lib.get_cloud_from_metadata_requests; found with --strace). Those requests honour
# http_proxy: through a proxy on a closed loopback port they fail at once, on loopback. The tests fetch nothing
# over plain HTTP; kn leaves a user's Ray alone here (on a cloud machine that answer is Ray's business).
NO_HTTP_OFF_MACHINE = {"http_proxy": "http://127.0.0.1:9", "no_proxy": "127.0.0.1,localhost,::1"}


def init_test_ray(ray, **options) -> None:
    """The tests' local Ray: kn's (`init_ray`, on loopback only), 2 CPUs, plain HTTP kept on loopback."""
    with environment(NO_HTTP_OFF_MACHINE):
        init_ray(ray, **{"num_cpus": 2, **options})


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 and ::ffff:127.x; never 0.0.0.0 or :: (a listener there answers on every interface)."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def ray_processes(root: int | None = None) -> list[psutil.Process]:
    """The driver (`root`, default this process) and everything it started, recursively."""
    driver = psutil.Process(root or os.getpid())
    return [driver, *driver.children(recursive=True)]


def _name(words: list[str]) -> str:
    """gcs_server, raylet, ray::RuntimeEnvAgent, agent/main.py ... from a command line."""
    word = next((w for w in words if "ray::" in w or w.endswith((".py", "gcs_server", "raylet"))),
                words[0] if words else "?")
    return "/".join(Path(word).parts[-2:]) if word.endswith(".py") else os.path.basename(word)


def outside_loopback(processes: list[psutil.Process]) -> list[str]:
    """One line per socket of `processes` bound to, listening on, or connected to a non-loopback address."""
    found = []
    for process in processes:
        try:
            sockets, name = process.net_connections(kind="inet"), _name(process.cmdline() or [process.name()])
        except psutil.Error:  # gone since the listing
            continue
        for sock in sockets:
            ends = [("local", sock.laddr), ("remote", sock.raddr)]
            bad = [f"{side} {end.ip}:{end.port}" for side, end in ends if end and not is_loopback(end.ip)]
            if bad:
                found.append(f"{name}[{process.pid}] {sock.status} {' '.join(bad)}")
    return sorted(found)


def _square(x):
    return x * x


class _Counter:
    def __init__(self):
        self.n = 0

    def add(self) -> int:
        self.n += 1
        return self.n


def exercise(ray) -> None:
    """Tasks and an actor (kn's workers are actors): workers connect to the raylet, the GCS and the driver."""
    assert ray.get([ray.remote(_square).remote(i) for i in range(4)]) == [0, 1, 4, 9]
    counter = ray.remote(_Counter).remote()
    assert ray.get([counter.add.remote() for _ in range(3)])[-1] == 3
    time.sleep(2)  # the agents' first reports


_CHILD = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(?:clone3?|fork|vfork)\b.*= (\d+)$")
_EXEC = re.compile(r'^(\d+)\s+execve\("[^"]*", \[(.*?)\]')
_SOCKET = re.compile(r'^(\d+)\s+(connect|bind|sendto|sendmsg)\(.*?htons\((\d+)\).*?'
                     r'(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")')


def strace_outside_loopback(log: str) -> list[str]:
    """`process syscall address:port (count)` for each non-loopback address in an `strace -f` log of connect, bind,
    sendto, sendmsg, execve and the clone calls (these name the processes and threads)."""
    names: dict[str, str] = {}
    found: dict[str, int] = defaultdict(int)
    for line in log.splitlines():
        if child := _CHILD.match(line):
            names[child[2]] = names.get(child[1], f"pid {child[1]}")
        elif exe := _EXEC.match(line):
            names[exe[1]] = _name(re.findall(r'"([^"]*)"', exe[2]))
        elif sock := _SOCKET.match(line):
            ip = sock[4] or sock[5]
            if not is_loopback(ip):
                found[f"{names.get(sock[1], 'pid ' + sock[1])} {sock[2]} {ip}:{sock[3]}"] += 1
    return [f"{what} ({n}x)" for what, n in sorted(found.items())]


def _under_strace(argv: list[str]) -> int:
    import shutil
    import subprocess
    import tempfile

    if not shutil.which("strace"):
        print("--strace needs strace (apt-get install strace)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "strace.log"
        subprocess.run(["strace", "-f", "-qq", "-s", "200", "-o", str(log), "-e",
                        "trace=connect,bind,sendto,sendmsg,execve,clone,clone3,fork,vfork",
                        sys.executable, __file__, *[a for a in argv if a != "--strace"]], check=False)
        bad = strace_outside_loopback(log.read_text(errors="replace"))
    print(f"strace: {len(bad)} non-loopback addresses in the whole run")
    print("\n".join(bad))
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("how", choices=["backend", "tests", "plain"], nargs="?", default="backend")
    parser.add_argument("--init", action="append", default=[], metavar="KEY=JSON",
                        help="one more ray.init argument (plain only), e.g. _node_ip_address='\"127.0.0.1\"'")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable set before Ray is imported")
    parser.add_argument("--strace", action="store_true", help="list every socket syscall of every process instead")
    args = parser.parse_args(argv)
    if args.strace:
        return _under_strace(argv)
    os.environ.update(item.split("=", 1) for item in args.env)
    import ray

    if args.how == "backend":
        from kn_core.cluster import RayBackend

        with RayBackend().connected() as ray:
            exercise(ray)
            bad = outside_loopback(processes := ray_processes())
    else:
        if args.how == "tests":
            init_test_ray(ray)
        else:
            extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.init)}
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning", **extra)
        try:
            exercise(ray)
            bad = outside_loopback(processes := ray_processes())
        finally:
            ray.shutdown()
    print(f"{' '.join(argv)}: {len(processes)} processes, {len(bad)} sockets not on loopback")
    print("\n".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
