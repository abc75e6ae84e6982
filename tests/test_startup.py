"""Start-up as a new user meets it: `python main.py` on a real X server (Xvfb, the xcb platform, not offscreen),
and a clear exit, not a core dump, where no window can open. The set-up installs Xvfb and Qt's system
libraries; if one is missing here, these tests fail: that is the point."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kn_gui.platform_check import missing_xcb_libraries, startup_problem

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"


def _env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(changes)
    return env


@pytest.fixture
def xvfb():
    assert shutil.which("Xvfb"), "Xvfb is missing: `bash setup.sh test` installs it (Debian package xvfb)"
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                              pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    assert number, "Xvfb did not start"
    yield f":{number}"
    server.terminate()
    server.wait(10)


def _visible_window(display: str, title: str) -> bool:
    tree = subprocess.run(["xwininfo", "-root", "-tree"], env=_env(DISPLAY=display), capture_output=True,
                          text=True, timeout=10).stdout
    for window_id in re.findall(rf"^\s*(0x[0-9a-f]+) \"[^\"]*{re.escape(title)}[^\"]*\"", tree, re.M):
        info = subprocess.run(["xwininfo", "-id", window_id], env=_env(DISPLAY=display), capture_output=True,
                              text=True, timeout=10).stdout
        if "Map State: IsViewable" in info:
            return True
    return False


def test_qt_system_libraries_are_installed():
    assert missing_xcb_libraries() == []


def test_main_window_is_shown_on_a_real_x_server(xvfb):
    assert shutil.which("xwininfo"), "xwininfo is missing: `bash setup.sh test` installs it (Debian x11-utils)"
    app = subprocess.Popen([sys.executable, str(MAIN)], env=_env(DISPLAY=xvfb, QT_QPA_PLATFORM="xcb"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        shown = False
        while not shown and time.monotonic() < deadline and app.poll() is None:
            time.sleep(0.5)
            shown = _visible_window(xvfb, "Knowledge Neuron Studio")
        running = app.poll() is None
    finally:
        app.terminate()
        try:
            _, err = app.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            app.kill()
            _, err = app.communicate()
    assert running, f"the app exited with status {app.returncode}: {err[-2000:]}"
    assert shown, f"no viewable main window within 60 s; stderr: {err[-2000:]}"
    assert "Could not load the Qt platform plugin" not in err


@pytest.mark.parametrize("changes", [{}, {"QT_QPA_PLATFORM": "xcb"}], ids=["no display", "xcb without DISPLAY"])
def test_no_display_is_one_line_and_status_2(changes):
    done = subprocess.run([sys.executable, str(MAIN)], env=_env(**changes), capture_output=True, text=True,
                          timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "no display" in lines[0] and "xvfb-run" in lines[0] and "`kn`" in lines[0]


def test_unreachable_display_is_one_line_and_status_2():
    done = subprocess.run([sys.executable, str(MAIN)], env=_env(DISPLAY=":973", QT_QPA_PLATFORM="xcb"),
                          capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "cannot connect to the X display ':973'" in lines[0]


def test_headless_platforms_and_other_systems_need_no_display(monkeypatch):
    assert startup_problem({"QT_QPA_PLATFORM": "offscreen"}) is None
    assert startup_problem({"WAYLAND_DISPLAY": "wayland-0"}) is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert startup_problem({}) is None
