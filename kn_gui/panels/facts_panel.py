"""Facts panel: relations -> facts -> prompts in a tree, with the model's check per prompt."""

from __future__ import annotations

from PySide6.QtCore import QItemSelectionModel, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFont, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QDialog, QDialogButtonBox, QFormLayout, QHeaderView,
                               QLineEdit, QMessageBox, QPlainTextEdit, QTreeView, QWidget)

from kn_core.facts import Fact, Relation

from ..session import fact_key, fact_label
from .common import button, fmt_prob, hbox, hint, problem_label, vbox

ROLE = Qt.UserRole + 10
OK, BAD = "#1e8449", "#c0392b"


# Attribution time per answer token per prompt when no run of the loaded model has been timed yet: the
# default model (SmolLM2-135M), 20 steps, on a 2-core CPU (README, "Speed": 1.74 s per one-token prompt).
SECONDS_PER_TOKEN_PROMPT = 1.75
LONG_ANSWER_TOKENS = 5  # PARAREL objects are 1-3 tokens; a longer answer multiplies the attribution time


def seconds_per_token_prompt(session) -> float:
    """Measured on this machine and model when the session has runs (their seconds per answer token), else the
    documented constant."""
    per_token = [ps.seconds / max(1, len(ps.answer_ids)) for run in session.runs.values() for ps in run.scores
                 if ps.seconds > 0]
    return sum(per_token) / len(per_token) if per_token else SECONDS_PER_TOKEN_PROMPT


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class FactDialog(QDialog):
    """Add or edit a fact. Bad input keeps the dialog open with the typed text and a line saying what to fix;
    an answer longer than LONG_ANSWER_TOKENS is accepted only on a second OK, after a warning with the
    expected attribution time."""

    def __init__(self, factset, fact: Fact | None = None, relation_id: str | None = None, parent=None,
                 session=None, seconds_per_token: float | None = None):
        super().__init__(parent)
        self.setWindowTitle("Edit fact" if fact else "Add fact")
        self.factset = factset
        self.original = fact
        self.session = session
        self.seconds_per_token = seconds_per_token
        self.relation = QComboBox()
        for rid, rel in factset.relations.items():
            self.relation.addItem(f"{rid}: {rel.name}", rid)
        pick = fact.relation if fact else relation_id
        if pick is not None and self.relation.findData(pick) >= 0:
            self.relation.setCurrentIndex(self.relation.findData(pick))
        self.subject = QLineEdit(fact.subject if fact else "")
        self.subject.setPlaceholderText("e.g. France")
        self.object = QLineEdit(fact.object if fact else "")
        self.object.setPlaceholderText("e.g. Paris")
        self.problem = problem_label()
        form = QFormLayout(self)
        form.addRow("Relation", self.relation)
        form.addRow("Subject [X]", self.subject)
        form.addRow("Object [Y]", self.object)
        form.addRow(self.problem)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        form.addRow(self.buttons)
        self.setMinimumWidth(480)
        self._confirmed: Fact | None = None  # the long-answer fact the user was warned about
        for field in (self.subject, self.object):
            field.textEdited.connect(self._edited)
        self.relation.currentIndexChanged.connect(self._edited)

    def fact(self) -> Fact:
        return Fact(self.relation.currentData(), self.subject.text().strip(), self.object.text().strip())

    def _edited(self, *_):
        self._confirmed = None
        self.buttons.button(QDialogButtonBox.Ok).setText("OK")

    def _say(self, text: str, field=None):
        self.problem.setText(text)
        self.problem.show()
        self.adjustSize()
        if field is not None:
            field.setFocus()

    def problem_with_input(self) -> tuple[str, object]:
        """What is wrong with the typed fact ("" when nothing), and the field to fix."""
        if self.relation.currentData() is None:
            return "Add a relation first (Edit \u2192 Add relation), then its facts.", None
        if not self.subject.text().strip():
            return "Type the subject, the text that replaces [X] (e.g. France).", self.subject
        if not self.object.text().strip():
            return "Type the object, the answer that replaces [Y] (e.g. Paris).", self.object
        fact = self.fact()
        if fact != self.original and fact in self.factset.facts:
            return f"{fact.subject} \u2192 {fact.object} is already in {fact.relation}: change the subject or the " \
                   "object.", self.object
        relation = self.factset.relations[fact.relation]
        if not relation.templates:
            return f"Relation {relation.id} has no templates, so this fact has no prompts: add a template to the " \
                   "relation first (select it and choose Edit).", None
        return "", None

    def long_answer_warning(self, fact: Fact) -> str:
        """A warning when the answer is long (with the expected attribution time), else ""."""
        if self.session is None or self.session.lm is None:
            return ""
        prompts, _ = self.session.prompts_for(fact)
        if not prompts:
            return ""
        tokens = max(len(p.answer_ids) for p in prompts)
        if tokens <= LONG_ANSWER_TOKENS:
            return ""
        per_token = self.seconds_per_token or seconds_per_token_prompt(self.session)
        expected = tokens * len(prompts) * per_token
        shown = fact.object if len(fact.object) <= 40 else fact.object[:37] + "\u2026"
        return (f"The answer {shown!r} is {tokens} tokens long: attribution integrates every answer token, "
                f"so this fact's {len(prompts)} prompts take about {fmt_duration(expected)} "
                f"({tokens} tokens \u00d7 {len(prompts)} prompts \u00d7 {per_token:.2g} s). "
                "Press \u201cAdd anyway\u201d to keep it, or shorten the answer.")

    def accept(self):
        problem, field = self.problem_with_input()
        if problem:
            self._say(problem, field)
            return
        fact = self.fact()
        if self._confirmed != fact:
            warning = self.long_answer_warning(fact)
            if warning:
                self._confirmed = fact
                self.buttons.button(QDialogButtonBox.Ok).setText("Add anyway")
                self._say(warning, self.object)
                return
        super().accept()


class RelationDialog(QDialog):
    """Add or edit a relation; refuses (and stays open) an empty id, a taken id, no templates or a template
    without [X] or [Y], saying which line to fix."""

    def __init__(self, relation: Relation | None = None, parent=None, taken_ids=()):
        super().__init__(parent)
        self.setWindowTitle("Edit relation" if relation else "Add relation")
        self.taken_ids = set(taken_ids) - ({relation.id} if relation else set())
        self.rid = QLineEdit(relation.id if relation else "")
        self.rid.setPlaceholderText("e.g. P36")
        self.rid.setReadOnly(relation is not None)
        self.name = QLineEdit(relation.name if relation else "")
        self.name.setPlaceholderText("e.g. capital")
        self.templates = QPlainTextEdit("\n".join(relation.templates) if relation else "")
        self.templates.setPlaceholderText("One template per line, e.g.\nThe capital of [X] is [Y].")
        self.problem = problem_label()
        form = QFormLayout(self)
        form.addRow("Id", self.rid)
        form.addRow("Name", self.name)
        form.addRow("Templates", self.templates)
        form.addRow(self.problem)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def template_lines(self) -> list[str]:
        return [t.strip() for t in self.templates.toPlainText().splitlines() if t.strip()]

    def relation(self) -> Relation:
        return Relation(self.rid.text().strip(), self.name.text().strip() or self.rid.text().strip(),
                        tuple(self.template_lines()))

    def problem_with_input(self) -> str:
        rid = self.rid.text().strip()
        if not rid:
            return "Type an id for the relation (e.g. P36)."
        if rid in self.taken_ids:
            return f"Relation {rid} exists already: choose another id, or select {rid} and choose Edit."
        lines = self.template_lines()
        if not lines:
            return ("A relation needs at least one template: type one per line with [X] for the subject and [Y] "
                    "for the object, e.g. The capital of [X] is [Y].")
        for number, line in enumerate(lines, 1):
            for slot, what in (("[X]", "the subject"), ("[Y]", "the object")):
                if slot not in line:
                    return f"Template {number} ({line!r}) has no {slot}: write {slot} where {what} goes."
            if line.count("[Y]") > 1:
                return f"Template {number} ({line!r}) has [Y] more than once: the object has one slot."
        if len(set(lines)) != len(lines):
            return "A template is listed twice: delete the repeated line."
        try:
            self.relation()
        except ValueError as exc:
            return f"{exc}."
        return ""

    def accept(self):
        problem = self.problem_with_input()
        if problem:
            self.problem.setText(problem)
            self.problem.show()
            self.adjustSize()
            self.templates.setFocus() if "emplate" in problem else self.rid.setFocus()
            return
        super().accept()


class FactsPanel(QWidget):
    fact_selected = Signal(object)  # Fact | None (the current fact)
    change_requested = Signal(str, object)  # description, new FactSet (pushed as an undoable command)
    import_requested = Signal()
    check_requested = Signal(list)  # facts to check
    batch_edit_requested = Signal(list)  # facts: apply the Edits panel's edit to each (one history entry)
    error = Signal(str, str)  # title, message

    # short check headers (their tooltips say them in full): the dock is narrow, the first column needs the room
    HEADERS = ["Relation / fact / prompt", "says", "p"]
    HEADER_TIPS = ["", "The model's top-1 token for the prompt (\u2714 the answer, \u2718 not); a fact: its prompts "
                   "answered / checked", "p(answer): the probability of the answer on the prompt"]

    def __init__(self, session, parent=None, seconds_per_token: float | None = None):
        super().__init__(parent)
        self.session = session
        self.seconds_per_token = seconds_per_token  # attribution s per answer token per prompt; None: measured
        self.model = QStandardItemModel(0, len(self.HEADERS), self)
        self.model.setHorizontalHeaderLabels(self.HEADERS)
        for col, tip in enumerate(self.HEADER_TIPS):
            self.model.horizontalHeaderItem(col).setToolTip(tip)
        self.tree = QTreeView()
        self.tree.setIndentation(12)  # three levels deep: the default 20 px each cut the prompts at 1280x800
        self.tree.setModel(self.model)
        self.tree.setAlternatingRowColors(True)
        self.tree.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.tree.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.tree.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.tree.setUniformRowHeights(True)
        header = self.tree.header()
        header.setSectionResizeMode(0, QHeaderView.Stretch)
        for col in (1, 2):
            header.setSectionResizeMode(col, QHeaderView.ResizeToContents)
        header.setStretchLastSection(False)
        self.tree.selectionModel().currentRowChanged.connect(self._current_changed)
        self.tree.expanded.connect(self._expanded)
        self.tree.doubleClicked.connect(lambda _: self.edit_selected())

        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter facts\u2026")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(self._apply_filter)

        self.add_rel_button = button("+ Relation", self.add_relation, "Add a relation with its templates")
        self.add_button = button("+ Fact", self.add_fact, "Add a fact to the current relation")
        self.edit_button = button("Edit", self.edit_selected, "Edit the selected relation or fact")
        self.delete_button = button("Delete", self.delete_selected, "Delete the selected facts or relation",
                                    name="danger")
        self.import_button = button("Import\u2026", self.import_requested.emit,
                                    "Import PARAREL folder, CSV or JSONL")
        self.check_button = button("Check", self._check, "Ask the model for each prompt's answer (selected "
                                   "relation or facts; all when nothing is selected)")
        self.batch_button = button("Batch edit", lambda: self.batch_edit_requested.emit(
            self.selected_facts()), "Apply the Edits panel's edit to every selected fact, each with its own refined "
            "neurons, as one undoable entry (progress and Cancel in the status bar)")
        for b in (self.add_rel_button, self.add_button, self.edit_button, self.delete_button, self.import_button,
                  self.check_button, self.batch_button):  # as wide as their text, not the style's 80 px: the
            b.setMinimumWidth(b.fontMetrics().horizontalAdvance(b.text()) + 20)  # dock fits 1280x800's side
        self.summary = hint("")
        self.setLayout(vbox(self.filter, self.tree,
                            hbox(self.add_rel_button, self.add_button, self.edit_button, self.delete_button, None),
                            hbox(self.import_button, self.check_button, self.batch_button, None),
                            self.summary))
        self.rebuild()

    # ----------------------------------------------------------------- building the tree
    def rebuild(self):
        keep = self.current_fact()
        expanded = {self.model.item(r).data(ROLE)[1] for r in range(self.model.rowCount())
                    if self.tree.isExpanded(self.model.index(r, 0))}
        self.model.removeRows(0, self.model.rowCount())
        fs = self.session.factset
        bold = QFont()
        bold.setBold(True)
        for rid, rel in fs.relations.items():
            facts = fs.facts_of(rid)
            rel_item = QStandardItem(f"{rid}: {rel.name}  ({len(facts)} facts, {len(rel.templates)} templates)")
            rel_item.setFont(bold)
            rel_item.setData(("relation", rid), ROLE)
            rel_item.setToolTip("\n".join(rel.templates) or "no templates")
            row = [rel_item] + [QStandardItem("") for _ in range(2)]
            for fact in facts:
                rel_item.appendRow(self._fact_row(fact))
            self.model.appendRow(row)
            if rid in expanded or len(fs.relations) <= 3:
                self.tree.expand(rel_item.index())
        self.summary.setText(f"{len(fs.relations)} relations, {len(fs.facts)} facts"
                             + ("" if self.session.lm else " \u2014 load a model to see prompts and checks"))
        self._apply_filter(self.filter.text())
        if keep is not None:
            self.select_fact(keep)

    def _fact_row(self, fact: Fact) -> list[QStandardItem]:
        """A fact's row. Its prompts are rendered (tokenized: about 4 ms a fact) now only when the model has checked
        some, for the row's ✔ count; otherwise when the row is first expanded (`_expanded`): rendering them all
        up front held the UI thread for minutes after importing PARAREL's 22,425 facts."""
        item = QStandardItem(fact_label(fact))
        item.setData(("fact", fact), ROLE)
        cells = [item, QStandardItem(""), QStandardItem("")]
        relation = self.session.factset.relations.get(fact.relation)
        checked = relation is not None and any(self.session.check_for(fact, t) is not None for t in relation.templates)
        if self.session.lm is not None and not checked:
            pending = QStandardItem("…")
            pending.setData(("pending", fact), ROLE)
            pending.setSelectable(False)
            item.appendRow([pending, QStandardItem(""), QStandardItem("")])
        else:
            self._add_prompt_rows(item, cells, fact)
        if fact_key(fact) in self.session.runs:
            item.setText(fact_label(fact) + "   \u25cf")
            item.setToolTip("\u25cf = has an attribution run")
        return cells

    def _expanded(self, index):
        """A fact row opened for the first time: its prompts replace the placeholder `_fact_row` left."""
        item = self.model.itemFromIndex(index.siblingAtColumn(0))
        first = item.child(0) if item is not None and item.rowCount() == 1 else None
        if first is None or (first.data(ROLE) or ("",))[0] != "pending":
            return
        fact = first.data(ROLE)[1]
        item.removeRows(0, 1)
        self._add_prompt_rows(item, None, fact)

    def _add_prompt_rows(self, item: QStandardItem, cells: list[QStandardItem] | None, fact: Fact):
        """The fact's prompts under `item`, each with the model's answer where checked; with `cells`, the row's
        count of correct answers too."""
        prompts, skipped = self.session.prompts_for(fact)
        n_ok = n_checked = 0
        for prompt in prompts:
            p_item = QStandardItem(prompt.text + (" ___" if prompt.kind == "causal" else ""))  # masked: has its [MASK]
            p_item.setData(("prompt", fact, prompt.template), ROLE)
            p_item.setToolTip(f"{prompt.text} [{prompt.answer!r}]\ntemplate: {prompt.template}")
            says, prob = QStandardItem(""), QStandardItem("")
            check = self.session.check_for(fact, prompt.template)
            if check is not None:
                n_checked += 1
                n_ok += bool(check["correct"])
                says.setText(("\u2714 " if check["correct"] else "\u2718 ") + repr(check["top1_token"]))
                color = QBrush(QColor(OK if check["correct"] else BAD))
                says.setForeground(color)
                prob.setText(fmt_prob(check["prob"]))
                prob.setForeground(color)
                says.setToolTip(f"the model's top prediction is {check['top1_token']!r}: "
                                + ("the answer" if check["correct"] else "not the answer"))
            item.appendRow([p_item, says, prob])
        for skip in skipped:
            s_item = QStandardItem(f"skipped: {skip.template}")
            s_item.setForeground(QBrush(QColor("#7f8c8d")))
            s_item.setToolTip(skip.reason)
            s_item.setData(("skipped", fact, skip.template), ROLE)
            item.appendRow([s_item, QStandardItem("skipped"), QStandardItem("")])
        if n_checked and cells is not None:
            cells[2].setText(f"{n_ok}/{n_checked} \u2714")
            cells[2].setForeground(QBrush(QColor(OK if n_ok == n_checked else (BAD if n_ok == 0 else "#b9770e"))))

    def refresh_fact(self, fact: Fact):
        """Re-renders one fact's row in place (after a check or a run) without touching the selection."""
        item = self._find_fact_item(fact)
        if item is None:
            return
        parent = item.parent()
        row = item.row()
        fresh = self._fact_row(fact)
        selection = self.tree.selectionModel()
        current = self._data(self.tree.currentIndex())
        selection.blockSignals(True)
        try:
            item.setText(fresh[0].text())
            item.setToolTip(fresh[0].toolTip())
            for col in range(1, len(fresh)):
                cell = parent.child(row, col)
                cell.setText(fresh[col].text())
                cell.setForeground(fresh[col].foreground())
            item.removeRows(0, item.rowCount())
            while fresh[0].rowCount():
                item.appendRow(fresh[0].takeRow(0))
            if self.tree.isExpanded(item.index()):  # open: its prompts now, not a placeholder
                self._expanded(item.index())
            if current and current[0] in ("prompt", "skipped") and current[1] == fact:
                for c in range(item.rowCount()):
                    if item.child(c).data(ROLE) == current:
                        selection.setCurrentIndex(item.child(c).index(),
                                                  QItemSelectionModel.ClearAndSelect | QItemSelectionModel.Rows)
        finally:
            selection.blockSignals(False)
        self.tree.viewport().update()

    def _find_fact_item(self, fact: Fact):
        for r in range(self.model.rowCount()):
            rel = self.model.item(r)
            if rel.data(ROLE)[1] != fact.relation:
                continue
            for c in range(rel.rowCount()):
                child = rel.child(c)
                if child.data(ROLE)[0] == "fact" and child.data(ROLE)[1] == fact:
                    return child
        return None

    def _apply_filter(self, text: str):
        text = text.strip().lower()
        for r in range(self.model.rowCount()):
            rel = self.model.item(r)
            any_visible = False
            for c in range(rel.rowCount()):
                child = rel.child(c)
                visible = not text or text in child.text().lower() or text in rel.text().lower()
                self.tree.setRowHidden(c, rel.index(), not visible)
                any_visible |= visible
            self.tree.setRowHidden(r, self.model.invisibleRootItem().index(), not any_visible and bool(text))

    # ----------------------------------------------------------------- selection
    def _data(self, index):
        if not index.isValid():
            return None
        return self.model.itemFromIndex(index.siblingAtColumn(0)).data(ROLE)

    def current_fact(self) -> Fact | None:
        data = self._data(self.tree.currentIndex())
        if data and data[0] in ("fact", "prompt", "skipped"):
            return data[1]
        return None

    def current_relation(self) -> str | None:
        data = self._data(self.tree.currentIndex())
        if not data:
            return None
        return data[1] if data[0] == "relation" else data[1].relation

    def selected_facts(self) -> list[Fact]:
        facts = []
        for index in self.tree.selectionModel().selectedRows(0):
            data = self._data(index)
            if not data:
                continue
            if data[0] == "relation":
                facts.extend(self.session.factset.facts_of(data[1]))
            elif data[1] not in facts:
                facts.append(data[1])
        seen, unique = set(), []
        for f in facts:
            if f not in seen:
                seen.add(f)
                unique.append(f)
        return unique

    def select_fact(self, fact: Fact):
        item = self._find_fact_item(fact)
        if item is not None:
            self.tree.expand(item.parent().index())
            self.tree.selectionModel().setCurrentIndex(
                item.index(), QItemSelectionModel.ClearAndSelect | QItemSelectionModel.Rows)
            self.tree.scrollTo(item.index())

    def select_facts(self, facts: list[Fact]):
        sel = self.tree.selectionModel()
        sel.clearSelection()
        for i, fact in enumerate(facts):
            item = self._find_fact_item(fact)
            if item is None:
                continue
            flags = QItemSelectionModel.Select | QItemSelectionModel.Rows
            if i == 0:
                sel.setCurrentIndex(item.index(), flags)
            else:
                sel.select(item.index(), flags)

    def _current_changed(self, current, previous):
        self.fact_selected.emit(self.current_fact())

    # ----------------------------------------------------------------- editing (undoable via the window)
    def add_relation(self):
        dialog = RelationDialog(parent=self, taken_ids=self.session.factset.relations)
        if dialog.exec() != QDialog.Accepted:
            return
        try:
            relation = dialog.relation()
            if relation.id in self.session.factset.relations:
                raise ValueError(f"relation {relation.id} exists already; select it and choose Edit")
            new = self.session.factset.with_relation(relation)
        except (ValueError, KeyError) as exc:
            self.error.emit("Cannot add the relation", f"{exc}. Fix it and try again.")
            return
        self.change_requested.emit(f"Add relation {relation.id}", new)

    def add_fact(self):
        fs = self.session.factset
        if not fs.relations:
            self.error.emit("No relation yet", "Add a relation (with templates such as 'The capital of [X] is "
                            "[Y].') first, or import a fact set.")
            return
        dialog = FactDialog(fs, relation_id=self.current_relation(), parent=self, session=self.session,
                            seconds_per_token=self.seconds_per_token)
        if dialog.exec() != QDialog.Accepted:
            return
        try:
            fact = dialog.fact()
            if fact in fs.facts:
                raise ValueError(f"{fact_label(fact)} is already in {fact.relation}")
            new = fs.with_fact(fact)
        except (ValueError, KeyError) as exc:
            self.error.emit("Cannot add the fact", f"{exc}. Fix it and try again.")
            return
        self.change_requested.emit(f"Add fact {fact_label(fact)}", new)

    def edit_selected(self):
        data = self._data(self.tree.currentIndex())
        if not data:
            return
        if data[0] in ("prompt", "skipped"):  # a prompt's row: its fact is what can be edited
            data = ("fact", data[1])
        fs = self.session.factset
        try:
            if data[0] == "relation":
                dialog = RelationDialog(fs.relation(data[1]), parent=self)
                if dialog.exec() != QDialog.Accepted:
                    return
                relation = dialog.relation()
                self.change_requested.emit(f"Edit relation {relation.id}", fs.with_relation(relation))
            else:
                old = data[1]
                dialog = FactDialog(fs, fact=old, parent=self, session=self.session,
                                    seconds_per_token=self.seconds_per_token)
                if dialog.exec() != QDialog.Accepted:
                    return
                new_fact = dialog.fact()
                if new_fact == old:
                    return
                self.change_requested.emit(f"Edit fact {fact_label(new_fact)}", fs.replacing_fact(old, new_fact))
        except (ValueError, KeyError) as exc:
            self.error.emit("Cannot edit", f"{exc}. Fix it and try again.")

    def delete_selected(self):
        fs = self.session.factset
        rows = [self._data(i) for i in self.tree.selectionModel().selectedRows(0)]
        rels = [d[1] for d in rows if d and d[0] == "relation"]
        facts = [d[1] for d in rows if d and d[0] == "fact" and d[1].relation not in rels]
        if not rels and not facts:
            self.error.emit("Nothing to delete", "Select facts or a relation in the tree first.")
            return
        what = ", ".join([f"relation {r} with its {len(fs.facts_of(r))} facts" for r in rels]
                         + ([f"{len(facts)} fact(s)"] if facts else []))
        if rels and QMessageBox.question(self, "Delete", f"Delete {what}?") != QMessageBox.Yes:
            return
        new = fs
        for r in rels:
            new = new.without_relation(r)
        self.change_requested.emit(f"Delete {what}", new.without_facts(facts) if facts else new)

    def _check(self):
        facts = self.selected_facts() or list(self.session.factset.facts)
        self.check_requested.emit(facts)
