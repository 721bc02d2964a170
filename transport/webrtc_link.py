"""WebRTC links between agents and the fusion node (aiortc data channels, aiohttp signalling).

The agent opens the peer connection: it posts its offer to the fusion node's signalling
server (``POST {signal_url}/offer``, JSON ``{"sdp", "type", "agent_id", "token"}``) and gets
the answer back (``{"sdp", "type"}``; 401 with ``{"error"}`` when its credentials are refused,
400 when the body is malformed). ICE runs with no STUN/TURN servers (``iceServers=[]``): both
ends must reach each other directly.

Two data channels, both opened by the agent:

- ``features`` (unordered, ``maxRetransmits=0``): one serialized ``FeatureFrame`` chunk per
  message (:func:`transport.framing.split_frame`), so a lost packet costs one chunk of whole
  tiles, never a frame, and nothing waits for a retransmission.
- ``control`` (reliable, ordered): serialized ``Control`` messages from the fusion node.

Why the sender manages aiortc's SCTP (measured with real one-way loss between network
namespaces, 10 frames/s of 4 chunks of ~1 KB): aiortc treats random loss as congestion. A lost
unreliable chunk counts against the congestion window until three later packets have been
acknowledged (then it is abandoned), the window halves on every loss (to 4 packets at least) and
falls to one packet when the retransmission timer fires (1 s at least). At 30-40 % loss the window
fills with lost chunks, nothing more is sent, and the sender stalls until that timer; every
message handed to the channel meanwhile waits in aiortc's unbounded queues (seen: p99 0.8-3.9 s
at 30 %, 7.7-9.5 s at 40 %). ``maxPacketLifeTime`` instead of ``maxRetransmits=0`` does not help: the
lifetime is only checked when a chunk would be retransmitted, and the fast retransmissions it
allows arrive ~100 ms late. So :class:`WebRtcUplink`

- hands a chunk to aiortc only when it goes on the wire at once (nothing queued in aiortc, flight
  size under the window), and keeps the rest itself, latest frame wins: chunks of an older frame
  still in hand when a new one is offered are dropped and counted;
- keeps the congestion window at least ``sctp_cwnd_floor_packets`` (16) packets. The agent is
  paced by the application (a frame per sensor period, sized by rate control), so this only stops
  random loss from stalling it: without the floor, 40-50 % of the chunks arrived at 30 % loss and
  15-24 % at 40 % (the rest waited out stalls and were replaced); with it 70 % and 58 %, all of
  them handed to SCTP, p99 latency ~2 ms either way.

Both reach into aiortc 1.16's private SCTP state, in one function (:func:`sctp_has_room`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidAccessError, InvalidStateError
from google.protobuf.message import DecodeError

from protos import Control, FeatureFrame
from transport.framing import LatestChunks
from transport.grpc_link import LinkError, UplinkCounters

log = logging.getLogger(__name__)

FEATURES_LABEL = "features"
CONTROL_LABEL = "control"
OFFER_PATH = "/offer"
MAX_OFFER_BYTES = 64 * 1024
"""Largest signalling body accepted (an offer with two data channels is about 1 KB)."""
CONTROL_BACKLOG_BYTES = 64 * 1024
"""The server refuses to queue more control bytes than this for an agent that does not drain them."""
SIGNAL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 15.0
SCTP_PACKET_BYTES = 1160
"""User bytes in one aiortc SCTP DATA chunk (``rtcsctptransport.USERDATA_MAX_LENGTH``): a chunk of up to
1100 bytes plus the data channel framing is one packet."""
ROOM_POLL_S = 0.002
"""How often a blocked sender looks again for room in SCTP (aiortc has no event for it)."""
CLOSE_DRAIN_S = 0.5
STABLE_CONNECTION_S = 2.0
"""A connection that lasted this long restarts the reconnect backoff (shorter ones, e.g. two agents with one id
replacing each other, keep backing off)."""
FINAL_HTTP_STATUSES = (400, 401, 403)
RETRYABLE_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, ConnectionError, ValueError, InvalidAccessError,
                    InvalidStateError)
"""What ends one connection attempt of an uplink without ending the uplink (it reconnects after a backoff)."""


def sctp_has_room(channel: RTCDataChannel, cwnd_floor_bytes: int = 0) -> bool:
    """Whether a message sent on ``channel`` now would go on the wire at once instead of queueing,
    after raising the association's congestion window to ``cwnd_floor_bytes`` if it is below.

    Uses aiortc 1.16's private SCTP state (``rtcsctptransport.RTCSctpTransport``): messages wait in
    ``_data_channel_queue`` (what ``bufferedAmount`` counts), then as DATA chunks in
    ``_outbound_queue`` until ``_flight_size`` is under ``_cwnd`` (``_transmit``); both queues are
    shared by every channel of the association and unbounded. ``_cwnd`` is only compared against,
    so raising it is safe at any time. Without these attributes (another aiortc) it falls back to
    ``bufferedAmount`` alone, with no floor.
    """
    sctp = channel.transport
    try:
        sctp._cwnd = max(sctp._cwnd, cwnd_floor_bytes)
        return not sctp._data_channel_queue and not sctp._outbound_queue and sctp._flight_size < sctp._cwnd
    except AttributeError:
        return channel.bufferedAmount == 0


@dataclass(slots=True)
class WebRtcUplinkCounters(UplinkCounters):
    """What a WebRTC uplink did. Frame counters as for gRPC (``sent``: frames of which at least one
    chunk went out; ``dropped_stale``: frames replaced before any chunk went out); chunk counters
    on top."""

    chunks_sent: int = 0
    chunks_dropped_stale: int = 0
    """Unsent chunks of a frame that a newer frame replaced (frames never split are not counted here)."""
    waits_for_room: int = 0
    """Chunks that had to wait for room in SCTP (congestion window full or something queued in aiortc)."""


@dataclass(slots=True)
class WebRtcUplink:
    """An agent's stream of ``FeatureFrame`` chunks to the fusion node over a WebRTC data channel.

    Same surface as :class:`transport.grpc_link.FeatureUplink`. :meth:`offer` never blocks and
    never queues stale data: the sender splits the newest frame into chunks when it takes it up,
    hands a chunk to aiortc only when it goes on the wire at once, and a newer frame replaces
    whatever is left of an older one (a frame waits at most one frame period here). ``send_time_ns`` of each chunk is the moment it was
    handed to aiortc. Run :meth:`run` as a task; it reconnects with backoff (0.1 s to 5 s, with
    jitter) and raises ``LinkError`` when the fusion node refuses the credentials.
    """

    signal_url: str
    agent_id: int
    token: str = ""
    on_control: Callable[[Control], None] | None = None
    max_chunk_bytes: int = 1100
    sctp_cwnd_floor_packets: int = 16
    """Lowest SCTP congestion window kept, in packets (see the module docstring); 0 leaves aiortc's alone."""
    ssl_context: ssl.SSLContext | None = None
    """For an ``https://`` signalling URL with a private CA; ``None`` uses the system's trust."""
    counters: WebRtcUplinkCounters = field(default_factory=WebRtcUplinkCounters)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while the data channels to the fusion node are open."""
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when an open connection broke (cleared again on reconnecting)."""
    _pending: LatestChunks = field(init=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: bool = False
    _close_requested: asyncio.Event = field(default_factory=asyncio.Event)
    _connected_at: float = 0.0
    _close_deadline: float = 0.0

    def __post_init__(self) -> None:
        self._pending = LatestChunks(self.max_chunk_bytes, self.counters)

    def offer(self, frame: FeatureFrame) -> None:
        self._pending.offer(frame)
        self._ready.set()

    @property
    def idle(self) -> bool:
        """``True`` when no frame or chunk is waiting to be handed to SCTP."""
        return self._pending.idle

    def close(self) -> None:
        """Finish: the link closes once the chunks in hand have gone to SCTP (giving up after 0.5 s)."""
        self._close_deadline = time.monotonic() + CLOSE_DRAIN_S
        self._closed = True
        self._ready.set()
        self._close_requested.set()

    async def run(self) -> None:
        """Stream until :meth:`close`; reconnect after failures; raise ``LinkError`` if refused."""
        backoff = 0.1
        while not self._closed:
            try:
                await self._connection()
            except RETRYABLE_ERRORS as err:
                self.counters.last_error = f"{type(err).__name__}: {err}"
            finally:
                if self.connected.is_set():
                    if time.monotonic() - self._connected_at >= STABLE_CONNECTION_S:
                        backoff = 0.1
                    self.connected.clear()
                    if not self._closed:
                        self.disconnected.set()
                        self.counters.disconnects += 1
            if self._closed:
                return
            log.warning("agent %d: WebRTC link to %s down (%s); reconnecting in %.1f s", self.agent_id,
                        self.signal_url, self.counters.last_error, backoff)
            try:  # reconnect backoff with jitter, cut short by close()
                await asyncio.wait_for(self._close_requested.wait(), backoff * (0.5 + random.random()))
            except TimeoutError:
                pass
            backoff = min(backoff * 2, 5.0)

    async def _connection(self) -> None:
        """One peer connection, from offer to its end (closed, failed or broken)."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        lost = asyncio.Event()
        try:
            features = pc.createDataChannel(FEATURES_LABEL, ordered=False, maxRetransmits=0)
            control = pc.createDataChannel(CONTROL_LABEL)
            self._watch(pc, features, control, lost)
            await pc.setLocalDescription(await pc.createOffer())  # returns when ICE gathering is complete
            answer = await self._signal(pc.localDescription)
            await pc.setRemoteDescription(answer)
            await self._wait_open(features, control, lost)
            self.counters.connects += 1
            self._connected_at = time.monotonic()
            self.disconnected.clear()
            self.connected.set()
            await self._stream(features, lost)
            if not lost.is_set():
                await self._drain(features, lost)
        finally:
            await pc.close()
        if not self._closed:
            raise ConnectionError(f"peer connection {pc.connectionState}")

    def _watch(self, pc: RTCPeerConnection, features: RTCDataChannel, control: RTCDataChannel,
               lost: asyncio.Event) -> None:
        def on_lost(*_) -> None:
            lost.set()
            self._ready.set()  # wake the sender

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                on_lost()

        features.on("close", on_lost)
        control.on("close", on_lost)
        control.on("message", self._control_message)

    def _control_message(self, data: bytes | str) -> None:
        if isinstance(data, str):
            self.counters.last_error = "text message on the control channel"
            return
        try:
            control = Control.FromString(data)
        except DecodeError as err:
            self.counters.last_error = f"malformed Control of {len(data)} bytes: {err}"
            log.warning("agent %d: %s", self.agent_id, self.counters.last_error)
            return
        self.counters.controls += 1
        if self.on_control is not None:
            self.on_control(control)

    async def _signal(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        body = {"sdp": offer.sdp, "type": offer.type, "agent_id": self.agent_id, "token": self.token}
        timeout = aiohttp.ClientTimeout(total=SIGNAL_TIMEOUT_S)
        url = self.signal_url.rstrip("/") + OFFER_PATH
        ssl_arg = self.ssl_context if self.ssl_context is not None else True
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(url, json=body, ssl=ssl_arg) as reply:
            text = await reply.text()
            if reply.status in FINAL_HTTP_STATUSES:
                self.counters.last_error = f"HTTP {reply.status}: {_error_text(text)}"
                raise LinkError(f"agent {self.agent_id}: fusion node at {self.signal_url} refused the offer: "
                                f"{self.counters.last_error}")
            if reply.status != 200:
                raise ConnectionError(f"signalling answered HTTP {reply.status}: {_error_text(text)}")
        try:
            answer = json.loads(text)
            return RTCSessionDescription(sdp=answer["sdp"], type=answer["type"])
        except (ValueError, KeyError, TypeError) as err:
            raise ConnectionError(f"signalling answered something that is not an SDP answer: {err}") from err

    async def _wait_open(self, features: RTCDataChannel, control: RTCDataChannel, lost: asyncio.Event) -> None:
        opened = asyncio.Event()

        def check(*_) -> None:
            if features.readyState == "open" and control.readyState == "open":
                opened.set()

        features.on("open", check)
        control.on("open", check)
        check()
        waits = [asyncio.ensure_future(opened.wait()), asyncio.ensure_future(lost.wait())]
        try:
            done, _ = await asyncio.wait(waits, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        if not opened.is_set():
            raise ConnectionError("data channels did not open" + (" (connection failed)" if done else
                                                                  f" within {CONNECT_TIMEOUT_S:.0f} s"))

    async def _stream(self, channel: RTCDataChannel, lost: asyncio.Event) -> None:
        """Hand chunks to SCTP as it takes them without queueing, until closed or lost."""
        floor_bytes = self.sctp_cwnd_floor_packets * SCTP_PACKET_BYTES
        waiting = False
        while not lost.is_set() and channel.readyState == "open":
            chunk = self._pending.peek()
            if chunk is None:
                if self._closed:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            if not sctp_has_room(channel, floor_bytes):
                if self._closed and time.monotonic() > self._close_deadline:
                    return
                self.counters.waits_for_room += not waiting
                waiting = True
                await asyncio.sleep(ROOM_POLL_S)  # polling: aiortc signals no "window opened" event
                continue
            waiting = False
            chunk.send_time_ns = time.time_ns()
            data = chunk.SerializeToString()
            channel.send(data)
            self._pending.sent()
            self.counters.bytes_sent += len(data)
            await asyncio.sleep(0)  # let aiortc put it on the wire before looking for room again

    async def _drain(self, channel: RTCDataChannel, lost: asyncio.Event) -> None:
        """On close: give SCTP until the close deadline to put what it was handed on the wire."""
        while not lost.is_set() and not sctp_has_room(channel) and time.monotonic() < self._close_deadline:
            await asyncio.sleep(ROOM_POLL_S)


def _error_text(body: str) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200]


@dataclass(slots=True)
class _Peer:
    agent_id: int
    pc: RTCPeerConnection
    features: RTCDataChannel | None = None
    control: RTCDataChannel | None = None
    announced: bool = False
    """``on_connect`` was called for it (so ``on_disconnect`` is owed)."""


class WebRtcServer:
    """The fusion node's end: a signalling server and one peer connection per agent.

    ``on_chunk(agent_id, data, receive_time_ns)`` is called on the event loop for every message on
    an agent's features channel (raw bytes, not parsed: decoding is the caller's job) and must be
    cheap. ``authenticate(agent_id, token)`` returns ``None`` to admit the agent, else the refusal
    message sent back with HTTP 401. ``on_connect`` fires when both of an agent's channels are
    open (``send_control`` works from then on), ``on_disconnect`` when that connection failed,
    closed or was replaced by a newer one from the same agent id. Refused offers are counted in
    :attr:`refused` by reason.
    """

    def __init__(self, *, on_chunk: Callable[[int, bytes, int], None], authenticate: Callable[[int, str], str | None],
                 on_connect: Callable[[int], None] | None = None,
                 on_disconnect: Callable[[int], None] | None = None) -> None:
        self._on_chunk = on_chunk
        self._authenticate = authenticate
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._peers: dict[int, _Peer] = {}
        self._pcs: set[RTCPeerConnection] = set()
        self._runner: web.AppRunner | None = None
        self._closing: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
        self.refused: dict[str, int] = {}

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Serve signalling on ``host:port`` (0 picks a free port); returns the bound port."""
        app = web.Application(client_max_size=MAX_OFFER_BYTES)
        app.router.add_post(OFFER_PATH, self._handle_offer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        return self._runner.addresses[0][1]

    def send_control(self, agent_id: int, control: Control) -> bool:
        """Queue ``control`` for the agent; ``False`` if it has no open control channel (or a full one)."""
        peer = self._peers.get(agent_id)
        channel = peer.control if peer is not None else None
        if channel is None or channel.readyState != "open" or channel.bufferedAmount > CONTROL_BACKLOG_BYTES:
            return False
        channel.send(control.SerializeToString())
        return True

    def connected_agents(self) -> set[int]:
        return {agent_id for agent_id, peer in self._peers.items() if peer.announced}

    async def stop(self) -> None:
        """Close every peer connection and the signalling server."""
        for peer in list(self._peers.values()):
            self._drop(peer)
        await asyncio.gather(*(pc.close() for pc in list(self._pcs)), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _refuse(self, status: int, reason: str, message: str) -> web.Response:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.warning("refused a WebRTC offer (%s): %s", reason, message)
        return web.json_response({"error": message}, status=status)

    async def _handle_offer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as err:
            return self._refuse(400, "malformed", f"body is not JSON: {err}")
        problem = _offer_problem(body)
        if problem is not None:
            return self._refuse(400, "malformed", problem)
        agent_id, token = body["agent_id"], body.get("token", "")
        refusal = self._authenticate(agent_id, token)
        if refusal is not None:
            return self._refuse(401, "unauthenticated", refusal)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._pcs.add(pc)
        peer = _Peer(agent_id, pc)
        self._watch(peer)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        # aiortc's SDP parser reports some malformed lines with assert statements.
        except (ValueError, AttributeError, KeyError, AssertionError, InvalidAccessError, InvalidStateError) as err:
            await self._close_pc(pc)
            return self._refuse(400, "bad_sdp", f"cannot answer this offer: {err}")
        old = self._peers.get(agent_id)
        if old is not None:
            log.info("agent %d connected again: replacing its old connection", agent_id)
            self._drop(old)
            self._close_later(old.pc)
        self._peers[agent_id] = peer
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})

    def _watch(self, peer: _Peer) -> None:
        pc, agent_id = peer.pc, peer.agent_id

        @pc.on("datachannel")
        def on_channel(channel: RTCDataChannel) -> None:
            if channel.label == FEATURES_LABEL:
                peer.features = channel
                on_chunk = self._on_chunk

                @channel.on("message")
                def on_message(data: bytes | str) -> None:
                    if isinstance(data, bytes):
                        on_chunk(agent_id, data, time.time_ns())
                    else:
                        self.refused["text_message"] = self.refused.get("text_message", 0) + 1
            elif channel.label == CONTROL_LABEL:
                peer.control = channel
            if peer.features is not None and peer.control is not None and self._peers.get(agent_id) is peer:
                peer.announced = True
                if self._on_connect is not None:
                    self._on_connect(agent_id)

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._drop(peer)
                self._close_later(pc)

    def _drop(self, peer: _Peer) -> None:
        """Forget ``peer`` (if it is still the agent's connection) and report the disconnect once."""
        if self._peers.get(peer.agent_id) is peer:
            del self._peers[peer.agent_id]
        if peer.announced:
            peer.announced = False
            if self._on_disconnect is not None:
                self._on_disconnect(peer.agent_id)

    def _close_later(self, pc: RTCPeerConnection) -> None:
        task = asyncio.ensure_future(self._close_pc(pc))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_pc(self, pc: RTCPeerConnection) -> None:
        await pc.close()
        self._pcs.discard(pc)


def _offer_problem(body: object) -> str | None:
    """What is wrong with a signalling body, or ``None``."""
    if not isinstance(body, dict):
        return "body must be a JSON object with sdp, type, agent_id and token"
    missing = [key for key in ("sdp", "type", "agent_id") if key not in body]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    if body["type"] != "offer":
        return f"type must be 'offer', got {body['type']!r}"
    if not isinstance(body["sdp"], str) or not body["sdp"]:
        return "sdp must be a non-empty string"
    agent_id = body["agent_id"]
    if isinstance(agent_id, bool) or not isinstance(agent_id, int) or not -2**31 <= agent_id < 2**31:
        return f"agent_id must be a 32-bit integer, got {agent_id!r}"
    if not isinstance(body.get("token", ""), str):
        return "token must be a string"
    if "m=application" not in body["sdp"]:
        return "the offer has no data channels (no m=application section)"
    return None
