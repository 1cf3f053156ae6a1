"""Faults of the cache directory, survived: full, read-only, holding damaged files, a prompt-cache
write cut by SIGKILL. Each case ends with the daemon serving, its greedy answers token-identical to a
clean daemon's (docs/serving.md, Faults). Clients that misbehave: test_faults_net.py."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import threading

import mlx.core as mx
import openai
import pytest
from conftest import Daemon, until

# system prompts of one length (so their cache files are one size), each past prompt_cache_min_tokens
SYSTEMS = [f"You are assistant number {i}. Answer briefly, kindly and in plain words. " * 2 for i in range(6)]
QUESTION = {"role": "user", "content": "Say something about the sea."}


def ask(daemon: Daemon, system: str) -> tuple[str, int]:
    """The greedy answer under `system`, and how many prompt tokens came from the prompt cache."""
    r = daemon.client().chat.completions.create(
        model="tiny", temperature=0, max_tokens=12, messages=[{"role": "system", "content": system}, QUESTION])
    return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens


def start(tiny_gguf, cache_dir, **env: str) -> Daemon:
    return Daemon("--model", str(tiny_gguf), "--drafter", "random", cache_dir=cache_dir, env=env)


def events(daemon: Daemon, event: str) -> list[dict]:
    return [r for r in daemon.log_records() if r.get("event") == event]


def strays(root) -> list:
    """Temporary files of writes that never finished (the prompt cache's and the calibration's)."""
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def entries(root) -> list:
    return [p for p in root.glob("prompts/*/*.safetensors") if ".tmp" not in p.name]



@pytest.fixture(scope="module")
def reference(tiny_daemon) -> dict[str, str]:
    """Each system prompt's answer on a clean daemon."""
    return {s: ask(tiny_daemon, s)[0] for s in SYSTEMS}


@pytest.fixture(scope="module")
def warm_dir(tiny_gguf, tmp_path_factory):
    """A cache dir as a daemon leaves it: its calibration and two persisted system prompts."""
    root = tmp_path_factory.mktemp("warm")
    daemon = start(tiny_gguf, root)
    for system in SYSTEMS[:2]:
        ask(daemon, system)
    assert daemon.stop() == 0
    assert len(list(root.glob("calibration/*.json"))) == 1 and len(entries(root)) == 2
    return root


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs: a real filesystem, to fill or remount read-only (chmod does not stop root)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root with CAP_SYS_ADMIN: {mounted.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], check=True)


def fill(root) -> None:
    """Writes one file until the filesystem refuses more (ENOSPC)."""
    fd = os.open(root / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, bytes(1 << 16))
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_full_cache_dir_costs_only_the_files(tiny_gguf, tmpfs, reference):
    fill(tmpfs)
    daemon = start(tiny_gguf, tmpfs)  # the calibration cannot be saved
    try:
        for system in SYSTEMS[:3]:  # each asks for a prompt-cache write, which fails
            assert ask(daemon, system)[0] == reference[system]
        again, cached = ask(daemon, SYSTEMS[0])  # the entry is kept in memory
        assert again == reference[SYSTEMS[0]] and cached > 0
    finally:
        code = daemon.stop()  # saves the calibration once more
    assert code == 0, daemon.log()
    assert len(events(daemon, "calibration not saved")) == 1
    assert len(events(daemon, "prompt cache not written to disk")) == 1
    assert strays(tmpfs) == []


def test_a_read_only_cache_dir_is_read_not_written(tiny_gguf, tmpfs, warm_dir, reference):
    shutil.copytree(warm_dir, tmpfs, dirs_exist_ok=True)
    (folder,) = (tmpfs / "prompts").iterdir()
    (folder / "0123456789abcdef01234567.4242.tmp.safetensors").write_bytes(b"half")  # a killed write's
    (folder / "fedcba9876543210fedcba98.safetensors").write_bytes(b"damaged")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    daemon = start(tiny_gguf, tmpfs)  # neither file can be removed
    try:
        answer, cached = ask(daemon, SYSTEMS[0])  # from the disk, on a fresh daemon
        assert answer == reference[SYSTEMS[0]] and cached > 0
        for system in SYSTEMS[2:4]:  # their writes are refused
            assert ask(daemon, system)[0] == reference[system]
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
    assert events(daemon, "calibration loaded")
    assert len(events(daemon, "calibration not saved")) == 1
    assert len(events(daemon, "prompt cache not written to disk")) == 1
    assert [r["file"] for r in events(daemon, "unreadable prompt cache file")] == [
        str(folder / "fedcba9876543210fedcba98.safetensors")]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_files_are_dropped_at_start(tiny_gguf, warm_dir, tmp_path, reference, damage):
    root = tmp_path / "cache"
    shutil.copytree(warm_dir, root)
    files = [*root.glob("calibration/*.json"), *entries(root)]
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    daemon = start(tiny_gguf, root)
    try:
        assert ask(daemon, SYSTEMS[0]) == (reference[SYSTEMS[0]], 0)  # nothing of its damaged entry is used
        assert ask(daemon, SYSTEMS[1])[0] == reference[SYSTEMS[1]]
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
    assert len(events(daemon, "unreadable prompt cache file")) == 2
    assert events(daemon, "calibration unreadable: probed again")
    (calibration,) = root.glob("calibration/*.json")  # written whole again
    assert "costs" in json.loads(calibration.read_text())
    assert len(entries(root)) == 2 and all(mx.load(str(p))["ids"].size for p in entries(root))


def test_sigkill_mid_write_then_a_restart(tiny_gguf, tiny_lm, tmp_path, reference):
    root = tmp_path / "cache"
    daemon = start(tiny_gguf, root)

    def ask_until_killed(system):
        with contextlib.suppress(openai.APIError):
            ask(daemon, system)

    load = [threading.Thread(target=ask_until_killed, args=(s,)) for s in SYSTEMS]
    for t in load:  # each request persists its own system prompt
        t.start()
    until(lambda: entries(root))  # the writes have begun
    daemon.stop(signal.SIGKILL)
    for t in load:
        t.join()
    whole = entries(root)[0]
    size = whole.stat().st_size
    # what a kill between the write and the rename leaves, written out so the case is always there
    whole.with_name(f"{whole.stem}.99999.tmp.safetensors").write_bytes(whole.read_bytes()[: size // 2])
    (calibration,) = root.glob("calibration/*.json")
    calibration.with_name(f"{calibration.stem}.99999.tmp").write_text(calibration.read_text()[:100])
    bound = int(size * 2.5)  # two entries: fewer than the killed daemon may have written
    daemon = start(tiny_gguf, root, MTPD_PROMPT_CACHE_DISK_BYTES=str(bound))
    try:
        assert strays(root) == []
        kept = entries(root)
        assert kept and sum(p.stat().st_size for p in kept) <= bound
        for path in kept:  # each file left is whole, and answers from the disk
            text = tiny_lm.tokenizer.decode(mx.load(str(path))["ids"].tolist())
            system = next(s for s in SYSTEMS if s in text)
            answer, cached = ask(daemon, system)
            assert answer == reference[system] and cached > 0
        for system in SYSTEMS:
            assert ask(daemon, system)[0] == reference[system]
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
    assert strays(root) == [] and sum(p.stat().st_size for p in entries(root)) <= bound
