"""transport.impair: real namespaces, veth pairs, nftables loss and tc tbf caps (root only; skipped elsewhere).

Senders and receivers are small Python subprocesses started inside the namespaces with ``exec_prefix``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from transport.impair import ImpairmentError, NetnsTopology, impairment_unavailable

_reason = impairment_unavailable()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

PORT = 47001

# Hub side: count UDP datagrams until stdin closes, then drain until 0.2 s of quiet and print the count.
UDP_RECEIVER = """
import select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: no drops at the socket, only at the rule
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
n = 0
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if s in ready:
        s.recv(2048); n += 1
    if sys.stdin in ready and not sys.stdin.readline():
        break
s.settimeout(0.2)
try:
    while True:
        s.recv(2048); n += 1
except TimeoutError:
    pass
print(n)
"""

# Remote side: send argv[3] small datagrams, lightly paced.
UDP_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"x" * 64, (sys.argv[1], int(sys.argv[2])))
    if i % 50 == 49:
        time.sleep(0.001)
"""

# One process: send argv[1] datagrams to itself over 127.0.0.1, print how many arrived.
LOOPBACK = """
import socket, sys
n = int(sys.argv[1])
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0)); r.settimeout(0.5)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
got = 0
for _ in range(0, n, 50):
    for _ in range(50):
        s.sendto(b"x" * 64, r.getsockname())
    try:
        for _ in range(50):
            r.recv(2048); got += 1
    except TimeoutError:
        pass
print(got)
"""

# Hub side: accept one TCP connection, read argv[3] bytes, answer one byte.
TCP_SINK = """
import socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(1)
print("ready", flush=True)
c, _ = l.accept()
left = int(sys.argv[3])
while left > 0:
    chunk = c.recv(65536)
    if not chunk:
        sys.exit("connection closed early")
    left -= len(chunk)
c.sendall(b"k")
"""

# Remote side: send argv[3] bytes over TCP, wait for the sink's answer, print elapsed seconds.
TCP_SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
t0 = time.monotonic()
c.sendall(b"x" * int(sys.argv[3]))
assert c.recv(1) == b"k"
print(time.monotonic() - t0)
"""

# One process: TCP connect to argv[1]:argv[2] and read the greeting the echo server sends.
TCP_GREETER = """
import socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(1)
print("ready", flush=True)
c, peer = l.accept()
c.sendall(sys.argv[3].encode())
"""

TCP_READER = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
print(c.recv(100).decode())
"""


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def start_py(topo: NetnsTopology, ns: str, code: str, *args: object) -> subprocess.Popen[str]:
    """Start ``code`` in ``ns``; returns once it has printed ``ready``."""
    proc = subprocess.Popen(topo.exec_prefix(ns) + [sys.executable, "-c", code, *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"helper did not start: {line!r} {proc.communicate()[1]}")
    return proc


def run_py(topo: NetnsTopology, ns: str, code: str, *args: object, timeout: float = 15) -> str:
    done = subprocess.run(topo.exec_prefix(ns) + [sys.executable, "-c", code, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def finish(proc: subprocess.Popen[str], timeout: float = 15) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out.strip()


@pytest.fixture(scope="module")
def topo() -> Iterator[NetnsTopology]:
    with NetnsTopology(1, prefix="cpt2") as t:
        yield t


@pytest.fixture
def link(topo: NetnsTopology) -> Iterator[NetnsTopology]:
    topo.clear()
    yield topo
    topo.clear()


def test_star_comes_up_and_is_always_deleted() -> None:
    subprocess.run(["ip", "netns", "add", "cpt1-r7"], check=True)  # stale leftover of an earlier run
    with NetnsTopology(2, prefix="cpt1") as t:
        assert "cpt1-r7" not in netns_names()
        assert {t.hub, t.remote(0), t.remote(1)} <= netns_names()
        assert (t.hub, t.remote(1), t.hub_address(1), t.remote_address(1)) == \
            ("cpt1-hub", "cpt1-r1", "10.200.1.2", "10.200.1.1")
        for k in range(2):
            server = start_py(t, t.remote(k), TCP_GREETER, t.remote_address(k), PORT, f"hello from r{k}")
            assert run_py(t, t.hub, TCP_READER, t.remote_address(k), PORT) == f"hello from r{k}"
            finish(server)
    assert not {ns for ns in netns_names() if ns.startswith("cpt1-")}

    with pytest.raises(KeyError), NetnsTopology(1, prefix="cpt1") as t:
        assert t.hub in netns_names()
        raise KeyError("boom")
    assert not {ns for ns in netns_names() if ns.startswith("cpt1-")}


def test_udp_loss_is_real_and_counted(link: NetnsTopology) -> None:
    t, sent = link, 2000
    t.set_loss(30, link=0, both_ways=False, protocol="udp")
    receiver = start_py(t, t.hub, UDP_RECEIVER, t.hub_address(0), PORT)
    run_py(t, t.remote(0), UDP_SENDER, t.hub_address(0), PORT, sent)
    received = int(finish(receiver))

    assert abs(received / sent - 0.70) < 0.05, received  # binomial sd ~0.01
    counters = t.loss_counters()
    assert counters["r0->hub"]["seen"] == sent
    assert counters["r0->hub"]["seen"] - counters["r0->hub"]["dropped"] == received
    assert counters["hub->r0"]["dropped"] == 0

    # All protocols, both ways: the veths lose packets, loopback inside the hub never does.
    t.set_loss(30, link=0)
    assert int(run_py(t, t.hub, LOOPBACK, 500)) == 500
    assert t.loss_counters()["r0->hub"] == {"seen": 0, "dropped": 0}


def test_fractional_loss_and_clear(link: NetnsTopology) -> None:
    t = link
    t.set_loss(12.5, link=0, protocol="tcp")
    rules = subprocess.run(t.exec_prefix(t.remote(0)) + ["nft", "list", "table", "inet", "impair"],
                           capture_output=True, text=True, check=True).stdout
    assert "numgen random mod 1000 < 125" in rules and "tcp" in rules
    t.clear()
    rules = subprocess.run(t.exec_prefix(t.hub) + ["nft", "list", "table", "inet", "impair"],
                           capture_output=True, text=True, check=True).stdout
    assert "drop" not in rules


def test_bandwidth_cap(link: NetnsTopology) -> None:
    t, size = link, 500_000  # 4 Mbit: 2 s at 2 Mbit/s
    t.cap_bandwidth("2mbit", link=0)
    sink = start_py(t, t.hub, TCP_SINK, t.hub_address(0), PORT, size)
    capped = float(run_py(t, t.remote(0), TCP_SOURCE, t.hub_address(0), PORT, size))
    finish(sink)
    assert capped >= 1.5, capped

    t.cap_bandwidth(None, link=0)
    sink = start_py(t, t.hub, TCP_SINK, t.hub_address(0), PORT, size)
    free = float(run_py(t, t.remote(0), TCP_SOURCE, t.hub_address(0), PORT, size))
    finish(sink)
    assert free < 1.0, free


def test_errors_before_anything_is_created() -> None:
    with pytest.raises(ImpairmentError, match="at most 15"):
        NetnsTopology(2, prefix="cpt4_too_long_x")
    with pytest.raises(ImpairmentError, match="remotes"):
        NetnsTopology(0, prefix="cpt4")
    with pytest.raises(ImpairmentError, match="prefix"):
        NetnsTopology(1, prefix="cpt 4")
    t = NetnsTopology(1, prefix="cpt4")
    with pytest.raises(ImpairmentError, match="not up"):
        t.set_loss(10)
    assert not {ns for ns in netns_names() if ns.startswith(("cpt4", "cpt 4"))}
    with t:
        with pytest.raises(ValueError, match="0..100"):
            t.set_loss(120)
        with pytest.raises(ValueError, match="protocol"):
            t.set_loss(10, protocol="icmp")
        with pytest.raises(ImpairmentError, match="tc"):
            t.cap_bandwidth("lots")
    assert not {ns for ns in netns_names() if ns.startswith("cpt4-")}
