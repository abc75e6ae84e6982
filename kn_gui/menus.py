"""The window's actions, menus, toolbar, recent projects and Help: `WindowMenus`, an object the window owns. The
actions call the objects that do the work (the window's project lifecycle, its file actions, the panels)."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMessageBox, QStyle

from kn_core.history import MODEL

from .icons import crisp_icon

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


class WindowMenus:
    """Builds the window's QActions (parented to the window, so their shortcuts work and `shortcuts()` finds
    them), its menus and toolbar; keeps the recent projects and the actions' enabled states."""

    def __init__(self, window):
        self.window = window
        self.settings = window.settings
        self.recent_menu = None
        self.toolbar = None

    def action(self, text, slot, shortcut=None, tip="", icon=None, short=None) -> QAction:
        action = QAction(text, self.window)
        action.triggered.connect(slot)
        if icon is not None:
            action.setIcon(crisp_icon(self.window.style(), icon))  # SVG where the style's bitmaps are small (2x)
        if short:
            action.setIconText(short)  # the toolbar's label; menus show the full text
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(tip + (f" ({QKeySequence(shortcut).toString()})" if shortcut else ""))
        return action

    def build(self):
        self._build_file_actions()
        self._build_run_actions()
        self._build_menus()
        self._build_toolbar()
        self.rebuild_recent()

    def _build_file_actions(self):
        S, w, life, files = QStyle, self.window, self.window.lifecycle, self.window.files
        self.act_new = self.action("&New project", life.new_project, QKeySequence.New, "Start an empty project",
                                   S.SP_FileIcon, "New")
        self.act_open = self.action("&Open project\u2026", life.open_project_dialog, QKeySequence.Open,
                                    "Open a .knproj project", S.SP_DialogOpenButton, "Open")
        self.act_save = self.action("&Save", life.save, QKeySequence.Save, "Save the project",
                                    S.SP_DialogSaveButton, "Save")
        self.act_save_as = self.action("Save &as\u2026", life.save_as, QKeySequence.SaveAs,
                                       "Save the project under a new name")
        self.act_import = self.action("&Import facts\u2026", files.import_facts_dialog, "Ctrl+I",
                                      "Import a PARAREL folder, CSV or JSONL")
        self.act_import_pararel = self.action("Import PARAREL &folder\u2026", files.import_pararel_dialog, None,
                                              "Import a PARAREL folder (pattern files + TREx facts)")
        self.act_export_facts = self.action("Export facts\u2026", files.export_facts_dialog, None,
                                            "Save the fact set as CSV or JSONL")
        self.act_export_plots = self.action("Export figure (PNG/SVG/PDF)\u2026", files.export_plots_dialog, None,
                                            "A paper-ready figure of the attribution plots at a chosen size and dpi")
        self.act_export_json = self.action("Export results (JSON)\u2026", files.export_results_dialog,
                                           "Ctrl+Shift+E", "Runs, neuron sets and edits as JSON")
        self.act_export_table = self.action(
            "Export before/after table (CSV)\u2026",
            lambda: w.edits_panel.table.export_csv_dialog(w, "edit.csv"))
        self.act_export_model = self.action("Export edited model\u2026", files.export_model_dialog, None,
                                            "Save the model with its active edits to a folder")
        self.act_export_report = self.action("Export report (HTML)\u2026", files.export_report_dialog, None,
                                             "Into a folder, as `kn report`: report.html (one self-contained "
                                             "page: runs, figures, neuron sets, edits, provenance), report.md, "
                                             "report.json")
        self.act_open_scores = self.action("Open s&cores\u2026", files.open_scores_dialog, None,
                                           "Open a scores file (kn attribute --save) as a run")
        self.act_quit = self.action("&Quit", w.close, QKeySequence.Quit)

    def _build_run_actions(self):
        S, w = QStyle, self.window
        self.act_undo = self.action("&Undo", w.undo, QKeySequence.Undo, "Undo the last change", S.SP_ArrowBack,
                                    "Undo")
        self.act_redo = self.action("&Redo", w.redo, QKeySequence("Ctrl+Shift+Z"), "Redo", S.SP_ArrowForward,
                                    "Redo")
        self.act_redo.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
        self.act_load = self.action("&Load model", w.model_panel._load, "Ctrl+L", "Load the chosen model",
                                    S.SP_ComputerIcon, "Load model")
        self.act_run = self.action("&Run attribution", lambda: w.attributions.run_attribution("current"), "F5",
                                   "Attribute every prompt of the current fact", S.SP_MediaPlay, "Run")
        self.act_run_sel = self.action("Run &selected facts", lambda: w.attributions.run_attribution("selection"),
                                       "Shift+F5", "Attribute every fact selected in the Facts panel")
        self.act_check = self.action("&Check prompts", lambda: w.attributions.check_facts(w.facts_panel.selected_facts()
                                                                              or w.session.factset.facts),
                                     "F6", "Ask the model for each prompt's answer", S.SP_DialogApplyButton, "Check")
        self.act_cancel = self.action("&Cancel", w.cancel_job, "Esc", "Cancel the running job", S.SP_BrowserStop,
                                      "Cancel")
        self.act_apply_edit = self.action("&Apply edit", lambda: w.edits_panel._apply(), "Ctrl+Return",
                                          "Apply the edit set up in the Edits panel (undo with Ctrl+Z)")
        self.act_runs = self.action("R&uns\u2026", w.files.show_runs, "Ctrl+R", "Every run of the fact or the "
                                    "project: open, rename, delete, compare two")
        self.act_reset_layout = self.action("Reset layout", w.docks.reset)
        self.act_about = self.action("&About", self.about)
        self.act_shortcuts = self.action("&Keyboard shortcuts", self.show_shortcuts, "F1",
                                         "Every action that has a shortcut")
        self.act_docs = self.action("&Documentation", self.open_docs, None, "The README (the method, the app, the "
                                    "kn command) and docs/", S.SP_DialogHelpButton)

    def _build_menus(self):
        w = self.window
        bar = w.menuBar()
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
        edit_menu.addAction(self.action("Add relation\u2026", w.facts_panel.add_relation))
        edit_menu.addAction(self.action("Add fact\u2026", w.facts_panel.add_fact, "Ctrl+Shift+N"))
        edit_menu.addAction(self.action("Delete facts", w.facts_panel.delete_selected))
        run_menu = bar.addMenu("&Run")
        run_menu.addActions([self.act_load, self.act_check, self.act_run, self.act_run_sel, self.act_cancel])
        run_menu.addSeparator()
        run_menu.addActions([self.act_runs, self.act_apply_edit])
        view_menu = bar.addMenu("&View")
        for dock in (w.model_dock, w.facts_dock, w.neurons_dock, w.edits_dock):
            view_menu.addAction(dock.toggleViewAction())
        view_menu.addSeparator()
        view_menu.addAction(self.act_reset_layout)
        help_menu = bar.addMenu("&Help")
        help_menu.addActions([self.act_shortcuts, self.act_docs])
        help_menu.addSeparator()
        help_menu.addAction(self.act_about)

    def _build_toolbar(self):
        # short labels beside icons: the bar fits 1024 px, so Cancel (last) is never pushed into the overflow
        tb = self.window.addToolBar("Main")
        tb.setObjectName("toolbar_main")
        tb.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        tb.setIconSize(QSize(18, 18))
        tb.addActions([self.act_new, self.act_open, self.act_save])
        tb.addSeparator()
        tb.addActions([self.act_undo, self.act_redo])
        tb.addSeparator()
        tb.addActions([self.act_load, self.act_check, self.act_run, self.act_cancel])
        self.toolbar = tb

    def update(self, *_):
        """Each action (and the panels' run and apply buttons) enabled for what the window can do now."""
        w = self.window
        busy, has_model = w.runner.busy, w.session.lm is not None
        undo, redo = w.history.next_undo(), w.history.next_redo()
        model_busy = busy and w.runner.in_use("model") is not None
        self.act_undo.setEnabled(undo is not None and not (model_busy and undo.lane == MODEL))
        self.act_redo.setEnabled(redo is not None and not (model_busy and redo.lane == MODEL))
        self.act_undo.setText("&Undo " + undo.text if undo is not None else "&Undo")
        self.act_redo.setText("&Redo " + redo.text if redo is not None else "&Redo")
        self.act_undo.setToolTip(self.act_undo.text().replace("&", "") + " (Ctrl+Z)")
        self.act_redo.setToolTip(self.act_redo.text().replace("&", "") + " (Ctrl+Shift+Z)")
        self.act_cancel.setEnabled(busy)
        startable = has_model and (not busy or w.runner.only_quick)  # queued behind an answer check
        for a in (self.act_run, self.act_run_sel, self.act_check):
            a.setEnabled(startable)
        for a in (self.act_export_model, self.act_apply_edit):
            a.setEnabled(has_model and not busy)
        w.attribution_panel.set_running(busy, has_model, startable)
        w.edits_panel.set_busy(busy, has_model)
        self.act_load.setEnabled(not model_busy)

    # ----------------------------------------------------------------------------------------- recent
    def recent_projects(self) -> list[str]:
        value = self.settings.value("recent", [])
        if isinstance(value, str):
            value = [value]
        return [v for v in (value or []) if v]

    def add_recent(self, path: str):
        path = os.path.abspath(path)
        recent = [p for p in self.recent_projects() if p != path]
        self.settings.setValue("recent", ([path] + recent)[:MAX_RECENT])
        self.rebuild_recent()

    def forget_recent(self, path: str):
        self.settings.setValue("recent", [p for p in self.recent_projects() if p != os.path.abspath(path)])
        self.rebuild_recent()

    def rebuild_recent(self):
        self.recent_menu.clear()
        recent = self.recent_projects()
        for path in recent:
            self.recent_menu.addAction(self.action(Path(path).name, lambda _=False, p=path:
                                                   self.window.lifecycle.open_project(p), tip=path))
        self.recent_menu.setEnabled(bool(recent))

    # ----------------------------------------------------------------------------------------- help
    def about(self):
        QMessageBox.about(self.window, "Knowledge Neuron Studio", about_text())

    def shortcuts(self) -> list[tuple[str, str]]:
        """(action, shortcut) for every action of the window that has one, in menu order."""
        seen, rows = set(), []
        for action in self.window.findChildren(QAction):
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
                          QMessageBox.Ok, self.window)
        box.open()
        return box

    def open_docs(self):
        from PySide6.QtCore import QUrl
        from PySide6.QtGui import QDesktopServices

        readme = Path(__file__).resolve().parent.parent / "README.md"
        if not readme.exists() or not QDesktopServices.openUrl(QUrl.fromLocalFile(str(readme))):
            self.window.status(f"The documentation is {readme} and the docs/ folder beside it; no viewer could open "
                               "it here.", 15000)
