"""Attribution in the window: the panels' run, threshold, template and prompt-format requests handed to the
AttributionController, and its events (streamed chunks, finished runs, flags, answer checks) shown on the panels.
`AttributionFlow`, an object the window owns."""

from __future__ import annotations

from .controllers import UserError
from .controllers import attribution as A
from .session import Run, fact_label


class AttributionFlow:
    def __init__(self, window):
        self.window = window
        self.session, self.runner, self.controller = window.session, window.runner, window.attribution
        self.panel = window.attribution_panel
        self.status, self.show_error = window.status, window.show_error
        self.kept_note = ""  # a stopped run's note: it stays until a note of the user's next step (_runs_stopped)

    # ----------------------------------------------------------------------------------------- runs
    def run_attribution(self, which: str = "current"):
        w = self.window
        if not w.need_model():
            return
        if which == "selection":
            facts = w.facts_panel.selected_facts()
            if not facts:
                self.show_error("No facts selected", "Select facts (or a relation) in the Facts panel, then run.")
                return
        else:
            fact = w.facts_panel.current_fact() or w.current_fact
            if fact is None:
                self.show_error("No fact selected", "Pick a fact in the Facts panel (click it), then press F5.")
                return
            facts = [fact]
        try:
            params = self.panel.params()
        except ValueError as exc:
            self.show_error("Invalid parameters", f"{exc}.")
            return
        try:
            runs = self.controller.start(facts, params, self.panel.hold_out.value())
        except UserError as exc:
            self.show_error(exc.title, str(exc))
            return
        if len(runs) < len(facts):
            self.status(f"Skipped {len(facts) - len(runs)} fact(s) without usable prompts.")
        first = runs[0]
        if w.current_fact != first.fact:
            w.facts_panel.select_fact(first.fact)
        w.select_fact(first.fact)
        self.panel.show_run(first)

    def attribute_relation(self, relation_id: str):
        """Attributes every fact of a relation (the erase edit's offer when it found too few neurons)."""
        facts = self.session.factset.facts_of(relation_id)
        if facts and self.window.need_model():
            self.window.facts_panel.select_facts(facts)
            self.run_attribution("selection")

    def check_facts(self, facts):
        if not self.window.need_model() or not facts:
            return
        if not self.controller.check(list(facts)):
            self.status("No prompts to check (no templates usable for this model).")

    def on_event(self, ev):
        """The controller's events on the panels (a dispatch table of small handlers)."""
        handler = {A.ChunkReady: self._chunk, A.PromptDone: self._prompt_done, A.RunFinished: self._run_finished,
                   A.AllDone: self._all_done, A.FlagsMeasured: self._flags_measured,
                   A.RunsStopped: self._runs_stopped, A.ChecksDone: self._checks_done,
                   A.ChecksCleared: self._checks_cleared, A.SubjectControlled: self._subject_controlled}.get(type(ev))
        if handler is not None:
            handler(ev)

    def _chunk(self, ev):
        if self.panel.run is ev.run and ev.prompt == len(ev.run.scores):
            self.panel.stream_chunk(ev.prompt, ev.layers, ev.scores)

    def _prompt_done(self, ev):
        if self.panel.run is ev.run:
            self.panel.prompt_done(ev.prompt)
            self.window.neurons_panel.set_run(ev.run)

    def _run_finished(self, ev):
        self.window.mark_dirty()
        self.window.facts_panel.refresh_fact(ev.run.fact)
        if self.panel.run is ev.run:
            self.update_auto_sets(ev.run)
        self.window.run_finished.emit(ev.run)

    def _all_done(self, ev):
        self.status(f"Attribution done: {len(ev.runs)} fact(s), {ev.prompts} prompts.")
        self.controller.measure_flags()

    def _flags_measured(self, ev):
        self.show_flags()
        f = ev.flags
        self.status(f"Flagged {len(f.massive)} massive and {len(f.unspecific)} unspecific neurons "
                    f"({f.rule.get('stats_source') or f'{ev.prompts} prompts'}); "
                    + ("kept in the sets (Keep massive/unspecific is on)." if self.session.keep_massive
                       else "left out of the coarse/refined sets.")
                    + (f"   |   {ev.left_out}" if ev.left_out else ""), 20000)

    def _runs_stopped(self, ev):
        w = self.window
        w.mark_dirty()
        self.panel.live.clear()
        self.panel.show_run(None)
        if w.current_fact is not None:
            w.current_fact, fact = None, w.current_fact
            w.select_fact(fact)
        # stays until the next note (0): job progress shows beside it, never over it
        self.kept_note = (f"Attribution {ev.outcome}; kept {ev.kept} finished prompt(s) of {ev.total} as a partial "
                          "run (a complete earlier run stays the fact's run; Runs\u2026 lists every run).")
        self.status(self.kept_note, 0)

    def _checks_done(self, ev):
        if len(ev.facts) > 30:
            self.window.facts_panel.rebuild()
        else:
            for fact in ev.facts:
                self.window.facts_panel.refresh_fact(fact)
        if self.panel.run is not None and self.panel.run.fact in ev.facts:
            self.panel.redraw()  # its summary says whether the model knows the fact: from these checks now
        note = f"Checked {ev.prompts} prompts: the model answers {ev.correct} correctly (\u2714)."
        if self.kept_note and self.window.statusBar().currentMessage() == self.kept_note:
            # the check re-selecting the fact starts ends right after the cancel: beside its note, not over it
            self.kept_note = f"{self.kept_note}   |   {note}"
            self.status(self.kept_note, 0)
        else:
            self.status(note)

    def _checks_cleared(self, ev):
        self.status(f"The model changed: the answer checks of {ev.facts} facts were cleared; press Check (F6) "
                    "to measure them again.")

    # ----------------------------------------------------------------------------------------- flags and sets
    def flags_for_model(self):
        """The flags of the loaded model and the runs: the project's saved ones when they describe them (shown at
        once: the sets never include a flagged neuron while they are measured), else measured again on a job."""
        s = self.session
        s.reset_flags()
        restored = s.restore_flags()
        self.show_flags()
        if not restored:
            self.controller.measure_flags()

    def show_flags(self):
        """The session's flags (or none) on the panels, and the sets recomputed with them left out."""
        s = self.session
        self.panel.set_flags(s.flags)
        self.window.neurons_panel.set_flags(s.flags)
        self.window.edits_panel.set_stats(s.activation_stats)
        run = self.panel.run
        if run is not None and run.scores:
            self.panel.redraw()
            self.update_auto_sets(run)

    def update_auto_sets(self, run: Run):
        if self.controller.update_auto_sets(run):
            self.window.sets_changed()

    def change_selection(self, **change):
        """The panel's t, p or keep-massive request: applied by the controller when the shown run's stored scores
        decide its sets (else the controls go back and the status bar says why), then the sets and plots."""
        problem = self.controller.change_selection(self.panel.run, **change)
        self.panel.show_selection()
        if problem:
            self.status(problem, 20000)
            return
        run = self.panel.run
        if run is not None and run.scores:
            self.update_auto_sets(run)
        self.window.mark_dirty()
        self.panel.redraw()

    def adapt_p(self):
        w = self.window
        try:
            result = self.controller.adapt_p(w.current_fact)
        except UserError as exc:
            self.show_error(exc.title, str(exc))
            return
        self.change_selection(t=self.session.t, p=result.p)
        steps = " \u2192 ".join(f"{p:.2f} ({m:.1f})" for p, m in result.history)
        self.status(f"p adapted for {w.current_fact.relation}: {steps}; mean refined neurons per fact "
                    f"{result.mean_neurons:.2f}.")

    def subject_control(self):
        try:
            self.controller.subject_control(self.panel.run)
        except UserError as exc:
            self.show_error(exc.title, str(exc))

    def _subject_controlled(self, ev):
        from kn_core.neurons import neuron_name

        c, layout = ev.control, self.session.lm.layout if self.session.lm is not None else None
        if self.panel.run is ev.run:
            self.panel.redraw()
            self.update_auto_sets(ev.run)
        if c["reason"]:
            self.status(f"Subject control of {fact_label(ev.run.fact)}: not controlled ({c['reason']}).", 0)
            return
        flagged = [neuron_name(layer, index, layout) for layer, index in c["template"]]
        self.status(f"Subject control of {fact_label(ev.run.fact)} ({len(c['control_subjects'])} other subjects, "
                    f"{c['control_prompts']} prompts): {len(flagged)} of {len(c['candidates'])} refined neurons "
                    "flagged template and kept out of the refined set" + (f" ({', '.join(flagged)})" if flagged
                                                                          else "") + ".", 0)

    def make_relation_set(self):
        try:
            neuron_set = self.controller.relation_set(self.window.current_fact)
        except UserError as exc:
            self.show_error(exc.title, str(exc))
            return
        self.window.neurons_panel.add_set(neuron_set)
        self.status(f"{neuron_set.name}: {len(neuron_set.neurons)} neurons refined for \u2265 10% of "
                    f"{neuron_set.source.split()[0]} facts.")

    # ----------------------------------------------------------------------------------------- prompts
    def templates_changed(self, mode: str):
        self.controller.set_causal_templates(mode)
        self.window.facts_panel.rebuild()  # each fact's prompts and skipped templates, for the new choice
        how = ("every template, cut before [Y]" if mode == "prefix" else "only templates that end with [Y]")
        self.status(f"Causal templates: {mode} ({how}); runs from now on record it, earlier runs keep theirs.")

    def prompt_format_changed(self, mode: str):
        """The model encodes every prompt in `mode` from now on (kn_core.encoding); a model that cannot (no chat
        template, a masked model) stays plain and the status bar says why."""
        try:
            changed = self.controller.set_prompt_format(mode)
        except UserError as exc:
            self.panel.set_prompt_format("plain")
            self.status(str(exc))
            return
        if changed:  # the facts' checked answers and the flags were measured on other inputs
            self.show_flags()
            self.window.facts_panel.rebuild()
            self.window.update_actions()  # as after set_model: the rebuild leaves Run disabled until then
        if mode == "chat":
            self.status("Prompts: chat (the model's chat template, the prompt starting the assistant's reply); runs "
                        "from now on record it, earlier runs keep theirs.")
