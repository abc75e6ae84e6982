"""Quits the real app again and again under Xvfb + openbox after a short journey, counting crashes at quit (issue
24: "Fatal Python error: none_dealloc" was seen once in 7 quits).

Each round: launch `kn-studio PROJECT --model MODEL`, wait for the model, attribute the selected fact (F5), edit
with its refined neurons (Ctrl+Return), undo (Ctrl+Z) (--journeys times: a longer session), then quit, alternately by Ctrl+Q and by the window
manager's close (Alt+F4, WM_DELETE_WINDOW), answering Discard to "Unsaved changes". A round crashed when the
app died during the session, or its exit code is not 0, or stderr says "Fatal" or "Traceback". The driver is
tests/test_e2e_x11.py's (real X input events, waits on the app's event log).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/quit_loop.py --rounds 20 --model default --log quit.log
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def one_round(x, project: Path, model: str, by: str, journeys: int = 1) -> tuple[int, str]:
    """(exit code, the app's stderr of this round)."""
    start = x.stderr_path.stat().st_size if x.stderr_path.exists() else 0
    x.launch(str(project), "--model", model)
    recover = x.xdotool_search("Recover unsaved work")  # a round that failed was killed: its autosave is offered
    if recover:
        x.keys("alt+n", window=recover)
    x.wait_event(lambda e: e["event"] == "model_loaded", "model loaded")
    x.wait_idle()
    for _ in range(journeys):
        x.keys("F5")
        x.wait_job("Attribution")
        x.wait_idle()
        x.keys("ctrl+Return")
        x.wait_event(lambda e: e["event"] == "edit_evaluated", "the edit's report")
        x.wait_idle()
        x.keys("ctrl+z")
        x.wait_idle()
    x.keys("ctrl+q" if by == "ctrl+q" else "alt+F4")
    deadline = time.monotonic() + 60
    while x.app.poll() is None and time.monotonic() < deadline:
        found = x.xdotool_search("Unsaved changes")
        if found:
            x.keys("alt+d", window=found)
        time.sleep(0.3)
    code = x.app.wait(120)
    return code, x.stderr_path.read_text(errors="replace")[start:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M) or 'tiny' (a tiny random model)")
    parser.add_argument("--journeys", type=int, default=1, help="attribute, edit, undo this many times before a quit")
    parser.add_argument("--log", default="-")
    args = parser.parse_args(argv)
    import test_e2e_x11 as E

    E.TIMEOUT = 900  # the default model's attribution on a loaded 2-core machine
    tmp = Path(tempfile.mkdtemp(prefix="kn-quit-"))
    tiny, project, _ = E.make_projects(tmp)
    model = str(tiny) if args.model == "tiny" else args.model
    out = sys.stdout if args.log == "-" else open(args.log, "a", buffering=1)
    crashes = 0
    x = E.XSession(tmp)

    def search(name):
        import subprocess

        done = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", name], env=x.env,
                              capture_output=True, text=True)
        return done.stdout.split()[-1] if done.returncode == 0 and done.stdout.strip() else None

    x.xdotool_search = search
    try:
        for n in range(1, args.rounds + 1):
            by = "ctrl+q" if n % 2 else "alt+F4"
            start = x.stderr_path.stat().st_size if x.stderr_path.exists() else 0
            try:
                code, err = one_round(x, project, model, by, args.journeys)
            except AssertionError as exc:
                ended = x.app is not None and x.app.poll() is not None
                err = x.stderr_path.read_text(errors="replace")[start:]
                x.kill_app()
                if ended and ("Fatal" in err or x.app.returncode != 0):  # it died during the session
                    crashes += 1
                    print(f"round {n} ({by}): CRASH during the session (exit {x.app.returncode}): "
                          f"{err.strip()[-400:]}", file=out)
                else:
                    print(f"round {n} ({by}): journey failed: {str(exc)[:300]}", file=out)
                continue
            bad = code != 0 or "Fatal" in err or "Traceback" in err
            crashes += bad
            print(f"round {n} ({by}): exit {code}" + (f" CRASH: {err.strip()[-600:]}" if bad else " ok"), file=out)
        print(f"{crashes} crash(es) in {args.rounds} quits", file=out)
    finally:
        x.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
