"""Regenerates the screenshots in docs/screenshots/ (and the one the README shows) from the real app.

Drives the real window through the journey on the embedded default model: load the model, pick a fact, run
attribution (grabbing the whole window mid-run), inspect a neuron, suppress the refined set, and grabs the
inspector and the before/after table; then the same window at 1280x800 (where the per-layer plots fold into a
tab beside the map) to check the default dock sizes.

    .venv/bin/python scripts/screenshots.py --screen 1600x1000   # its own Xvfb + openbox (window manager)
    .venv/bin/python scripts/screenshots.py --screen 1280x800 --only-window
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py   # an X server, no WM
    QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/screenshots.py              # no X server at all

With --screen the window is shown as a user sees it: maximized by the window manager onto a screen of that size
(title bar and all, the whole screen grabbed) and saved as main_window_WxH.png; --only-window stops there.
Options: --steps N (integrated-gradient steps, default 20 = the paper), --fact "France" (subject in P36),
--out DIR (default docs/screenshots), --width/--height (default 1600x1000).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--relation", default="P36")
    parser.add_argument("--fact", default="France")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--screen", help="WxH: start Xvfb of that size with openbox and grab the whole screen")
    parser.add_argument("--only-window", action="store_true", help="with --screen: only the main window shot")
    args = parser.parse_args(argv)
    if args.screen:
        args.width, args.height = map(int, args.screen.lower().split("x"))
        start_x_server(args.width, args.height)
    if "QT_QPA_PLATFORM" not in os.environ:
        os.environ["QT_QPA_PLATFORM"] = "xcb" if os.environ.get("DISPLAY") else "offscreen"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from PySide6.QtCore import QEventLoop, QSettings, QTimer

    from kn_gui.app import build_app
    from kn_gui.main_window import MainWindow

    app = build_app()
    tmp = tempfile.mkdtemp(prefix="kn-shots-")
    settings = QSettings(os.path.join(tmp, "settings.ini"), QSettings.IniFormat)
    window = MainWindow(settings=settings, confirm_dialogs=False)
    window.lifecycle.auto_discard = True
    window.project.autosave_folder = os.path.join(tmp, "autosave")
    if not args.screen:
        window.resize(args.width, args.height)
    window.show()
    if args.screen:
        window.showMaximized()  # as a user on that screen would: the window manager fits it, title bar and all

    def pump(ms: int = 300):
        loop = QEventLoop()
        QTimer.singleShot(ms, loop.quit)
        loop.exec()

    def wait(signal, timeout_s: float, what: str, action=lambda: None):
        """Runs `action` and waits for `signal` (an error message ends the script, saying what failed)."""
        loop = QEventLoop()
        got = []
        signal.connect(lambda *a: (got.append(a), loop.quit()))
        window.error_shown.connect(lambda title, message: (got.append(("error", title, message)), loop.quit()))
        QTimer.singleShot(int(timeout_s * 1000), loop.quit)
        action()
        if not got:
            loop.exec()
        if not got:
            raise SystemExit(f"timed out waiting for {what}")
        if got[0] and got[0][0] == "error":
            raise SystemExit(f"{what}: {got[0][1]}: {got[0][2]}")
        return got[0]

    def idle(timeout_s: float = 600):
        deadline = time.monotonic() + timeout_s
        while window.runner.busy and time.monotonic() < deadline:
            pump(100)

    def shot(widget, name: str):
        """The window as the screen shows it (frame and all, on a real X server); a panel as it draws itself."""
        pump(400)
        path = out / name
        if widget is window and args.screen:
            from PIL import ImageGrab

            image = ImageGrab.grab(xdisplay=os.environ["DISPLAY"])
            image.save(str(path))
            print("wrote", path, f"{image.width}x{image.height}")
            return
        if widget is window and os.environ["QT_QPA_PLATFORM"] == "xcb":
            image = window.screen().grabWindow(window.winId())
        else:
            image = widget.grab()
        image.save(str(path))
        print("wrote", path, f"{image.width()}x{image.height()}")

    window.model_dock.raise_()
    wait(window.model_loaded, 600, "the default model", lambda: window.load_model("default"))
    idle()
    if args.only_window:
        fs = window.session.factset
        fact = next(f for f in fs.facts_of(args.relation) if f.subject == args.fact)
        window.facts_panel.select_fact(fact)
        idle()
        shot(window, f"main_window_{args.width}x{args.height}.png")
        window.close()
        return 0
    window.model_dock.raise_()  # loading raises the Facts tab (the next step); the model's summary first
    shot(window.model_dock, "model_panel.png")

    fs = window.session.factset
    fact = next(f for f in fs.facts_of(args.relation) if f.subject == args.fact)
    window.facts_dock.raise_()
    window.facts_panel.select_fact(fact)
    idle()
    window.attributions.check_facts(fs.facts_of(args.relation))
    idle()
    window.facts_panel.select_fact(fact)
    window.facts_panel.tree.expand(window.facts_panel._find_fact_item(fact).index())
    shot(window.facts_dock, "facts_panel.png")

    window.attribution_panel.steps.setValue(args.steps)
    started = time.monotonic()
    window.attributions.run_attribution("current")
    run = window.session.runs[(fact.relation, fact.subject, fact.object)]
    while len(run.scores) < 2 and window.runner.busy:  # mid-analysis: some prompts done, the rest streaming
        pump(200)
    shot(window, "main_window_running.png")
    if not run.complete:
        wait(window.run_finished, 3600, "attribution")
    idle()
    print(f"attribution: {time.monotonic() - started:.0f} s")
    refined = window.session.refined(run)
    ap = window.attribution_panel
    if refined:
        layer, neuron = max(refined, key=lambda n: float(run.mean_scores()[n]))
        ap.select_neuron(layer, neuron)
        window.editing.inspect_neuron(layer, neuron)
        idle()
    shot(ap, "attribution_panel.png")
    shot(window.neurons_dock, "inspector.png")
    ap.tabs.setCurrentIndex(1)
    shot(ap, "per_prompt.png")
    ap.tabs.setCurrentIndex(0)

    name = f"refined: {fact.subject} \u2192 {fact.object}"
    window.edits_panel.kind.setCurrentText("Suppress")
    window.edits_panel.suppress_to.setCurrentIndex(1)  # mean ablation: the flags job measured the statistics
    window.edits_panel.set_target_set(name)
    wait(window.edit_evaluated, 600, "the edit evaluation", window.edits_panel.apply_button.click)
    pump(800)  # the answer checks the edit made stale are measured again: wait for them
    idle()
    window.edits_dock.setFloating(True)  # the whole table, at a width a reader can follow
    window.edits_dock.resize(args.width, 430)
    shot(window.edits_dock, "before_after.png")
    window.edits_dock.setFloating(False)
    window.facts_dock.raise_()
    shot(window, "main_window.png")
    # last: the control can take every refined neuron out of the set the edit above used (France -> Paris: all 3),
    # and it scores the run's own weights, so the edit is undone first
    if refined:  # the subject control, and the hover line of the neuron it judged with the largest kept share
        while window.edit_stack.active_edits():
            window.undo()
            idle()
        wait(window.attribution.event, 1200, "the subject control", window.attributions.subject_control)
        idle()
        control = run.params.get("subject_control") or {}
        kept = [(r, (a, b)) for a, b, r in control.get("ratios", ()) if r is not None]
        pump(800)  # the answer checks the undo made stale are measured again: the panel is shot idle
        idle()
        if kept:
            ap._show_hover(max(kept)[1])
        shot(ap, "subject_control.png")
    if args.screen:
        window.close()
        return 0
    window.resize(1280, 800)  # a laptop screen: the per-layer plots fold into a tab, the map keeps its height
    window.docks.default_dock_sizes()
    pump(1000)  # the docks, the fold and the scroll areas settle at the new size
    shot(window, "main_window_1280x800.png")

    project = os.path.join(tmp, "journey.knproj")
    window.lifecycle.save_to(project, wait=True)
    window.close()
    print("project saved to", project)
    return 0


def start_x_server(width: int, height: int) -> None:
    """Xvfb of that size and openbox on it, for this process (both end with it)."""
    import atexit
    import subprocess

    read, write = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", f"{width}x{height}x24", "-nolisten",
                             "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as handle:
        os.environ["DISPLAY"] = f":{handle.readline().strip()}"
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    wm = subprocess.Popen(["openbox", "--sm-disable"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # openbox takes the screen before the window maps
    atexit.register(lambda: (wm.terminate(), xvfb.terminate()))


if __name__ == "__main__":
    raise SystemExit(main())
