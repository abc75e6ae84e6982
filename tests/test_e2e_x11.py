"""The real app under a real X server (Xvfb 1280x800) with a window manager (openbox), driven by real X input
events (xdotool): launch, load, attribute, cancel a re-run, edit, undo, save, kill -9, recover, switch project
while a job runs, export, quit. The driver waits on the app's state (window titles, and the event log the app
writes with KN_STUDIO_EVENT_LOG, kn_gui/event_log.py), never on fixed sleeps; screenshots of each step are kept
in test-artifacts/e2e/ (CI artifacts; gitignored).

Needs Xvfb, openbox and xdotool (`bash setup.sh test` installs them); skipped with the reason when one is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "e2e"
SCREEN = (1280, 800)
TIMEOUT = 180  # seconds for any one state to arrive (a loaded 2-core CI machine is slow)
TOOLS = ("Xvfb", "openbox", "xdotool", "xwininfo")

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS) or not sys.platform.startswith("linux"),
                                reason="needs " + ", ".join(TOOLS) + " (bash setup.sh test installs them)")


class XSession:
    """Xvfb + openbox; runs and drives the app on that display."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        read, write = os.pipe()
        self.xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0",
                                      f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp"], pass_fds=(write,),
                                     stderr=subprocess.DEVNULL)
        os.close(write)
        with os.fdopen(read) as handle:
            self.display = f":{handle.readline().strip()}"
        self.env = {**os.environ, "DISPLAY": self.display, "HOME": str(tmp / "home"),
                    "XDG_CONFIG_HOME": str(tmp / "home" / ".config"), "XDG_DATA_HOME": str(tmp / "home" / ".local"),
                    "XDG_RUNTIME_DIR": str(tmp / "run"), "QT_QPA_PLATFORM": "xcb", "PYTHONPATH": str(ROOT),
                    "OMP_NUM_THREADS": "1", "KN_STUDIO_EVENT_LOG": str(tmp / "events.jsonl")}
        for folder in ("home", "run"):
            (tmp / folder).mkdir(mode=0o700, exist_ok=True)
        self.wm = subprocess.Popen(["openbox", "--sm-disable"], env=self.env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        self.app = None
        self.stderr_path = tmp / "app-stderr.txt"
        self.shots = 0

    # ----------------------------------------------------------------------------------------- the app
    def launch(self, *args):
        self.seen = len(self.events())
        self.app = subprocess.Popen([sys.executable, "-m", "kn_gui.app", *args], env=self.env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "a"))
        self.window_id = self.wait_window("Knowledge Neuron Studio")

    def events(self) -> list[dict]:
        path = Path(self.env["KN_STUDIO_EVENT_LOG"])
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def wait_event(self, test, what: str) -> dict:
        """The first event after the last wait (or launch) for which test(event) is true."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            events = self.events()
            for i in range(self.seen, len(events)):
                if test(events[i]):
                    self.seen = i + 1
                    return events[i]
            assert self.app.poll() is None, f"the app ended ({self.app.returncode}) waiting for {what}"
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last events: {self.events()[-8:]}")

    def wait_job(self, name_start: str, outcome: str = "done") -> dict:
        return self.wait_event(lambda e: e["event"] == "job_ended" and e["name"].startswith(name_start)
                               and e["outcome"] == outcome, f"{name_start} {outcome}")

    def wait_idle(self, quiet_s: float = 1.0):
        """Every job this app instance started has ended, and none started for quiet_s."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            events = self.events()
            starts = [i for i, e in enumerate(events) if e["event"] == "started"]
            events = events[starts[-1]:] if starts else events  # a killed instance's jobs never end
            started = sum(e["event"] == "job_started" for e in events)
            ended = sum(e["event"] == "job_ended" for e in events)
            if started == ended and (not events or time.time() - events[-1]["t"] >= quiet_s):
                return
            time.sleep(0.1)
        raise AssertionError(f"the app never became idle; last events: {self.events()[-8:]}")

    # ----------------------------------------------------------------------------------------- X
    def xdotool(self, *args) -> str:
        done = subprocess.run(["xdotool", *args], env=self.env, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, f"xdotool {' '.join(args)}: {done.stderr}"
        return done.stdout.strip()

    def wait_window(self, name: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            done = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", name], env=self.env,
                                  capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.split()[-1]
            if self.app is not None and self.app.poll() is not None:
                raise AssertionError(f"the app ended ({self.app.returncode}) before a window {name!r} appeared: "
                                     + self.stderr_path.read_text()[-2000:])
            time.sleep(0.2)
        raise AssertionError(f"no window named {name!r} appeared")

    def keys(self, *keys, window: str | None = None):
        """Real key events to the window (activated first, so the window manager gives it the focus)."""
        target = window or self.window_id
        self.xdotool("windowactivate", "--sync", target)
        self.xdotool("key", "--clearmodifiers", "--delay", "60", *keys)

    def type_into_dialog(self, title: str, text: str):
        dialog = self.wait_window(title)
        self.xdotool("windowactivate", "--sync", dialog)
        self.xdotool("key", "--clearmodifiers", "ctrl+a")
        self.xdotool("type", "--delay", "20", text)
        self.xdotool("key", "Return")

    def frame_fits(self) -> bool:
        """The window's frame (title bar included) lies on the screen: the status bar is visible."""
        info = subprocess.run(["xwininfo", "-id", self.window_id, "-frame"], env=self.env, capture_output=True,
                              text=True).stdout
        get = {line.split(":")[0].strip(): line.split(":")[1].strip() for line in info.splitlines() if ":" in line}
        x, y = int(get["Absolute upper-left X"]), int(get["Absolute upper-left Y"])
        return x >= 0 and y >= 0 and x + int(get["Width"]) <= SCREEN[0] and y + int(get["Height"]) <= SCREEN[1]

    def screenshot(self, name: str):
        from PIL import ImageGrab

        self.shots += 1
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        ImageGrab.grab(xdisplay=self.display).save(ARTIFACTS / f"{self.shots:02d}-{name}.png")

    def kill_app(self):
        if self.app is not None and self.app.poll() is None:
            self.app.send_signal(signal.SIGKILL)
            self.app.wait(TIMEOUT)

    def close(self):
        self.kill_app()
        for process in (self.wm, self.xvfb):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def make_projects(tmp: Path) -> tuple[Path, Path, Path]:
    """A tiny model folder; project A (the geography facts, France attributed, loose thresholds so its refined set
    has neurons to edit) and project B (the same facts, no run)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from kn_core.attribution import AttributionParams, attribute_fact
    from kn_core.facts import render_prompts
    from kn_core.models import load_model
    from kn_gui.project_io import ProjectSnapshot, save_project
    from kn_gui.session import COMPLETE, Run
    from test_gui import FRANCE, geo_factset
    from tiny import TINY_CAUSAL, make_tiny

    folder = tmp / "tiny-model"
    built = make_tiny(TINY_CAUSAL, n_layer=8, n_inner=1024)  # big enough that Esc lands during a run
    built.model.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    fs = geo_factset()
    prompts, _ = render_prompts(FRANCE, fs.relation("P36"), lm.tokenizer, lm.kind)
    params = AttributionParams(steps=4)
    run = Run(fact=FRANCE, prompts=prompts, scores=attribute_fact(lm, prompts, params), params=params.to_dict(),
              model=lm.describe(), state=COMPLETE)
    a, b = tmp / "a.knproj", tmp / "b.knproj"
    save_project(str(a), ProjectSnapshot(factset=fs, runs=[run], t=0.05, p=0.3))
    save_project(str(b), ProjectSnapshot(factset=fs))
    return folder, a, b


@pytest.fixture
def x_session(tmp_path):
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    session = XSession(tmp_path)
    yield session
    session.close()


def test_a_researchers_session_with_real_input(x_session, tmp_path):
    x = x_session
    model, a, b = make_projects(tmp_path)
    # launch, open A, load the model
    x.launch(str(a), "--model", str(model))
    x.wait_event(lambda e: e["event"] == "project_opened", "project A opened")
    x.wait_event(lambda e: e["event"] == "model_loaded", "model loaded")
    x.wait_idle()
    assert x.frame_fits(), "the window with its title bar is larger than the 1280x800 screen"
    x.screenshot("opened")
    # cancel a re-run (F5 then Esc): the complete run stays the fact's run. A fast machine may finish the run
    # before Esc lands: then it is tried again (the run it made is an earlier run now, which the app keeps too)
    for _ in range(5):
        x.keys("F5", "Escape")
        ended = x.wait_event(lambda e: e["event"] == "job_ended" and e["name"].startswith("Attribution"),
                             "the re-run's end")
        x.wait_idle()
        if ended["outcome"] == "cancelled":
            break
    assert ended["outcome"] == "cancelled", "every re-run ended before Esc"
    x.screenshot("rerun-cancelled")
    # attribute again, to the end
    x.keys("F5")
    x.wait_job("Attribution")
    x.wait_idle()
    x.screenshot("attributed")
    # edit (the fact's refined neurons) and undo
    x.keys("ctrl+Return")
    x.wait_event(lambda e: e["event"] == "edit_evaluated", "the edit's before/after report")
    x.wait_idle()
    x.screenshot("edited")
    x.keys("ctrl+z")
    x.wait_event(lambda e: e["event"] == "edits_index" and e["index"] == 0, "the edit undone")
    x.wait_idle()
    # save, then unsaved work (a run), autosaved; kill -9
    x.keys("ctrl+s")
    x.wait_event(lambda e: e["event"] == "project_saved", "project A saved")
    x.wait_idle()
    x.keys("F5")
    x.wait_job("Attribution")
    x.wait_event(lambda e: e["event"] == "autosaved" and not e["error"], "the autosave")
    x.screenshot("before-kill")
    x.kill_app()
    # recover: the relaunched app offers the autosaved work; Return answers Yes
    x.launch("--model", str(model))
    x.keys("Return", window=x.wait_window("Recover unsaved work"))
    x.wait_event(lambda e: e["event"] == "status" and e["message"].startswith("Recovered unsaved work"),
                 "the recovered project")
    x.wait_event(lambda e: e["event"] == "model_loaded", "model loaded")
    x.wait_idle()
    x.screenshot("recovered")
    # switch project while a job runs: a run ends, the flags job starts, B is opened over it
    x.keys("F5")
    x.wait_job("Attribution")
    x.keys("ctrl+o")
    x.type_into_dialog("Open project", str(b))
    answer = x.wait_window("Unsaved changes")  # the recovered work is not saved: discard it
    x.keys("alt+d", window=answer)
    x.wait_event(lambda e: e["event"] == "project_opened" and e["path"] == str(b), "project B opened")
    x.wait_idle()
    x.screenshot("switched")
    # export the results
    out = tmp_path / "exported.json"
    x.keys("ctrl+shift+e")
    x.type_into_dialog("Export results", str(out))
    x.wait_event(lambda e: e["event"] == "status" and "Results written" in e["message"], "the export")
    assert json.loads(out.read_text())["t"] is not None
    x.screenshot("exported")
    # quit
    x.keys("ctrl+q")
    assert x.app.wait(TIMEOUT) == 0
    stderr = x.stderr_path.read_text()
    assert "Traceback" not in stderr and "Fatal" not in stderr, stderr[-3000:]
