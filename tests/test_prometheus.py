"""A real Prometheus scrapes a daemon that served a mixed workload; every dashboard query has data."""

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import Daemon, free_port

DASHBOARD = Path(__file__).parent.parent / "grafana" / "mtpd-dashboard.json"
CODE = [{"role": "user", "content": "Write a Python function.\n```python\ndef add(a, b):"}]
PROSE = [{"role": "user", "content": "Tell me about the quiet sea at dawn."}]
SYSTEM = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Hi."}]


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def workload(daemon: Daemon) -> None:
    client = daemon.client()
    for spec, messages in (("adaptive", CODE), ("fixed:2", PROSE), ("fixed:3", CODE), ("off", PROSE)):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                       extra_body={"speculation": spec})
    list(client.chat.completions.create(model="tiny", messages=SYSTEM, max_tokens=20, stream=True))
    client.chat.completions.create(model="tiny", messages=SYSTEM, max_tokens=5)
    client.completions.create(model="tiny", prompt="The sea", max_tokens=10)
    for body in (b"{bad", b'{"messages": [], "model": "tiny"}'):
        req = urllib.request.Request(daemon.url + "/v1/chat/completions", data=body)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(req)


def query(url: str, expr: str) -> list:
    with urllib.request.urlopen(url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "Prometheus did not catch up in time"
        time.sleep(0.2)


def scraped_tokens(url: str) -> float | None:
    """What Prometheus last scraped of the daemon's completion-token counter (None: nothing yet)."""
    try:
        result = query(url, "mtpd_completion_tokens_total")
    except OSError:
        return None
    return float(result[0]["value"][1]) if result else None


def exposed_tokens(daemon: Daemon) -> float:
    with urllib.request.urlopen(daemon.url + "/metrics") as r:
        return float(re.search(r"^mtpd_completion_tokens_total\{model=\S+\} (\S+)$", r.read().decode(), re.M).group(1))


@pytest.fixture(scope="module")
def scraped(tiny_gguf):
    binary = shutil.which("prometheus")
    if binary is None:
        if sys.platform == "darwin":
            pytest.skip("no prometheus binary (brew install prometheus)")
        pytest.fail("prometheus is not installed: ./install.sh --test installs the Debian package")
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "random")
    folder = Path(tempfile.mkdtemp(prefix="mtpd-prom-"))
    (folder / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mtpd\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{daemon.port}']\n"
    )
    port = free_port()
    prom = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        until(lambda: scraped_tokens(url) == 0.0)  # up, and scraped once before any work
        for _ in range(2):  # two workloads, each scraped: every rate has an increase to show
            workload(daemon)
            until(lambda: scraped_tokens(url) == exposed_tokens(daemon))
        yield url, daemon
    finally:
        prom.terminate()
        prom.wait(30)
        assert daemon.stop() == 0


def test_the_target_is_up(scraped):
    url, _ = scraped
    (up,) = query(url, 'up{job="mtpd"}')
    assert up["value"][1] == "1"


@pytest.mark.parametrize("expr", dashboard_queries())
def test_every_dashboard_query_has_data(scraped, expr):
    url, _ = scraped
    result = query(url, expr.replace("$__rate_interval", "1m"))
    values = [float(r["value"][1]) for r in result]
    assert values and any(v == v for v in values), f"no data for {expr}"  # v == v: not NaN


def test_every_metric_the_dashboard_names_exists(scraped):
    _, daemon = scraped
    with urllib.request.urlopen(daemon.url + "/metrics") as r:
        exposed = r.read().decode()
    names = {n for e in dashboard_queries() for n in re.findall(r"\bmtpd_\w+", e)}
    missing = [n for n in names if not re.search(rf"^{n}[{{ ]", exposed, re.M)]
    assert not missing, missing
