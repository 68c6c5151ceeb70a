"""Slow links on one machine: N ranks, each in its own Linux network namespace, joined at a chosen rate.

    with EmulatedLink(nproc=2, rate="1gbit") as link:     # namespaces, links and qdiscs exist inside the block
        results = spawn(fn, 2, *args, link=link)          # each rank enters its namespace before gloo starts

Topology (every address exists only inside namespaces this module creates; nothing is routed outside them):

    2 ranks:  [rank 0: eth0 10.231.0.1] ==== veth ==== [rank 1: eth0 10.231.0.2]
    N ranks:  [rank i: eth0 10.231.0.(i+1)] ==== veth ==== [hub: p<i> -- bridge br0 -- p<j>] ==== ... rank j

Every egress into a link (each rank's eth0, and for N > 2 each hub port towards its rank) goes through a token
bucket filter (``tc qdisc ... tbf rate R``), so each rank sends at most R and receives at most R: a switch with
full-duplex ports of rate R.  ``netem`` is not used (latency comes only from the rate and the queue, whose
``limit`` holds LIMIT_S seconds of traffic, so TCP's window fills it rather than losing packets).  The bucket
holds ``max(BURST_MIN, R * BURST_S)`` bytes: the kernel's timer cannot release tokens more finely, and a GSO
packet larger than the bucket would be split into MTU-sized packets (CPU work that would cap the fast rates).

Ranks join their namespace with ``setns(2)`` (``enter``) before any socket exists, and gloo binds to ``eth0``
(``GLOO_SOCKET_IFNAME``) with rank 0's address as ``MASTER_ADDR``.

Clean-up: ``close`` (the context manager's exit, also after a rank failed) deletes every namespace, and with it
its veth ends, bridge and qdiscs.  Namespace names are ``ptlink-<creator pid>-<serial>-<role>``; a new
``EmulatedLink`` first deletes the namespaces of creators that no longer run (``cleanup_stale``), so a launcher
killed by SIGKILL leaves nothing behind for long.  ``unavailable()`` says why the emulation cannot run here (not
root, no ``ip`` / ``tc``, namespaces or tbf refused) and is None where it can.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from ..cost.collectives import format_rate, parse_rate  # noqa: F401  (re-exported: rates of links)

PREFIX = "ptlink"
SUBNET = "10.231.0"  # /24, only ever inside this module's namespaces
IFNAME = "eth0"  # each rank's interface, inside its namespace
BURST_S = 2e-3  # seconds of traffic the token bucket holds ...
BURST_MIN = 128 * 1024  # ... and at least this many bytes (two 64 KB GSO packets)
LIMIT_S = 0.05  # seconds of traffic the tbf queue holds before it drops
COMMAND_TIMEOUT_S = 20.0  # per `ip` / `tc` call: none of them should take more than milliseconds
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"  # where `ip netns add` mounts namespaces

_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-\d+-\w+$")
_serial = itertools.count()


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise RuntimeError(f"emulated link: `{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _namespaces() -> List[str]:
    proc = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _delete_namespace(name: str) -> None:
    _run("ip", "netns", "delete", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> List[str]:
    """Deletes the namespaces left by ``EmulatedLink`` s whose creating process no longer runs; returns their
    names.  (This process's own and other live creators' namespaces are left alone.)"""
    stale = [name for name in _namespaces()
             if (m := _NAME_RE.match(name)) is not None and not _alive(int(m.group(1)))]
    for name in stale:
        _delete_namespace(name)
    return stale


def owned_namespaces(pid: Optional[int] = None) -> List[str]:
    """Names of the namespaces ``EmulatedLink`` s of process ``pid`` (default: this one) hold now."""
    pid = os.getpid() if pid is None else pid
    return [n for n in _namespaces() if (m := _NAME_RE.match(n)) is not None and int(m.group(1)) == pid]


@functools.lru_cache(maxsize=1)
def unavailable() -> Optional[str]:
    """Why ``EmulatedLink`` cannot run on this machine (a sentence for a skip or an error), or None if it can.
    Checks Linux, root, ``ip`` and ``tc`` on PATH, then creates one namespace with a tbf qdisc (and deletes it)."""
    if not sys.platform.startswith("linux"):
        return f"emulated links need Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return (f"emulated links need root to create network namespaces, veth links and tc qdiscs "
                f"(running as uid {os.geteuid()})")
    for tool, package in (("ip", "iproute2's ip"), ("tc", "iproute2's tc")):
        if shutil.which(tool) is None:
            return f"emulated links need {package} on PATH (not found)"
    probe = f"{PREFIX}-{os.getpid()}-{next(_serial)}-probe"
    try:
        for args in (("ip", "netns", "add", probe),
                     ("ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"),
                     ("tc", "-n", probe, "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "1gbit", "burst",
                      "128kb", "limit", "1mb")):
            proc = _run(*args, check=False)
            if proc.returncode != 0:
                return f"emulated links: `{' '.join(args)}` is refused here: {proc.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"emulated links: running ip/tc failed: {exc}"
    finally:
        _delete_namespace(probe)
    return None


@dataclass(frozen=True)
class RankPlace:
    """Where one rank runs: its namespace, interface and address, and the rendezvous address (rank 0's)."""

    namespace: str
    ifname: str
    address: str
    master_addr: str

    def enter(self) -> Dict[str, str]:
        """Moves the calling thread (call it from the main thread before any socket or thread that needs the
        network exists; threads started later inherit it) into this rank's namespace; returns the environment
        gloo needs there (``MASTER_ADDR``, ``GLOO_SOCKET_IFNAME``), which the caller sets."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(os.path.join(NETNS_DIR, self.namespace), os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into network namespace {self.namespace} failed: {os.strerror(err)}")
        finally:
            os.close(fd)
        return {"MASTER_ADDR": self.master_addr, "GLOO_SOCKET_IFNAME": self.ifname}


class EmulatedLink:
    """``nproc`` network namespaces joined at ``rate`` (see the module docstring); a context manager.

    ``rate``: "1gbit", "500mbit", ... or bits/s (``parse_rate``).  ``places[r]``: rank r's ``RankPlace``, which
    ``spawn(..., link=...)`` hands to each rank.  ``close()`` removes everything (idempotent).  Raises
    RuntimeError with ``unavailable()``'s reason where the emulation cannot run."""

    def __init__(self, nproc: int, rate: Union[str, float, int]):
        if isinstance(nproc, bool) or not isinstance(nproc, int) or not 2 <= nproc <= 250:
            raise ValueError(f"EmulatedLink: nproc must be an int in [2, 250], got {nproc!r}")
        self.rate_bits = parse_rate(rate)
        self.nproc = nproc
        reason = unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        cleanup_stale()
        base = f"{PREFIX}-{os.getpid()}-{next(_serial)}"
        self.namespaces: List[str] = []
        master = f"{SUBNET}.1"
        self.places: Tuple[RankPlace, ...] = tuple(
            RankPlace(f"{base}-r{r}", IFNAME, f"{SUBNET}.{r + 1}", master) for r in range(nproc))
        try:
            self._build(f"{base}-hub")
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _limit(self, namespace: str, dev: str) -> None:
        rate_bytes = self.rate_bits / 8
        burst = int(max(BURST_MIN, rate_bytes * BURST_S))
        limit = int(max(4 * burst, rate_bytes * LIMIT_S))
        _run("tc", "-n", namespace, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(self.rate_bits)}bit",
             "burst", str(burst), "limit", str(limit))

    def _build(self, hub: str) -> None:
        for place in self.places:
            self._add_namespace(place.namespace)
        if self.nproc == 2:
            a, b = self.places
            _run("ip", "link", "add", IFNAME, "netns", a.namespace, "type", "veth", "peer", "name", IFNAME, "netns",
                 b.namespace)
        else:
            self._add_namespace(hub)
            _run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", hub, "link", "set", "br0", "up")
            for r, place in enumerate(self.places):
                port = f"p{r}"
                _run("ip", "link", "add", IFNAME, "netns", place.namespace, "type", "veth", "peer", "name", port,
                     "netns", hub)
                _run("ip", "-n", hub, "link", "set", port, "master", "br0")
                _run("ip", "-n", hub, "link", "set", port, "up")
                self._limit(hub, port)
        for place in self.places:
            _run("ip", "-n", place.namespace, "addr", "add", f"{place.address}/24", "dev", IFNAME)
            _run("ip", "-n", place.namespace, "link", "set", IFNAME, "up")
            self._limit(place.namespace, IFNAME)

    def close(self) -> None:
        """Deletes every namespace of this link (their interfaces and qdiscs go with them)."""
        while self.namespaces:
            _delete_namespace(self.namespaces.pop())

    def __enter__(self) -> "EmulatedLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmulatedLink(nproc={self.nproc}, rate={format_rate(self.rate_bits)!r}, namespaces={self.namespaces})"
