"""The window's layout: panels in scroll areas, default dock sizes, and the saved layout (`DockLayout`, an object
the window owns)."""

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


class DockLayout:
    """The main window's dock sizes and its saved layout (geometry and dock state in the settings)."""

    def __init__(self, window):
        self.window = window
        self.sized = False  # the docks have sizes for this screen: a saved layout, or the defaults once shown
        self.default_state = None  # the docks' places before a saved layout was restored (Reset layout)
        self._fit_timer = None

    def default_dock_sizes(self):
        """Dock sizes that give the neuron map at least its minimum height and show the edits dock down to its
        Apply button. Below 1500 px wide the Neurons dock joins the Model and Facts tabs, so the plots keep their
        width at 1280 px; when the window is too short for the per-layer plots above the map (about 900 px) the
        attribution panel folds them into a tab (AttributionPanel.set_folded) and the edits dock gets the rest."""
        win = self.window
        w, h = max(win.width(), 1024), max(win.height(), 700)
        ap = win.attribution_panel
        central = ap.minimumSizeHint()
        if w < 1500:
            win.tabifyDockWidget(win.facts_dock, win.neurons_dock)
            win.resizeDocks([win.model_dock], [max(300, min(SIDE_WIDTH, w - central.width() - 40))], Qt.Horizontal)
        else:
            win.addDockWidget(Qt.RightDockWidgetArea, win.neurons_dock)
            side = max(280, min(SIDE_WIDTH, (w - central.width() - 40) // 2))
            win.resizeDocks([win.model_dock, win.neurons_dock], [side, side - 40], Qt.Horizontal)
        (win.model_dock if win.session.lm is None else win.facts_dock).raise_()  # loading first, then facts
        chrome = win.menuBar().sizeHint().height() + win.menus.toolbar.sizeHint().height() + \
            win.statusBar().sizeHint().height() + 40
        unfolded = ap._unfolded_height()
        folded = unfolded - (0 if ap.folded else ap.layer_widget.minimumHeight() + ap.split.handleWidth())
        central_height = (unfolded if h - chrome - unfolded >= EDITS_HEIGHT else folded) + 8  # + rounding slack
        win.resizeDocks([win.edits_dock], [max(EDITS_HEIGHT, h - chrome - central_height)], Qt.Vertical)

    def restore(self):
        win, settings = self.window, self.window.settings
        geometry = settings.value("window/geometry")
        state = settings.value("window/state")
        screen = win.screen().availableGeometry()
        saved_on = settings.value("window/screen")
        same_screen = saved_on == f"{screen.width()}x{screen.height()}"
        # a saved layout wins over the default sizes on the screen it was saved on; elsewhere (a laptop after a
        # big monitor) the docks keep their places but get sizes for this screen
        self.sized = isinstance(state, (QByteArray, bytes)) and same_screen
        if isinstance(geometry, (QByteArray, bytes)):
            win.restoreGeometry(geometry)
        else:
            win.resize(min(1600, screen.width()), min(1000, screen.height()))
        self.fit_to_screen()
        self.default_state = win.saveState()
        if isinstance(state, (QByteArray, bytes)):
            win.restoreState(state)

    def save(self):
        win = self.window
        screen = win.screen().availableGeometry()
        win.settings.setValue("window/geometry", win.saveGeometry())
        win.settings.setValue("window/state", win.saveState())
        win.settings.setValue("window/screen", f"{screen.width()}x{screen.height()}")

    def fit_to_screen(self):
        """Never larger than the screen's available area with the window manager's frame (title bar, borders):
        the status bar stays on screen. Before the first show the frame is unknown; FRAME_GUESS stands in."""
        win = self.window
        screen = win.screen().availableGeometry()
        frame, inner = win.frameGeometry(), win.geometry()
        extra_w, extra_h = frame.width() - inner.width(), frame.height() - inner.height()
        if not win.isVisible():
            extra_w, extra_h = FRAME_GUESS
        elif (extra_w, extra_h) == (0, 0):  # shown without a frame: no window manager, nothing to fit
            return
        width = min(win.width(), screen.width() - extra_w)
        height = min(win.height(), screen.height() - extra_h)
        if (width, height) != (win.width(), win.height()):
            win.resize(width, height)
        frame = win.frameGeometry()
        x = min(max(frame.x(), screen.x()), screen.right() - frame.width() + 1)
        y = min(max(frame.y(), screen.y()), screen.bottom() - frame.height() + 1)
        if (x, y) != (frame.x(), frame.y()):
            win.move(x, y)

    def shown(self):
        """The window's showEvent: fitted to the screen once the window manager has framed it (the first show),
        by a timer the window owns so it dies with the window; dock sizes for the size the window really got on
        a first start or another screen."""
        if self._fit_timer is None:
            self._fit_timer = QTimer(self.window, singleShot=True, interval=100, timeout=self.fit_to_screen)
            self._fit_timer.start()
        if not self.sized:
            self.sized = True
            self.default_dock_sizes()

    def reset(self):
        self.window.restoreState(self.default_state)
        self.default_dock_sizes()
