"""Settings: defaults < TOML file < environment < command line, with origins and one-line errors."""

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import run_mtpd

from daemon.server.app import errors
from daemon.settings import load_settings


@pytest.fixture
def config(tmp_path, monkeypatch):
    for name in ("MTPD_PORT", "MTPD_SPECULATION", "MTPD_HOST", "MTPD_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "c.toml"
    path.write_text('port = 9001\nspeculation = "fixed:2"\nhost = "0.0.0.0"\napi_key = "k"\n')
    return path


def test_each_layer_overrides_the_one_below(config, monkeypatch):
    monkeypatch.setenv("MTPD_PORT", "9100")
    monkeypatch.setenv("MTPD_SPECULATION", "off")
    settings, origin = load_settings(config, {"speculation": "fixed:3", "model": None})
    assert (settings.port, origin["port"]) == (9100, "env MTPD_PORT")
    assert (settings.speculation, origin["speculation"]) == ("fixed:3", "command line")
    assert (settings.host, origin["host"]) == ("0.0.0.0", str(config))
    assert (settings.max_queue, origin["max_queue"]) == (16, "default")
    assert settings.api_key.get_secret_value() == "k"


def test_default_file_is_read_from_the_config_home(config, tmp_path):
    home = tmp_path / "xdg" / "mtpd"
    home.mkdir(parents=True)
    (home / "config.toml").write_text("max_queue = 3\n")
    settings, origin = load_settings()
    assert settings.max_queue == 3 and origin["max_queue"] == str(home / "config.toml")


@pytest.mark.parametrize(
    "text, message",
    [
        ("port = 70000", "invalid setting port"),
        ('speculation = "fixed:99"', "invalid setting speculation"),
        ("prot = 1", "invalid setting prot"),
        ("port = [", "cannot read"),
    ],
)
def test_invalid_settings_are_one_clear_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_settings(path)


def test_config_show_and_bad_start_from_the_command_line(config):
    shown = run_mtpd("config", "show", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[0]: line for line in shown.stdout.splitlines()}
    assert "9001" in lines["port"] and str(config) in lines["port"]
    assert "********" in lines["api_key"] and " k " not in lines["api_key"]
    config.write_text("port = -1\n")
    bad = run_mtpd("serve", "--config", str(config))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("mtpd: error: invalid setting port")


def test_a_500_shows_no_traceback():
    async def boom(request):
        raise RuntimeError("secret internals")

    async def scenario():
        app = web.Application(middlewares=[errors])
        app.router.add_get("/boom", boom)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/boom")
            return response.status, await response.json()

    status, body = asyncio.run(scenario())
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "secret" not in str(body) and "Traceback" not in str(body)
