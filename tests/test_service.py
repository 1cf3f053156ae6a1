"""The service files, the launchctl / systemctl calls (through a recorded fake: launchd cannot run
here), `mtpd status`, and a kill -9 that loses no persisted state."""

import json
import os
import plistlib
import shutil
import signal
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import Daemon, free_port, run_mtpd

from daemon.system.service import LABEL, launchd_plist, service_plan, systemd_unit

FAKE = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
"""


def mtpd_with(env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def fake_managers(tmp_path):
    """`launchctl`, `systemctl` and `journalctl` that only record how they were called."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("launchctl", "systemctl", "journalctl"):
        exe = bin_dir / name
        exe.write_text(FAKE.format(log=log))
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}", "XDG_CONFIG_HOME": str(home / ".config")}
    return env, home, log


def test_plist_key_by_key(tmp_path):
    plist = plistlib.loads(launchd_plist(["/opt/mtpd/bin/mtpd", "serve"], {"MTPD_PORT": "8001"}, tmp_path))
    assert plist["Label"] == LABEL and LABEL.count(".") >= 2
    assert plist["ProgramArguments"] == ["/opt/mtpd/bin/mtpd", "serve"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] == 10
    assert plist["ProcessType"] == "Interactive"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(tmp_path / "Library/Logs/mtpd/mtpd.log")
    assert plist["EnvironmentVariables"] == {"MTPD_PORT": "8001"}
    assert plist["WorkingDirectory"] == str(tmp_path)
    assert set(plist) == {"Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "ThrottleInterval", "ProcessType",
                          "StandardOutPath", "StandardErrorPath", "EnvironmentVariables", "WorkingDirectory"}


def test_dry_run_prints_valid_files_and_changes_nothing(fake_managers):
    env, home, log = fake_managers
    done = mtpd_with(env, "service", "install", "--dry-run", "--manager", "launchd", "--env", "MTPD_PORT=8001")
    assert done.returncode == 0, done.stderr
    xml = done.stdout[done.stdout.index("<?xml"): done.stdout.index("</plist>") + len("</plist>")]
    plist = plistlib.loads(xml.encode())
    assert Path(plist["ProgramArguments"][0]).is_absolute() and plist["ProgramArguments"][-1] == "serve"
    assert plist["EnvironmentVariables"]["MTPD_PORT"] == "8001"
    assert f"launchctl bootstrap gui/{os.getuid()} {home}/Library/LaunchAgents/{LABEL}.plist" in done.stdout
    unit = mtpd_with(env, "service", "install", "--dry-run", "--manager", "systemd")
    assert unit.returncode == 0 and "[Service]" in unit.stdout and "Restart=on-failure" in unit.stdout
    assert not log.exists() and not (home / "Library").exists() and not (home / ".config/systemd").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    unit = tmp_path / "mtpd.service"
    unit.write_text(systemd_unit([sys.executable, "-m", "daemon", "serve"], {"MTPD_PORT": "8001"}, 40))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in done.stderr.splitlines() if "mtpd.service" in line]
    assert done.returncode == 0 and not problems, done.stderr


@pytest.mark.parametrize("manager", ["launchd", "systemd"])
def test_every_action_drives_the_manager(fake_managers, manager):
    env, home, log = fake_managers
    uid = os.getuid()
    target = f"gui/{uid}/{LABEL}"
    expected = {
        "launchd": {
            "install": [f"launchctl bootout {target}",
                        f"launchctl bootstrap gui/{uid} {home}/Library/LaunchAgents/{LABEL}.plist"],
            "start": [f"launchctl kickstart {target}"],
            "stop": [f"launchctl kill SIGTERM {target}"],
            "restart": [f"launchctl kickstart -k {target}"],
            "status": [f"launchctl print {target}"],
            "uninstall": [f"launchctl bootout {target}"],
        },
        "systemd": {
            "install": ["systemctl --user daemon-reload", "systemctl --user enable mtpd.service",
                        "systemctl --user restart mtpd.service"],
            "start": ["systemctl --user start mtpd.service"],
            "stop": ["systemctl --user stop mtpd.service"],
            "restart": ["systemctl --user restart mtpd.service"],
            "status": ["systemctl --user status --no-pager mtpd.service"],
            "logs": ["journalctl --user -u mtpd.service -n 100 --no-pager"],
            "uninstall": ["systemctl --user disable --now mtpd.service", "systemctl --user daemon-reload"],
        },
    }[manager]
    path = service_plan("install", manager, home, {}).path
    for action, calls in expected.items():
        log.unlink(missing_ok=True)
        done = mtpd_with(env, "service", action, "--manager", manager)
        assert done.returncode == 0, done.stderr
        assert log.read_text().splitlines() == calls, action
        if action == "install":
            first = path.read_bytes()
            assert mtpd_with(env, "service", "install", "--manager", manager).returncode == 0
            assert path.read_bytes() == first  # re-installing is idempotent
    assert not path.exists()  # after uninstall


def test_status_with_and_without_a_daemon(tiny_gguf, tmp_path):
    port = free_port()
    none = run_mtpd("status", "--port", str(port))
    assert none.returncode == 1 and f"no mtpd daemon is running at http://127.0.0.1:{port}/health" in none.stderr
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "random")
    try:
        daemon.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=10, extra_body={"speculation": "fixed:2"})
        shown = run_mtpd("status", "--port", str(daemon.port))
        assert shown.returncode == 0, shown.stderr
        assert "tiny with drafter random" in shown.stdout and "1 requests served" in shown.stdout
        assert "0 running, 0 waiting" in shown.stdout
        assert "acceptance" in shown.stdout
    finally:
        daemon.stop()


def test_kill_9_mid_request_loses_no_persisted_state(tiny_gguf):
    system = [{"role": "system", "content": "You answer in one word. " * 12}]
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "random")
    client = daemon.client()
    client.chat.completions.create(model="tiny", messages=[*system, {"role": "user", "content": "a"}], max_tokens=5)
    request = urllib.request.Request(
        daemon.url + "/v1/chat/completions",
        data=json.dumps({"messages": [*system, {"role": "user", "content": "b"}], "max_tokens": 400,
                         "stream": True}).encode())
    stream = urllib.request.urlopen(request)
    stream.readline()
    daemon.proc.send_signal(signal.SIGKILL)
    assert daemon.stop() == -9
    files = sorted(p.relative_to(daemon.cache_dir) for p in daemon.cache_dir.rglob("*") if p.is_file())
    assert any(p.parts[0] == "calibration" for p in files) and any(p.parts[0] == "prompts" for p in files)

    restarted = Daemon("--model", str(tiny_gguf), "--drafter", "random", cache_dir=daemon.cache_dir)
    try:
        answer = restarted.client().chat.completions.create(
            model="tiny", messages=[*system, {"role": "user", "content": "c"}], max_tokens=5)
        assert answer.usage.prompt_tokens_details.cached_tokens > 40  # the system prompt, from disk
        events = [r["event"] for r in restarted.log_records()]
        assert "calibration loaded" in events and "calibration probed" not in events
    finally:
        assert restarted.stop() == 0


def test_the_template_in_the_repository_is_what_install_writes(tmp_path):
    template = (Path(__file__).parent.parent / "launchd" / f"{LABEL}.plist").read_text()
    filled = template.replace("__MTPD__", "/opt/bin/mtpd").replace("__HOME__", str(tmp_path))
    path = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    assert plistlib.loads(filled.encode()) == plistlib.loads(launchd_plist(["/opt/bin/mtpd", "serve"], {"PATH": path}, tmp_path))
