"""One model over several processes on loopback, through MLX's ring backend: the ids of 1 rank,
the split's own arithmetic, the start-up check, and what a lost rank does to a running daemon."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import Daemon, run_mtpd
from mlx_lm.models.pipeline import PipelineMixin

from daemon.cluster.hosts import Host, parse_hosts, read_hostfile, ring_addresses
from daemon.cluster.split import pipeline_ranges

PROMPTS = [
    {"id": "code", "category": "code",
     "messages": [{"role": "user", "content": "Write a Python function that counts words in a sentence."}]},
    {"id": "prose", "category": "prose", "messages": [{"role": "user", "content": "Why do leaves change color in autumn?"}]},
]
SPECS = ("off", "fixed:2", "adaptive")
LOCAL2, LOCAL3 = "127.0.0.1,127.0.0.1", "127.0.0.1,127.0.0.1,127.0.0.1"


class Group:
    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize("n_layers,size", [(30, 2), (30, 3), (7, 2), (7, 3), (4, 4)])
def test_pipeline_ranges_are_mlx_lms_split(n_layers, size):
    ranges = pipeline_ranges(n_layers, size)
    for rank, (start, end) in enumerate(ranges):
        m = PipelineMixin()
        m.layers = list(range(n_layers))

        m.pipeline(Group(rank, size))
        assert (m.start_idx, m.end_idx) == (start, end)
    assert ranges[0][1] == n_layers  # rank 0 holds the last layers, so the final hidden state
    assert sorted(i for s, e in ranges for i in range(s, e)) == list(range(n_layers))


def test_too_few_layers_for_the_ranks():
    with pytest.raises(ValueError, match="cannot be shared out"):
        pipeline_ranges(2, 3)


def test_hosts_and_hostfile(tmp_path):
    assert parse_hosts("127.0.0.1, mac2") == [Host("127.0.0.1", "127.0.0.1"), Host("mac2", "mac2")]
    with pytest.raises(ValueError, match="two or more"):
        parse_hosts("127.0.0.1")
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([{"ssh": "localhost", "ips": []}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]))
    hosts = read_hostfile(path)
    assert hosts == [Host("localhost", "localhost"), Host("mac2", "10.0.0.2")]
    ring = ring_addresses(hosts, base_port=4000)
    assert ring[1] == ["10.0.0.2:4001"] and ring[0][0].startswith("127.0.0.1:")
    path.write_text(json.dumps({"backend": "jaccl", "hosts": [{"ssh": "a"}, {"ssh": "b"}]}))
    with pytest.raises(ValueError, match="ring backend, not 'jaccl'"):
        read_hostfile(path)
    path.write_text("[{\"host\": 1}]")
    with pytest.raises(ValueError, match="mlx.launch hostfile"):
        read_hostfile(path)


def _bench(tmp_path: Path, name: str, *args: str, prompts=PROMPTS, specs=SPECS, tokens: int = 24) -> tuple[dict, str]:
    """`mtpd bench` on the default model: {(prompt id, spec): token ids}, and its log."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out = tmp_path / f"{name}.json"
    argv = ["bench", "--prompts", str(path), *(a for s in specs for a in ("--spec", s)), "--max-tokens", str(tokens),
            "--json", str(out), *args]
    done = run_mtpd(*argv, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return {(r["id"], r["spec"]): r["token_ids"] for r in json.loads(out.read_text())["results"]}, done.stderr


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return _bench(tmp_path_factory.mktemp("one"), "one")[0]


def test_two_ranks_pipeline_give_one_ranks_ids(one_rank, tmp_path):
    ids, log = _bench(tmp_path, "two", "--hosts", LOCAL2)
    assert ids == one_rank
    ready = {r["rank"]: r for r in map(json.loads, (line for line in log.splitlines() if '"rank ready"' in line))}
    assert {(r["rank"], r["layers"]) for r in ready.values()} == {(0, "15-29"), (1, "0-14")}
    whole = ready[0]["weights_mib"] + ready[1]["weights_mib"]  # each rank reads only the weights it keeps
    assert ready[1]["peak_memory_mib"] < 0.75 * whole


def test_three_ranks_tensor_give_one_ranks_ids(one_rank, tmp_path):
    ids, log = _bench(tmp_path, "three", "--hosts", LOCAL3, "--split", "tensor", prompts=PROMPTS[:1], tokens=16)
    assert ids == {k: v[:16] for k, v in one_rank.items() if k[0] == "code"}
    assert sum('"rank ready"' in line and '"layers": "0-29"' in line for line in log.splitlines()) == 3


def test_seeded_sampling_gives_one_ranks_tokens(tmp_path, hosts=LOCAL2, split="pipeline"):
    """With drafts, the drafter's distribution and so its feature layers (9 and 19 here, block 9 on
    another rank in a pipeline) decide which tokens a seed gives."""
    sampling = ("--temperature", "0.8", "--seed", "7")
    specs = ("off", "fixed:2")
    alone, _ = _bench(tmp_path, "alone", *sampling, prompts=PROMPTS[1:], specs=specs, tokens=12)
    spread, _ = _bench(tmp_path, "spread", *sampling, "--hosts", hosts, "--split", split, prompts=PROMPTS[1:],
                       specs=specs, tokens=12)
    assert spread == alone


def test_heads_that_do_not_divide_are_refused():
    done = run_mtpd("generate", "hi", "--hosts", LOCAL2, "--split", "tensor", "--max-tokens", "2", timeout=120)
    assert done.returncode == 2
    assert "9 query and 3 KV heads do not divide over 2 ranks" in done.stderr


def test_a_rank_with_another_model_is_refused(tmp_path):
    """Each rank's fingerprint against rank 0's, over a real two-rank group: both refuse."""
    from daemon.cluster.hosts import loopback_ring

    ring = json.dumps(loopback_ring(2))
    script = (
        "import sys; from daemon.cluster.launch import join_ring; from daemon.cluster.identity import verify\n"
        f"rank = int(sys.argv[1]); group = join_ring({ring}, rank)\n"
        "verify(group, bytes([rank]) * 32, ['a', 'b'])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    assert all("rank 1 (b) loaded another model or drafter than rank 0" in e for e in errors)


def _pids(log: str) -> dict[int, int]:
    return {r["rank"]: r["pid"] for r in map(json.loads, (line for line in log.splitlines() if '"rank started"' in line))}


@pytest.mark.parametrize("hosts,split", [(LOCAL2, "pipeline"), (LOCAL3, "tensor")])
def test_a_killed_rank_ends_the_request_and_the_daemon(hosts, split):
    daemon = Daemon("--hosts", hosts, "--split", split, "--drafter", "none")
    followers = _pids(daemon.log())
    assert len(followers) == hosts.count(",")
    with urllib.request.urlopen(daemon.url + "/health") as r:
        health = json.loads(r.read())
    assert health["placement"].startswith(f"{split} over {hosts.count(',') + 1} ranks")
    outcome = {}

    def ask():
        try:
            daemon.client().chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=3000)
        except openai.APIStatusError as e:
            outcome["error"] = e
        outcome["at"] = time.monotonic()

    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(1.5)  # mid-answer (the whole answer can take as little as ~3 s now)
    killed = time.monotonic()
    os.kill(followers[1], signal.SIGKILL)
    asking.join(20)
    assert not asking.is_alive()
    error = outcome["error"]
    assert error.status_code == 503 and outcome["at"] - killed < 15
    assert error.body["code"] == "rank_lost" and "rank 1 on 127.0.0.1 exited" in error.body["message"]
    assert daemon.proc.wait(15) == 1  # it stops, for its service manager to restart the group
    for pid in followers.values():  # and no rank is left behind
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid)
    daemon.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[1].split()[0] != "Z"


def test_requests_at_once_over_two_ranks_share_forwards_and_answer_as_alone():
    """Pipeline ranks take a batch's ragged forward as one message; the daemon stops cleanly."""
    import concurrent.futures
    import re

    daemon = Daemon("--hosts", LOCAL2)
    try:
        client = daemon.client()
        questions = ["Write a Python function that reverses a list.", "What is a hash map?", "Name three colors."]

        def ask(q):
            r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": q}],
                                               max_tokens=32, temperature=0)
            return r.choices[0].message.content

        alone = [ask(q) for q in questions]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(ask, questions))
        with urllib.request.urlopen(daemon.url + "/metrics") as r:
            metrics = r.read().decode()
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]
    assert together == alone
    one = float(re.search(r'mtpd_batch_sequences_bucket\{le="1.0"\} (\S+)', metrics).group(1))
    assert float(re.search(r"mtpd_batch_sequences_count (\S+)", metrics).group(1)) > one  # forwards of 2+ sequences
    assert '"rank stopped"' in daemon.log()
