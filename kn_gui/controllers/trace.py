"""Causal tracing in the app: the trace panel's request becomes one worker job (kn_core.tracing.trace on the
current fact's first prompt, all three kinds), whose result the panel shows and the session keeps (saved with the
project as an evaluation of kind "trace", as `kn trace --project` stores one; the panel lists and reopens them).
The noise's scale follows ROME: the standard deviation of the token embeddings of every subject in the open fact
set."""

from __future__ import annotations

from typing import Callable

from PySide6.QtCore import QObject

from kn_core.facts import Fact

from ..session import Session, fact_key
from ..worker import JobRunner


class TraceController(QObject):
    def __init__(self, session: Session, runner: JobRunner, panel, current_fact: Callable[[], Fact | None],
                 status: Callable[[str], None], parent=None):
        super().__init__(parent)
        self.session, self.runner, self.panel = session, runner, panel
        self.current_fact, self.status = current_fact, status
        panel.trace_requested.connect(self.start)
        panel.saved_traces = lambda: self.session.traces
        runner.busy_changed.connect(lambda busy: panel.set_running(busy, session.lm is not None))
        panel.set_running(runner.busy, session.lm is not None)

    def start(self, options: dict) -> bool:
        from kn_core.tracing import TraceParams

        lm, fact = self.session.lm, self.current_fact()
        if lm is None or fact is None:
            self.status("Causal trace: load a model and pick a fact first.")
            return False
        prompts, skipped = self.session.prompts_for(fact)
        if not prompts:
            self.status(f"Causal trace: no prompt of {fact.subject} works for this model"
                        + (f" ({skipped[0].reason})" if skipped else "") + ".")
            return False
        prompt = prompts[0]
        params = TraceParams(**options)
        subjects = [f.subject for f in self.session.factset.facts]
        key, generation = fact_key(fact), self.session.generation

        def job(task):
            from kn_core.tracing import embedding_std, trace

            return trace(lm, prompt.text, fact.subject, prompt.answer_ids, params,
                         noise_scale=embedding_std(lm, subjects), task=task)

        def done(result):
            if self.session.generation == generation:  # kept with the project it was run for
                self.session.traces.append({
                    "name": f"{fact.relation} {fact.subject}: {prompt.text!r} ({params.samples} samples, noise "
                            f"{params.noise:g}\u00d7, window {params.window}, seed {params.seed})",
                    "report": {"fact": {"relation": fact.relation, "subject": fact.subject, "object": fact.object},
                               **result.to_dict()},
                    "params": {**params.to_dict(), "facts": self.session.factset.name}})
                self.session.results_dirty = True
                self.panel.list_saved()
            current = self.current_fact()
            if current is None or fact_key(current) != key:  # the user moved on: do not show another fact's trace
                self.status(f"Causal trace of {fact.subject} finished after you picked another fact; not shown.")
                return
            self.panel.show_result(result)
            self.status(f"Causal trace of {prompt.text!r}: {result.elapsed_s:.0f} s.")

        self.runner.submit(f"Causal trace of {fact.subject}", job, on_done=done,
                           on_error=lambda message, tb: self.status(f"Causal trace failed: {message}"))
        return True
