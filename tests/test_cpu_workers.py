"""Worker processes: messages come through; one that fails stops the others instead of a hang;
a killed parent leaves none behind."""

import os
import signal
import subprocess
import sys
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



def _report_and_wait(messages) -> None:
    messages.put(os.getpid())
    time.sleep(120)


def test_workers_of_a_killed_parent_end():
    """SIGTERM to `mtpd train-drafter` (no chance to stop its workers): they end by themselves."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); import test_cpu_workers as t; "
         "from daemon.cpu import workers; workers.run(t._report_and_wait, [(), ()], lambda pid: print(pid, flush=True))"],
        stdout=subprocess.PIPE, text=True)
    pids = [int(parent.stdout.readline()) for _ in range(2)]
    parent.send_signal(signal.SIGTERM)
    parent.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    """Running: a zombie (ended, not yet reaped by init) is not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
