"""Projects: save, open, and autosave with recovery after a crash.

Autosave writes the whole project to a sibling file (`.NAME.autosave.knproj` beside a saved project, or one in
the app's data folder for an untitled one) every few minutes and after every finished job while there are
unsaved changes. The files are listed in the settings; a clean save or close deletes its file, so a file still
listed at the next start is work a killed app left behind, and the window offers to recover it.
"""

from __future__ import annotations

import os
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QLockFile, QObject, QStandardPaths, Signal

from .. import project_io
from ..project_io import ProjectSnapshot, place_runs
from ..session import Session, fact_key, starter_factset
from ..worker import JobRunner
from . import UserError
from .edits import EditsController

AUTOSAVE_KEY = "autosave/files"


@dataclass(frozen=True)
class ProjectOpened:
    snapshot: ProjectSnapshot
    recovered: bool = False


@dataclass(frozen=True)
class ProjectSaved:
    path: str


@dataclass(frozen=True)
class Autosaved:
    path: str
    error: str = ""


class ProjectController(QObject):
    event = Signal(object)
    _autosave_done = Signal(object)

    def __init__(self, session: Session, runner: JobRunner, edits: EditsController, settings, parent=None):
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.edits = edits
        self.settings = settings
        self.path: str | None = None
        self._autosave_file: str | None = None
        self._autosave_lock: QLockFile | None = None  # held while this window writes its autosave file
        self.autosave_folder: str | None = None  # for untitled projects; None: the app's data folder
        self._autosaving: threading.Thread | None = None
        self._autosave_done.connect(self.event.emit)

    def modified(self) -> bool:
        return not self.edits.history.is_clean() or self.session.results_dirty

    def snapshot(self) -> ProjectSnapshot:
        state, model = self.edits.saved_state()
        return project_io.snapshot(self.session, state, model)

    # ----------------------------------------------------------------------------------------- save / open
    def save_to(self, path: str):
        """Queues the save of the project as it is now; ProjectSaved when it is on disk."""
        snap = self.snapshot()
        saved_position = self.edits.history.position()

        def done(saved_path):
            self.path = saved_path
            self.edits.history.set_clean(saved_position)  # the state written (changes since stay unsaved)
            self.session.results_dirty = False
            self.discard_autosave()
            self.event.emit(ProjectSaved(saved_path))

        return self.runner.submit(f"Saving {Path(path).name}", lambda task: project_io.save_project(path, snap, task),
                                  on_done=done, uses=())

    def open(self, path: str, recovered: bool = False):
        """Queues reading the project; when read, it replaces the session and ProjectOpened follows."""
        if not os.path.exists(path):
            raise UserError("Project not found", f"{path} does not exist (moved or deleted?). Pick it again with "
                            "File \u2192 Open.")
        job = self.runner.in_use("session")
        if job is not None:
            raise UserError("Busy", f"Cannot open a project while \u201c{job.name}\u201d runs: wait for it or press "
                            "Cancel (Esc).")
        self.runner.submit(f"Opening {Path(path).name}", lambda task: project_io.open_project_file(path, task),
                           on_done=lambda snap: self._opened(snap, recovered), uses=("session",),
                           project_bound=False)

    def _opened(self, snap: ProjectSnapshot, recovered: bool):
        self.edits.history.clear()  # the model's edits are reverted
        s = self.session
        s.generation += 1  # from now on, results of the jobs started for the previous project are dropped
        s.factset = snap.factset
        s.runs, s.partial_runs, s.earlier_runs = place_runs(snap.runs)
        s.neuron_sets = {ns.name: ns for ns in snap.sets}
        s.t, s.p = snap.t, snap.p
        s.causal_templates = snap.causal_templates
        s.prompt_format = snap.prompt_format
        s.score_storage = snap.score_storage
        s.kept_records = snap.kept_records
        s.keep_saved_checks(snap.checks_sha256, snap.checks)
        s.saved_flags = snap.flags
        s.traces = list(snap.traces)
        self.discard_autosave()
        if recovered:
            self._claim_autosave(snap.path)  # keep writing to the recovered file until the user saves
            self.path = snap.autosave_of
        else:
            self.path = snap.path
        self.edits.history.set_clean()
        s.results_dirty = recovered
        self.event.emit(ProjectOpened(snap, recovered))

    def new(self):
        """An empty project: the built-in facts, no runs, sets or edits (the loaded model stays)."""
        s = self.session
        s.generation += 1
        self.edits.history.clear()  # the model's edits are reverted
        self.edits.history.set_clean()
        s.traces = []
        self.edits.pending = None
        self.discard_autosave()
        self.path = None
        s.score_storage = None  # a new project stores full scores
        s.kept_records = {}
        s.saved_flags = None
        s.saved_checks = None
        s.factset = starter_factset()
        s.runs.clear()
        s.partial_runs.clear()
        s.earlier_runs.clear()
        s.neuron_sets.clear()
        s.results_dirty = False

    def add_scores_run(self, run, name: str) -> bool:
        """A scores file's run (open_scores.scores_run) into the project, its fact added to the fact set as one
        undoable change when it is not there; True when this very run was open already. UserError when another
        run for the same prompt and answer is open."""
        from ..open_scores import SCORES_RELATION, same_scores

        s, key = self.session, fact_key(run.fact)
        shown = run.fact in s.factset.facts
        earlier = s.runs.get(key)
        if shown and earlier is not None:
            if not same_scores(earlier, run):
                raise UserError("Could not open the scores", f"{name}: a different run for this prompt and answer "
                                f"is already open ({run.fact.subject!r} \u2192 {run.fact.object!r}); delete that "
                                "fact first to replace it.")
            return True
        fs = s.factset  # a fact deleted earlier (its run left behind) comes back with this file's run
        if SCORES_RELATION.id not in fs.relations:
            fs = fs.with_relation(SCORES_RELATION)
        if not shown:
            fs = fs.with_fact(run.fact)
        s.runs[key] = run
        self.edits.push_factset(f"Open scores {name}", fs)
        s.results_dirty = True
        return False

    # ----------------------------------------------------------------------------------------- autosave
    def _listed(self) -> list[str]:
        value = self.settings.value(AUTOSAVE_KEY, [])
        return [v for v in ([value] if isinstance(value, str) else (value or [])) if v]

    def _set_listed(self, paths: list[str]):
        self.settings.setValue(AUTOSAVE_KEY, paths)
        self.settings.sync()

    def autosave_path(self) -> str:
        if self._autosave_file is None:
            if self.path:
                folder, name = os.path.split(os.path.abspath(self.path))
                self._claim_autosave(os.path.join(folder, f".{name}.autosave.knproj"))
            else:
                folder = Path(self.autosave_folder or Path(QStandardPaths.writableLocation(
                    QStandardPaths.AppDataLocation)) / "autosave")
                folder.mkdir(parents=True, exist_ok=True)
                self._claim_autosave(str(folder / f"untitled-{os.getpid()}-{id(self):x}.knproj"))
        return self._autosave_file

    def _claim_autosave(self, path: str):
        """This window's autosave file, with a lock beside it that a running app holds: another app started
        meanwhile must not offer a live window's work as left by a crash (a killed app's lock goes stale with
        its process: QLockFile checks the pid it wrote)."""
        self._release_autosave_lock()
        self._autosave_file = path
        self._autosave_lock = QLockFile(path + ".lock")
        self._autosave_lock.tryLock(0)

    def _release_autosave_lock(self):
        if self._autosave_lock is not None:
            self._autosave_lock.unlock()
            self._autosave_lock = None

    @staticmethod
    def _held_by_a_running_app(path: str) -> bool:
        lock = QLockFile(path + ".lock")
        if lock.tryLock(0):  # free, or stale (its app ended): removed with the unlock
            lock.unlock()
            return False
        return lock.error() == QLockFile.LockFailedError

    def autosave(self) -> threading.Thread | None:
        """Writes the unsaved state in a background thread (a long job may hold the worker); Autosaved after."""
        if not self.modified() or (self._autosaving is not None and self._autosaving.is_alive()):
            return None
        snap = self.snapshot()
        path = self.autosave_path()
        snap.autosave_of = self.path
        listed = self._listed()
        if path not in listed:
            self._set_listed(listed + [path])

        def write():
            try:
                project_io.save_project(path, snap)
                self._autosave_done.emit(Autosaved(path))
            except Exception as exc:  # noqa: BLE001 - autosave must never disturb the user's work
                traceback.print_exc()
                self._autosave_done.emit(Autosaved(path, str(exc)))

        self._autosaving = threading.Thread(target=write, name="kn-autosave", daemon=True)
        self._autosaving.start()
        return self._autosaving

    def wait_autosave(self):
        """Returns once no autosave is being written (its thread emits a signal of this object when it ends)."""
        if self._autosaving is not None:
            self._autosaving.join()

    def discard_autosave(self):
        """The work is saved (or deliberately dropped): its autosave file goes."""
        self.wait_autosave()
        path, self._autosave_file = self._autosave_file, None
        self._release_autosave_lock()
        if path is None:
            return
        self._set_listed([p for p in self._listed() if p != path])
        if os.path.exists(path):
            os.remove(path)

    def recoverable(self) -> list[str]:
        """Autosave files left by an app that did not end cleanly (not this window's own, nor another running
        app's: the lock `_claim_autosave` holds)."""
        listed, own = self._listed(), self._autosave_file
        others = [p for p in listed if os.path.exists(p) and p != own]
        running = [p for p in others if self._held_by_a_running_app(p)]  # still listed: offered if it crashes
        found = [p for p in others if p not in running]
        self._set_listed(found + running + ([own] if own in listed else []))
        return found
