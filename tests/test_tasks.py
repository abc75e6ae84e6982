import threading

import pytest

from kn_core.tasks import Cancelled, Task, as_task


def test_progress_is_clamped_and_sliced_into_the_parent_bar():
    seen = []
    task = Task(on_progress=lambda f, m: seen.append((f, m)))
    task.progress(1.5, "over")
    phase = task.slice(0.5, 1.0)
    phase.progress(0.5, "half of the second half")
    phase.slice(0.0, 0.5).progress(1.0, "nested")
    phase.progress(None, "unknown")
    assert seen == [(1.0, "over"), (0.75, "half of the second half"), (0.75, "nested"), (None, "unknown")]


def test_cancel_reaches_every_slice_from_another_thread():
    task = Task()
    phase = task.slice(0.2, 0.4)
    phase.check()
    threading.Thread(target=task.cancel).start()
    for _ in range(1000):
        if phase.cancelled:
            break
        threading.Event().wait(0.001)
    with pytest.raises(Cancelled):
        phase.check()
    child_cancel = Task().slice(0, 1)
    child_cancel.cancel()
    assert child_cancel.cancelled


def test_partials_go_to_the_root_and_a_missing_task_is_silent():
    got = []
    task = Task(on_partial=got.append)
    task.slice(0, 0.5).partial({"chunk": 1})
    assert got == [{"chunk": 1}]
    silent = as_task(None)
    silent.progress(0.5)
    silent.partial(object())
    silent.check()
    assert as_task(task) is task


def test_a_relay_has_its_own_listeners_and_is_cancelled_with_its_origin():
    outer, inner = [], []
    job = Task(on_progress=lambda f, m: outer.append(m))
    phase = job.relay(on_progress=lambda f, m: inner.append((f, m)), on_partial=inner.append)
    phase.progress(0.5, "half")
    phase.partial("chunk")
    assert inner == [(0.5, "half"), "chunk"] and outer == []
    job.cancel()
    with pytest.raises(Cancelled):
        phase.check()
    relayed_cancel = Task().relay()
    relayed_cancel.cancel()  # cancels the origin too: one cancel per job
    assert relayed_cancel.cancelled
