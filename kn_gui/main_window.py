"""The main window: docks, menus, toolbar, status bar; it wires the panels to the session, the worker and the
undo stack. No tensor math here: every model call goes to kn_core, inside a worker job."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QIcon, QKeySequence, QUndoStack
from PySide6.QtWidgets import (QApplication, QDockWidget, QFileDialog, QLabel, QMainWindow, QMessageBox,
                               QProgressBar, QPushButton, QWidget)

from kn_core.facts import Fact

from .commands import EditCommand, FactSetCommand
from .panels.attribution_panel import AttributionPanel
from .panels.common import write_json
from .panels.edits_panel import EditsPanel
from .panels.facts_panel import FactsPanel
from .panels.model_panel import ModelPanel
from .panels.neurons_panel import NeuronsPanel
from .session import NeuronSet, Run, Session, fact_key, fact_label, starter_factset
from .worker import JobRunner

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
APP_NAME = "Knowledge Neuron Studio"
MAX_RECENT = 8
AUTO_CHECK_PROMPTS = 400
CONTROLS_SAME, CONTROLS_OTHER = 4, 4


class MainWindow(QMainWindow):
    model_loaded = Signal(object)
    run_finished = Signal(object)  # the Run
    edit_evaluated = Signal(dict)
    project_opened = Signal(str)
    project_saved = Signal(str)
    error_shown = Signal(str, str)

    def __init__(self, load_model_fn=None, factset=None, settings: QSettings | None = None, parent=None,
                 confirm_dialogs: bool = True):
        super().__init__(parent)
        self.setWindowTitle(APP_NAME)
        icon = RESOURCES / "icon.svg"
        if icon.exists():
            self.setWindowIcon(QIcon(str(icon)))
        self.setObjectName("MainWindow")
        self.settings = settings or QSettings("KnowledgeNeuronStudio", "Studio")
        if load_model_fn is None:
            from kn_core.models import load_model as load_model_fn
        self._load_model_fn = load_model_fn
        self.session = Session(factset if factset is not None else starter_factset())
        self.undo_stack = QUndoStack(self)
        self.runner = JobRunner(self)
        self.edit_stack = None
        self.project_path: str | None = None
        self.pending_history = None  # (state, sha) from an opened project, waiting for its model
        self.current_fact: Fact | None = None
        self.quiet = not confirm_dialogs  # tests: errors go to the status bar and error_shown, no modal dialog
        self.last_error: tuple[str, str] | None = None
        self._running_runs: list[Run] = []

        self._build_panels()
        self._build_actions()
        self._build_menus()
        self._build_status()
        self._connect()
        self._restore_layout()
        self._update_title()
        self._update_actions()
        if not self.session.factset.facts and "unavailable" in self.session.factset.name:
            self.status("Built-in facts are unavailable; import a fact set (File \u2192 Import facts).")

    # ================================================================= construction
    def _dock(self, title: str, widget: QWidget, area, name: str) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable
                         | QDockWidget.DockWidgetClosable)
        self.addDockWidget(area, dock)
        return dock

    def _build_panels(self):
        s = self.session
        self.model_panel = ModelPanel()
        self.facts_panel = FactsPanel(s)
        self.attribution_panel = AttributionPanel(s)
        self.neurons_panel = NeuronsPanel(s)
        self.edits_panel = EditsPanel(s, self.undo_stack)
        self.setCentralWidget(self.attribution_panel)
        self.model_dock = self._dock("Model", self.model_panel, Qt.LeftDockWidgetArea, "dock_model")
        self.facts_dock = self._dock("Facts", self.facts_panel, Qt.LeftDockWidgetArea, "dock_facts")
        self.tabifyDockWidget(self.model_dock, self.facts_dock)
        self.neurons_dock = self._dock("Neurons", self.neurons_panel, Qt.RightDockWidgetArea, "dock_neurons")
        self.edits_dock = self._dock("Edits and history", self.edits_panel, Qt.BottomDockWidgetArea, "dock_edits")
        self.model_dock.raise_()
        self.resizeDocks([self.model_dock, self.neurons_dock], [470, 420], Qt.Horizontal)
        self.resizeDocks([self.edits_dock], [270], Qt.Vertical)

    def _action(self, text, slot, shortcut=None, tip="", icon=None) -> QAction:
        action = QAction(text, self)
        action.triggered.connect(slot)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(tip + (f" ({QKeySequence(shortcut).toString()})" if shortcut else ""))
        return action

    def _build_actions(self):
        self.act_new = self._action("&New project", self.new_project, QKeySequence.New, "Start an empty project")
        self.act_open = self._action("&Open project\u2026", self.open_project_dialog, QKeySequence.Open,
                                     "Open a .knproj project")
        self.act_save = self._action("&Save", self.save, QKeySequence.Save, "Save the project")
        self.act_save_as = self._action("Save &as\u2026", self.save_as, QKeySequence.SaveAs,
                                        "Save the project under a new name")
        self.act_import = self._action("&Import facts\u2026", self.import_facts_dialog, "Ctrl+I",
                                       "Import a PARAREL folder, CSV or JSONL")
        self.act_import_pararel = self._action("Import PARAREL &folder\u2026", self.import_pararel_dialog, None,
                                               "Import a PARAREL folder (pattern files + TREx facts)")
        self.act_export_facts = self._action("Export facts\u2026", self.export_facts_dialog, None,
                                             "Save the fact set as CSV or JSONL")
        self.act_export_plots = self._action("Export plots (PNG/SVG)\u2026", self.export_plots_dialog, None,
                                             "Save the three plots as PNG or SVG")
        self.act_export_json = self._action("Export results (JSON)\u2026", self.export_results_dialog, None,
                                            "Runs, neuron sets and edits as JSON")
        self.act_export_table = self._action("Export before/after table (CSV)\u2026",
                                             lambda: self.edits_panel.table.export_csv_dialog(self, "edit.csv"))
        self.act_export_model = self._action("Export edited model\u2026", self.export_model_dialog, None,
                                             "Save the model with its active edits to a folder")
        self.act_quit = self._action("&Quit", self.close, QKeySequence.Quit)
        self.act_undo = self._action("&Undo", self.undo, QKeySequence.Undo, "Undo the last change")
        self.act_redo = self._action("&Redo", self.redo, QKeySequence("Ctrl+Shift+Z"), "Redo")
        self.act_redo.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
        self.act_load = self._action("&Load model", self.model_panel._load, "Ctrl+L", "Load the chosen model")
        self.act_run = self._action("&Run attribution", lambda: self.run_attribution("current"), "F5",
                                    "Attribute every prompt of the current fact")
        self.act_run_sel = self._action("Run &selected facts", lambda: self.run_attribution("selection"),
                                        "Shift+F5", "Attribute every fact selected in the Facts panel")
        self.act_check = self._action("&Check prompts", lambda: self.check_facts(self.facts_panel.selected_facts()
                                                                                  or self.session.factset.facts),
                                      "F6", "Ask the model for each prompt's answer")
        self.act_cancel = self._action("&Cancel", self.cancel_job, "Esc", "Cancel the running job")
        self.act_reset_layout = self._action("Reset layout", self.reset_layout)
        self.act_about = self._action("&About", self.about)
        self.undo_stack.canUndoChanged.connect(self._update_actions)
        self.undo_stack.canRedoChanged.connect(self._update_actions)

    def _build_menus(self):
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        file_menu.addActions([self.act_new, self.act_open])
        self.recent_menu = file_menu.addMenu("Open &recent")
        file_menu.addActions([self.act_save, self.act_save_as])
        file_menu.addSeparator()
        file_menu.addActions([self.act_import, self.act_import_pararel, self.act_export_facts])
        export = file_menu.addMenu("&Export")
        export.addActions([self.act_export_plots, self.act_export_table, self.act_export_json,
                           self.act_export_model])
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
        view_menu = bar.addMenu("&View")
        for dock in (self.model_dock, self.facts_dock, self.neurons_dock, self.edits_dock):
            view_menu.addAction(dock.toggleViewAction())
        view_menu.addSeparator()
        view_menu.addAction(self.act_reset_layout)
        help_menu = bar.addMenu("&Help")
        help_menu.addAction(self.act_about)

        tb = self.addToolBar("Main")
        tb.setObjectName("toolbar_main")
        tb.setToolButtonStyle(Qt.ToolButtonTextOnly)
        tb.addActions([self.act_new, self.act_open, self.act_save])
        tb.addSeparator()
        tb.addActions([self.act_undo, self.act_redo])
        tb.addSeparator()
        tb.addActions([self.act_load, self.act_check, self.act_run, self.act_cancel])
        self._rebuild_recent()

    def _build_status(self):
        sb = self.statusBar()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setFixedWidth(220)
        self.progress.setVisible(False)
        self.eta = QLabel("")
        self.eta.setMinimumWidth(170)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("danger")
        self.cancel_button.clicked.connect(self.cancel_job)
        self.cancel_button.setVisible(False)
        self.model_label = QLabel("no model")
        self.model_label.setObjectName("hint")
        sb.addPermanentWidget(self.eta)
        sb.addPermanentWidget(self.progress)
        sb.addPermanentWidget(self.cancel_button)
        sb.addPermanentWidget(self.model_label)

    def _connect(self):
        r = self.runner
        r.job_started.connect(self._job_started)
        r.job_progress.connect(self._job_progress)
        r.job_ended.connect(self._job_ended)
        r.busy_changed.connect(self._busy_changed)
        self.undo_stack.cleanChanged.connect(lambda _: self._update_title())
        self.undo_stack.indexChanged.connect(self._undo_index_changed)
        mp = self.model_panel
        mp.load_requested.connect(self.load_model)
        fp = self.facts_panel
        fp.fact_selected.connect(self.select_fact)
        fp.change_requested.connect(self._push_factset)
        fp.import_requested.connect(self.import_facts_dialog)
        fp.check_requested.connect(self.check_facts)
        fp.error.connect(self.show_error)
        ap = self.attribution_panel
        ap.run_requested.connect(self.run_attribution)
        ap.thresholds_changed.connect(self._thresholds_changed)
        ap.neurons_selected.connect(self._neurons_selected)
        ap.neuron_clicked.connect(self.inspect_neuron)
        ap.adapt_p_requested.connect(self.adapt_p)
        ap.relation_set_requested.connect(self.make_relation_set)
        np_ = self.neurons_panel
        np_.select_neurons.connect(self._select_from_set)
        np_.inspect_requested.connect(self.inspect_neuron)
        np_.sets_changed.connect(self._sets_changed)
        np_.error.connect(self.show_error)
        np_.message.connect(self.status)
        ep = self.edits_panel
        ep.apply_requested.connect(self.apply_edit)
        ep.message.connect(self.status)

    # ================================================================= layout, title, recent
    def _restore_layout(self):
        self._default_state = self.saveState()
        geometry = self.settings.value("window/geometry")
        state = self.settings.value("window/state")
        if isinstance(geometry, (QByteArray, bytes)):
            self.restoreGeometry(geometry)
        else:
            self.resize(1500, 950)
        if isinstance(state, (QByteArray, bytes)):
            self.restoreState(state)

    def reset_layout(self):
        self.restoreState(self._default_state)

    def _update_title(self):
        name = Path(self.project_path).name if self.project_path else "untitled"
        self.setWindowTitle(f"{name}[*] \u2014 {APP_NAME}")
        self.setWindowModified(self.is_modified())

    def is_modified(self) -> bool:
        return (not self.undo_stack.isClean()) or self.session.results_dirty

    def _mark_dirty(self):
        self.session.results_dirty = True
        self._update_title()

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

    def _rebuild_recent(self):
        self.recent_menu.clear()
        recent = self.recent_projects()
        for path in recent:
            self.recent_menu.addAction(self._action(Path(path).name, lambda _=False, p=path: self.open_project(p),
                                                    tip=path))
        self.recent_menu.setEnabled(bool(recent))

    # ================================================================= status, errors, jobs
    def status(self, message: str, timeout_ms: int = 8000):
        self.statusBar().showMessage(message, timeout_ms)

    def show_error(self, title: str, message: str):
        """Every failure ends here: a dialog (or, in tests, the status bar) saying what happened and what to do."""
        self.last_error = (title, message)
        self.status(f"{title}: {message}", 15000)
        self.error_shown.emit(title, message)
        if not self.quiet:
            box = QMessageBox(QMessageBox.Warning, title, message, QMessageBox.Ok, self)
            box.setWindowModality(Qt.WindowModal)
            box.open()  # not exec(): the event loop (and the worker's signals) keep running

    def _job_started(self, name: str):
        self.progress.setVisible(True)
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.cancel_button.setVisible(True)
        self.eta.setText(name)
        self.status(name + "\u2026", 0)

    def _job_progress(self, fraction: float, message: str, eta: float):
        if fraction < 0:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(fraction * 1000))
        eta_text = ""
        if eta >= 0:
            eta_text = f"ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        self.eta.setText(eta_text)
        if message:
            self.statusBar().showMessage(message, 0)

    def _job_ended(self, name: str, outcome: str, message: str):
        if outcome == "failed":
            self.show_error(f"{name} failed", message)
        elif outcome == "cancelled":
            self.status(f"{name}: cancelled.")
        else:
            if self.statusBar().currentMessage().endswith("\u2026") or not self.statusBar().currentMessage():
                self.status(f"{name}: done.")

    def _busy_changed(self, busy: bool):
        self.progress.setVisible(busy)
        self.cancel_button.setVisible(busy)
        if not busy:
            self.eta.setText("")
        self.attribution_panel.set_running(busy, self.session.lm is not None)
        self.edits_panel.set_busy(busy, self.session.lm is not None)
        self.model_panel.set_loading(busy)
        self._update_actions()

    def _update_actions(self, *_):
        busy = self.runner.busy
        index = self.undo_stack.index()
        self.act_undo.setEnabled(self.undo_stack.canUndo() and not (busy and self._touches_model(index - 1)))
        self.act_redo.setEnabled(self.undo_stack.canRedo() and not (busy and self._touches_model(index)))
        self.act_undo.setText("&Undo " + self.undo_stack.undoText() if self.undo_stack.canUndo() else "&Undo")
        self.act_redo.setText("&Redo " + self.undo_stack.redoText() if self.undo_stack.canRedo() else "&Redo")
        self.act_cancel.setEnabled(busy)
        has_model = self.session.lm is not None
        for a in (self.act_run, self.act_run_sel, self.act_check, self.act_export_model):
            a.setEnabled(has_model and not busy)
        self.attribution_panel.set_running(busy, has_model)
        self.edits_panel.set_busy(busy, has_model)
        self.act_load.setEnabled(not busy)

    def cancel_job(self):
        if self.runner.busy:
            self.runner.cancel()
            self.status("Cancelling\u2026 (the job stops at the next batch)")

    def _need_model(self) -> bool:
        if self.session.lm is None:
            self.show_error("No model loaded", "Load a model first: Model panel \u2192 Load model (Ctrl+L). The "
                            "embedded default works offline.")
            return False
        return True

    def _need_idle(self, what: str) -> bool:
        if self.runner.busy:
            self.show_error("Busy", f"Cannot {what} while \u201c{self.runner.current.name}\u201d runs: wait for it "
                            "or press Cancel (Esc).")
            return False
        return True

    # ================================================================= model
    def load_model(self, source: str = "default", device: str = "auto", dtype: str = "auto"):
        if not self._need_idle("load a model"):
            return
        if self.edit_stack is not None and self.edit_stack.active_edits():
            if not self.quiet and QMessageBox.question(
                    self, "Replace the model?", "The current model has active edits. Loading another model "
                    "drops them from the history (save the project first to keep them). Continue?") \
                    != QMessageBox.Yes:
                return
        fn = self._load_model_fn
        self.model_panel.set_loading(True, f"Loading {source}\u2026")

        def job(ctx):
            return fn(source, device=device, dtype=dtype, task=ctx.task())

        def failed(message, tb):
            self.model_panel.set_loading(False, f"Could not load {source}. See the message for what to do.")

        self.runner.submit(f"Loading model {source}", job, on_done=self.set_model, on_error=failed,
                           on_cancel=lambda: self.model_panel.set_loading(False, "Loading cancelled."))

    def set_model(self, lm):
        """Makes `lm` (a kn_core LoadedModel) the window's model. Tests pass tiny models here directly."""
        from kn_core.edits import EditStack

        if self.edit_stack is not None:
            self.edit_stack.clear()
            had_edits = any(isinstance(self.undo_stack.command(i), EditCommand)
                            for i in range(self.undo_stack.count()))
            if had_edits:
                if not self.undo_stack.isClean():
                    self.session.results_dirty = True
                self.undo_stack.clear()
        self.session.lm = lm
        self.session.checks.clear()
        self.edit_stack = EditStack(lm)
        self.model_panel.show_model(lm)
        info = lm.describe()
        self.model_label.setText(f"{info.get('name') or lm.source} \u00b7 {lm.family} \u00b7 {lm.layout.layers}\u00d7"
                                 f"{lm.layout.neurons} \u00b7 {info['device']}")
        self.facts_panel.rebuild()
        self._apply_pending_history()
        self._update_actions()
        self.model_loaded.emit(lm)
        self.status(f"Model ready: {info.get('name') or lm.source} ({lm.family}, {lm.layout.layers} layers \u00d7 "
                    f"{lm.layout.neurons} neurons).")
        n_prompts = sum(len(f.relation and self.session.factset.relation(f.relation).templates)
                        for f in self.session.factset.facts)
        if 0 < n_prompts <= AUTO_CHECK_PROMPTS:
            self.check_facts(list(self.session.factset.facts))
        if self.current_fact is not None:
            self.select_fact(self.current_fact)

    # ================================================================= facts
    def _push_factset(self, text: str, new_factset):
        self.undo_stack.push(FactSetCommand(self.session, new_factset, text, self._factset_changed))

    def _factset_changed(self):
        self.facts_panel.rebuild()
        self._update_title()

    def import_facts_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self, "Import facts", "", "Fact sets (*.jsonl *.csv *.json);;All (*)")
        if path:
            self.import_facts(path)

    def import_pararel_dialog(self):
        folder = QFileDialog.getExistingDirectory(self, "Import a PARAREL folder")
        if folder:
            self.import_facts(folder)

    def import_facts(self, path: str):
        from kn_core.facts import import_facts

        try:
            imported = import_facts(path)
        except Exception as exc:  # noqa: BLE001 - FactImportError names file, line and problem
            self.show_error("Could not import the facts", f"{exc}. Fix the file (or pick another) and import again.")
            return False
        fs = self.session.factset
        merged = fs
        added = 0
        for relation in imported.relations.values():
            if relation.id in merged.relations:
                old = merged.relation(relation.id)
                templates = old.templates + tuple(t for t in relation.templates if t not in old.templates)
                merged = merged.with_relation(type(old)(old.id, old.name or relation.name, templates))
            else:
                merged = merged.with_relation(relation)
        present = set(merged.facts)
        for fact in imported.facts:
            if fact not in present:
                merged = merged.with_fact(fact)
                present.add(fact)
                added += 1
        self._push_factset(f"Import {added} facts from {Path(path).name}", merged)
        self.status(f"Imported {added} new facts ({len(imported.relations)} relations) from {Path(path).name}.")
        return True

    def export_facts_dialog(self):
        from kn_core.facts import export_facts

        path, _ = QFileDialog.getSaveFileName(self, "Export facts", "facts.jsonl", "JSONL (*.jsonl);;CSV (*.csv)")
        if not path:
            return
        try:
            export_facts(self.session.factset, path)
        except Exception as exc:  # noqa: BLE001
            self.show_error("Could not export the facts", f"{exc}. Choose another file name or folder.")
            return
        self.status(f"Facts exported to {path}.")

    def check_facts(self, facts):
        if not facts or self.session.lm is None:
            if self.session.lm is None:
                self._need_model()
            return
        lm = self.session.lm
        items = []
        for fact in facts:
            prompts, _ = self.session.prompts_for(fact)
            items.extend(prompts)
        if not items:
            self.status("No prompts to check (no templates usable for this model).")
            return
        from kn_core.evaluation import answer_probabilities

        def job(ctx):
            results = answer_probabilities(lm, items, progress=lambda f, _=None: ctx.progress(f, "checking prompts"),
                                           cancel=ctx.cancel)
            return list(zip(items, results))

        def done(pairs):
            if self.session.lm is not lm:
                return
            touched = []
            for prompt, result in pairs:
                self.session.checks[(fact_key(prompt.fact), prompt.template)] = {
                    "correct": bool(result["correct"]), "prob": float(result["prob"]),
                    "top1_token": result["top1_token"]}
                if prompt.fact not in touched:
                    touched.append(prompt.fact)
            if len(touched) > 30:
                self.facts_panel.rebuild()
            else:
                for fact in touched:
                    self.facts_panel.refresh_fact(fact)
            ok = sum(r["correct"] for _, r in pairs)
            self.status(f"Checked {len(pairs)} prompts: the model answers {ok} correctly (\u2714).")

        self.runner.submit(f"Checking {len(items)} prompts", job, on_done=done)

    def select_fact(self, fact: Fact | None):
        same = fact is not None and fact == self.current_fact
        self.current_fact = fact
        if fact is None:
            return
        run = self.session.runs.get(fact_key(fact))
        if same and run is self.attribution_panel.run:
            return
        self.attribution_panel.show_run(run)
        self.neurons_panel.set_run(run)
        self.edits_panel.set_objects([o for o in self.session.factset.objects_of(fact.relation) if o != fact.object])
        if (self.session.lm is not None and not self.runner.busy and
                self.session.factset.relations.get(fact.relation) is not None and
                not any(self.session.check_for(fact, t) for t in self.session.factset.relation(fact.relation).templates)):
            self.check_facts([fact])  # a handful of prompts: the marker appears as soon as the fact is picked
        if run is not None:
            self._update_auto_sets(run)

    # ================================================================= attribution
    def run_attribution(self, which: str = "current"):
        if not self._need_model():
            return
        if which == "selection":
            facts = self.facts_panel.selected_facts()
            if not facts:
                self.show_error("No facts selected", "Select facts (or a relation) in the Facts panel, then run.")
                return
        else:
            fact = self.facts_panel.current_fact() or self.current_fact
            if fact is None:
                self.show_error("No fact selected", "Pick a fact in the Facts panel (click it), then press F5.")
                return
            facts = [fact]
        try:
            params = self.attribution_panel.params()
        except ValueError as exc:
            self.show_error("Invalid parameters", f"{exc}.")
            return
        lm = self.session.lm
        runs, skipped = [], []
        for fact in facts:
            prompts, skips = self.session.prompts_for(fact)
            if not prompts:
                reasons = "; ".join(s.reason for s in skips[:2]) or "the relation has no templates"
                skipped.append(f"{fact_label(fact)} ({reasons})")
                continue
            runs.append(Run(fact=fact, prompts=prompts, params=params.to_dict(), model=lm.describe()))
        if skipped and not runs:
            self.show_error("Nothing to attribute", "No usable prompts for: " + "; ".join(skipped)
                            + ". Add templates whose [Y] is at the end (causal models) or fix the facts.")
            return
        if skipped:
            self.status("Skipped (no usable prompts): " + "; ".join(skipped))
        previous = {fact_key(r.fact): self.session.runs.get(fact_key(r.fact)) for r in runs}
        for run in runs:
            self.session.runs[fact_key(run.fact)] = run
        self._running_runs = runs
        first = runs[0]
        if self.current_fact != first.fact:
            self.facts_panel.select_fact(first.fact)
        self.select_fact(first.fact)
        self.attribution_panel.show_run(first)
        total = sum(len(r.prompts) for r in runs)
        from kn_core.attribution import attribute_fact

        def job(ctx):
            done = 0
            for ri, run in enumerate(runs):
                n = len(run.prompts)

                def progress(fraction, message, ri=ri, run=run, n=n, base=done):
                    ctx.progress((base + fraction * n) / total, f"attributing {fact_label(run.fact)}: {message}"
                                 + (f", fact {ri + 1}/{len(runs)}" if len(runs) > 1 else ""))

                def chunk(partial, ri=ri):
                    ctx.partial(("chunk", ri, partial["prompt"], tuple(partial["layers"]), partial["scores"]))

                ctx.check()
                attribute_fact(lm, run.prompts, params, task=ctx.task(progress, chunk),
                               on_prompt=lambda k, result, ri=ri: ctx.partial(("prompt", ri, k, result)))
                done += n
            return len(runs)

        def partial(item):
            kind, ri, k = item[0], item[1], item[2]
            run = runs[ri]
            shown = self.attribution_panel.run is run
            if kind == "chunk":
                if shown and k == len(run.scores):
                    self.attribution_panel.stream_chunk(k, item[3], item[4])
                return
            run.scores.append(item[3])
            run.seconds += item[3].seconds
            if len(run.scores) == len(run.prompts):
                run.complete = True
            if shown:
                self.attribution_panel.prompt_done(k)
                self.neurons_panel.set_run(run)
            if run.complete:
                self._run_complete(run)

        def finished(_):
            self._running_runs = []
            self.status(f"Attribution done: {len(runs)} fact(s), {total} prompts.")

        def cancelled():
            self._running_runs = []
            for run in runs:
                key = fact_key(run.fact)
                if not run.scores:
                    old = previous.get(key)
                    if old is None:
                        self.session.runs.pop(key, None)
                    else:
                        self.session.runs[key] = old
            if self.current_fact is not None:
                self.select_fact(self.current_fact)
            kept = sum(len(r.scores) for r in runs)
            self.status(f"Attribution cancelled; kept {kept} finished prompt(s) of {total}.")
            self.attribution_panel.live.clear()
            self.attribution_panel.redraw()

        self.runner.submit(f"Attribution ({total} prompts)", job, on_done=finished, on_partial=partial,
                           on_cancel=cancelled, on_error=lambda m, tb: cancelled())

    def _run_complete(self, run: Run):
        self._mark_dirty()
        self.facts_panel.refresh_fact(run.fact)
        if self.attribution_panel.run is run:
            self._update_auto_sets(run)
        self.run_finished.emit(run)

    def _update_auto_sets(self, run: Run):
        """The current fact's refined (and union of coarse) neurons as named sets, kept in step with t and p."""
        if not run.scores:
            return
        label = fact_label(run.fact)
        refined = self.session.refined(run)
        self.session.put_set(NeuronSet(f"refined: {label}", "refined", refined, f"{run.fact.relation}, t="
                                       f"{self.session.t:.2f} p={self.session.p:.2f}"))
        coarse = sorted({n for i in range(len(run.scores)) for n in self.session.coarse(run, i)})
        self.session.put_set(NeuronSet(f"coarse: {label}", "coarse", coarse, f"{run.fact.relation}, t="
                                       f"{self.session.t:.2f}"))
        self._sets_changed()

    def _thresholds_changed(self, t: float, p: float):
        run = self.attribution_panel.run
        if run is not None and run.scores:
            self._update_auto_sets(run)
        self._mark_dirty()

    def adapt_p(self):
        fact = self.current_fact
        if fact is None:
            self.show_error("No fact selected", "Pick a fact of the relation whose p should be adapted.")
            return
        try:
            result = self.session.adapt_p(fact.relation)
        except ValueError as exc:
            self.show_error("Cannot adapt p", str(exc))
            return
        self.attribution_panel.set_thresholds(self.session.t, result.p)
        self.attribution_panel._thresholds()
        steps = " \u2192 ".join(f"{p:.2f} ({m:.1f})" for p, m in result.history)
        self.status(f"p adapted for {fact.relation}: {steps}; mean refined neurons per fact "
                    f"{result.mean_neurons:.2f}.")

    def make_relation_set(self):
        fact = self.current_fact
        if fact is None:
            self.show_error("No fact selected", "Pick a fact of the relation first.")
            return
        runs = self.session.relation_runs(fact.relation)
        if not runs:
            self.show_error("No runs", f"Run attribution on some facts of {fact.relation} first.")
            return
        neurons = self.session.relation_level(fact.relation)
        rel = self.session.factset.relations.get(fact.relation)
        name = f"relation: {fact.relation} {rel.name if rel else ''}".strip()
        self.neurons_panel.add_set(NeuronSet(name, "relation", [n for n, _ in neurons],
                                             f"{len(runs)} facts, \u2265 10%"))
        self.status(f"{name}: {len(neurons)} neurons refined for \u2265 10% of {len(runs)} facts.")

    # ================================================================= neurons
    def _neurons_selected(self, neurons):
        self.neurons_panel.set_selection(neurons)
        self.edits_panel.refresh_targets(len(neurons))
        if neurons:
            self.edits_panel.target.setCurrentIndex(0)

    def _select_from_set(self, neurons):
        self.attribution_panel.set_selected(neurons)
        self._neurons_selected(list(map(tuple, neurons)))

    def _sets_changed(self):
        self.neurons_panel.refresh()
        self.edits_panel.refresh_targets()

    def inspect_neuron(self, layer: int, neuron: int):
        lm = self.session.lm
        self.neurons_panel.show_inspection(layer, neuron, None)
        if lm is None:
            return
        from .engine import neuron_tokens

        def job(ctx):
            return neuron_tokens(lm, layer, neuron)

        def done(tokens):
            if self.neurons_panel.inspected == (layer, neuron):
                self.neurons_panel.show_inspection(layer, neuron, tokens)

        self.runner.submit(f"Inspecting L{layer} N{neuron}", job, on_done=done)

    # ================================================================= edits
    def _target_neurons(self, target) -> list[tuple[int, int]]:
        if target is None or target[0] == "selection":
            return list(self.attribution_panel.selected)
        s = self.session.neuron_sets.get(target[1])
        return list(map(tuple, s.neurons)) if s else []

    def _evaluation_prompts(self, facts_main: list[Fact], relation: str):
        """The edited fact(s)' prompts, then controls: other facts of the relation and of other relations."""
        fs = self.session.factset
        rows = []
        for fact in facts_main:
            for p in self.session.prompts_for(fact)[0]:
                rows.append(("fact", p))
        same = [f for f in fs.facts_of(relation) if f not in facts_main][:CONTROLS_SAME]
        for fact in same:
            ps = self.session.prompts_for(fact)[0]
            rows.extend(("same relation", p) for p in ps[:1])
        others = []
        for rid in fs.relations:
            if rid == relation:
                continue
            for fact in fs.facts_of(rid)[:2]:
                others.append(fact)
        for fact in others[:CONTROLS_OTHER]:
            ps = self.session.prompts_for(fact)[0]
            rows.extend(("other relations", p) for p in ps[:1])
        return rows

    def apply_edit(self, request: dict):
        from kn_core import edits as E

        if not self._need_model():
            return
        lm = self.session.lm
        fact = self.current_fact
        kind = request["kind"]
        try:
            if kind == "Erase relation":
                if fact is None:
                    raise ValueError("pick a fact of the relation to erase in the Facts panel")
                runs = self.session.relation_runs(fact.relation)
                if not runs:
                    raise ValueError(f"run attribution on some facts of {fact.relation} first: erase uses the "
                                     "relation's most frequent refined neurons")
                sets = [self.session.refined(r) for r in runs]
                edit = E.make_erase(lm, sets, k=request["k"], fill=request["fill"])
                if not edit.neurons:
                    raise ValueError(f"the runs of {fact.relation} have no refined neurons at t = "
                                     f"{self.session.t:.2f}, p = {self.session.p:.2f}; lower t or p")
                main = self.session.factset.facts_of(fact.relation)[:3]
                title = f"Erase {fact.relation}: {len(edit.neurons)} neurons"
            else:
                neurons = self._target_neurons(request["target"])
                if not neurons:
                    raise ValueError("no neurons to edit: click neurons in the layer \u00d7 neuron plot or choose a "
                                     "neuron set (e.g. the refined set of a fact)")
                if fact is None:
                    raise ValueError("pick the fact to evaluate the edit on in the Facts panel")
                main = [fact]
                if kind == "Suppress":
                    edit = E.Suppress(tuple(neurons), scope=request["scope"])
                elif kind == "Amplify":
                    edit = E.Amplify(tuple(neurons), factor=request["factor"], scope=request["scope"])
                else:
                    new_object = request["new_object"]
                    if not new_object:
                        raise ValueError("type the new object o' (the relation's objects are suggested)")
                    if new_object == fact.object:
                        raise ValueError(f"the new object equals the current one ({fact.object})")
                    old_prompts = self.session.prompts_for(fact)[0]
                    new_prompts = self.session.prompts_for(Fact(fact.relation, fact.subject, new_object))[0]
                    if not old_prompts or not new_prompts:
                        raise ValueError(f"cannot render prompts for {new_object!r} with this model's tokenizer")
                    # the paper leaves out neurons shared with > 10% of the relation's facts: the *other* facts
                    sets = [self.session.refined(r) for r in self.session.relation_runs(fact.relation)
                            if r.fact != fact]
                    edit = E.make_update(lm, neurons, old_prompts[0].answer_ids, new_prompts[0].answer_ids,
                                         relation_neuron_sets=sets, lambda1=request["lambda1"],
                                         lambda2=request["lambda2"])
                    if not edit.neurons:
                        raise ValueError("every chosen neuron is shared by > 10% of the relation's facts, so the "
                                         "update leaves them out; choose other neurons")
                title = f"{edit.describe()} \u2014 evaluated on {fact_label(fact)}"
            L, N = lm.layout.layers, lm.layout.neurons
            bad = [n for n in edit.neurons if not (0 <= n[0] < L and 0 <= n[1] < N)]
            if bad:
                raise ValueError(f"neuron {bad[0]} is outside this model ({L} layers \u00d7 {N} neurons); the set "
                                 "was made on another model")
        except Exception as exc:  # noqa: BLE001
            self.show_error("Cannot apply the edit", f"{exc}.")
            return
        rows = self._evaluation_prompts(main, main[0].relation)
        if not rows:
            self.show_error("Cannot evaluate the edit", "No prompts to evaluate it on with this model.")
            return
        new_rows = []
        if kind == "Update":
            new_fact = Fact(fact.relation, fact.subject, request["new_object"])
            new_rows = self.session.prompts_for(new_fact)[0]
        prompts = [p for _, p in rows]
        from kn_core.evaluation import answer_probabilities

        def measure(ctx):
            out = answer_probabilities(lm, prompts, cancel=ctx.cancel)
            new = answer_probabilities(lm, new_rows, cancel=ctx.cancel) if new_rows else []
            return out, new

        def before_done(result):
            before, new_before = result
            try:  # validate on the real model (the worker is idle now) before it enters the history
                edit.apply(lm).revert()
            except Exception as exc:  # noqa: BLE001
                self.show_error("Cannot apply the edit", f"{exc}.")
                return
            command = EditCommand(self.edit_stack, edit, text=edit.describe(), on_change=self._edit_changed)
            try:
                self.undo_stack.push(command)
            except Exception as exc:  # noqa: BLE001
                self.show_error("Cannot apply the edit", f"{exc}.")
                return
            self.runner.submit("Evaluating the edit (after)", measure,
                               on_done=lambda res: after_done(command, before, new_before, res))

        def after_done(command, before, new_before, result):
            after, new_after = result
            report_rows = []
            for (group, p), b, a in zip(rows, before, after):
                report_rows.append({"group": group, "fact": fact_label(p.fact), "prompt": p.text,
                                    "answer": p.answer, "before": b["prob"], "after": a["prob"],
                                    "top_before": b["top1_token"], "top_after": a["top1_token"]})
            for i, (b, a) in enumerate(zip(new_before, new_after)):
                if i < len(report_rows):
                    report_rows[i]["new_before"] = b["prob"]
                    report_rows[i]["new_after"] = a["prob"]
            report = {"title": title, "rows": report_rows, "edit": edit.to_dict(),
                      "new_object": request.get("new_object") if kind == "Update" else None}
            command.report = report
            self.edits_panel.show_report(report)
            self.status(f"{edit.describe()}: {self.edits_panel.result_summary.text()}", 20000)
            self.edit_evaluated.emit(report)
            self.edits_dock.raise_()

        self.runner.submit("Evaluating the edit (before)", measure, on_done=before_done)

    def _edit_changed(self, command):
        self._update_actions()

    def _undo_index_changed(self, index: int):
        self._update_actions()
        self._update_title()
        report = None
        for i in range(index - 1, -1, -1):
            cmd = self.undo_stack.command(i)
            if isinstance(cmd, EditCommand):
                report = cmd.report
                break
        self.edits_panel.show_report(report)

    def _touches_model(self, index: int) -> bool:
        return 0 <= index < self.undo_stack.count() and isinstance(self.undo_stack.command(index), EditCommand)

    def undo(self):
        """Fact changes undo at any time; model edits wait for an idle worker (the model is in use)."""
        if not self.undo_stack.canUndo():
            return
        if self._touches_model(self.undo_stack.index() - 1) and not self._need_idle("undo an edit"):
            return
        self.undo_stack.undo()

    def redo(self):
        if not self.undo_stack.canRedo():
            return
        if self._touches_model(self.undo_stack.index()) and not self._need_idle("redo an edit"):
            return
        self.undo_stack.redo()

    # ================================================================= projects
    def _confirm_discard(self) -> bool:
        if not self.is_modified():
            return True
        if self.quiet:
            return getattr(self, "auto_discard", False)
        answer = QMessageBox.question(self, "Unsaved changes", "The project has unsaved changes. Save them first?",
                                      QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel)
        if answer == QMessageBox.Save:
            return self.save(wait=True)
        return answer == QMessageBox.Discard

    def _edit_commands(self) -> list[EditCommand]:
        return [self.undo_stack.command(i) for i in range(self.undo_stack.count())
                if isinstance(self.undo_stack.command(i), EditCommand)]

    def new_project(self):
        if not self._confirm_discard() or not self._need_idle("start a new project"):
            return
        if self.edit_stack is not None:
            self.edit_stack.clear()
        self.undo_stack.clear()
        self.session.factset = starter_factset()
        self.session.runs.clear()
        self.session.neuron_sets.clear()
        self.session.results_dirty = False
        self.project_path = None
        self.pending_history = None
        self.current_fact = None
        self.facts_panel.rebuild()
        self.attribution_panel.show_run(None)
        self.neurons_panel.refresh()
        self.edits_panel.show_report(None)
        self._sets_changed()
        self.undo_stack.setClean()
        self._update_title()
        self.status("New project.")

    def open_project_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self, "Open project", "", "Projects (*.knproj);;All (*)")
        if path:
            self.open_project(path)

    def open_project(self, path: str):
        if not self._confirm_discard() or not self._need_idle("open a project"):
            return
        if not os.path.exists(path):
            self.show_error("Project not found", f"{path} does not exist (moved or deleted?). Pick it again with "
                            "File \u2192 Open.")
            recent = [p for p in self.recent_projects() if p != os.path.abspath(path)]
            self.settings.setValue("recent", recent)
            self._rebuild_recent()
            return
        from .project_io import open_project_file

        self.runner.submit(f"Opening {Path(path).name}", lambda ctx: open_project_file(path, ctx),
                           on_done=self._project_loaded)

    def _project_loaded(self, data: dict):
        if self.edit_stack is not None:
            self.edit_stack.clear()
        self.undo_stack.clear()
        s = self.session
        s.factset = data["factset"]
        s.runs = data["runs"]
        s.neuron_sets = {ns.name: ns for ns in data["sets"]}
        s.t, s.p = data["t"], data["p"]
        s.checks = data["checks"] if s.lm is not None else {}
        s.results_dirty = False
        self.project_path = data["path"]
        self.attribution_panel.set_thresholds(s.t, s.p)
        self.pending_history = (data["edit_state"], data["edit_sha"]) if data["edit_state"]["entries"] else None
        self.facts_panel.rebuild()
        self.current_fact = None
        self.attribution_panel.show_run(None)
        self._sets_changed()
        if s.lm is not None:
            self._apply_pending_history()
        elif self.pending_history:
            self.status("The project has saved edits; load its model to re-apply them.")
        first = next(iter(s.runs.values()), None)
        if first is not None:
            self.facts_panel.select_fact(first.fact)
            self.select_fact(first.fact)
        self.undo_stack.setClean()
        s.results_dirty = False
        self._add_recent(data["path"])
        self._update_title()
        self.project_opened.emit(data["path"])
        self.status(f"Opened {data['path']}: {len(s.factset.facts)} facts, {len(s.runs)} runs, "
                    f"{len(s.neuron_sets)} neuron sets.")

    def _apply_pending_history(self):
        if not self.pending_history or self.session.lm is None:
            return
        state, sha = self.pending_history
        lm = self.session.lm
        if sha is not None and sha != lm.sha256:
            self.show_error("Saved edits not applied",
                            "The project's edits were made on another model (weights sha256 "
                            f"{sha[:12]}\u2026, loaded {lm.sha256[:12]}\u2026). They are kept in the file; load the "
                            "model they were made on to re-apply them.")
            return
        from kn_core.edits import edit_from_dict

        self.pending_history = None
        was_clean = self.undo_stack.isClean()
        try:
            commands = []
            for entry in state["entries"]:
                edit = edit_from_dict(entry["edit"])
                cmd = EditCommand(self.edit_stack, edit, text=edit.describe(), on_change=self._edit_changed,
                                  report=entry.get("report"))
                self.undo_stack.push(cmd)
                commands.append(cmd)
            for _ in range(len(commands) - int(state.get("cursor", len(commands)))):
                self.undo_stack.undo()
        except Exception as exc:  # noqa: BLE001
            self.show_error("Saved edits not applied", f"{exc}. The history was left out; the model is unedited.")
            self.edit_stack.clear()
            self.undo_stack.clear()
            return
        if was_clean:
            self.undo_stack.setClean()
        self.status(f"Re-applied {int(state.get('cursor', 0))} saved edit(s) to the model "
                    f"({len(state['entries'])} in the history).")

    def save(self, wait: bool = False) -> bool:
        if self.project_path is None:
            return self.save_as(wait=wait)
        return self.save_to(self.project_path, wait=wait)

    def save_as(self, wait: bool = False) -> bool:
        path, _ = QFileDialog.getSaveFileName(self, "Save project", "project.knproj", "Projects (*.knproj)")
        if not path:
            return False
        if not path.endswith(".knproj"):
            path += ".knproj"
        return self.save_to(path, wait=wait)

    def save_to(self, path: str, wait: bool = False) -> bool:
        if not self._need_idle("save"):
            return False
        from .project_io import save_project, snapshot

        edit_state, reports, model_info = None, [], None
        if self.edit_stack is not None and len(self.edit_stack):
            edit_state = self.edit_stack.to_dict()
            commands = self._edit_commands()
            reports = [c.report for c in commands][:len(edit_state["entries"])]
            reports += [None] * (len(edit_state["entries"]) - len(reports))
            model_info = self.session.lm.describe()
        elif self.pending_history:
            edit_state, model_info = self.pending_history[0], {"sha256": self.pending_history[1], "source": "?"}
            reports = [e.get("report") for e in edit_state["entries"]]
        snap = snapshot(self.session, edit_state, model_info, reports)
        index_at_save = self.undo_stack.index()
        result = {"ok": False}

        def done(saved_path):
            result["ok"] = True
            self.project_path = saved_path
            if self.undo_stack.index() == index_at_save:
                self.undo_stack.setClean()
            self.session.results_dirty = False
            self._add_recent(saved_path)
            self._update_title()
            self.project_saved.emit(saved_path)
            self.status(f"Saved {saved_path}.")

        self.runner.submit(f"Saving {Path(path).name}", lambda ctx: save_project(path, snap, ctx), on_done=done)
        if wait:
            self.runner.wait_idle(120000)
            return result["ok"]
        return True

    # ================================================================= export
    def export_plots(self, folder: str, fmt: str = "png") -> list[str]:
        """The three plots as PNG (pyqtgraph's exporter, 1400 px wide) or SVG (Qt's SVG generator)."""
        import pyqtgraph.exporters as ex
        from PySide6.QtCore import QRect, QSize
        from PySide6.QtGui import QPainter
        from PySide6.QtSvg import QSvgGenerator

        ap = self.attribution_panel
        ap._draw_prompts(force=True)
        written = []
        for name, widget in {"layers": ap.layer_widget, "heatmap": ap.heat_widget,
                             "prompts": ap.prompt_widget}.items():
            path = os.path.join(folder, f"{name}.{fmt}")
            if fmt == "svg":
                size = widget.size() if widget.width() > 50 else QSize(900, 400)
                generator = QSvgGenerator()
                generator.setFileName(path)
                generator.setSize(size)
                generator.setViewBox(QRect(0, 0, size.width(), size.height()))
                generator.setTitle(f"Knowledge Neuron Studio: {name}")
                painter = QPainter(generator)
                try:
                    widget.scene().render(painter, widget.rect().toRectF() if hasattr(widget.rect(), "toRectF")
                                          else widget.rect(), widget.sceneRect())
                finally:
                    painter.end()
            else:
                exporter = ex.ImageExporter(widget.scene())
                exporter.parameters()["width"] = 1400
                exporter.export(path)
            if not os.path.exists(path):
                raise OSError(f"nothing was written to {path}")
            written.append(path)
        return written

    def export_plots_dialog(self):
        folder = QFileDialog.getExistingDirectory(self, "Export plots to folder")
        if not folder:
            return
        fmt = "svg" if (not self.quiet and QMessageBox.question(
            self, "Format", "Save as SVG (vector)? No saves PNG.") == QMessageBox.Yes) else "png"
        try:
            written = self.export_plots(folder, fmt)
        except Exception as exc:  # noqa: BLE001
            self.show_error("Could not export the plots", f"{exc}. Choose a folder you can write to.")
            return
        self.status(f"Wrote {', '.join(Path(p).name for p in written)} to {folder}.")

    def results_dict(self) -> dict:
        s = self.session
        runs = []
        for run in s.runs.values():
            if not run.scores:
                continue
            runs.append({"fact": {"relation": run.fact.relation, "subject": run.fact.subject,
                                  "object": run.fact.object},
                         "params": run.params, "model": run.model, "seconds": run.seconds, "complete": run.complete,
                         "prompts": [{"text": p.text, "answer": p.answer, "prob": ps.prob,
                                      "coarse": [list(n) for n in s.coarse(run, i)]}
                                     for i, (p, ps) in enumerate(zip(run.prompts, run.scores))],
                         "refined": [list(n) for n in s.refined(run)]})
        edits = [{"edit": c.edit.to_dict(), "description": c.text(), "report": c.report}
                 for c in self._edit_commands()]
        return {"t": s.t, "p": s.p, "model": s.lm.describe() if s.lm else None, "runs": runs,
                "neuron_sets": [ns.to_dict() for ns in s.neuron_sets.values()], "edits": edits}

    def export_results_dialog(self):
        path, _ = QFileDialog.getSaveFileName(self, "Export results", "results.json", "JSON (*.json)")
        if not path:
            return
        try:
            write_json(path, self.results_dict())
        except OSError as exc:
            self.show_error("Could not export the results", f"{exc}. Choose a folder you can write to.")
            return
        self.status(f"Results written to {path}.")

    def export_model_dialog(self):
        folder = QFileDialog.getExistingDirectory(self, "Export the edited model to folder")
        if folder:
            self.export_model(folder)

    def export_model(self, folder: str):
        if not self._need_model() or not self._need_idle("export the model"):
            return
        from kn_core.edits import export_model

        lm, stack = self.session.lm, self.edit_stack

        def done(info):
            skipped = info.get("skipped") or []
            note = f"; {len(skipped)} answer-position edit(s) cannot be weights and were left out" if skipped else ""
            self.status(f"Model with {len(info.get('edits', []))} edit(s) saved to {folder}{note}.")

        self.runner.submit(f"Exporting the model to {folder}",
                           lambda ctx: export_model(lm, stack, folder, skip_unexportable=True), on_done=done)

    # ================================================================= misc
    def about(self):
        QMessageBox.about(self, APP_NAME, f"<b>{APP_NAME}</b><p>Find, inspect and edit the feed-forward neurons "
                          "that store facts in pretrained transformers (Dai et al., ACL 2022: Knowledge Neurons in "
                          "Pretrained Transformers).</p>")

    def closeEvent(self, event):
        if not self._confirm_discard():
            event.ignore()
            return
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.runner.shutdown()
        self.undo_stack.blockSignals(True)
        if self.edit_stack is not None:
            self.edit_stack.clear()
        event.accept()
