"""Ranks in network namespaces joined at a chosen rate (pytrain.trainers.emulated_link), on real processes.

Needs root, iproute2's ip and tc, and namespaces with the tbf qdisc (CI runs as root); elsewhere every test that
builds a link skips with ``unavailable()``'s reason.  Cost: three spawns of tiny jobs (2 and 4 ranks, and a
4-step `pytrain train`; most of it process start-up) and a few ip/tc calls.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from pytrain.data import default_corpus
from pytrain.testing.emulated_link import allreduce_then_die, transfer_seconds
from pytrain.train import GPT, TrainConfig
from pytrain.trainers import EmulatedLink, SpawnError, spawn, spawn_on_link
from pytrain.trainers.emulated_link import (BURST_MIN, BURST_S, PREFIX, cleanup_stale, format_rate,
                                           owned_namespaces, parse_rate, unavailable)

needs_link = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


@pytest.mark.parametrize("text, bits", [("1gbit", 1e9), ("500mbit", 5e8), ("0.5gbit", 5e8), ("10G", 1e10),
                                        ("64kbit", 64e3), ("2.5gbit/s", 2.5e9), (1e9, 1e9)])
def test_parse_rate(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["", "fast", "1 tbit", "-1gbit", "0", "1e12", "nan"])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError, match="link rate"):
        parse_rate(text)


def test_format_rate_round_trips():
    for text in ("500mbit", "1gbit", "10gbit", "64kbit"):
        assert format_rate(parse_rate(text)) == text


def _qdiscs(namespace: str) -> str:
    return subprocess.run(["tc", "-n", namespace, "qdisc", "show"], capture_output=True, text=True, check=True).stdout


@needs_link
def test_bridge_topology_and_cleanup():
    with EmulatedLink(4, "0.5gbit") as link:
        names = set(owned_namespaces())
        assert set(link.namespaces) == names and len(names) == 5  # 4 ranks and the hub
        for place in link.places:
            assert "tbf" in _qdiscs(place.namespace) and "rate 500Mbit" in _qdiscs(place.namespace)
        hub = (names - {p.namespace for p in link.places}).pop()
        assert _qdiscs(hub).count("rate 500Mbit") == 4  # each port towards its rank
        assert len({p.address for p in link.places}) == 4
    assert owned_namespaces() == []


@needs_link
def test_two_ranks_talk_at_the_link_rate():
    rate, n_bytes = parse_rate("200mbit"), 4 << 20  # 4 MB: about 0.17 s each way at 200 Mbit/s
    times = spawn_on_link(transfer_seconds, 2, "200mbit", n_bytes, timeout_s=120)[0]
    ideal = 8 * n_bytes / rate
    for pair, seconds in times.items():
        # never faster than the rate (a tenth of slack for the bucket and the clock); the upper bound is only
        # there to catch a link that does not carry the data at all: the machine is shared and loaded
        assert ideal * 0.9 <= seconds <= ideal * 30, (pair, seconds, ideal)
    assert owned_namespaces() == []


@needs_link
def test_a_dying_rank_still_removes_the_link():
    with pytest.raises(SpawnError) as info:
        with EmulatedLink(4, "1gbit") as link:
            spawn(allreduce_then_die, 4, 3, link=link, timeout_s=120, grace_s=5)
    assert info.value.rank == 3 and "SIGKILL" in str(info.value)
    assert owned_namespaces() == []


@needs_link
def test_a_killed_launcher_leaves_nothing_after_cleanup_stale():
    code = ("import os, signal\nfrom pytrain.trainers.emulated_link import EmulatedLink\n"
            "link = EmulatedLink(2, '1gbit')\nprint(os.getpid(), flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid = int(proc.stdout.split()[0])
    left = owned_namespaces(pid)
    assert len(left) == 2 and all(n.startswith(f"{PREFIX}-{pid}-") for n in left)
    assert sorted(cleanup_stale()) == sorted(left)
    assert owned_namespaces(pid) == []


def test_spawn_rejects_a_link_of_another_size():
    class Two:  # stands for a link of 2 ranks; spawn checks the size before it starts anything
        nproc = 2

    with pytest.raises(ValueError, match="joins 2 ranks, but nproc is 3"):
        spawn(transfer_seconds, 3, 8, link=Two())


@needs_link
def test_pytrain_train_runs_its_ranks_on_an_emulated_link(tmp_path):
    """``pytrain train --emulate-link``: each step all-reduces the gradients over the link (DDP's ring: each rank
    sends 2 (n-1)/n of the gradient bytes), so the steps cannot take less than those bytes, less what the token
    bucket holds at the start, at the link's rate (a tenth of slack); on loopback these steps take a few ms each.
    The namespaces are gone afterwards."""
    rate, steps = parse_rate("50mbit"), 4
    flags = ["--layers", "1", "--hidden", "128", "--heads", "2", "--seq", "16", "--steps", str(steps),
             "--eval-every", str(steps), "--nproc", "2", "--batch", "8", "--hook", "none", "--emulate-link", "50mbit"]
    proc = subprocess.run([sys.executable, "-m", "pytrain", "train", *flags, "--log-file", str(tmp_path / "log")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert "2 ranks in network namespaces joined at 50mbit" in proc.stdout
    cfg = TrainConfig.from_args(flags)
    grad_bytes = 4 * sum(p.numel() for p in GPT(len(set(default_corpus())), cfg.layers, cfg.hidden, cfg.heads,
                                                 cfg.seq).parameters())
    bucket = max(BURST_MIN, rate / 8 * BURST_S)
    seconds = sum(r["step_s"] for r in map(json.loads, (tmp_path / "log").read_text().splitlines()) if "step_s" in r)
    assert seconds >= 0.9 * (steps * grad_bytes - bucket) * 8 / rate, (seconds, grad_bytes)
    assert cleanup_stale() == []  # the launcher removed its namespaces itself: none of a dead creator is left


@pytest.mark.parametrize("flags, message", [(["--nproc", "1"], "needs --nproc >= 2"),
                                            (["--nproc", "2", "--emulate-link", "fast"], "--emulate-link: link rate")])
def test_pytrain_train_rejects_a_link_it_cannot_emulate(flags, message, capsys):
    if "--emulate-link" not in flags:
        flags = [*flags, "--emulate-link", "1gbit"]
    with pytest.raises(SystemExit):
        TrainConfig.from_args(flags)
    assert message in capsys.readouterr().err
