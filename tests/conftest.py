import os

# Qt widgets need a platform plugin; tests must run without a display.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


import pytest  # noqa: E402


@pytest.fixture
def pause_after_first_prompt(monkeypatch):
    """The next attribution job waits after its first prompt (in the worker thread) until it is cancelled, so a
    test of what Cancel keeps does not race a fast machine that finishes every prompt before the click lands.
    Later jobs run normally."""
    import time

    import kn_core.attribution as attribution

    original = attribution.attribute_fact
    paused = []

    def attribute_fact(lm, prompts, params=None, *, task=None, on_prompt=None):
        def first_then_wait(k, result):
            if on_prompt is not None:
                on_prompt(k, result)
            if paused:
                return
            paused.append(k)
            deadline = time.monotonic() + 60
            while not task.cancelled and time.monotonic() < deadline:
                time.sleep(0.01)

        return original(lm, prompts, params, task=task, on_prompt=first_then_wait)

    monkeypatch.setattr(attribution, "attribute_fact", attribute_fact)
