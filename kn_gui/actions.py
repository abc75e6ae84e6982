"""The window's actions, menus, toolbar, recent projects, file dialogs, projects (new, open, save, recovery) and
exports: a mixin of MainWindow, kept apart so the window module is construction and wiring."""

from __future__ import annotations

import os
import time
from pathlib import Path

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QFileDialog, QMessageBox, QStyle

from .controllers import UserError
from .controllers import project as P
from .icons import crisp_icon
from .panels.common import default_folder, export_folder, remember_folder, save_file_dialog, write_json
from .project_io import results_dict
from .session import fact_key, fact_label, merge_factsets, starter_factset

MAX_RECENT = 8


def about_text() -> str:
    """The About box: what the app is, its version and the versions of what it runs on."""
    import platform

    import PySide6

    from kn_core import __version__

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # the app starts without it only in tests of the window
        torch_version = "not installed"
    return ("<b>Knowledge Neuron Studio</b> " + __version__ + "<p>Find, inspect and edit the feed-forward neurons "
            "that store facts in pretrained transformers (Dai et al., ACL 2022: Knowledge Neurons in Pretrained "
            "Transformers).</p><p>Python " + platform.python_version() + " \u00b7 PySide6 " + PySide6.__version__
            + " \u00b7 PyTorch " + torch_version + "</p><p>Help \u2192 Documentation opens the README; F1 lists "
            "the keyboard shortcuts.</p>")


class ActionsMixin:
    def _action(self, text, slot, shortcut=None, tip="", icon=None, short=None) -> QAction:
        action = QAction(text, self)
        action.triggered.connect(slot)
        if icon is not None:
            action.setIcon(crisp_icon(self.style(), icon))  # SVG where the style's bitmaps are small (2x screens)
        if short:
            action.setIconText(short)  # the toolbar's label; menus show the full text
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(tip + (f" ({QKeySequence(shortcut).toString()})" if shortcut else ""))
        return action

    def _build_actions(self):
        S = QStyle
        self.act_new = self._action("&New project", self.new_project, QKeySequence.New, "Start an empty project",
                                    S.SP_FileIcon, "New")
        self.act_open = self._action("&Open project\u2026", self.open_project_dialog, QKeySequence.Open,
                                     "Open a .knproj project", S.SP_DialogOpenButton, "Open")
        self.act_save = self._action("&Save", self.save, QKeySequence.Save, "Save the project",
                                     S.SP_DialogSaveButton, "Save")
        self.act_save_as = self._action("Save &as\u2026", self.save_as, QKeySequence.SaveAs,
                                        "Save the project under a new name")
        self.act_import = self._action("&Import facts\u2026", self.import_facts_dialog, "Ctrl+I",
                                       "Import a PARAREL folder, CSV or JSONL")
        self.act_import_pararel = self._action("Import PARAREL &folder\u2026", self.import_pararel_dialog, None,
                                               "Import a PARAREL folder (pattern files + TREx facts)")
        self.act_export_facts = self._action("Export facts\u2026", self.export_facts_dialog, None,
                                             "Save the fact set as CSV or JSONL")
        self.act_export_plots = self._action("Export figure (PNG/SVG/PDF)\u2026", self.export_plots_dialog, None,
                                             "A paper-ready figure of the attribution plots at a chosen size and dpi")
        self.act_export_json = self._action("Export results (JSON)\u2026", self.export_results_dialog, "Ctrl+Shift+E",
                                            "Runs, neuron sets and edits as JSON")
        self.act_export_table = self._action(
            "Export before/after table (CSV)\u2026",
            lambda: self.edits_panel.table.export_csv_dialog(self, "edit.csv"))
        self.act_export_model = self._action("Export edited model\u2026", self.export_model_dialog, None,
                                             "Save the model with its active edits to a folder")
        self.act_export_report = self._action("Export report (HTML)\u2026", self.export_report_dialog, None,
                                              "One self-contained page: runs, figures, neuron sets, edits and "
                                              "provenance; opens in any browser")
        self.act_open_scores = self._action("Open s&cores\u2026", self.open_scores_dialog, None,
                                            "Open a scores file (kn attribute --save) as a run")
        self.act_quit = self._action("&Quit", self.close, QKeySequence.Quit)
        self.act_undo = self._action("&Undo", self.undo, QKeySequence.Undo, "Undo the last change",
                                     S.SP_ArrowBack, "Undo")
        self.act_redo = self._action("&Redo", self.redo, QKeySequence("Ctrl+Shift+Z"), "Redo", S.SP_ArrowForward,
                                     "Redo")
        self.act_redo.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
        self.act_load = self._action("&Load model", self.model_panel._load, "Ctrl+L", "Load the chosen model",
                                     S.SP_ComputerIcon, "Load model")
        self.act_run = self._action("&Run attribution", lambda: self.run_attribution("current"), "F5",
                                    "Attribute every prompt of the current fact", S.SP_MediaPlay, "Run")
        self.act_run_sel = self._action("Run &selected facts", lambda: self.run_attribution("selection"),
                                        "Shift+F5", "Attribute every fact selected in the Facts panel")
        self.act_check = self._action("&Check prompts", lambda: self.check_facts(self.facts_panel.selected_facts()
                                                                                  or self.session.factset.facts),
                                      "F6", "Ask the model for each prompt's answer", S.SP_DialogApplyButton, "Check")
        self.act_cancel = self._action("&Cancel", self.cancel_job, "Esc", "Cancel the running job", S.SP_BrowserStop,
                                       "Cancel")
        self.act_apply_edit = self._action("&Apply edit", lambda: self.edits_panel._apply(), "Ctrl+Return",
                                           "Apply the edit set up in the Edits panel (undo with Ctrl+Z)")
        self.act_runs = self._action("R&uns\u2026", self.show_runs, "Ctrl+R", "Every run of the fact or the project: "
                                     "open, rename, delete, compare two")
        self.act_reset_layout = self._action("Reset layout", self.reset_layout)
        self.act_about = self._action("&About", self.about)
        self.act_shortcuts = self._action("&Keyboard shortcuts", self.show_shortcuts, "F1",
                                          "Every action that has a shortcut")
        self.act_docs = self._action("&Documentation", self.open_docs, None, "The README (the method, the app, the "
                                     "kn command) and docs/", S.SP_DialogHelpButton)

    def _build_menus(self):
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        file_menu.addActions([self.act_new, self.act_open])
        self.recent_menu = file_menu.addMenu("Open &recent")
        file_menu.addAction(self.act_open_scores)
        file_menu.addActions([self.act_save, self.act_save_as])
        file_menu.addSeparator()
        file_menu.addActions([self.act_import, self.act_import_pararel, self.act_export_facts])
        export = file_menu.addMenu("&Export")
        export.addActions([self.act_export_report, self.act_export_plots, self.act_export_table,
                           self.act_export_json, self.act_export_model])
        file_menu.addSeparator()
        file_menu.addAction(self.act_quit)
        edit_menu = bar.addMenu("&Edit")
        edit_menu.addActions([self.act_undo, self.act_redo])
        edit_menu.addSeparator()
        edit_menu.addAction(self._action("Add relation\u2026", self.facts_panel.add_relation))
        edit_menu.addAction(self._action("Add fact\u2026", self.facts_panel.add_fact, "Ctrl+Shift+N"))
        edit_menu.addAction(self._action("Delete facts", self.facts_panel.delete_selected))
        run_menu = bar.addMenu("&Run")
        run_menu.addActions([self.act_load, self.act_check, self.act_run, self.act_run_sel, self.act_cancel])
        run_menu.addSeparator()
        run_menu.addActions([self.act_runs, self.act_apply_edit])
        view_menu = bar.addMenu("&View")
        for dock in (self.model_dock, self.facts_dock, self.neurons_dock, self.edits_dock):
            view_menu.addAction(dock.toggleViewAction())
        view_menu.addSeparator()
        view_menu.addAction(self.act_reset_layout)
        help_menu = bar.addMenu("&Help")
        help_menu.addActions([self.act_shortcuts, self.act_docs])
        help_menu.addSeparator()
        help_menu.addAction(self.act_about)

        # short labels beside icons: the bar fits 1024 px, so Cancel (last) is never pushed into the overflow
        tb = self.addToolBar("Main")
        tb.setObjectName("toolbar_main")
        tb.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        tb.setIconSize(QSize(18, 18))
        tb.addActions([self.act_new, self.act_open, self.act_save])
        tb.addSeparator()
        tb.addActions([self.act_undo, self.act_redo])
        tb.addSeparator()
        tb.addActions([self.act_load, self.act_check, self.act_run, self.act_cancel])
        self.toolbar = tb
        self._rebuild_recent()

    # ----------------------------------------------------------------------------------------- recent
    def recent_projects(self) -> list[str]:
        value = self.settings.value("recent", [])
        if isinstance(value, str):
            value = [value]
        return [v for v in (value or []) if v]

    def _add_recent(self, path: str):
        path = os.path.abspath(path)
        recent = [p for p in self.recent_projects() if p != path]
        self.settings.setValue("recent", ([path] + recent)[:MAX_RECENT])
        self._rebuild_recent()

    def _forget_recent(self, path: str):
        self.settings.setValue("recent", [p for p in self.recent_projects() if p != os.path.abspath(path)])
        self._rebuild_recent()

    def _rebuild_recent(self):
        self.recent_menu.clear()
        recent = self.recent_projects()
        for path in recent:
            self.recent_menu.addAction(self._action(Path(path).name, lambda _=False, p=path: self.open_project(p),
                                                    tip=path))
        self.recent_menu.setEnabled(bool(recent))

    # ----------------------------------------------------------------------------------------- dialogs
    def _start_folder(self) -> str:
        """Where file dialogs open: the project's folder, else the user's documents folder."""
        return os.path.dirname(os.path.abspath(self.project.path)) if self.project.path else str(default_folder())

    def _confirm_discard(self) -> bool:
        if not self.is_modified():
            return True
        if self.quiet:
            return self.auto_discard
        box = QMessageBox(QMessageBox.Question, "Unsaved changes", "The project has unsaved changes. Save them first?",
                          QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel, self)
        box.button(QMessageBox.Save).setText("&Save")  # keyboard answers: Alt+S, Alt+D, Esc
        box.button(QMessageBox.Discard).setText("&Discard")
        answer = box.exec()
        if answer == QMessageBox.Save:
            return self.save(wait=True)
        return answer == QMessageBox.Discard

    def open_project_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self, "Open project", self._start_folder(),
                                              "Projects (*.knproj);;All (*)")
        if path:
            self.open_project(path)

    def save_as(self, wait: bool = False) -> bool:
        name = Path(self.project.path).name if self.project.path else "project.knproj"
        path, _ = QFileDialog.getSaveFileName(self, "Save project", os.path.join(self._start_folder(), name),
                                              "Projects (*.knproj)")
        if not path:
            return False
        if not path.endswith(".knproj"):
            path += ".knproj"
        return self.save_to(path, wait=wait)

    def import_facts_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self, "Import facts", self._start_folder(),
                                              "Fact sets (*.jsonl *.csv *.json);;All (*)")
        if path:
            self.import_facts(path)

    def import_pararel_dialog(self):
        folder = QFileDialog.getExistingDirectory(self, "Import a PARAREL folder", self._start_folder())
        if folder:
            self.import_facts(folder)

    def export_facts_dialog(self):
        from kn_core.fact_files import export_facts

        path = save_file_dialog(self, "Export facts", "facts.jsonl", "JSONL (*.jsonl);;CSV (*.csv)")
        if not path:
            return
        try:
            export_facts(self.session.factset, path)
        except Exception as exc:  # noqa: BLE001
            self.show_error("Could not export the facts", f"{exc}. Choose another file name or folder.")
            return
        self.status(f"Facts exported to {path}.")

    # ----------------------------------------------------------------------------------------- exports
    def export_plots(self, folder: str, fmt: str = "png") -> list[str]:
        """Every figure of the attribution panel with something to show, as paper figures in `folder`."""
        from .panels.figures import export_figures

        written, _ = export_figures(self.attribution_panel, folder, fmt)
        return [str(p) for p in written]

    def export_plots_dialog(self):
        from .panels.figures import FigureExportDialog

        dialog = FigureExportDialog(self.attribution_panel, self, folder=str(export_folder()))
        dialog.accepted.connect(lambda: (remember_folder(dialog.written), self.status(f"Figure written to "
                                                                                     f"{dialog.written}.")))
        dialog.open()

    def results_dict(self) -> dict:
        return results_dict(self.session, self.edits.commands())

    def export_results_dialog(self):
        path = save_file_dialog(self, "Export results", "results.json", "JSON (*.json)")
        if not path:
            return
        try:
            write_json(path, self.results_dict())
        except OSError as exc:
            self.show_error("Could not export the results", f"{exc}. Choose a folder you can write to.")
            return
        self.status(f"Results written to {path}.")

    def export_report_dialog(self):
        path = save_file_dialog(self, "Export report", "report.html", "HTML (*.html)")
        if path:
            self.export_report(path if path.endswith((".html", ".htm")) else path + ".html")

    def export_report(self, path: str) -> bool:
        """The project as one self-contained HTML page (kn_gui.report_export): a snapshot now, the figures drawn
        and the file written by a worker job. False if nothing was queued."""
        from .report_export import project_report_job

        run = self.session.runs.get(fact_key(self.current_fact)) if self.current_fact is not None else None
        job = project_report_job(path, self.session, self.edits.commands(), run, self.attribution_panel,
                                 self.project.path)
        self.runner.submit(f"Exporting the report to {Path(path).name}", job,  # a failure: the window's error
                           on_done=lambda written: self.status(f"Report written to {written}."), uses=(),
                           project_bound=False)
        return True

    def open_scores_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self, "Open scores", self._start_folder(),
                                              "Scores (kn attribute --save) (*.npz);;All (*)")
        if path:
            self.open_scores(path)

    def open_scores(self, path: str) -> bool:
        """A `kn attribute --save` file as a run of the project (undoable: its fact is added to the fact set)."""
        from kn_core.scores_file import ScoresFileError, load_scores

        from .open_scores import SCORES_RELATION, same_scores, scores_run

        s = self.session
        try:
            run = scores_run(load_scores(path), path, s.lm)
        except ScoresFileError as exc:
            self.show_error("Could not open the scores", f"{exc}.")
            return False
        key, name = fact_key(run.fact), Path(path).name
        shown = run.fact in s.factset.facts
        earlier = s.runs.get(key)
        if shown and earlier is not None and not same_scores(earlier, run):
            self.show_error("Could not open the scores", f"{name}: a different run for this prompt and answer is "
                            f"already open ({run.fact.subject!r} \u2192 {run.fact.object!r}); delete that fact "
                            "first to replace it.")
            return False
        again = shown and earlier is not None
        if not again:  # a fact deleted earlier (its run left behind) comes back with this file's run
            fs = s.factset
            if SCORES_RELATION.id not in fs.relations:
                fs = fs.with_relation(SCORES_RELATION)
            if not shown:
                fs = fs.with_fact(run.fact)
            s.runs[key] = run
            self._push_factset(f"Open scores {name}", fs)
            self._mark_dirty()
        self.facts_panel.select_fact(run.fact)
        self.select_fact(run.fact)
        self.status(f"Opened {name} as a run: {run.fact.subject!r} \u2192 {run.fact.object!r}"
                    + (" (already open)." if again else "."))
        return True

    def export_model_dialog(self):
        folder = QFileDialog.getExistingDirectory(self, "Export the edited model to folder", self._start_folder())
        if folder:
            self.export_model(folder)

    def export_model(self, folder: str):
        if not self._need_model() or not self._need_free("export the model"):
            return
        from kn_core.edit_stack import export_model

        lm, stack = self.session.lm, self.edit_stack

        def done(info):
            skipped = info.get("skipped") or []
            note = f"; {len(skipped)} answer-position edit(s) cannot be weights and were left out" if skipped else ""
            self.status(f"Model with {len(info.get('edits', []))} edit(s) saved to {folder}{note}.")

        self.runner.submit(f"Exporting the model to {folder}",
                           lambda task: export_model(lm, stack, folder, skip_unexportable=True), on_done=done,
                           project_bound=False)

    def about(self):
        QMessageBox.about(self, "Knowledge Neuron Studio", about_text())

    def shortcuts(self) -> list[tuple[str, str]]:
        """(action, shortcut) for every action of the window that has one, in menu order."""
        from PySide6.QtGui import QAction

        seen, rows = set(), []
        for action in self.findChildren(QAction):
            keys = ", ".join(k.toString(QKeySequence.NativeText) for k in action.shortcuts())
            name = action.text().replace("&", "").replace("\u2026", "")
            if keys and name and (name, keys) not in seen:
                seen.add((name, keys))
                rows.append((name, keys))
        return rows

    def show_shortcuts(self):
        rows = "".join(f"<tr><td>{name}</td><td><b>{keys}</b></td></tr>" for name, keys in self.shortcuts())
        box = QMessageBox(QMessageBox.Information, "Keyboard shortcuts", f"<table cellpadding=3>{rows}</table>"
                          "<p>In the map: click selects a neuron, Ctrl-click adds, the wheel zooms, drag pans.</p>",
                          QMessageBox.Ok, self)
        box.open()
        return box

    def open_docs(self):
        from PySide6.QtCore import QUrl
        from PySide6.QtGui import QDesktopServices

        readme = Path(__file__).resolve().parent.parent / "README.md"
        if not readme.exists() or not QDesktopServices.openUrl(QUrl.fromLocalFile(str(readme))):
            self.status(f"The documentation is {readme} and the docs/ folder beside it; no viewer could open it "
                        "here.", 15000)

    # ----------------------------------------------------------------------------------------- runs, batch edits
    def show_runs(self):
        """Run → Runs… (Ctrl+R): the runs of the selected fact or of the project (panels/runs_browser.py)."""
        from .commands import RenameRunCommand, RunsCommand
        from .panels.runs_browser import RunsDialog

        s, facts = self.session, self.history.facts
        dialog = RunsDialog(s, self.current_fact, self)
        dialog.open_requested.connect(lambda run: self.history.push(facts, RunsCommand(
            s, f"Open the {run.state} run of {fact_label(run.fact)}", lambda: s.make_current(run))))
        dialog.delete_requested.connect(lambda run: self.history.push(facts, RunsCommand(
            s, f"Delete a {run.state} run of {fact_label(run.fact)}", lambda: s.delete_run(run))))
        dialog.rename_requested.connect(lambda run, name: self.history.push(facts, RenameRunCommand(run, name)))
        facts.indexChanged.connect(dialog.refresh)
        dialog.finished.connect(lambda _: facts.indexChanged.disconnect(dialog.refresh))
        self.runs_dialog = dialog
        dialog.open()
        return dialog

    def batch_edit(self, facts):
        """The Edits panel's request on each selected fact; facts without a run are named before anything runs
        (a question, or in quiet mode the status bar) and left out."""
        missing = self.batch.unattributed(list(facts))
        if missing and len(missing) < len(facts):
            names = ", ".join(fact_label(f) for f in missing[:4]) + (f" and {len(missing) - 4} more"
                                                                       if len(missing) > 4 else "")
            note = (f"{len(missing)} of the {len(facts)} selected facts have no attribution run and will be "
                    f"skipped: {names}.")
            if self.quiet:
                self.status(note, 20000)
            elif QMessageBox.question(self, "Skip facts without a run?", note + " Edit the other "
                                      f"{len(facts) - len(missing)}?") != QMessageBox.Yes:
                return
        self._try(self.batch.apply, self.edits_panel.current_request(), list(facts))

    # ----------------------------------------------------------------------------------------- projects and facts
    def import_facts(self, path: str) -> bool:
        from kn_core.fact_files import import_facts

        try:
            imported = import_facts(path)
        except Exception as exc:  # noqa: BLE001 - FactImportError names file, line and problem
            self.show_error("Could not import the facts", f"{exc}. Fix the file (or pick another) and import again.")
            return False
        merged, added = merge_factsets(self.session.factset, imported)
        self._push_factset(f"Import {added} facts from {Path(path).name}", merged)
        self.status(f"Imported {added} new facts ({len(imported.relations)} relations) from {Path(path).name}.")
        return True

    def _project_event(self, ev):
        if isinstance(ev, P.ProjectOpened):
            self._project_loaded(ev)
        elif isinstance(ev, P.ProjectSaved):
            self._add_recent(ev.path)
            self._update_title()
            self.project_saved.emit(ev.path)
            self.status(f"Saved {ev.path}.")
        elif isinstance(ev, P.Autosaved) and ev.error:
            self.status(f"Autosave to {ev.path} failed: {ev.error}", 15000)

    def _project_loaded(self, ev):
        snap, s = ev.snapshot, self.session
        self.attribution_panel.set_thresholds(s.t, s.p)
        self.attribution_panel.set_causal_templates(s.causal_templates)
        self.attribution_panel.set_prompt_format(s.prompt_format)
        self._prompt_format_changed(s.prompt_format)  # the project's prompt format, on the loaded model
        self.facts_panel.rebuild()
        self.current_fact = None
        self.attribution_panel.show_run(None)
        self.edits_panel.show_report(None)
        self._sets_changed()
        self.edits.pending = None
        if snap.edit_state and snap.edit_state.get("entries"):
            self._restore_history(snap.edit_state, snap.edit_sha)
        self.history.set_clean()
        self._flags_for_model()
        first = next(iter(s.runs.values()), None)
        if first is not None:
            self.facts_panel.select_fact(first.fact)
            self.select_fact(first.fact)
        if not ev.recovered:
            self._add_recent(snap.path)
        self._update_title()
        self.project_opened.emit(snap.path)
        what = "Recovered unsaved work" if ev.recovered else f"Opened {snap.path}"
        self.status(f"{what}: {len(s.factset.facts)} facts, {len(s.runs)} runs, {len(s.neuron_sets)} neuron sets.")

    def new_project(self):
        if not self._confirm_discard() or not self._need_free("start a new project", "session"):
            return
        self.project.new()
        s = self.session
        s.factset = starter_factset()
        s.runs.clear()
        s.partial_runs.clear()
        s.earlier_runs.clear()
        s.neuron_sets.clear()
        s.results_dirty = False
        self.current_fact = None
        self.facts_panel.rebuild()
        self.attribution_panel.show_run(None)
        self.neurons_panel.refresh()
        self.edits_panel.show_report(None)
        self._sets_changed()
        self._update_title()
        self.status("New project.")

    def open_project(self, path: str):
        if not self._confirm_discard():
            return
        try:
            self.project.open(path)
        except UserError as exc:
            self.show_error(exc.title, str(exc))
            if exc.title == "Project not found":
                self._forget_recent(path)

    def save(self, wait: bool = False) -> bool:
        if self.project.path is None:
            return self.save_as(wait=wait)
        return self.save_to(self.project.path, wait=wait)

    def save_to(self, path: str, wait: bool = False) -> bool:
        """Queues the save; with `wait`, returns whether it reached the disk."""
        if not self._need_free("save", "session"):
            return False
        saved = []
        self.project_saved.connect(saved.append)
        try:
            self.project.save_to(path)
            if wait:
                self.runner.wait_idle(120000)
        finally:
            self.project_saved.disconnect(saved.append)
        return bool(saved) or not wait

    def offer_recovery(self) -> bool:
        """At start: autosave files a killed app left behind are offered for recovery. True if one was opened."""
        found = self.project.recoverable()
        if not found:
            return False
        path = max(found, key=os.path.getmtime)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
        if self.quiet:
            recover = self.auto_recover
        else:
            recover = QMessageBox.question(
                self, "Recover unsaved work?", f"Knowledge Neuron Studio did not close cleanly. Unsaved work from "
                f"{when} was autosaved ({path}). Recover it? (No keeps the file for later.)") == QMessageBox.Yes
        if recover:
            self.project.open(path, recovered=True)
        return recover
