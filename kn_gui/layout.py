"""The window's layout: panels in scroll areas, default dock sizes, and the saved layout (a mixin of MainWindow)."""

from __future__ import annotations

from PySide6.QtCore import QByteArray, QEvent, Qt, QTimer
from PySide6.QtWidgets import QFrame, QScrollArea, QSizePolicy, QWidget


class PanelScroll(QScrollArea):
    """A panel inside a scroll area, so its minimum size never forces the window past the screen. The panel
    fills the viewport but never shrinks below its minimum size hint (QScrollArea's own resizing would keep
    word-wrapped panels at their full preferred height, scrolling where nothing needs to)."""

    def __init__(self, widget: QWidget):
        super().__init__()
        self.setFrameShape(QFrame.NoFrame)
        self.setWidget(widget)
        widget.installEventFilter(self)

    def _fit(self):
        view, least = self.viewport().size(), self.widget().minimumSizeHint()
        self.widget().resize(max(view.width(), least.width()), max(view.height(), least.height()))

    def viewportEvent(self, event):
        if event.type() == QEvent.Resize:
            self._fit()
        return super().viewportEvent(event)

    def eventFilter(self, watched, event):
        if event.type() == QEvent.LayoutRequest:
            self._fit()
        return False


FRAME_GUESS = (16, 48)  # a window manager's borders and title bar, until the real frame is known
SIDE_WIDTH = 340  # a side dock's default width; the plots get the rest
EDITS_HEIGHT = 270  # the edits dock down to its Apply button (the history below it may scroll)


def show_current_page_only(stack):
    """A QStackedWidget sized by its current page, not its tallest one (the short edit forms leave room)."""
    def fit(index):
        for i in range(stack.count()):
            page = stack.widget(i)
            vertical = QSizePolicy.Preferred if i == index else QSizePolicy.Ignored
            page.setSizePolicy(QSizePolicy.Preferred, vertical)
        stack.updateGeometry()

    stack.currentChanged.connect(fit)
    fit(stack.currentIndex())


class LayoutMixin:
    def _default_dock_sizes(self):
        """Dock sizes that give the neuron map at least its minimum height and show the edits dock down to its
        Apply button. Below 1500 px wide the Neurons dock joins the Model and Facts tabs, so the plots keep their
        width at 1280 px; when the window is too short for the per-layer plots above the map (about 900 px) the
        attribution panel folds them into a tab (AttributionPanel.set_folded) and the edits dock gets the rest."""
        w, h = max(self.width(), 1024), max(self.height(), 700)
        ap = self.attribution_panel
        central = ap.minimumSizeHint()
        if w < 1500:
            self.tabifyDockWidget(self.facts_dock, self.neurons_dock)
            self.resizeDocks([self.model_dock], [max(300, min(SIDE_WIDTH, w - central.width() - 40))], Qt.Horizontal)
        else:
            self.addDockWidget(Qt.RightDockWidgetArea, self.neurons_dock)
            side = max(280, min(SIDE_WIDTH, (w - central.width() - 40) // 2))
            self.resizeDocks([self.model_dock, self.neurons_dock], [side, side - 40], Qt.Horizontal)
        (self.model_dock if self.session.lm is None else self.facts_dock).raise_()  # loading first, then facts
        chrome = self.menuBar().sizeHint().height() + self.toolbar.sizeHint().height() + \
            self.statusBar().sizeHint().height() + 40
        unfolded = ap._unfolded_height()
        folded = unfolded - (0 if ap.folded else ap.layer_widget.minimumHeight() + ap.split.handleWidth())
        central_height = (unfolded if h - chrome - unfolded >= EDITS_HEIGHT else folded) + 8  # + rounding slack
        self.resizeDocks([self.edits_dock], [max(EDITS_HEIGHT, h - chrome - central_height)], Qt.Vertical)

    def _restore_layout(self):
        geometry = self.settings.value("window/geometry")
        state = self.settings.value("window/state")
        screen = self.screen().availableGeometry()
        saved_on = self.settings.value("window/screen")
        same_screen = saved_on == f"{screen.width()}x{screen.height()}"
        # a saved layout wins over the default sizes on the screen it was saved on; elsewhere (a laptop after a
        # big monitor) the docks keep their places but get sizes for this screen
        self._sized = isinstance(state, (QByteArray, bytes)) and same_screen
        if isinstance(geometry, (QByteArray, bytes)):
            self.restoreGeometry(geometry)
        else:
            self.resize(min(1600, screen.width()), min(1000, screen.height()))
        self._fit_to_screen()
        self._default_state = self.saveState()
        if isinstance(state, (QByteArray, bytes)):
            self.restoreState(state)

    def save_layout(self):
        screen = self.screen().availableGeometry()
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.settings.setValue("window/screen", f"{screen.width()}x{screen.height()}")

    def _fit_to_screen(self):
        """Never larger than the screen's available area with the window manager's frame (title bar, borders):
        the status bar stays on screen. Before the first show the frame is unknown; FRAME_GUESS stands in."""
        screen = self.screen().availableGeometry()
        frame, inner = self.frameGeometry(), self.geometry()
        extra_w, extra_h = frame.width() - inner.width(), frame.height() - inner.height()
        if not self.isVisible():
            extra_w, extra_h = FRAME_GUESS
        elif (extra_w, extra_h) == (0, 0):  # shown without a frame: no window manager, nothing to fit
            return
        width = min(self.width(), screen.width() - extra_w)
        height = min(self.height(), screen.height() - extra_h)
        if (width, height) != (self.width(), self.height()):
            self.resize(width, height)
        frame = self.frameGeometry()
        x = min(max(frame.x(), screen.x()), screen.right() - frame.width() + 1)
        y = min(max(frame.y(), screen.y()), screen.bottom() - frame.height() + 1)
        if (x, y) != (frame.x(), frame.y()):
            self.move(x, y)

    def showEvent(self, event):
        super().showEvent(event)
        if not hasattr(self, "_fit_timer"):  # once the window manager has framed it (the first show); a timer the
            # window owns, so it dies with the window
            self._fit_timer = QTimer(self, singleShot=True, interval=100, timeout=self._fit_to_screen)
            self._fit_timer.start()
        if not self._sized:  # first start or another screen: dock sizes for the size the window really got
            self._sized = True
            self._default_dock_sizes()

    def reset_layout(self):
        self.restoreState(self._default_state)
        self._default_dock_sizes()
