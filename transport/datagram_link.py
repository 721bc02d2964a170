"""A best-effort datagram link between agents and the fusion node: chunks over plain UDP.

What V2X radios and media streams do: every chunk of a frame (:func:`transport.framing.split_frame`,
whole tiles, decodable alone) goes out at once in its own datagram with an RTP-style sequence
number and send time; nothing is retransmitted, nothing waits for an acknowledgement, and the rate
is the application's (one frame per sensor period, sized by rate control). It is the WebRTC data
channel without SCTP's congestion control, which reads random loss as congestion (see
:mod:`transport.webrtc_link`), and without its encryption: use it on a trusted network or radio.

Every datagram starts with a 30-byte header (network byte order)::

    magic  4s  b"CPD1"
    kind   B   HELLO=1 (agent->node, payload: token), WELCOME=2, REFUSED=3 (payload: reason),
               FEATURE=4 (payload: a FeatureFrame chunk), CONTROL=5 (payload: a Control), BYE=6
    flags  B   0
    agent  i   the agent's id
    session Q  chosen at random by the agent for one connection
    seq    I   per-session datagram sequence number of the sender
    time   Q   send time, ns since the epoch

The agent says HELLO with its id, token and a fresh session; the node checks the credentials and
answers WELCOME (or REFUSED with the reason, which ends the uplink). From then on it takes FEATURE
datagrams of that session from that address only; anything else is refused and counted by reason.
HELLO is repeated every second as a keep-alive (every 0.25 s until welcomed); either end gives the
other up after ``timeout_s`` without a datagram from it. ``Control`` messages from the node are
best effort too: they are periodic reports and corrections, the next one replaces a lost one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from protos import Control, FeatureFrame
from transport.framing import LatestChunks
from transport.grpc_link import LinkError, UplinkCounters

log = logging.getLogger(__name__)

MAGIC = b"CPD1"
HEADER = struct.Struct("!4sBBiQIQ")
HELLO, WELCOME, REFUSED, FEATURE, CONTROL, BYE = 1, 2, 3, 4, 5, 6
KINDS = {HELLO: "hello", WELCOME: "welcome", REFUSED: "refused", FEATURE: "feature", CONTROL: "control", BYE: "bye"}
KEEPALIVE_S = 1.0
HELLO_RETRY_S = 0.25
TIMEOUT_S = 5.0
SEND_BUFFER_LIMIT = 16 * 1024
"""Bytes the asyncio transport may hold (the socket would block) before the sender waits: no stale queue."""
ROOM_POLL_S = 0.002
REORDER_WINDOW = 1024
"""A datagram whose sequence number is further behind the newest than this is refused as stale."""


class DatagramError(ValueError):
    """A datagram that is not one of ours (short, wrong magic, unknown kind)."""


@dataclass(frozen=True, slots=True)
class Datagram:
    kind: int
    agent_id: int
    session: int
    seq: int
    time_ns: int
    payload: bytes

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.kind, 0, self.agent_id, self.session, self.seq, self.time_ns) + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> Datagram:
        if len(data) < HEADER.size:
            raise DatagramError(f"datagram of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
        magic, kind, _flags, agent_id, session, seq, time_ns = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise DatagramError(f"datagram does not start with {MAGIC!r} (got {magic!r})")
        if kind not in KINDS:
            raise DatagramError(f"datagram of unknown kind {kind}")
        return cls(kind, agent_id, session, seq, time_ns, bytes(data[HEADER.size:]))


def parse_address(address: str, *, listen: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``udp://`` allowed; port 0, any free port, only to ``listen``) -> ``(host, port)``;
    ``ValueError`` naming what is wrong."""
    text = address.removeprefix("udp://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if listen else 1) <= int(port) < 65536:
        raise ValueError(f"datagram address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(slots=True)
class _SequenceWindow:
    """RTP-style receive bookkeeping of one sender's sequence numbers: duplicates and stale ones are
    refused; gaps are counted as lost (and uncounted if the datagram turns up late)."""

    newest: int = -1
    recent: set[int] = field(default_factory=set)
    order: deque[int] = field(default_factory=deque)
    received: int = 0
    lost: int = 0

    def accept(self, seq: int) -> str | None:
        """``None`` to take datagram ``seq``, else why it is refused."""
        if self.newest >= 0 and seq <= self.newest - REORDER_WINDOW:
            return "stale_sequence"
        if seq in self.recent:
            return "duplicate_sequence"
        if self.newest < 0:
            self.newest = seq
        elif seq > self.newest:
            self.lost += seq - self.newest - 1
            self.newest = seq
        else:
            self.lost = max(0, self.lost - 1)  # a late one, counted as lost before
        self.received += 1
        self.recent.add(seq)
        self.order.append(seq)
        if len(self.order) > REORDER_WINDOW:
            self.recent.discard(self.order.popleft())
        return None


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple, int], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr) -> None:
        self._on_datagram(data, addr, time.time_ns())

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable: the other end is not up yet
        log.debug("datagram socket error: %s", exc)


@dataclass(slots=True)
class DatagramUplinkCounters(UplinkCounters):
    """What a datagram uplink did. Frame counters as for gRPC; chunk counters as for WebRTC."""

    chunks_sent: int = 0
    chunks_dropped_stale: int = 0
    """Unsent chunks of a frame that a newer frame replaced (the socket was full)."""
    waits_for_room: int = 0
    hellos_sent: int = 0
    datagrams_refused: int = 0
    """Datagrams from the node that were not ours or not for this session."""


@dataclass(slots=True)
class DatagramUplink:
    """An agent's stream of ``FeatureFrame`` chunks to the fusion node in UDP datagrams.

    Same surface as :class:`transport.grpc_link.FeatureUplink`: :meth:`offer` never blocks and never
    queues stale data (a newer frame replaces what is left of an older one); run :meth:`run` as a
    task. It reconnects (a fresh HELLO and session) after ``timeout_s`` without a word from the node
    and raises ``LinkError`` when the node refuses the credentials.
    """

    address: str
    agent_id: int
    token: str = ""
    on_control: Callable[[Control], None] | None = None
    max_chunk_bytes: int = 1100
    timeout_s: float = TIMEOUT_S
    counters: DatagramUplinkCounters = field(default_factory=DatagramUplinkCounters)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    _pending: LatestChunks = field(init=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: bool = False
    _session: int = 0
    _seq: int = 0
    _last_heard: float = 0.0
    _refusal: str | None = None
    _control_window: _SequenceWindow = field(default_factory=_SequenceWindow)
    _transport: asyncio.DatagramTransport | None = None

    def __post_init__(self) -> None:
        self._pending = LatestChunks(self.max_chunk_bytes, self.counters)
        parse_address(self.address)

    def offer(self, frame: FeatureFrame) -> None:
        self._pending.offer(frame)
        self._ready.set()

    @property
    def idle(self) -> bool:
        return self._pending.idle

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def run(self) -> None:
        """Stream until :meth:`close`; raise ``LinkError`` if the node refuses this agent."""
        host, port = parse_address(self.address)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self._datagram), remote_addr=(host, port))
        self._transport = transport
        keepalive = asyncio.create_task(self._keepalive())
        try:
            await self._stream()
        finally:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)
            if self.connected.is_set():
                self._send(BYE, b"")
            transport.close()
            self.connected.clear()
        if self._refusal is not None:
            raise LinkError(f"agent {self.agent_id}: fusion node at {self.address} refused it: {self._refusal}")

    def _send(self, kind: int, payload: bytes) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        data = Datagram(kind, self.agent_id, self._session, self._seq, time.time_ns(), payload).pack()
        self._transport.sendto(data)
        return len(data)

    def _new_session(self) -> None:
        self._session = random.getrandbits(64)
        self._seq = 0
        self._control_window = _SequenceWindow()

    async def _keepalive(self) -> None:
        """HELLO until welcomed, then every second; a silent node for ``timeout_s`` means reconnect."""
        self._new_session()
        while not self._closed:
            now = time.monotonic()
            if self.connected.is_set() and now - self._last_heard > self.timeout_s:
                self.connected.clear()
                self.disconnected.set()
                self.counters.disconnects += 1
                self.counters.last_error = f"no datagram from the node for {self.timeout_s:.1f} s"
                log.warning("agent %d: datagram link to %s down (%s); saying hello again", self.agent_id,
                            self.address, self.counters.last_error)
                self._new_session()
            self._send(HELLO, self.token.encode())
            self.counters.hellos_sent += 1
            await asyncio.sleep(KEEPALIVE_S if self.connected.is_set() else HELLO_RETRY_S)

    def _datagram(self, data: bytes, addr, receive_ns: int) -> None:
        try:
            datagram = Datagram.unpack(data)
        except DatagramError as err:
            self.counters.datagrams_refused += 1
            self.counters.last_error = str(err)
            return
        if datagram.session != self._session or datagram.agent_id != self.agent_id:
            self.counters.datagrams_refused += 1  # an old session's reply, or not for us
            return
        if self._control_window.accept(datagram.seq) is not None:
            self.counters.datagrams_refused += 1
            return
        self._last_heard = time.monotonic()
        if datagram.kind == WELCOME and not self.connected.is_set():
            self.counters.connects += 1
            self.disconnected.clear()
            self.connected.set()
            self._ready.set()
        elif datagram.kind == REFUSED:
            self._refusal = datagram.payload.decode(errors="replace") or "refused"
            self.counters.last_error = self._refusal
            self._closed = True
            self._ready.set()
        elif datagram.kind == CONTROL:
            try:
                control = Control.FromString(datagram.payload)
            except DecodeError as err:
                self.counters.last_error = f"malformed Control of {len(datagram.payload)} bytes: {err}"
                return
            self.counters.controls += 1
            if self.on_control is not None:
                self.on_control(control)

    async def _stream(self) -> None:
        """Send each chunk as it comes while connected: all of a frame at once, unless the socket is full."""
        waiting = False
        while True:
            if self._closed and (self.idle or not self.connected.is_set() or self._refusal is not None):
                return  # closing: what is in hand goes out first, if it can
            chunk = self._pending.peek() if self.connected.is_set() else None
            if chunk is None:
                self._ready.clear()
                await self._ready.wait()
                continue
            if self._transport.get_write_buffer_size() > SEND_BUFFER_LIMIT:
                if self._closed:
                    return
                self.counters.waits_for_room += not waiting
                waiting = True
                await asyncio.sleep(ROOM_POLL_S)
                continue
            waiting = False
            chunk.send_time_ns = time.time_ns()
            self.counters.bytes_sent += self._send(FEATURE, chunk.SerializeToString())
            self._pending.sent()


@dataclass(slots=True)
class _Peer:
    agent_id: int
    session: int
    address: tuple
    last_heard: float
    window: _SequenceWindow = field(default_factory=_SequenceWindow)
    seq: int = 0


class DatagramServer:
    """The fusion node's end: one UDP socket for every agent.

    Same callbacks as :class:`transport.webrtc_link.WebRtcServer`: ``on_chunk(agent_id, data,
    receive_ns)`` for every FEATURE datagram of an admitted session (the chunk's bytes, not parsed),
    ``authenticate(agent_id, token)`` (``None`` admits, else the refusal sent back), ``on_connect`` /
    ``on_disconnect``. Datagrams that are not ours, not of an admitted session, from another
    address, duplicated or far behind are refused and counted by reason in :attr:`refused`.
    """

    def __init__(self, *, on_chunk: Callable[[int, bytes, int], None], authenticate: Callable[[int, str], str | None],
                 on_connect: Callable[[int], None] | None = None, on_disconnect: Callable[[int], None] | None = None,
                 timeout_s: float = TIMEOUT_S) -> None:
        self._on_chunk = on_chunk
        self._authenticate = authenticate
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self.timeout_s = timeout_s
        self._peers: dict[int, _Peer] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._reaper: asyncio.Task | None = None
        self.refused: dict[str, int] = {}
        self.datagrams_received = 0
        self._ended: dict[int, tuple[int, int]] = {}  # agent -> (received, lost) of its ended sessions

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free port); returns the bound port."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self._datagram),
                                                                 local_addr=(host, port), family=family)
        self._reaper = asyncio.create_task(self._reap())
        return self._transport.get_extra_info("sockname")[1]

    def send_control(self, agent_id: int, control: Control) -> bool:
        """Send ``control`` to the agent (best effort); ``False`` if it is not connected."""
        peer = self._peers.get(agent_id)
        if peer is None or self._transport is None:
            return False
        self._reply(peer, CONTROL, control.SerializeToString())
        return True

    def connected_agents(self) -> set[int]:
        return set(self._peers)

    def stats(self) -> dict:
        """Datagrams received, refused by reason, and per agent (every session so far) received and lost."""
        totals = dict(self._ended)
        for agent_id, peer in self._peers.items():
            received, lost = totals.get(agent_id, (0, 0))
            totals[agent_id] = (received + peer.window.received, lost + peer.window.lost)
        return {"datagrams_received": self.datagrams_received, "refused": dict(self.refused),
                "peers": {str(a): {"received": r, "lost": n} for a, (r, n) in sorted(totals.items())}}

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for agent_id in list(self._peers):
            self._drop(agent_id)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _refuse(self, reason: str, message: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.debug("refused a datagram (%s): %s", reason, message)

    def _reply(self, peer: _Peer, kind: int, payload: bytes) -> None:
        peer.seq = (peer.seq + 1) & 0xFFFFFFFF
        self._transport.sendto(Datagram(kind, peer.agent_id, peer.session, peer.seq, time.time_ns(), payload).pack(),
                               peer.address)

    def _datagram(self, data: bytes, addr, receive_ns: int) -> None:
        self.datagrams_received += 1
        try:
            datagram = Datagram.unpack(data)
        except DatagramError as err:
            self._refuse("malformed", f"from {addr}: {err}")
            return
        peer = self._peers.get(datagram.agent_id)
        if datagram.kind == HELLO:
            self._hello(datagram, addr, peer)
            return
        if peer is None or peer.session != datagram.session:
            self._refuse("unknown_session", f"{KINDS[datagram.kind]} from {addr} for agent {datagram.agent_id} "
                                            "outside an admitted session")
            return
        if addr != peer.address:
            self._refuse("wrong_address", f"agent {datagram.agent_id}'s session from {addr}, admitted from "
                                          f"{peer.address}")
            return
        problem = peer.window.accept(datagram.seq)
        if problem is not None:
            self._refuse(problem, f"agent {datagram.agent_id} datagram {datagram.seq}")
            return
        peer.last_heard = time.monotonic()
        if datagram.kind == FEATURE:
            self._on_chunk(datagram.agent_id, datagram.payload, receive_ns)
        elif datagram.kind == BYE:
            self._drop(datagram.agent_id)
        else:
            self._refuse("unexpected_kind", f"{KINDS[datagram.kind]} from agent {datagram.agent_id}")

    def _hello(self, datagram: Datagram, addr, peer: _Peer | None) -> None:
        if peer is not None and peer.session == datagram.session and peer.address == addr:
            peer.window.accept(datagram.seq)  # a keep-alive (its number is no gap in the features)
            peer.last_heard = time.monotonic()
            self._reply(peer, WELCOME, b"")
            return
        problem = self._authenticate(datagram.agent_id, datagram.payload.decode(errors="replace"))
        if problem is not None:
            self._refuse("credentials", problem)
            self._transport.sendto(Datagram(REFUSED, datagram.agent_id, datagram.session, 1, time.time_ns(),
                                            problem.encode()).pack(), addr)
            return
        if peer is not None:  # a new session of a known agent replaces the old one
            self._drop(datagram.agent_id)
        peer = self._peers[datagram.agent_id] = _Peer(datagram.agent_id, datagram.session, addr, time.monotonic())
        peer.window.accept(datagram.seq)
        self._reply(peer, WELCOME, b"")
        log.info("agent %d joined over UDP from %s", datagram.agent_id, addr)
        if self._on_connect is not None:
            self._on_connect(datagram.agent_id)

    def _drop(self, agent_id: int) -> None:
        peer = self._peers.pop(agent_id, None)
        if peer is None:
            return
        received, lost = self._ended.get(agent_id, (0, 0))
        self._ended[agent_id] = (received + peer.window.received, lost + peer.window.lost)
        if self._on_disconnect is not None:
            self._on_disconnect(agent_id)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.timeout_s / 2))
            now = time.monotonic()
            for agent_id, peer in list(self._peers.items()):
                if now - peer.last_heard > self.timeout_s:
                    log.warning("agent %d: no datagram for %.1f s; dropped", agent_id, self.timeout_s)
                    self._drop(agent_id)
