"""Worker processes: messages come through; one that fails stops the others instead of a hang."""

import time

import pytest

from daemon.cpu import workers as cpu_workers


def _count_to(name: str, n: int, messages) -> None:
    for i in range(n):
        messages.put((name, i))


def _fail_or_wait(fail: bool, messages) -> None:
    if fail:
        raise SystemExit(3)
    time.sleep(120)  # as a data-parallel step waits on the failed process's gradients


def test_messages_of_every_worker_arrive_in_order():
    seen = []
    cpu_workers.run(_count_to, [("a", 3), ("b", 2)], seen.append)
    assert [i for name, i in seen if name == "a"] == [0, 1, 2]
    assert [i for name, i in seen if name == "b"] == [0, 1]


def test_a_failed_worker_stops_the_others_and_raises():
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"1 of 2 worker processes failed \(exit codes \[3\]\)"):
        cpu_workers.run(_fail_or_wait, [(False,), (True,)], lambda _: None)
    assert time.monotonic() - started < 60

