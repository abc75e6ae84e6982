"""The main window: it builds the panels, docks and controllers and wires them. The work is done by objects it
owns, each holding its own state: `menus` (actions, menus, toolbar, recent projects: menus.py), `docks` (dock
sizes, the saved layout: layout.py), `lifecycle` (new, open, save, recovery: lifecycle.py), `files` (imports,
exports, scores files, the runs browser: actions.py), `attributions` (runs, checks, flags, thresholds:
attribution_flow.py) and `editing` (edits, batch edits, neuron selection: edits_flow.py). The controllers
(kn_gui/controllers) change the session; the attribution panel only emits requests."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QDockWidget, QMainWindow, QMessageBox, QWidget

from kn_core.facts import Fact
from kn_core.history import MODEL, History

from .actions import FileActions
from .attribution_flow import AttributionFlow
from .controllers import UserError
from .controllers import attribution as A
from .controllers.batch import BatchController
from .controllers import edits as E
from .controllers import project as P
from .controllers.trace import TraceController
from .edits_flow import EditsFlow
from .job_status import JobStatus
from .layout import DockLayout, PanelScroll, show_current_page_only
from .lifecycle import ProjectLifecycle
from .menus import WindowMenus
from .panels.attribution_panel import AttributionPanel
from .panels.common import set_settings
from .panels.edits_panel import EditsPanel
from .panels.facts_panel import FactsPanel
from .panels.model_panel import ModelPanel
from .panels.neurons_panel import NeuronsPanel
from .panels.trace_panel import TracePanel
from .commands import QtHistory
from .session import Session, TooCoarse, fact_key, starter_factset
from .worker import JobRunner, collect_garbage_in_gui_thread

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
APP_NAME = "Knowledge Neuron Studio"
AUTOSAVE_MS = 3 * 60 * 1000
RECHECK_DELAY_MS = 300


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
        collect_garbage_in_gui_thread()  # never in the worker thread: see its docstring
        self.setObjectName("MainWindow")
        icon = RESOURCES / "icon.svg"
        if icon.exists():
            self.setWindowIcon(QIcon(str(icon)))
        self.settings = settings or QSettings("KnowledgeNeuronStudio", "Studio")
        set_settings(self.settings)  # export dialogs remember their last folder there
        if load_model_fn is None:
            from kn_core.models import load_model as load_model_fn
        self._load_model_fn = load_model_fn
        self.session = Session(factset if factset is not None else starter_factset())
        self.runner = JobRunner(self)
        self.runner.project_token = lambda: self.session.generation
        self.history = History()  # the one undo history: model edits, fact-set and run changes (kn_core.history)
        self.history_view = QtHistory(self.history, self)
        self.undo_stack = self.history_view.view_stack  # the model edits (the History view shows them)
        self.edits = E.EditsController(self.session, self.runner, self.history, self)
        self.batch = BatchController(self.session, self.runner, self.history, self)
        self.attribution = A.AttributionController(self.session, self.runner, self.edits.active_descriptions, self)
        self.project = P.ProjectController(self.session, self.runner, self.edits, self.settings, self)
        self.current_fact: Fact | None = None
        self.quiet = not confirm_dialogs  # tests: errors go to the status bar and error_shown, no modal dialog
        self.last_error: tuple[str, str] | None = None
        self._recheck = QTimer(self, singleShot=True, interval=RECHECK_DELAY_MS, timeout=self._recheck_now)
        self._autosave_timer = QTimer(self, interval=AUTOSAVE_MS, timeout=self.project.autosave)

        self._build_panels()
        self.docks = DockLayout(self)
        self.lifecycle = ProjectLifecycle(self)
        self.files = FileActions(self)
        self.attributions = AttributionFlow(self)
        self.editing = EditsFlow(self)
        self.menus = WindowMenus(self)
        self.menus.build()
        self._build_status()
        self._connect()
        self.docks.restore()
        self.update_title()
        self.menus.update()
        self._autosave_timer.start()
        if not self.session.factset.facts and "unavailable" in self.session.factset.name:
            self.status("Built-in facts are unavailable; import a fact set (File \u2192 Import facts).")

    @property
    def edit_stack(self):
        return self.edits.edit_stack

    @property
    def project_path(self) -> str | None:
        return self.project.path

    # ================================================================= construction
    def _dock(self, title: str, widget: QWidget, area, name: str) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(PanelScroll(widget))
        dock.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable
                         | QDockWidget.DockWidgetClosable)
        self.addDockWidget(area, dock)
        return dock

    def _build_panels(self):
        s = self.session
        self.model_panel = ModelPanel()
        self.facts_panel = FactsPanel(s)
        self.attribution_panel = AttributionPanel(s)
        self.trace_panel = TracePanel()  # causal tracing, a tab beside the attribution map
        self.attribution_panel.tabs.addTab(self.trace_panel, "Causal trace")
        self.trace = TraceController(s, self.runner, self.trace_panel, lambda: self.current_fact, self.status, self)
        self.neurons_panel = NeuronsPanel(s)
        self.edits_panel = EditsPanel(s, self.undo_stack)
        show_current_page_only(self.edits_panel.pages)
        self.setCentralWidget(PanelScroll(self.attribution_panel))
        self.model_dock = self._dock("Model", self.model_panel, Qt.LeftDockWidgetArea, "dock_model")
        self.facts_dock = self._dock("Facts", self.facts_panel, Qt.LeftDockWidgetArea, "dock_facts")
        self.tabifyDockWidget(self.model_dock, self.facts_dock)
        self.neurons_dock = self._dock("Neurons", self.neurons_panel, Qt.RightDockWidgetArea, "dock_neurons")
        self.edits_dock = self._dock("Edits and history", self.edits_panel, Qt.BottomDockWidgetArea, "dock_edits")
        # the side docks run the full height (their lists and the inspector need it); edits sit under the plots
        self.setCorner(Qt.BottomLeftCorner, Qt.LeftDockWidgetArea)
        self.setCorner(Qt.BottomRightCorner, Qt.RightDockWidgetArea)
        self.model_dock.raise_()

    def _build_status(self):
        self.job_status = JobStatus(self.statusBar(), self.runner, self.cancel_job)
        # a long note (an import's left-out files, a kept partial run) is cut where the job's widgets begin: whole
        # when the pointer rests on the status bar
        bar = self.statusBar()  # a Python slot: PySide6 6.11 cannot connect a signal to a wrapped C++ setter
        bar.messageChanged.connect(lambda text: bar.setToolTip(text))
        self.cancel_button, self.model_label = self.job_status.cancel_button, self.job_status.model_label

    def _connect(self):
        """Panels' requests to the objects that serve them; controllers' events to the views."""
        r, flow, editing = self.runner, self.attributions, self.editing
        r.job_ended.connect(self._job_ended)
        r.busy_changed.connect(self._busy_changed)
        self.history_view.changed.connect(self.update_title)
        self.history_view.changed.connect(self.update_actions)
        self.history_view.lane_changed.connect(
            lambda lane: self._edits_index_changed() if lane == MODEL else self._facts_index_changed())
        self.attribution.event.connect(flow.on_event)
        self.edits.event.connect(editing.on_edits_event)
        self.batch.event.connect(editing.on_batch_event)
        self.model_panel.load_requested.connect(self.load_model)
        fp = self.facts_panel
        fp.fact_selected.connect(self.select_fact)
        fp.change_requested.connect(self._push_factset)
        fp.import_requested.connect(self.files.import_facts_dialog)
        fp.check_requested.connect(flow.check_facts)
        fp.batch_edit_requested.connect(editing.batch_edit)
        fp.error.connect(self.show_error)
        ap = self.attribution_panel
        ap.run_requested.connect(flow.run_attribution)
        ap.thresholds_requested.connect(lambda t, p: flow.change_selection(t=t, p=p))
        ap.keep_massive_requested.connect(lambda keep: flow.change_selection(keep_massive=keep))
        ap.neurons_selected.connect(editing.neurons_selected)
        ap.neuron_clicked.connect(editing.inspect_neuron)
        ap.adapt_p_requested.connect(flow.adapt_p)
        ap.relation_set_requested.connect(flow.make_relation_set)
        ap.subject_control_requested.connect(flow.subject_control)
        ap.templates_changed.connect(flow.templates_changed)
        ap.prompt_format_changed.connect(flow.prompt_format_changed)
        ap.problem.connect(lambda message: self.status(message, 20000))
        np_ = self.neurons_panel
        np_.select_neurons.connect(editing.select_from_set)
        np_.inspect_requested.connect(editing.inspect_neuron)
        np_.sets_changed.connect(self.sets_changed)
        np_.sets_requested.connect(self.edits.push_sets)
        np_.error.connect(self.show_error)
        np_.message.connect(self.status)
        self.edits_panel.apply_requested.connect(editing.apply_edit)
        self.edits_panel.attribute_relation_requested.connect(flow.attribute_relation)
        self.edits_panel.message.connect(self.status)

    # ================================================================= title, status, errors, jobs
    def update_title(self):
        name = Path(self.project.path).name if self.project.path else "untitled"
        self.setWindowTitle(f"{name}[*] \u2014 {APP_NAME}")
        self.setWindowModified(self.is_modified())

    def is_modified(self) -> bool:
        return self.project.modified()

    def mark_dirty(self):
        self.session.results_dirty = True
        self.update_title()

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

    def attempt(self, fn, *args) -> bool:
        """Runs a controller call; a UserError becomes a message. True when it went through."""
        try:
            fn(*args)
        except UserError as exc:
            self.show_error(exc.title, str(exc))
            return False
        except TooCoarse as exc:  # e.g. erase over a relation whose compactly stored runs cannot decide the sets
            self.show_error("Scores stored compactly", str(exc))
            return False
        return True

    def _job_ended(self, name: str, outcome: str, message: str):
        if outcome == "failed":
            self.show_error(f"{name} failed", message)
        elif outcome == "cancelled":
            if not self.statusBar().currentMessage():  # a note the job's end left (what was kept) stays
                self.status(f"{name}: cancelled.")
        elif outcome == "dropped":
            self.status(f"{name} finished after another project was opened: {message}.", 15000)
        else:
            if not self.statusBar().currentMessage():
                self.status(f"{name}: done.")
            self.project.autosave()

    def _busy_changed(self, busy: bool):
        self.model_panel.set_loading(busy)
        self.update_actions()

    def update_actions(self, *_):
        self.menus.update()

    def cancel_job(self):
        if self.runner.busy:
            self.runner.cancel()
            self.job_status.cancel_requested()

    def need_model(self) -> bool:
        if self.session.lm is None:
            self.show_error("No model loaded", "Load a model first: Model panel \u2192 Load model (Ctrl+L). The "
                            "embedded default works offline.")
            return False
        return True

    def need_free(self, what: str, resource: str = "model") -> bool:
        """False (with a message) while a running or queued job reads what this would change."""
        job = self.runner.in_use(resource)
        if job is not None:
            self.show_error("Busy", f"Cannot {what} while \u201c{job.name}\u201d runs: wait for it or press Cancel "
                            "(Esc).")
            return False
        return True

    # ================================================================= model
    def load_model(self, source: str = "default", device: str = "auto", dtype: str = "auto"):
        """Queued behind whatever runs (opening a project, saving), refused only while the model is in use."""
        if not self.need_free("load a model"):
            return
        if self.edit_stack is not None and self.edit_stack.active_edits() and not self.quiet and \
                QMessageBox.question(self, "Replace the model?", "The current model has active edits. Loading "
                                     "another model drops them from the history (save the project first to keep "
                                     "them). Continue?") != QMessageBox.Yes:
            return
        fn = self._load_model_fn
        self.model_panel.set_loading(True, f"Loading {source}\u2026")

        def job(task):
            return fn(source, device=device, dtype=dtype, task=task)

        self.runner.submit(f"Loading model {source}", job, on_done=self.set_model, uses=(), project_bound=False,
                           on_error=lambda m, tb: self.model_panel.set_loading(
                               False, f"Could not load {source}. See the message for what to do."),
                           on_cancel=lambda: self.model_panel.set_loading(False, "Loading cancelled."))

    def set_model(self, lm):
        """Makes `lm` (a kn_core LoadedModel) the window's model. Tests pass tiny models here directly."""
        self.edits.set_model(lm)
        self.attribution.set_model(lm)
        self.model_panel.show_model(lm)
        info = lm.describe()
        self.model_label.setText(f"{info.get('name') or lm.source} \u00b7 {lm.family} \u00b7 {lm.layout.layers}\u00d7"
                                 f"{lm.layout.neurons} \u00b7 {info['device']}")
        self.attribution_panel.templates.setEnabled(lm.kind == "causal")
        self.attribution_panel.prompt_format.setEnabled(lm.kind == "causal")
        self.attributions.prompt_format_changed(self.attribution_panel.prompt_format.currentText())  # the new model
        self.facts_panel.rebuild()
        self.facts_dock.raise_()  # the next step is picking a fact (the model's summary stays in the status bar)
        if self.edits.pending:
            self.lifecycle.restore_history(*self.edits.pending)
        self.update_actions()
        self.model_loaded.emit(lm)
        self.status(f"Model ready: {info.get('name') or lm.source} ({lm.family}, {lm.layout.layers} layers \u00d7 "
                    f"{lm.layout.neurons} neurons).")
        facts = list(self.session.factset.facts)
        if 0 < self.attribution.prompt_count(facts) <= A.AUTO_CHECK_PROMPTS:
            self.attributions.check_facts(facts)
        if self.current_fact is not None:
            self.select_fact(self.current_fact)
        self.attributions.flags_for_model()

    # ================================================================= undo / redo
    def _edits_index_changed(self):
        self.update_actions()
        self.update_title()
        self.edits_panel.show_report(self.edits.report_shown())
        # the weights changed: the answer checks in the Facts tree describe the old ones
        self.attribution.model_changed()
        self.facts_panel.rebuild()
        self._recheck.start()

    def _recheck_now(self):
        if self.runner.busy:
            self._recheck.start()
            return
        self.attribution.recheck()

    def _facts_index_changed(self):
        self.facts_panel.rebuild()
        self.sets_changed()  # a neuron set saved, renamed or deleted (or undone)
        self.update_actions()
        self.update_title()
        fact = self.current_fact  # a run opened, deleted or restored (runs browser): the fact's run changed
        if fact is not None and self.session.runs.get(fact_key(fact)) is not self.attribution_panel.run:
            self.current_fact = None
            self.select_fact(fact)

    def _push_factset(self, text: str, new_factset):
        self.edits.push_factset(text, new_factset)

    def undo(self):
        """Undoes the newest change; model edits wait for the model to be free."""
        command = self.history.next_undo()
        if command is None or (command.lane == MODEL and not self.need_free("undo an edit")):
            return
        self.history.undo()

    def redo(self):
        command = self.history.next_redo()
        if command is None or (command.lane == MODEL and not self.need_free("redo an edit")):
            return
        self.history.redo()

    # ================================================================= the current fact
    def select_fact(self, fact: Fact | None):
        same = fact is not None and fact == self.current_fact
        self.current_fact = fact
        if fact is None:
            return
        s = self.session
        run = s.runs.get(fact_key(fact))
        if same and run is self.attribution_panel.run:
            self.editing.target_follows(fact)
            return
        self.attribution_panel.show_run(run)
        self.neurons_panel.set_run(run)
        self.edits_panel.set_fact(fact)
        self.edits_panel.set_objects([o for o in s.factset.objects_of(fact.relation) if o != fact.object])
        relation = s.factset.relations.get(fact.relation)
        if (s.lm is not None and not self.runner.busy and relation is not None
                and not any(s.check_for(fact, t) for t in relation.templates)):
            self.attributions.check_facts([fact])  # a handful of prompts: the marker appears as soon as it is picked
        if run is not None:
            self.attributions.update_auto_sets(run)
        self.editing.target_follows(fact)

    def sets_changed(self):
        self.neurons_panel.refresh()
        self.edits_panel.refresh_targets()

    # ================================================================= show, close
    def showEvent(self, event):
        super().showEvent(event)
        self.docks.shown()

    def closeEvent(self, event):
        if not self.lifecycle.confirm_discard():
            event.ignore()
            return
        self.docks.save()
        self._autosave_timer.stop()
        self._recheck.stop()
        self.runner.shutdown()
        self.project.discard_autosave()
        self.history_view.blockSignals(True)
        self.history.clear()  # the model's edits are reverted
        event.accept()
