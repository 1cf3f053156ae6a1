"""Always on: a launchd LaunchAgent (macOS) or a systemd user unit (Linux) for `mtpd serve`.

`service_plan` turns an action into the file to write (if any) and the commands to run; the command
line runs the plan, or prints it with --dry-run. Either manager's file can be produced on any OS.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

LABEL = "dev.mtpd.daemon"
UNIT = "mtpd.service"
ACTIONS = ("install", "uninstall", "start", "stop", "restart", "status", "logs")
THROTTLE_SECONDS = 10


def default_manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def program() -> list[str]:
    """The installed `mtpd serve`, by absolute path."""
    script = Path(sys.executable).parent / "mtpd"
    return [str(script), "serve"] if script.is_file() else [sys.executable, "-m", "daemon", "serve"]


def log_dir(home: Path) -> Path:
    return home / "Library" / "Logs" / "mtpd"


def launchd_plist(command: list[str], env: dict[str, str], home: Path) -> bytes:
    logs = log_dir(home)
    return plistlib.dumps({
        "Label": LABEL,
        "ProgramArguments": command,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a crash, not after a clean stop
        "ThrottleInterval": THROTTLE_SECONDS,
        "ProcessType": "Interactive",  # not Background: inference keeps normal CPU/GPU priority
        "WorkingDirectory": str(home),
        "EnvironmentVariables": env,
        "StandardOutPath": str(logs / "mtpd.log"),
        "StandardErrorPath": str(logs / "mtpd.log"),
    })


def systemd_unit(command: list[str], env: dict[str, str], stop_seconds: float) -> str:
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    environment = "".join(f"Environment={quoted(f'{k}={v}')}\n" for k, v in sorted(env.items()))
    return (
        "[Unit]\n"
        "Description=mtpd: local LLM daemon with MTP speculative decoding\n"
        "After=network.target\n\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={shlex.join(command)}\n"
        "Restart=on-failure\n"
        f"RestartSec={THROTTLE_SECONDS}\n"
        f"TimeoutStopSec={int(stop_seconds)}\n"
        "KillSignal=SIGTERM\n"
        "WorkingDirectory=%h\n"
        f"{environment}\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


@dataclass
class Plan:
    manager: str
    path: Path  # the service file
    content: bytes | None = None  # written before the commands (install)
    remove: bool = False  # deleted after the commands (uninstall)
    commands: list[list[str]] = field(default_factory=list)
    ignore_failure: set[int] = field(default_factory=set)  # indexes of commands allowed to fail


def service_plan(action: str, manager: str, home: Path, env: dict[str, str], config: Path | None = None,
                 stop_seconds: float = 40.0, follow: bool = False) -> Plan:
    command = program() + (["--config", str(config.resolve())] if config else [])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    if manager == "launchd":
        path = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        domain = f"gui/{os.getuid()}"
        target = f"{domain}/{LABEL}"
        plans = {
            "install": Plan(manager, path, launchd_plist(command, env, home),
                            commands=[["launchctl", "bootout", target], ["launchctl", "bootstrap", domain, str(path)]],
                            ignore_failure={0}),
            "uninstall": Plan(manager, path, remove=True, commands=[["launchctl", "bootout", target]],
                              ignore_failure={0}),
            "start": Plan(manager, path, commands=[["launchctl", "kickstart", target]]),
            "stop": Plan(manager, path, commands=[["launchctl", "kill", "SIGTERM", target]]),
            "restart": Plan(manager, path, commands=[["launchctl", "kickstart", "-k", target]]),
            "status": Plan(manager, path, commands=[["launchctl", "print", target]]),
            "logs": Plan(manager, path, commands=[["tail", "-n", "100", *(["-f"] if follow else []),
                                                   str(log_dir(home) / "mtpd.log")]]),
        }
    elif manager == "systemd":
        path = home / ".config" / "systemd" / "user" / UNIT
        ctl = ["systemctl", "--user"]
        plans = {
            "install": Plan(manager, path, systemd_unit(command, env, stop_seconds).encode(),
                            commands=[[*ctl, "daemon-reload"], [*ctl, "enable", UNIT], [*ctl, "restart", UNIT]]),
            "uninstall": Plan(manager, path, remove=True,
                              commands=[[*ctl, "disable", "--now", UNIT], [*ctl, "daemon-reload"]],
                              ignore_failure={0}),
            "start": Plan(manager, path, commands=[[*ctl, "start", UNIT]]),
            "stop": Plan(manager, path, commands=[[*ctl, "stop", UNIT]]),
            "restart": Plan(manager, path, commands=[[*ctl, "restart", UNIT]]),
            "status": Plan(manager, path, commands=[[*ctl, "status", "--no-pager", UNIT]]),
            "logs": Plan(manager, path, commands=[["journalctl", "--user", "-u", UNIT, "-n", "100", "--no-pager",
                                                   *(["-f"] if follow else [])]]),
        }
    else:
        raise ValueError(f"unknown service manager {manager!r}: launchd or systemd")
    return plans[action]


def describe(plan: Plan) -> str:
    """--dry-run: the file and the commands, as they would be written and run."""
    lines = []
    if plan.content is not None:
        lines += [f"# would write {plan.path}:", plan.content.decode().rstrip(), ""]
    lines += [shlex.join(c) for c in plan.commands]
    if plan.remove:
        lines.append(f"rm {shlex.quote(str(plan.path))}")
    return "\n".join(lines)


def execute(plan: Plan, run) -> int:
    """Writes the file (atomically), runs the commands with `run(argv) -> exit code`, removes the
    file for uninstall. Returns the first failing exit code that counts, else 0."""
    if plan.content is not None:
        plan.path.parent.mkdir(parents=True, exist_ok=True)
        if plan.manager == "launchd":
            log_dir(plan.path.parents[2]).mkdir(parents=True, exist_ok=True)
        tmp = plan.path.with_name(plan.path.name + ".tmp")
        tmp.write_bytes(plan.content)
        tmp.replace(plan.path)
    for i, argv in enumerate(plan.commands):
        code = run(argv)
        if code != 0 and i not in plan.ignore_failure:
            return code
    if plan.remove:
        plan.path.unlink(missing_ok=True)
    return 0
