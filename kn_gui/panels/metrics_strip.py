"""The metrics strip above the before/after table: the field's edit metrics (kn_core.metrics, docs/METRICS.md),
each with its random-neuron control beside it, so a number is never read without its baseline.

One card per metric: the edit's value in large type, "random: value" under it, the unedited model's value
("was ...") where it has one; a metric that does not apply shows "n/a" and its reason (also as the tooltip)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFrame, QGridLayout, QLabel, QScrollArea, QWidget

from kn_core.metrics import applicable, format_value

# (key, title, what it measures: the card's tooltip)
CARDS = (
    ("reliability", "Reliability", "The edited fact's own prompts reach the target (update: o' top-1; suppress/erase: "
                                   "the old answer no longer top-1; amplify: P(o) rose)."),
    ("generality", "Generality", "The same on paraphrase templates that were not used to find the neurons."),
    ("locality", "Locality", "Other facts (same relation, other relations) keep their top-1 answer; |\u0394p| of their "
                             "answers."),
    ("portability", "Portability", "Facts whose subject is the new object still hold (update only)."),
    ("flip_rate", "Top-1 flips", "Share of the fact's prompts whose top-1 token changed."),
    ("rank_old", "Rank of o", "Mean rank of the old object on the fact's prompts, before \u2192 after."),
    ("rank_new", "Rank of o'", "Mean rank of the new object on the fact's prompts, before \u2192 after."),
    ("edit_size", "Edit size", "Neurons edited; \u2016\u0394W\u2016 of a weight edit or \u2016\u0394a\u2016 of an "
                               "activation edit (0: the edit did nothing)."),
)


def _card_texts(key: str, value) -> tuple[str, str]:
    """(main text, detail line) for one metric of the edit or the control."""
    if value is None:
        return "n/a", ""
    if key == "flip_rate":
        return format_value(value), ""
    if key == "edit_size":
        main = (f"\u2016\u0394W\u2016 {value['weight_change']:.3g}" if value.get("weight_change") is not None else
                f"\u2016\u0394a\u2016 {value['activation_change']:.3g}" if value.get("activation_change") is not None
                else "not measured")
        return main, f"{value['neurons']} neurons"
    if not applicable(value):
        return "n/a", value["reason"]
    if key in ("rank_old", "rank_new"):
        return (f"{format_value(value['before'], 'rank')} \u2192 {format_value(value['after'], 'rank')}",
                f"median {format_value(value['median_before'], 'rank')} \u2192 "
                f"{format_value(value['median_after'], 'rank')}")
    detail = f"p {format_value(value['mean_prob'], 'prob')}, rank {format_value(value['mean_rank'], 'rank')}, n {value['n']}"
    if value.get("mean_abs_dp") is not None:
        detail = f"|\u0394p| {format_value(value['mean_abs_dp'], 'prob')}, n {value['n']}"
    return format_value(value["rate"]), detail


def _was(key: str, value) -> str:
    before = value.get("before") if isinstance(value, dict) and applicable(value) else None
    if key in ("reliability", "generality", "portability") and isinstance(before, dict) and before.get("rate") is not None:
        return f"was {format_value(before['rate'])}"
    return ""


PROTOCOL_TIPS = {
    "easyedit": "EasyEdit's definition (easyeditor/evaluate/evaluate_utils.py): token accuracies, locality = share "
                "of the target's positions whose argmax is unchanged (docs/METRICS.md).",
    "rome": "ROME's CounterFact scores (experiments/py/eval_utils_counterfact.py): ES/PS/NS compare p(o*) with p(o) "
            "per prompt; EM/PM/NM their magnitudes; S the harmonic mean of ES, PS, NS (docs/METRICS.md).",
    "mquake": "MQuAKE's edit-wise and multi-hop accuracy (docs/METRICS.md).",
}


def _card(title: str) -> tuple[QFrame, list[QLabel]]:
    """A compact card (3 lines): the title with the value in bold beside it, "random: ..." (the control), the
    detail in small type (all of it in the tooltip)."""
    frame = QFrame()
    frame.setObjectName("metricCard")
    frame.setFrameShape(QFrame.StyledPanel)
    labels = [QLabel(title), QLabel(), QLabel(), QLabel()]
    labels[0].setObjectName("hint")
    labels[1].setObjectName("metricValue")
    labels[1].setStyleSheet("font-size: 12pt; font-weight: 600; color: #1f3b57;")
    labels[2].setStyleSheet("color: #5d6d7e; font-size: 8pt;")
    labels[3].setStyleSheet("color: #7b4f9d;")
    inner = QGridLayout(frame)
    inner.setContentsMargins(5, 2, 5, 2)
    inner.setVerticalSpacing(0)
    inner.setHorizontalSpacing(6)
    for label in labels:
        label.setAlignment(Qt.AlignLeft | Qt.AlignVCenter)
    inner.addWidget(labels[0], 0, 0)
    inner.addWidget(labels[1], 0, 1, Qt.AlignRight)
    inner.addWidget(labels[3], 1, 0, 1, 2)
    inner.addWidget(labels[2], 2, 0, 1, 2)
    return frame, labels


def _cut(text: str, width: int = 26) -> str:
    return text if len(text) <= width else text[:width - 2].rstrip() + "\u2026"


class MetricsStrip(QScrollArea):
    """Shows `report["metrics"]` (kn_core.metrics.edit_metrics) or hides itself when there is none; after them,
    when the edit was scored by another protocol (`kn edit --protocol`), that protocol's scores under its own
    names, each beside its random-neuron control. The cards stand in a grid of `columns` beside the before/after
    table (the Edits dock is short and wide: stacked above the table they were cut to their titles at 1600x1000);
    it scrolls down when there are more cards than room."""

    def __init__(self, parent=None, columns: int = 3):
        super().__init__(parent)
        self.setFrameShape(QFrame.NoFrame)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        inner = QWidget()
        self.setWidget(inner)
        self.grid = QGridLayout(inner)
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setSpacing(4)
        self.columns = columns
        self.cards: dict[str, tuple[QFrame, QLabel, QLabel, QLabel, QLabel]] = {}
        for key, title, tip in CARDS:
            frame, labels = _card(title)
            frame.setToolTip(tip)
            self.cards[key] = (frame, *labels)
        self.protocol_heading = QLabel()
        self.protocol_heading.setObjectName("hint")
        self.protocol_heading.setWordWrap(True)
        self.protocol_cards: dict[str, tuple[QFrame, QLabel, QLabel, QLabel, QLabel]] = {}
        self._place()
        self.hide()

    def set_columns(self, columns: int) -> None:
        if columns != self.columns:
            self.columns = columns
            self._place()

    def _place(self):
        """Our cards, then the protocol's heading and cards, `columns` to a row."""
        for i in reversed(range(self.grid.count())):
            self.grid.takeAt(i)
        for k, (frame, *_) in enumerate(self.cards.values()):
            self.grid.addWidget(frame, k // self.columns, k % self.columns)
        row = (len(self.cards) + self.columns - 1) // self.columns
        self.grid.addWidget(self.protocol_heading, row, 0, 1, self.columns)
        for k, (frame, *_) in enumerate(self.protocol_cards.values()):
            self.grid.addWidget(frame, row + 1 + k // self.columns, k % self.columns)
        self.grid.setRowStretch(self.grid.rowCount(), 1)
        self._fit_width()

    def _fit_width(self):
        """As wide as the cards' texts need (the splitter never squeezes a card's value out of view)."""
        self.widget().layout().activate()
        self.setMinimumWidth(self.widget().minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width())

    def show_metrics(self, metrics: dict | None, protocol: str = "kn", protocol_scores: dict | None = None) -> None:
        self._show_protocol(protocol, protocol_scores)
        if not metrics:
            self.hide()
            return
        control = metrics.get("control") if applicable(metrics.get("control")) else None
        for key, title, tip in CARDS:
            frame, _, value_label, detail_label, control_label = self.cards[key]
            value = metrics.get(key)
            main, detail = _card_texts(key, value)
            was = _was(key, value)
            value_label.setText(main)
            # a long reason is cut here and given in full in the tooltip
            detail_label.setText("   ".join(t for t in (_cut(detail), was) if t))
            if control is None:
                control_label.setText("random: not measured")
            else:
                control_main, _ = _card_texts(key, control.get(key))
                control_label.setText(f"random: {control_main}")
            reason = detail if main == "n/a" and detail else ""
            frame.setToolTip(tip + (f"\n\n{detail}" if detail and not reason else "")
                             + (f"\n\nNot applicable: {reason}" if reason else "")
                             + "\n\nThe random control applies the same edit to as many random neurons of the same "
                               "layers (docs/METRICS.md).")
        self.show()
        self._fit_width()

    def _show_protocol(self, protocol: str, scores: dict | None) -> None:
        """Cards for the protocol's scores (kn_core.protocols: pre, post, control), named as the protocol names
        them."""
        from kn_core.protocols import flat_scores, format_score

        for frame, *_ in self.protocol_cards.values():
            self.grid.removeWidget(frame)
            frame.deleteLater()
        self.protocol_cards = {}
        self.protocol_heading.setVisible(bool(scores) and protocol != "kn")
        if scores and protocol != "kn":
            pre, post, control = (flat_scores(scores.get(side) or {}) for side in ("pre", "post", "control"))
            self.protocol_heading.setText(f"{protocol} protocol (its names; teacher-forced): after the edit, "
                                          "random = the random-neuron control, was = unedited")
            for key, value in post.items():
                frame, labels = _card(key)
                labels[1].setText(format_score(key, value))
                reason = value.get("reason", "") if isinstance(value, dict) else ""
                labels[2].setText(_cut(reason) if reason else f"was {format_score(key, pre.get(key))}")
                labels[3].setText(f"random: {format_score(key, control.get(key))}")
                frame.setToolTip(PROTOCOL_TIPS.get(protocol, "") + (f"\n\nNot applicable: {reason}" if reason else ""))
                self.protocol_cards[key] = (frame, *labels)
        self._place()

    def texts(self) -> dict[str, tuple[str, str, str]]:
        """(value, detail, control) per card, as shown; the protocol's cards after ours, as "protocol:<name>"."""
        cards = {**self.cards, **{f"protocol:{k}": card for k, card in self.protocol_cards.items()}}
        return {key: (v.text(), d.text(), c.text()) for key, (_, _, v, d, c) in cards.items()}
