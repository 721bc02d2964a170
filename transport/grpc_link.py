"""gRPC links between agents and the fusion node (``grpc.aio``).

Limits, both sides (they are what a deployment tunes first):

- **Message size**: :data:`MAX_MESSAGE_BYTES` (4 MiB) each way. A coded frame is a few
  kilobytes and an uncompressed fp16 feature map about 320 KB, so 4 MiB leaves room
  without letting one bad peer make the other allocate gigabytes. A larger message ends
  that stream with ``RESOURCE_EXHAUSTED``; the agent reconnects and goes on.
- **Keepalive**: clients ping every 10 s of silence and give up after 5 s without an
  answer (a dead Wi-Fi link is noticed in ~15 s, not after TCP's minutes); servers
  accept pings every 5 s even with no call in flight.
- **Reconnect**: an agent's uplink retries with exponential backoff from 0.1 s to 5 s
  (with jitter), so a restarted fusion node is rejoined within seconds; a refusal of
  its credentials (``UNAUTHENTICATED``/``PERMISSION_DENIED``) is final and reported.

Authentication: every call carries ``x-cpstream-agent`` (the agent id) and
``x-cpstream-token`` metadata; the server checks them before reading a frame. With
certificates configured the channel is TLS (and mutual TLS when the server is given
a client CA). Latest wins on the sender: :meth:`FeatureUplink.offer` replaces a frame
that has not gone out yet instead of queueing it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection

from protos import Control, FeatureFrame, FusedFrame, FusionStub, SubscribeRequest
from protos.cpstream_pb2 import DESCRIPTOR as CPSTREAM_DESCRIPTOR

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
AGENT_KEY = "x-cpstream-agent"
TOKEN_KEY = "x-cpstream-token"
FUSION_SERVICE = CPSTREAM_DESCRIPTOR.services_by_name["Fusion"].full_name

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)
FINAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True, slots=True)
class MalformedFrame:
    """A message on an agent's stream that is not a ``FeatureFrame`` (the stream goes on)."""

    size_bytes: int
    error: str


def _parse_feature_frame(data: bytes) -> FeatureFrame | MalformedFrame:
    try:
        return FeatureFrame.FromString(data)
    except DecodeError as err:
        return MalformedFrame(len(data), f"malformed FeatureFrame of {len(data)} bytes: {err}")


def add_fusion_service(servicer, server: grpc.aio.Server) -> None:
    """Register ``cp.v1.Fusion`` so that a malformed frame reaches the servicer as a
    :class:`MalformedFrame` (to be refused and counted) instead of ending the agent's stream."""
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            servicer.Stream, request_deserializer=_parse_feature_frame,
            response_serializer=Control.SerializeToString),
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            servicer.Subscribe, request_deserializer=SubscribeRequest.FromString,
            response_serializer=FusedFrame.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FUSION_SERVICE, handlers),))
    server.add_registered_method_handlers(FUSION_SERVICE, handlers)


class LinkError(RuntimeError):
    """A link that cannot go on (bad credentials, a refused stream); the message says why."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for TLS. Server: ``cert`` + ``key`` (+ ``ca`` to require client certificates).
    Client: ``ca`` to trust the server (+ ``cert`` + ``key`` for mutual TLS)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def _read(self, path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise LinkError(f"TLS {what} {path}: {err.strerror}") from err

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key = self._read(self.cert, "certificate"), self._read(self.key, "key")
        if cert is None or key is None:
            raise LinkError("TLS on the server needs both a certificate and a key")
        ca = self._read(self.ca, "client CA")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._read(self.ca, "CA"),
                                            private_key=self._read(self.key, "key"),
                                            certificate_chain=self._read(self.cert, "certificate"))


def open_channel(address: str, tls: TlsFiles | None = None) -> grpc.aio.Channel:
    """A client channel with the limits above (TLS when ``tls`` is given)."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)


@dataclass(slots=True)
class FusionServer:
    """A running server: the gRPC server, the port it got, and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", FUSION_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_fusion_server(servicer, address: str, tls: TlsFiles | None = None) -> FusionServer:
    """Serve ``cp.v1.Fusion`` with standard health checking and server reflection.

    ``address`` is ``host:port`` (port 0 picks a free one; see ``FusionServer.port``).
    Health reports NOT_SERVING until :meth:`FusionServer.set_serving` is called.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_fusion_service(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (FUSION_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = (server.add_secure_port(address, tls.server_credentials()) if tls is not None
            else server.add_insecure_port(address))
    if port == 0:
        raise LinkError(f"cannot listen on {address}")
    await server.start()
    running = FusionServer(server, port, health)
    await running.set_serving(False)
    return running


async def health_status(address: str, tls: TlsFiles | None = None, service: str = "",
                        timeout_s: float = 2.0) -> str:
    """The server's health status name (``SERVING``, ``NOT_SERVING``...) or ``UNREACHABLE``."""
    async with open_channel(address, tls) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def wait_serving(address: str, tls: TlsFiles | None = None, timeout_s: float = 60.0) -> None:
    """Block until the server reports SERVING (watching its health stream), or raise ``LinkError``."""
    deadline = time.monotonic() + timeout_s
    async with open_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                call = stub.Watch(health_pb2.HealthCheckRequest(service=""),
                                  timeout=max(0.1, deadline - time.monotonic()), wait_for_ready=True)
                async for reply in call:
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
                await asyncio.sleep(0.05)  # server went away between watches: retry (backoff, not a test wait)
    raise LinkError(f"fusion node at {address} did not report SERVING within {timeout_s:.0f} s")


@dataclass(slots=True)
class UplinkCounters:
    """What an agent's uplink did."""

    offered: int = 0
    sent: int = 0
    dropped_stale: int = 0
    bytes_sent: int = 0
    connects: int = 0
    disconnects: int = 0
    controls: int = 0
    last_error: str = ""


@dataclass(slots=True)
class FeatureUplink:
    """An agent's stream of ``FeatureFrame``s to the fusion node, reconnecting with backoff.

    :meth:`offer` never blocks and never queues: a frame not yet handed to gRPC is
    replaced by a newer one (counted as ``dropped_stale``). Run :meth:`run` as a task.
    """

    address: str
    agent_id: int
    token: str = ""
    tls: TlsFiles | None = None
    on_control: Callable[[Control], None] | None = None
    counters: UplinkCounters = field(default_factory=UplinkCounters)
    _slot: FeatureFrame | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: bool = False
    _generation: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while a stream to the fusion node is open."""
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when an open stream broke (cleared again on reconnecting)."""

    def offer(self, frame: FeatureFrame) -> None:
        self.counters.offered += 1
        if self._slot is not None:
            self.counters.dropped_stale += 1
        self._slot = frame
        self._ready.set()

    def close(self) -> None:
        """Finish: the stream ends after the frame in hand (if any) has gone out."""
        self._closed = True
        self._ready.set()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AGENT_KEY, str(self.agent_id)), (TOKEN_KEY, self.token))

    async def _frames(self, generation: int) -> AsyncIterator[FeatureFrame]:
        # A broken call's request iterator can outlive it inside gRPC: only the current one takes frames.
        while generation == self._generation:
            if self._slot is None:
                if self._closed:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            frame, self._slot = self._slot, None
            frame.send_time_ns = time.time_ns()
            self.counters.sent += 1
            self.counters.bytes_sent += frame.ByteSize()
            yield frame

    async def run(self) -> None:
        """Stream until :meth:`close`; reconnect after failures; raise ``LinkError`` if refused."""
        backoff = 0.1
        while not (self._closed and self._slot is None):
            self._generation += 1
            async with open_channel(self.address, self.tls) as channel:
                call = FusionStub(channel).Stream(self._frames(self._generation), metadata=self.metadata,
                                                  wait_for_ready=True)
                try:
                    await call.initial_metadata()
                    self.counters.connects += 1
                    self.disconnected.clear()
                    self.connected.set()
                    backoff = 0.1
                    async for control in call:
                        self.counters.controls += 1
                        if self.on_control is not None:
                            self.on_control(control)
                    code = await call.code()  # the server closed the stream: its status says why
                    if code == grpc.StatusCode.OK or self._closed:
                        return
                    raise grpc.aio.AioRpcError(code, await call.initial_metadata(), await call.trailing_metadata(),
                                               await call.details())
                except grpc.aio.AioRpcError as err:
                    self._generation += 1  # the broken call's request iterator must not take the next frame
                    if self.connected.is_set():
                        self.disconnected.set()
                    self.connected.clear()
                    self.counters.disconnects += 1
                    self.counters.last_error = f"{err.code().name}: {err.details()}"
                    if err.code() in FINAL_CODES:
                        raise LinkError(f"agent {self.agent_id}: fusion node at {self.address} refused the stream: "
                                        f"{err.code().name}: {err.details()}") from err
                    if err.code() == grpc.StatusCode.CANCELLED and self._closed:
                        return
                    log.warning("agent %d: stream to %s ended (%s); reconnecting in %.1f s", self.agent_id,
                                self.address, self.counters.last_error, backoff)
            await asyncio.sleep(backoff * (0.5 + random.random()))  # reconnect backoff with jitter
            backoff = min(backoff * 2, 5.0)


async def subscribe(address: str, request: SubscribeRequest | None = None, tls: TlsFiles | None = None,
                    metadata: Sequence[tuple[str, str]] = (), subscribed: asyncio.Event | None = None
                    ) -> AsyncIterator[FusedFrame]:
    """Fused frames from the fusion node as they are published (ends when the server does).

    ``subscribed`` is set once the server has registered the subscription: every frame
    fused after that reaches this subscriber.
    """
    async with open_channel(address, tls) as channel:
        call = FusionStub(channel).Subscribe(request or SubscribeRequest(), metadata=tuple(metadata),
                                             wait_for_ready=True)
        await call.initial_metadata()
        if subscribed is not None:
            subscribed.set()
        async for frame in call:
            yield frame
