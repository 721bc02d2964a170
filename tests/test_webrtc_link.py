"""transport.webrtc_link: signalling refusals in process; streaming between real processes in network namespaces.

aioice skips loopback addresses, so the streaming test runs the fusion side in the hub namespace and the agent in
a remote one (``transport.impair.NetnsTopology``), with real nftables loss on the uplink. Waits are on lines the
child processes print, never sleeps.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from protos import Control
from transport.grpc_link import LinkError
from transport.impair import NetnsTopology, impairment_unavailable
from transport.webrtc_link import WebRtcServer, WebRtcUplink

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "secret"


def _authenticate(agent_id: int, token: str) -> str | None:
    return None if token == TOKEN else f"wrong token for agent {agent_id}"


async def test_signalling_refuses_bad_credentials_and_malformed_offers_with_reasons() -> None:
    server = WebRtcServer(on_chunk=lambda *_: None, authenticate=_authenticate)
    port = await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    try:
        uplink = WebRtcUplink(url, 7, token="guess")
        with pytest.raises(LinkError, match="HTTP 401: wrong token for agent 7"):
            await uplink.run()
        assert not uplink.connected.is_set() and uplink.counters.connects == 0
        no_ice = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
        async with aiohttp.ClientSession() as session:
            for body, status, error in [
                (b"{not json", 400, "not JSON"),
                (json.dumps({"sdp": "v=0", "type": "offer"}).encode(), 400, "missing field(s): agent_id"),
                (json.dumps({"sdp": "v=0", "type": "offer", "agent_id": "7", "token": TOKEN}).encode(), 400,
                 "agent_id must be a 32-bit integer"),
                (json.dumps({"sdp": "v=0", "type": "answer", "agent_id": 7}).encode(), 400, "type must be 'offer'"),
                (json.dumps({"sdp": no_ice, "type": "offer", "agent_id": 7, "token": "x"}).encode(), 401,
                 "wrong token for agent 7"),
                (json.dumps({"sdp": "v=0", "type": "offer", "agent_id": 7, "token": TOKEN}).encode(), 400,
                 "no data channels"),
                (json.dumps({"sdp": no_ice, "type": "offer", "agent_id": 7, "token": TOKEN}).encode(), 400,
                 "cannot answer this offer"),
            ]:
                async with session.post(url + "/offer", data=body) as reply:
                    assert reply.status == status, body
                    assert error in (await reply.json())["error"]
        assert server.refused == {"unauthenticated": 2, "malformed": 5, "bad_sdp": 1}
        assert server.connected_agents() == set() and not server.send_control(7, Control())
    finally:
        await server.stop()


# Fusion side, in the hub namespace. stdin: "report M" prints every chunk received so far (agent, sequence,
# chunk index, chunk count, send_time_ns, receive_time_ns) once a chunk of frame M has arrived, then forgets them.
SERVER = r"""
import asyncio, json, sys
from protos import Control, FeatureFrame
from transport.webrtc_link import WebRtcServer

async def main():
    rows, seen, arrived = [], set(), asyncio.Event()
    def on_chunk(agent_id, data, receive_ns):
        chunk = FeatureFrame.FromString(data)
        rows.append([agent_id, chunk.sequence, chunk.chunk_index, chunk.chunk_count, chunk.send_time_ns, receive_ns])
        seen.add(chunk.sequence)
        arrived.set()
    def on_connect(agent_id):
        print("connected", agent_id, server.send_control(agent_id, Control(target_rate_level=2)), flush=True)
    server = WebRtcServer(on_chunk=on_chunk, on_connect=on_connect,
                          authenticate=lambda a, t: None if t == sys.argv[2] else "wrong token")
    print("port", await server.start(sys.argv[1], 0), flush=True)
    loop = asyncio.get_running_loop()
    while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip():
        marker = int(line.split()[1])
        while marker not in seen:
            arrived.clear()
            await arrived.wait()
        print("rows", json.dumps(rows), flush=True)
        rows.clear()
    await server.stop()

asyncio.run(main())
"""

# Agent side, in a remote namespace. stdin: "stream FIRST N" offers frames FIRST.. at 10 Hz (12 tiles of 300 bytes:
# 4 chunks each), then prints how many chunks they made and what the uplink counted once all went to SCTP.
AGENT = r"""
import asyncio, json, random, sys, time, zlib
from dataclasses import dataclass
import numpy as np
from transport.framing import GridSpec, feature_frame, split_frame
from transport.webrtc_link import WebRtcUplink

@dataclass
class Tile:
    index: int
    payload: bytes
    crc32: int
    relevance: float

GRID = GridSpec(-32.0, 32.0, -32.0, 32.0, 0.5, 64, 16)

def frame(sequence, rng):
    payloads = [rng.randbytes(300) for _ in range(12)]
    return feature_frame(agent_id=7, sequence=sequence, capture_time_ns=time.time_ns(), world_from_agent=np.eye(4),
                         grid=GRID, codec_id="test", rate_level=1, tile_count=64,
                         tiles=[Tile(i, p, zlib.crc32(p), rng.random()) for i, p in enumerate(payloads)])

async def main():
    uplink = WebRtcUplink(sys.argv[1], 7, token=sys.argv[2],
                          on_control=lambda c: print("control", c.target_rate_level, flush=True))
    task = asyncio.create_task(uplink.run())
    await uplink.connected.wait()
    print("connected", flush=True)
    loop, rng = asyncio.get_running_loop(), random.Random(0)
    while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip():
        first, count = map(int, line.split()[1:])
        chunks, start = 0, time.monotonic()
        for k in range(count):
            f = frame(first + k, rng)
            chunks += len(split_frame(f, uplink.max_chunk_bytes))
            uplink.offer(f)
            await asyncio.sleep(max(0.0, start + (k + 1) * 0.1 - time.monotonic()))
        while not uplink.idle:
            await asyncio.sleep(0.01)
        c = uplink.counters
        print("streamed", json.dumps({"chunks": chunks, "chunks_sent": c.chunks_sent,
                                      "chunks_dropped_stale": c.chunks_dropped_stale}), flush=True)
    uplink.close()
    await task

asyncio.run(main())
"""


class Child:
    """A Python child process in a namespace, driven by stdin lines; its stdout lines are awaited with a deadline.

    Stdout is read from the pipe's descriptor, never through a buffered reader: a buffered ``readline`` can take
    two lines off the pipe at once, and a select on the descriptor would then wait for the second in vain.
    """

    def __init__(self, argv: list[str], stderr: Path) -> None:
        self.stderr_path = stderr
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=stderr.open("w"), text=True)
        self._fd = self.proc.stdout.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self._partial = b""
        self._unclaimed: list[tuple[str, str]] = []

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _claim(self, word: str) -> str | None:
        for k, (first, rest) in enumerate(self._unclaimed):
            if first == word:
                del self._unclaimed[k]
                return rest
        return None

    def expect(self, word: str, timeout_s: float = 20.0) -> str:
        """The rest of the next line whose first word is ``word`` (lines starting otherwise wait their turn)."""
        deadline = time.monotonic() + timeout_s
        while (rest := self._claim(word)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                pytest.fail(f"no {word!r} line within {timeout_s} s (other lines: {self._unclaimed}): "
                            f"{self.stderr_path.read_text()[-2000:]}")
            data = os.read(self._fd, 65536)
            if not data:
                pytest.fail(f"child exited (rc {self.proc.wait()}) before {word!r}: {self.stderr_path.read_text()}")
            *lines, self._partial = (self._partial + data).split(b"\n")
            for line in lines:
                first, _, rest = line.decode().strip().partition(" ")
                self._unclaimed.append((first, rest))
        return rest

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def topology() -> Iterator[NetnsTopology]:
    reason = impairment_unavailable()
    if reason is not None:
        pytest.skip(f"WebRTC needs two network namespaces (aioice skips loopback): {reason}")
    with NetnsTopology(1, prefix="cpwt", subnet=204) as topo:
        yield topo


def _chunk_rows(agent: Child, server: Child, sequences: range, marker: int) -> np.ndarray:
    """The chunks of frames ``sequences`` the server got, once frame ``marker`` (sent after them) has arrived."""
    agent.send(f"stream {marker} 1")
    agent.expect("streamed")
    server.send(f"report {marker}")
    rows = np.array(json.loads(server.expect("rows")), dtype=np.int64).reshape(-1, 6)
    return rows[(rows[:, 1] >= sequences.start) & (rows[:, 1] < sequences.stop)]


@pytest.mark.e2e
def test_chunks_stream_between_namespaces_lossless_then_without_queueing_under_30_percent_loss(
        topology: NetnsTopology, tmp_path: Path) -> None:
    hub = topology.hub_address(0)
    python = [sys.executable, "-c"]
    server = Child(topology.exec_prefix(topology.hub) + python + [SERVER, hub, TOKEN], tmp_path / "server.err")
    agent = None
    try:
        port = int(server.expect("port"))
        agent = Child(topology.exec_prefix(topology.remote(0)) + python + [AGENT, f"http://{hub}:{port}", TOKEN],
                      tmp_path / "agent.err")
        assert server.expect("connected").split() == ["7", "True"]
        agent.expect("connected")
        assert agent.expect("control") == "2"  # the fusion node's Control came back

        # Lossless: every chunk of 50 frames arrives once. Frame 1000 (sent after them, same FIFO path) marks the end.
        agent.send("stream 0 50")
        sent = json.loads(agent.expect("streamed"))
        rows = _chunk_rows(agent, server, range(50), marker=1000)
        assert sent["chunks"] == sent["chunks_sent"] == 200
        assert len(rows) == 200 and len({(r[1], r[2]) for r in rows}) == 200
        assert set(rows[:, 3]) == {4}

        # 30 % loss on the uplink: about 70 % of the chunks arrive, and those that do are not held back.
        topology.set_loss(30, link=0, both_ways=False, protocol="udp")
        agent.send("stream 100 100")
        after = json.loads(agent.expect("streamed"))
        drops = topology.loss_counters()["r0->hub"]
        topology.set_loss(0, link=0)
        rows = _chunk_rows(agent, server, range(100, 200), marker=2000)
        offered = after["chunks"]
        share = len(rows) / offered
        real_loss = drops["dropped"] / drops["seen"]
        latency_ms = (rows[:, 5] - rows[:, 4]) / 1e6
        assert after["chunks_dropped_stale"] == 0 and after["chunks_sent"] - sent["chunks_sent"] - 4 == offered
        assert 0.2 < real_loss < 0.4
        assert abs(share - (1 - real_loss)) < 0.08 and 0.6 < share < 0.8, (share, real_loss)
        assert np.percentile(latency_ms, 99) < 100, np.percentile(latency_ms, [50, 99, 100])
    finally:
        for child in (agent, server):
            if child is not None:
                child.stop()
