"""transport.datagram_link: chunks in UDP datagrams, in process on loopback.

A small relay between the uplink and the server drops or repeats datagrams by a fixed pattern, so loss
here is deterministic (real random loss between namespaces is in test_loss_e2e.py). Waits are on events.
"""

from __future__ import annotations

import asyncio
import socket
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from protos import Control, FeatureFrame
from transport.datagram_link import (FEATURE, Datagram, DatagramServer, DatagramUplink, DatagramUplinkCounters,
                                     parse_address)
from transport.deadline import AgentBuffer
from transport.framing import GridSpec, LatestChunks, feature_frame, split_frame
from transport.grpc_link import LinkError

TOKEN = "secret"
GRID = GridSpec(-32.0, 32.0, -32.0, 32.0, 0.5, 64, 16)
WAIT_S = 10.0


@dataclass
class _Tile:
    index: int
    payload: bytes
    crc32: int
    relevance: float


def _frame(sequence: int, rng: np.random.Generator) -> FeatureFrame:
    payloads = [rng.bytes(300) for _ in range(12)]  # 4 chunks of whole tiles
    return feature_frame(agent_id=7, sequence=sequence, capture_time_ns=1_000_000_000 + sequence * 100_000_000,
                         world_from_agent=np.eye(4), grid=GRID, codec_id="test", rate_level=1, tile_count=64,
                         tiles=[_Tile(i, p, zlib.crc32(p), float(rng.random())) for i, p in enumerate(payloads)])


def _authenticate(agent_id: int, token: str) -> str | None:
    return None if token == TOKEN else f"wrong token for agent {agent_id}"


class _Relay(asyncio.DatagramProtocol):
    """Agent-facing socket; forwards to the server through its own socket, dropping uplink datagrams that
    ``drop(kind, n)`` picks (n counts the uplink's datagrams of that kind)."""

    def __init__(self, server_port: int, drop: Callable[[int, int], bool]) -> None:
        self.server_port, self.drop = server_port, drop
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None
        self.agent_addr = None
        self.seen: dict[int, int] = {}
        self.dropped: dict[int, int] = {}
        self.forwarded: list[bytes] = []

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.front, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr) -> None:
                relay.front.sendto(data, relay.agent_addr)

        self.back, _ = await loop.create_datagram_endpoint(Back, remote_addr=("127.0.0.1", self.server_port))
        return self.front.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr) -> None:
        self.agent_addr = addr
        kind = Datagram.unpack(data).kind
        n = self.seen[kind] = self.seen.get(kind, 0) + 1
        if self.drop(kind, n):
            self.dropped[kind] = self.dropped.get(kind, 0) + 1
            return
        self.forwarded.append(data)
        self.back.sendto(data)

    def close(self) -> None:
        self.front.close()
        self.back.close()


class _Collector:
    def __init__(self) -> None:
        self.chunks: list[tuple[int, bytes, int]] = []
        self.connected: list[int] = []
        self.disconnected: list[int] = []
        self._want = (0, asyncio.Event())

    def on_chunk(self, agent_id: int, data: bytes, receive_ns: int) -> None:
        self.chunks.append((agent_id, data, receive_ns))
        if len(self.chunks) >= self._want[0]:
            self._want[1].set()

    async def wait_chunks(self, n: int) -> None:
        self._want = (n, asyncio.Event())
        if len(self.chunks) >= n:
            return
        await asyncio.wait_for(self._want[1].wait(), WAIT_S)


async def _pair(drop: Callable[[int, int], bool] = lambda kind, n: False, token: str = TOKEN, timeout_s: float = 5.0):
    collector = _Collector()
    server = DatagramServer(on_chunk=collector.on_chunk, authenticate=_authenticate,
                            on_connect=collector.connected.append, on_disconnect=collector.disconnected.append,
                            timeout_s=timeout_s)
    port = await server.start("127.0.0.1", 0)
    relay = _Relay(port, drop)
    relay_port = await relay.start()
    controls: list[Control] = []
    got_control = asyncio.Event()

    def on_control(control: Control) -> None:
        controls.append(control)
        got_control.set()

    uplink = DatagramUplink(f"127.0.0.1:{relay_port}", 7, token, on_control=on_control, timeout_s=timeout_s)
    return collector, server, relay, uplink, controls, got_control


async def test_frames_and_controls_cross_and_bad_datagrams_are_refused_by_reason() -> None:
    collector, server, relay, uplink, controls, got_control = await _pair()
    link = asyncio.create_task(uplink.run())
    try:
        await asyncio.wait_for(uplink.connected.wait(), WAIT_S)
        assert collector.connected == [7] and server.connected_agents() == {7}
        rng = np.random.default_rng(0)
        frames = [_frame(s, rng) for s in range(5)]
        chunk_counts = [len(split_frame(f)) for f in frames]
        assert all(c >= 3 for c in chunk_counts)
        for sequence, frame in enumerate(frames):
            uplink.offer(frame)
            await collector.wait_chunks(sum(chunk_counts[:sequence + 1]))
        buffer = AgentBuffer(7)
        for agent_id, data, receive_ns in collector.chunks:
            assert agent_id == 7
            buffer.add(FeatureFrame.FromString(data), receive_ns, len(data))
        assert len(collector.chunks) == sum(chunk_counts) == uplink.counters.chunks_sent
        assert uplink.counters.sent == 5 and uplink.counters.dropped_stale == 0

        assert server.send_control(7, Control(target_rate_level=2))
        await asyncio.wait_for(got_control.wait(), WAIT_S)
        assert controls[-1].target_rate_level == 2
        assert not server.send_control(8, Control())  # not connected

        received = len(collector.chunks)
        feature = next(d for d in relay.forwarded if Datagram.unpack(d).kind == FEATURE)
        relay.back.sendto(feature)  # the same datagram again, from the admitted address
        relay.back.sendto(b"not ours at all")
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            host, port = "127.0.0.1", relay.back.get_extra_info("peername")[1]
            original = Datagram.unpack(feature)
            stranger.sendto(Datagram(FEATURE, 7, original.session, original.seq + 999, 0, b"x").pack(), (host, port))
            stranger.sendto(Datagram(FEATURE, 7, original.session ^ 1, 1, 0, b"x").pack(), (host, port))
        finally:
            stranger.close()
        uplink.offer(_frame(5, rng))  # the stream goes on beside the bad datagrams
        await collector.wait_chunks(received + len(split_frame(_frame(5, np.random.default_rng(0)))))
        assert server.refused == {"duplicate_sequence": 1, "malformed": 1, "wrong_address": 1, "unknown_session": 1}
        assert server.stats()["peers"]["7"]["lost"] == 0
    finally:
        uplink.close()
        await asyncio.wait_for(link, WAIT_S)
        await server.stop()
        relay.close()
    assert collector.disconnected == [7]  # the agent said goodbye
    assert server.stats()["peers"]["7"]["received"] >= len(collector.chunks)  # its session's counts are kept


async def test_a_wrong_token_ends_the_uplink_with_the_reason() -> None:
    collector, server, relay, uplink, *_ = await _pair(token="guess")
    try:
        with pytest.raises(LinkError, match="wrong token for agent 7"):
            await asyncio.wait_for(uplink.run(), WAIT_S)
        assert server.refused == {"credentials": 1} and collector.connected == []
        assert uplink.counters.connects == 0
    finally:
        await server.stop()
        relay.close()


async def test_lost_datagrams_cost_their_chunks_only_and_are_counted_from_sequence_gaps() -> None:
    rng = np.random.default_rng(1)
    frames = [_frame(s, rng) for s in range(7)]
    total = sum(len(split_frame(f)) for f in frames)

    def lost(n: int) -> bool:  # every third datagram of features, but not the last one (its gap would go unseen)
        return n % 3 == 0 and n < total

    collector, server, relay, uplink, *_ = await _pair(drop=lambda kind, n: kind == FEATURE and lost(n))
    link = asyncio.create_task(uplink.run())
    try:
        await asyncio.wait_for(uplink.connected.wait(), WAIT_S)
        sent = 0
        for frame in frames:
            uplink.offer(frame)
            sent += len(split_frame(frame))
            await collector.wait_chunks(sent - sum(lost(n) for n in range(1, sent + 1)))
        dropped = relay.dropped[FEATURE]
        assert uplink.counters.chunks_sent == total and dropped == sum(lost(n) for n in range(1, total + 1)) > 0
        assert len(collector.chunks) == total - dropped
        buffer, assembled = AgentBuffer(7), {}
        for _, data, receive_ns in collector.chunks:
            chunk = FeatureFrame.FromString(data)
            assembled[chunk.sequence] = buffer.add(chunk, receive_ns, len(data))
        # what is missing is exactly the dropped chunks; what arrived decodes alone: its tiles are whole
        assert sum(a.chunk_count - len(a.chunks) for a in assembled.values()) == dropped
        assert all(len(t.payload) == 300 for a in assembled.values() for t in a.tiles.values())
        assert server.stats()["peers"]["7"]["lost"] == dropped  # from the gaps in the sequence numbers
    finally:
        uplink.close()
        await asyncio.wait_for(link, WAIT_S)
        await server.stop()
        relay.close()


async def test_the_uplink_says_hello_again_when_the_node_comes_back() -> None:
    collector = _Collector()
    server = DatagramServer(on_chunk=collector.on_chunk, authenticate=_authenticate, timeout_s=0.6)
    port = await server.start("127.0.0.1", 0)
    uplink = DatagramUplink(f"127.0.0.1:{port}", 7, TOKEN, timeout_s=0.6)
    link = asyncio.create_task(uplink.run())
    try:
        await asyncio.wait_for(uplink.connected.wait(), WAIT_S)
        await server.stop()  # the node goes away: the uplink hears nothing more
        await asyncio.wait_for(uplink.disconnected.wait(), WAIT_S)
        assert not uplink.connected.is_set() and uplink.counters.disconnects == 1
        server = DatagramServer(on_chunk=collector.on_chunk, authenticate=_authenticate, timeout_s=0.6)
        assert await server.start("127.0.0.1", port) == port
        await asyncio.wait_for(uplink.connected.wait(), WAIT_S)
        assert uplink.counters.connects == 2 and server.connected_agents() == {7}
        uplink.offer(_frame(0, np.random.default_rng(2)))
        await collector.wait_chunks(1)
    finally:
        uplink.close()
        await asyncio.wait_for(link, WAIT_S)
        await server.stop()


def test_addresses_are_checked() -> None:
    assert parse_address("10.0.0.2:8766") == ("10.0.0.2", 8766)
    assert parse_address("udp://[::1]:9") == ("::1", 9)
    assert parse_address("0.0.0.0:0", listen=True) == ("0.0.0.0", 0)
    for bad in ("10.0.0.2", "host:port", ":80", "10.0.0.2:0", "10.0.0.2:70000"):
        with pytest.raises(ValueError, match="is not HOST:PORT"):
            parse_address(bad)
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        DatagramUplink("nowhere", 7)


def test_the_senders_keep_only_the_newest_frame_and_count_what_they_dropped() -> None:
    counters = DatagramUplinkCounters()
    pending = LatestChunks(1100, counters)
    rng = np.random.default_rng(3)
    a, b, c = (_frame(s, rng) for s in range(3))
    pending.offer(a)
    pending.offer(b)  # a was never taken up
    assert (counters.offered, counters.dropped_stale) == (2, 1)
    first = pending.peek()
    assert first.sequence == 1 and first.chunk_index == 0 and pending.peek() is first
    pending.sent()
    assert (counters.sent, counters.chunks_sent) == (1, 1)
    pending.offer(c)  # b's unsent chunks would arrive stale: dropped, b itself counts as sent
    assert (counters.dropped_stale, counters.chunks_dropped_stale) == (1, len(split_frame(b)) - 1)
    sequences = []
    while (chunk := pending.peek()) is not None:
        sequences.append(chunk.sequence)
        pending.sent()
    assert sequences == [2] * len(split_frame(c)) and pending.idle
    assert (counters.sent, counters.chunks_sent) == (2, 1 + len(split_frame(c)))
    with pytest.raises(ValueError, match="too small for a chunk header"):
        LatestChunks(100, counters)
