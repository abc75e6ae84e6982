"""A project's life in the window: new, open (and recover), save, save as, the unsaved-changes question, and the
panels refreshed when a project arrives. `ProjectLifecycle`, an object the window owns; the work itself (reading,
writing, autosave, the session's reset) is the ProjectController's (controllers/project.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QMessageBox

from .controllers import UserError
from .controllers import project as P
from .panels.common import default_folder


class ProjectLifecycle:
    def __init__(self, window):
        self.window = window
        self.project = window.project  # the ProjectController
        self.auto_discard = False  # quiet mode's answer to "discard unsaved changes?"
        self.auto_recover = False  # quiet mode's answer to "recover unsaved work?"
        self.project.event.connect(self._project_event)

    def start_folder(self) -> str:
        """Where file dialogs open: the project's folder, else the user's documents folder."""
        return os.path.dirname(os.path.abspath(self.project.path)) if self.project.path else str(default_folder())

    def confirm_discard(self) -> bool:
        w = self.window
        if not w.is_modified():
            return True
        if w.quiet:
            return self.auto_discard
        box = QMessageBox(QMessageBox.Question, "Unsaved changes", "The project has unsaved changes. Save them first?",
                          QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel, w)
        box.button(QMessageBox.Save).setText("&Save")  # keyboard answers: Alt+S, Alt+D, Esc
        box.button(QMessageBox.Discard).setText("&Discard")
        answer = box.exec()
        if answer == QMessageBox.Save:
            return self.save(wait=True)
        return answer == QMessageBox.Discard

    # ----------------------------------------------------------------------------------------- new, open
    def new_project(self):
        w = self.window
        if not self.confirm_discard() or not w.need_free("start a new project", "session"):
            return
        self.project.new()
        w.current_fact = None
        w.facts_panel.rebuild()
        w.attribution_panel.show_run(None)
        w.neurons_panel.refresh()
        w.edits_panel.show_report(None)
        w.sets_changed()
        w.update_title()
        w.status("New project.")

    def open_project_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self.window, "Open project", self.start_folder(),
                                              "Projects (*.knproj);;All (*)")
        if path:
            self.open_project(path)

    def open_project(self, path: str):
        if not self.confirm_discard():
            return
        try:
            self.project.open(path)
        except UserError as exc:
            self.window.show_error(exc.title, str(exc))
            if exc.title == "Project not found":
                self.window.menus.forget_recent(path)

    def offer_recovery(self) -> bool:
        """At start: autosave files a killed app left behind are offered for recovery. True if one was opened."""
        found = self.project.recoverable()
        if not found:
            return False
        path = max(found, key=os.path.getmtime)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
        if self.window.quiet:
            recover = self.auto_recover
        else:
            recover = QMessageBox.question(
                self.window, "Recover unsaved work?", f"Knowledge Neuron Studio did not close cleanly. Unsaved work "
                f"from {when} was autosaved ({path}). Recover it? (No keeps the file for later.)") == QMessageBox.Yes
        if recover:
            self.project.open(path, recovered=True)
        return recover

    def _project_event(self, ev):
        w = self.window
        if isinstance(ev, P.ProjectOpened):
            self._project_loaded(ev)
        elif isinstance(ev, P.ProjectSaved):
            w.menus.add_recent(ev.path)
            w.update_title()
            w.project_saved.emit(ev.path)
            w.status(f"Saved {ev.path}.")
        elif isinstance(ev, P.Autosaved) and ev.error:
            w.status(f"Autosave to {ev.path} failed: {ev.error}", 15000)

    def _project_loaded(self, ev):
        """The opened project on every panel: thresholds, facts, sets, the saved edits re-applied (when its model
        is loaded), the flags, its first run shown."""
        w, snap, s = self.window, ev.snapshot, self.window.session
        w.attribution_panel.set_thresholds(s.t, s.p)
        w.attribution_panel.set_causal_templates(s.causal_templates)
        w.attribution_panel.set_prompt_format(s.prompt_format)
        w.attributions.prompt_format_changed(s.prompt_format)  # the project's prompt format, on the loaded model
        w.facts_panel.rebuild()
        w.current_fact = None
        w.attribution_panel.show_run(None)
        w.edits_panel.show_report(None)
        w.sets_changed()
        w.edits.pending = None
        if snap.edit_state and snap.edit_state.get("entries"):
            self.restore_history(snap.edit_state, snap.edit_sha)
        w.history.set_clean()
        w.attributions.flags_for_model()
        first = next(iter(s.runs.values()), None)
        if first is not None:
            w.facts_panel.select_fact(first.fact)
            w.select_fact(first.fact)
        if not ev.recovered:
            w.menus.add_recent(snap.path)
        w.update_title()
        w.project_opened.emit(snap.path)
        what = "Recovered unsaved work" if ev.recovered else f"Opened {snap.path}"
        w.status(f"{what}: {len(s.factset.facts)} facts, {len(s.runs)} runs, {len(s.neuron_sets)} neuron sets.")

    def restore_history(self, state, sha):
        """The project's saved edits re-applied to the loaded model (or kept until its model is loaded)."""
        w = self.window
        was_clean = w.history.is_clean()
        try:
            restored = w.edits.restore(state, sha)
        except UserError as exc:
            w.show_error(exc.title, str(exc))
            return
        if restored is None:
            w.status("The project has saved edits; load its model to re-apply them.")
            return
        if was_clean:
            w.history.set_clean()
        w.status(f"Re-applied {restored.applied} saved edit(s) to the model ({restored.total} in the history).")

    # ----------------------------------------------------------------------------------------- save
    def save(self, wait: bool = False) -> bool:
        if self.project.path is None:
            return self.save_as(wait=wait)
        return self.save_to(self.project.path, wait=wait)

    def save_as(self, wait: bool = False) -> bool:
        name = Path(self.project.path).name if self.project.path else "project.knproj"
        path, _ = QFileDialog.getSaveFileName(self.window, "Save project", os.path.join(self.start_folder(), name),
                                              "Projects (*.knproj)")
        if not path:
            return False
        if not path.endswith(".knproj"):
            path += ".knproj"
        return self.save_to(path, wait=wait)

    def save_to(self, path: str, wait: bool = False) -> bool:
        """Queues the save; with `wait`, returns whether it reached the disk."""
        w = self.window
        if not w.need_free("save", "session"):
            return False
        saved = []
        w.project_saved.connect(saved.append)
        try:
            self.project.save_to(path)
            if wait:
                w.runner.wait_idle(120000)
        finally:
            w.project_saved.disconnect(saved.append)
        return bool(saved) or not wait
