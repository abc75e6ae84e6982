"""The main window: it builds the docks and wires the panels to the controllers (kn_gui/controllers), which hold
the logic and report typed events. Menus, file dialogs and exports: actions.py; sizes and layout: layout.py."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QDockWidget, QMainWindow, QMessageBox, QWidget

from kn_core.facts import Fact

from .controllers import UserError
from .controllers import attribution as A
from .controllers.batch import BatchApplied, BatchController
from .controllers import edits as E
from .controllers import project as P
from .controllers.trace import TraceController
from .panels.attribution_panel import AttributionPanel
from .panels.trace_panel import TracePanel
from .panels.edits_panel import EditsPanel
from .panels.facts_panel import FactsPanel
from .panels.model_panel import ModelPanel
from .panels.neurons_panel import NeuronsPanel
from .actions import ActionsMixin
from .job_status import JobStatus
from .layout import LayoutMixin, PanelScroll, show_current_page_only
from .panels.common import set_settings
from .session import Run, Session, TooCoarse, fact_key, fact_label, neuron_name, starter_factset
from .worker import JobRunner, collect_garbage_in_gui_thread

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
APP_NAME = "Knowledge Neuron Studio"
AUTOSAVE_MS = 3 * 60 * 1000
RECHECK_DELAY_MS = 300


class MainWindow(ActionsMixin, LayoutMixin, QMainWindow):
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
        self.history = E.History(self)
        self.undo_stack = self.history.edits  # the model edits (the History view shows them)
        self.edits = E.EditsController(self.session, self.runner, self.history, self)
        self.batch = BatchController(self.session, self.runner, self.history, self.edits, self)
        self.attribution = A.AttributionController(self.session, self.runner, self.edits.active_descriptions, self)
        self.project = P.ProjectController(self.session, self.runner, self.edits, self.settings, self)
        self.current_fact: Fact | None = None
        self.quiet = not confirm_dialogs  # tests: errors go to the status bar and error_shown, no modal dialog
        self.auto_discard = False  # quiet mode's answer to "discard unsaved changes?"
        self.auto_recover = False  # quiet mode's answer to "recover unsaved work?"
        self.last_error: tuple[str, str] | None = None
        self._recheck = QTimer(self, singleShot=True, interval=RECHECK_DELAY_MS, timeout=self._recheck_now)
        self._autosave_timer = QTimer(self, interval=AUTOSAVE_MS, timeout=self.project.autosave)

        self._build_panels()
        self._build_actions()
        self._build_menus()
        self._build_status()
        self._connect()
        self._restore_layout()
        self._update_title()
        self._update_actions()
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
        self.cancel_button, self.model_label = self.job_status.cancel_button, self.job_status.model_label

    def _connect(self):
        r = self.runner
        r.job_ended.connect(self._job_ended)
        r.busy_changed.connect(self._busy_changed)
        for stack in (self.history.edits, self.history.facts):
            stack.cleanChanged.connect(lambda _: self._update_title())
            stack.canUndoChanged.connect(self._update_actions)
            stack.canRedoChanged.connect(self._update_actions)
        self.history.edits.indexChanged.connect(self._edits_index_changed)
        self.history.facts.indexChanged.connect(self._facts_index_changed)
        self.attribution.event.connect(self._attribution_event)
        self.edits.event.connect(self._edits_event)
        self.batch.event.connect(self._batch_event)
        self.project.event.connect(self._project_event)
        self.model_panel.load_requested.connect(self.load_model)
        fp = self.facts_panel
        fp.fact_selected.connect(self.select_fact)
        fp.change_requested.connect(self._push_factset)
        fp.import_requested.connect(self.import_facts_dialog)
        fp.check_requested.connect(self.check_facts)
        fp.batch_edit_requested.connect(self.batch_edit)
        fp.error.connect(self.show_error)
        ap = self.attribution_panel
        ap.run_requested.connect(self.run_attribution)
        ap.thresholds_changed.connect(self._thresholds_changed)
        ap.neurons_selected.connect(self._neurons_selected)
        ap.neuron_clicked.connect(self.inspect_neuron)
        ap.adapt_p_requested.connect(self.adapt_p)
        ap.relation_set_requested.connect(self.make_relation_set)
        ap.templates_changed.connect(self._templates_changed)
        ap.prompt_format_changed.connect(self._prompt_format_changed)
        ap.problem.connect(lambda message: self.status(message, 20000))
        np_ = self.neurons_panel
        np_.select_neurons.connect(self._select_from_set)
        np_.inspect_requested.connect(self.inspect_neuron)
        np_.sets_changed.connect(self._sets_changed)
        np_.error.connect(self.show_error)
        np_.message.connect(self.status)
        self.edits_panel.apply_requested.connect(self.apply_edit)
        self.edits_panel.attribute_relation_requested.connect(self.attribute_relation)
        self.edits_panel.message.connect(self.status)

    # ================================================================= layout, title
    def _update_title(self):
        name = Path(self.project.path).name if self.project.path else "untitled"
        self.setWindowTitle(f"{name}[*] \u2014 {APP_NAME}")
        self.setWindowModified(self.is_modified())

    def is_modified(self) -> bool:
        return self.project.modified()

    def _mark_dirty(self):
        self.session.results_dirty = True
        self._update_title()

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

    def _try(self, fn, *args) -> bool:
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
        self._update_actions()

    def _update_actions(self, *_):
        busy, has_model = self.runner.busy, self.session.lm is not None
        undo, redo = self.history.next_undo(), self.history.next_redo()
        model_busy = busy and self.runner.in_use("model") is not None
        self.act_undo.setEnabled(undo is not None and not (model_busy and undo is self.history.edits))
        self.act_redo.setEnabled(redo is not None and not (model_busy and redo is self.history.edits))
        self.act_undo.setText("&Undo " + undo.undoText() if undo is not None else "&Undo")
        self.act_redo.setText("&Redo " + redo.redoText() if redo is not None else "&Redo")
        self.act_undo.setToolTip(self.act_undo.text().replace("&", "") + " (Ctrl+Z)")
        self.act_redo.setToolTip(self.act_redo.text().replace("&", "") + " (Ctrl+Shift+Z)")
        self.act_cancel.setEnabled(busy)
        for a in (self.act_run, self.act_run_sel, self.act_check, self.act_export_model, self.act_apply_edit):
            a.setEnabled(has_model and not busy)
        self.attribution_panel.set_running(busy, has_model)
        self.edits_panel.set_busy(busy, has_model)
        self.act_load.setEnabled(not model_busy)

    def cancel_job(self):
        if self.runner.busy:
            self.runner.cancel()
            self.job_status.cancel_requested()

    def _need_model(self) -> bool:
        if self.session.lm is None:
            self.show_error("No model loaded", "Load a model first: Model panel \u2192 Load model (Ctrl+L). The "
                            "embedded default works offline.")
            return False
        return True

    def _need_free(self, what: str, resource: str = "model") -> bool:
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
        if not self._need_free("load a model"):
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
        if self.edits.set_model(lm) and not self.history.edits.isClean():
            self.session.results_dirty = True
        self.session.lm = lm
        self.session.checks.clear()
        self.session.reset_flags()  # at once: the old model's flags never describe the new one
        self.model_panel.show_model(lm)
        info = lm.describe()
        self.model_label.setText(f"{info.get('name') or lm.source} \u00b7 {lm.family} \u00b7 {lm.layout.layers}\u00d7"
                                 f"{lm.layout.neurons} \u00b7 {info['device']}")
        self.attribution_panel.templates.setEnabled(lm.kind == "causal")
        self.attribution_panel.prompt_format.setEnabled(lm.kind == "causal")
        self._prompt_format_changed(self.attribution_panel.prompt_format.currentText())  # the new model gets it
        self.facts_panel.rebuild()
        self.facts_dock.raise_()  # the next step is picking a fact (the model's summary stays in the status bar)
        if self.edits.pending:
            self._restore_history(*self.edits.pending)
        self._update_actions()
        self.model_loaded.emit(lm)
        self.status(f"Model ready: {info.get('name') or lm.source} ({lm.family}, {lm.layout.layers} layers \u00d7 "
                    f"{lm.layout.neurons} neurons).")
        facts = list(self.session.factset.facts)
        if 0 < self.attribution.prompt_count(facts) <= A.AUTO_CHECK_PROMPTS:
            self.check_facts(facts)
        if self.current_fact is not None:
            self.select_fact(self.current_fact)
        self._flags_for_model()

    def _restore_history(self, state, sha):
        was_clean = self.history.is_clean()
        try:
            restored = self.edits.restore(state, sha)
        except UserError as exc:
            self.show_error(exc.title, str(exc))
            return
        if restored is None:
            self.status("The project has saved edits; load its model to re-apply them.")
            return
        if was_clean:
            self.history.set_clean()
        self.status(f"Re-applied {restored.applied} saved edit(s) to the model ({restored.total} in the history).")

    # ================================================================= undo / redo
    def _edits_index_changed(self, _index: int):
        self._update_actions()
        self._update_title()
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

    def _facts_index_changed(self, _index: int):
        self.facts_panel.rebuild()
        self._update_actions()
        self._update_title()
        fact = self.current_fact  # a run opened, deleted or restored (runs browser): the fact's run changed
        if fact is not None and self.session.runs.get(fact_key(fact)) is not self.attribution_panel.run:
            self.current_fact = None
            self.select_fact(fact)

    def _push_factset(self, text: str, new_factset):
        self.edits.push_factset(text, new_factset)

    def undo(self):
        """Undoes the newest change of either history; model edits wait for the model to be free."""
        stack = self.history.next_undo()
        if stack is None or (stack is self.history.edits and not self._need_free("undo an edit")):
            return
        self.history.undo(stack)

    def redo(self):
        stack = self.history.next_redo()
        if stack is None or (stack is self.history.edits and not self._need_free("redo an edit")):
            return
        self.history.redo(stack)

    # ================================================================= facts
    def check_facts(self, facts):
        if not self._need_model() or not facts:
            return
        if not self.attribution.check(list(facts)):
            self.status("No prompts to check (no templates usable for this model).")

    def select_fact(self, fact: Fact | None):
        same = fact is not None and fact == self.current_fact
        self.current_fact = fact
        if fact is None:
            return
        s = self.session
        run = s.runs.get(fact_key(fact))
        if same and run is self.attribution_panel.run:
            self._edit_target_follows(fact)
            return
        self.attribution_panel.show_run(run)
        self.neurons_panel.set_run(run)
        self.edits_panel.set_fact(fact)
        self.edits_panel.set_objects([o for o in s.factset.objects_of(fact.relation) if o != fact.object])
        relation = s.factset.relations.get(fact.relation)
        if (s.lm is not None and not self.runner.busy and relation is not None
                and not any(s.check_for(fact, t) for t in relation.templates)):
            self.check_facts([fact])  # a handful of prompts: the marker appears as soon as the fact is picked
        if run is not None:
            self._update_auto_sets(run)
        self._edit_target_follows(fact)

    def _edit_target_follows(self, fact: Fact):
        """The Edits panel's neurons follow the selected fact: another fact's refined or coarse set becomes this
        fact's set of the same kind (or the plot selection when this fact has none), never left on the old one;
        an empty plot selection gives way to the fact's refined set."""
        ep = self.edits_panel
        data = ep.target.currentData()
        if data and data[0] == "selection" and not self.attribution_panel.selected:
            data = ("set", "refined: ")
        if not data or data[0] != "set" or not data[1].startswith(("refined: ", "coarse: ")):
            return  # a non-empty selection, a relation or user set: the user's own choice
        kind = data[1].split(": ", 1)[0]
        own = f"{kind}: {fact_label(fact)}"
        if data[1] != own:
            index = ep._find_target(("set", own))
            ep.target.setCurrentIndex(max(index, 0))
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
        try:
            runs = self.attribution.start(facts, params, self.attribution_panel.hold_out.value())
        except UserError as exc:
            self.show_error(exc.title, str(exc))
            return
        if len(runs) < len(facts):
            self.status(f"Skipped {len(facts) - len(runs)} fact(s) without usable prompts.")
        first = runs[0]
        if self.current_fact != first.fact:
            self.facts_panel.select_fact(first.fact)
        self.select_fact(first.fact)
        self.attribution_panel.show_run(first)

    def attribute_relation(self, relation_id: str):
        """Attributes every fact of a relation (the erase edit's offer when it found too few neurons)."""
        facts = self.session.factset.facts_of(relation_id)
        if facts and self._need_model():
            self.facts_panel.select_facts(facts)
            self.run_attribution("selection")

    def _attribution_event(self, ev):
        ap = self.attribution_panel
        if isinstance(ev, A.ChunkReady):
            if ap.run is ev.run and ev.prompt == len(ev.run.scores):
                ap.stream_chunk(ev.prompt, ev.layers, ev.scores)
        elif isinstance(ev, A.PromptDone):
            if ap.run is ev.run:
                ap.prompt_done(ev.prompt)
                self.neurons_panel.set_run(ev.run)
        elif isinstance(ev, A.RunFinished):
            self._mark_dirty()
            self.facts_panel.refresh_fact(ev.run.fact)
            if ap.run is ev.run:
                self._update_auto_sets(ev.run)
            self.run_finished.emit(ev.run)
        elif isinstance(ev, A.AllDone):
            self.status(f"Attribution done: {len(ev.runs)} fact(s), {ev.prompts} prompts.")
            self.attribution.measure_flags()
        elif isinstance(ev, A.FlagsMeasured):
            self._show_flags()
            f = ev.flags
            self.status(f"Flagged {len(f.massive)} massive and {len(f.unspecific)} unspecific neurons "
                        f"({f.rule.get('stats_source') or f'{ev.prompts} prompts'}); "
                        + ("kept in the sets (Keep massive/unspecific is on)." if self.session.keep_massive
                           else "left out of the coarse/refined sets.")
                        + (f"   |   {ev.left_out}" if ev.left_out else ""), 20000)
        elif isinstance(ev, A.RunsStopped):
            self._mark_dirty()
            ap.live.clear()
            self.attribution_panel.show_run(None)
            if self.current_fact is not None:
                self.current_fact, fact = None, self.current_fact
                self.select_fact(fact)
            # stays until the next note (0): job progress shows beside it, never over it
            self.status(f"Attribution {ev.outcome}; kept {ev.kept} finished prompt(s) of {ev.total} as a partial "
                        "run (a complete earlier run stays the fact's run; Runs\u2026 lists every run).", 0)
        elif isinstance(ev, A.ChecksDone):
            if len(ev.facts) > 30:
                self.facts_panel.rebuild()
            else:
                for fact in ev.facts:
                    self.facts_panel.refresh_fact(fact)
            self.status(f"Checked {ev.prompts} prompts: the model answers {ev.correct} correctly (\u2714).")
        elif isinstance(ev, A.ChecksCleared):
            self.status(f"The model changed: the answer checks of {ev.facts} facts were cleared; press Check (F6) "
                        "to measure them again.")

    def _flags_for_model(self):
        """The flags of the loaded model and the runs: the project's saved ones when they describe them (shown at
        once: the sets never include a flagged neuron while they are measured), else measured again on a job."""
        s = self.session
        s.reset_flags()
        restored = s.restore_flags()
        self._show_flags()
        if not restored:
            self.attribution.measure_flags()

    def _show_flags(self):
        """The session's flags (or none) on the panels, and the sets recomputed with them left out."""
        s = self.session
        self.attribution_panel.set_flags(s.flags)
        self.neurons_panel.set_flags(s.flags)
        self.edits_panel.set_stats(s.activation_stats)
        run = self.attribution_panel.run
        if run is not None and run.scores:
            self.attribution_panel.redraw()
            self._update_auto_sets(run)

    def _update_auto_sets(self, run: Run):
        if self.attribution.update_auto_sets(run):
            self._sets_changed()

    def _templates_changed(self, mode: str):
        self.facts_panel.rebuild()  # each fact's prompts and skipped templates, for the new choice
        how = ("every template, cut before [Y]" if mode == "prefix" else "only templates that end with [Y]")
        self.status(f"Causal templates: {mode} ({how}); runs from now on record it, earlier runs keep theirs.")

    def _prompt_format_changed(self, mode: str):
        """The model encodes every prompt in `mode` from now on (kn_core.encoding); a model that cannot (no chat
        template, a masked model) stays plain and the status bar says why."""
        from kn_core.encoding import PromptError, set_prompt_format

        self.session.prompt_format = mode
        lm = self.session.lm
        if lm is None:
            return
        before = lm.prompt_format
        try:
            set_prompt_format(lm, mode)
        except PromptError as exc:
            set_prompt_format(lm, "plain")
            self.session.prompt_format = "plain"
            self.attribution_panel.set_prompt_format("plain")
            self.status(f"Prompts stay plain: {exc}")
            return
        if lm.prompt_format != before:  # the facts' checked answers and the flags were measured on other inputs
            self.session.checks.clear()
            self.session.reset_flags()
            self._show_flags()
            self.facts_panel.rebuild()
            self._update_actions()  # as after set_model: the rebuild leaves Run disabled until the actions update
        if mode == "chat":
            self.status("Prompts: chat (the model's chat template, the prompt starting the assistant's reply); runs "
                        "from now on record it, earlier runs keep theirs.")

    def _thresholds_changed(self, t: float, p: float):
        run = self.attribution_panel.run
        if run is not None and run.scores:
            self._update_auto_sets(run)
        self._mark_dirty()

    def adapt_p(self):
        try:
            result = self.attribution.adapt_p(self.current_fact)
        except UserError as exc:
            self.show_error(exc.title, str(exc))
            return
        self.attribution_panel.set_thresholds(self.session.t, result.p)
        self.attribution_panel._thresholds()
        steps = " \u2192 ".join(f"{p:.2f} ({m:.1f})" for p, m in result.history)
        self.status(f"p adapted for {self.current_fact.relation}: {steps}; mean refined neurons per fact "
                    f"{result.mean_neurons:.2f}.")

    def make_relation_set(self):
        try:
            neuron_set = self.attribution.relation_set(self.current_fact)
        except UserError as exc:
            self.show_error(exc.title, str(exc))
            return
        self.neurons_panel.add_set(neuron_set)
        self.status(f"{neuron_set.name}: {len(neuron_set.neurons)} neurons refined for \u2265 10% of "
                    f"{neuron_set.source.split()[0]} facts.")

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
        from kn_core.evaluation import neuron_tokens

        def done(result):
            if self.neurons_panel.inspected == (layer, neuron):
                self.neurons_panel.show_inspection(layer, neuron, {
                    "promoted": [(row["token"], row["logit"]) for row in result["promotes"]],
                    "suppressed": [(row["token"], row["logit"]) for row in result["suppresses"]],
                    "norm": result.get("norm")})

        self.runner.submit(f"Inspecting {neuron_name(layer, neuron)}", lambda task: neuron_tokens(lm, layer, neuron, top_k=12),
                           on_done=done)

    # ================================================================= edits
    def apply_edit(self, request: dict):
        target = request.get("target")
        if target is None or target[0] == "selection":
            neurons = list(self.attribution_panel.selected)
        else:
            chosen = self.session.neuron_sets.get(target[1])
            neurons = list(map(tuple, chosen.neurons)) if chosen else []
        self._try(self.edits.apply, request, self.current_fact, neurons)

    def _edits_event(self, ev):
        if isinstance(ev, E.EditEvaluated):
            self.edits_panel.show_report(ev.report)
            skipped = ev.report.get("skipped") or []
            note = f"   |   left out: {skipped[0][0]} ({skipped[0][1]})" + (
                f" and {len(skipped) - 1} more" if len(skipped) > 1 else "") if skipped else ""
            self.status(f"{ev.command.text()}: {self.edits_panel.result_summary.text()}{note}", 20000)
            self.edit_evaluated.emit(ev.report)
            self.edits_dock.raise_()
        elif isinstance(ev, E.EditFailed):
            self.show_error("Cannot apply the edit", ev.message)
        elif isinstance(ev, E.DegeneracyTested):
            self.edits_panel.show_degeneracy(ev.result, ev.fact, ev.edits_in_force)
            self.edits_dock.raise_()

    def _batch_event(self, ev):
        if isinstance(ev, BatchApplied):
            self.edits_panel.show_report(ev.report)
            self.status(f"{ev.command.text()}: {ev.report['batch']['applied']} facts edited as one history entry"
                        + (f", {len(ev.report['skipped'])} left out (listed in the Edits panel)"
                           if ev.report["skipped"] else ""), 20000)
            self.edits_dock.raise_()
        elif ev.cancelled:
            self.status(ev.message)
        else:
            self.show_error("Batch edit not applied", ev.message)

    def closeEvent(self, event):
        if not self._confirm_discard():
            event.ignore()
            return
        self.save_layout()
        self._autosave_timer.stop()
        self._recheck.stop()
        self.runner.shutdown()
        self.project.discard_autosave()
        for stack in (self.history.edits, self.history.facts):
            stack.blockSignals(True)
        if self.edit_stack is not None:
            self.edit_stack.clear()
        event.accept()

