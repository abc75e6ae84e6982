"""What the window's File and Run menus do beyond the panels: file dialogs, fact import and export, the exports
(figures, results, report, edited model), scores files opened as runs, and the runs browser. `FileActions`, an
object the window owns, holding the collaborators it works with; menus.py builds the menus that call it."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog

from .controllers import UserError
from .panels.common import export_folder, remember_folder, save_file_dialog, write_json
from .project_io import results_dict
from .session import fact_key, fact_label, merge_factsets


class FileActions:
    def __init__(self, window):
        self.window = window
        self.session, self.runner, self.history = window.session, window.runner, window.history
        self.edits, self.project = window.edits, window.project
        self.attribution_panel = window.attribution_panel
        self.status, self.show_error = window.status, window.show_error

    @property
    def current_fact(self):
        return self.window.current_fact

    def _start_folder(self) -> str:
        return self.window.lifecycle.start_folder()

    # ----------------------------------------------------------------------------------------- facts
    def import_facts_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self.window, "Import facts", self._start_folder(),
                                              "Fact sets (*.jsonl *.csv *.json);;All (*)")
        if path:
            self.import_facts(path)

    def import_pararel_dialog(self):
        folder = QFileDialog.getExistingDirectory(self.window, "Import a PARAREL folder", self._start_folder())
        if folder:
            self.import_facts(folder)

    def import_facts(self, path: str) -> bool:
        """A fact file or PARAREL folder merged into the fact set (undoable); the status bar names the format read
        and, for a benchmark file, every field the fact set left out (kn_core.fact_files.import_facts_described)."""
        from kn_core.fact_files import import_facts_described

        try:
            imported, read, left = import_facts_described(path)
        except Exception as exc:  # noqa: BLE001 - FactImportError names file, line and problem
            self.show_error("Could not import the facts", f"{exc}. Fix the file (or pick another) and import again.")
            return False
        merged, added = merge_factsets(self.session.factset, imported)
        self.edits.push_factset(f"Import {added} facts from {Path(path).name}", merged)
        what = "" if read == "kn" else f", read as {read}"
        kept_out = "; left out: " + ", ".join(f"{x['field']} ({x['records']}: {x['reason']})" for x in left) \
            if left else ""
        self.status(f"Imported {added} new facts ({len(imported.relations)} relations) from {Path(path).name}"
                    f"{what}{kept_out}.", 0 if left else 10000)
        return True

    def export_facts_dialog(self):
        from kn_core.fact_files import export_facts

        path = save_file_dialog(self.window, "Export facts", "facts.jsonl", "JSONL (*.jsonl);;CSV (*.csv)")
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

        dialog = FigureExportDialog(self.attribution_panel, self.window, folder=str(export_folder()))
        dialog.accepted.connect(lambda: (remember_folder(dialog.written), self.status(f"Figure written to "
                                                                                     f"{dialog.written}.")))
        dialog.open()

    def results_dict(self) -> dict:
        return results_dict(self.session, self.edits.commands())

    def export_results_dialog(self):
        path = save_file_dialog(self.window, "Export results", "results.json", "JSON (*.json)")
        if not path:
            return
        try:
            write_json(path, self.results_dict())
        except OSError as exc:
            self.show_error("Could not export the results", f"{exc}. Choose a folder you can write to.")
            return
        self.status(f"Results written to {path}.")

    def export_report_dialog(self):
        folder = QFileDialog.getExistingDirectory(self.window, "Export report into a folder", str(export_folder()))
        if folder:
            remember_folder(Path(folder) / "report.html")
            self.export_report(folder)

    def export_report(self, folder: str) -> bool:
        """The project's report (kn_core.report, as `kn report`) into `folder`: a snapshot now, the figures drawn
        and the files written by a worker job. False if nothing was queued."""
        from .report_export import project_report_job

        job = project_report_job(folder, self.session, self.edits.saved_state(), self.project.path)
        self.runner.submit(f"Exporting the report to {Path(folder).name}", job,  # a failure: the window's error
                           on_done=lambda written: self.status(f"Report written to {written} (report.html, "
                                                               "report.md, report.json)."), uses=(),
                           project_bound=False)
        return True

    def open_scores_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self.window, "Open scores", self._start_folder(),
                                              "Scores (kn attribute --save) (*.npz);;All (*)")
        if path:
            self.open_scores(path)

    def open_scores(self, path: str) -> bool:
        """A `kn attribute --save` file as a run of the project (undoable: its fact is added to the fact set)."""
        from kn_core.scores_file import ScoresFileError, load_scores

        from .open_scores import scores_run

        w = self.window
        try:
            run = scores_run(load_scores(path), path, self.session.lm)
            again = self.project.add_scores_run(run, Path(path).name)
        except ScoresFileError as exc:
            self.show_error("Could not open the scores", f"{exc}.")
            return False
        except UserError as exc:
            self.show_error(exc.title, str(exc))
            return False
        w.update_title()
        w.facts_panel.select_fact(run.fact)
        w.select_fact(run.fact)
        self.status(f"Opened {Path(path).name} as a run: {run.fact.subject!r} \u2192 {run.fact.object!r}"
                    + (" (already open)." if again else "."))
        return True

    def export_model_dialog(self):
        folder = QFileDialog.getExistingDirectory(self.window, "Export the edited model to folder",
                                                  self._start_folder())
        if folder:
            self.export_model(folder)

    def export_model(self, folder: str):
        w = self.window
        if not w.need_model() or not w.need_free("export the model"):
            return
        from kn_core.edit_stack import export_model

        lm, stack = self.session.lm, self.edits.edit_stack

        def done(info):
            skipped = info.get("skipped") or []
            note = f"; {len(skipped)} answer-position edit(s) cannot be weights and were left out" if skipped else ""
            self.status(f"Model with {len(info.get('edits', []))} edit(s) saved to {folder}{note}.")

        self.runner.submit(f"Exporting the model to {folder}",
                           lambda task: export_model(lm, stack, folder, skip_unexportable=True), on_done=done,
                           project_bound=False)

    # ----------------------------------------------------------------------------------------- runs
    def show_runs(self):
        """Run → Runs… (Ctrl+R): the runs of the selected fact or of the project (panels/runs_browser.py)."""
        from .commands import rename_run, runs_change
        from .panels.runs_browser import RunsDialog

        s, history, changed = self.session, self.history, self.window.history_view.lane_changed
        dialog = RunsDialog(s, self.current_fact, self.window)
        menus = self.window.menus  # window-modal: the main window's Ctrl+Z never sees a key pressed in it
        dialog.addActions([menus.act_undo, menus.act_redo])
        dialog.open_requested.connect(lambda run: history.push(runs_change(
            s, f"Open the {run.state} run of {fact_label(run.fact)}", lambda: s.make_current(run))))
        dialog.delete_requested.connect(lambda run: history.push(runs_change(
            s, f"Delete a {run.state} run of {fact_label(run.fact)}", lambda: s.delete_run(run))))
        dialog.rename_requested.connect(lambda run, name: history.push(rename_run(run, name)))
        changed.connect(dialog.refresh)
        dialog.finished.connect(lambda _: changed.disconnect(dialog.refresh))
        self.runs_dialog = dialog
        dialog.open()
        return dialog
