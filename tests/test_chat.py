"""The video chat: newest-frame sampling, the server's refusals, and real peers (headless Chromium, the Python
sender) streaming video over WebRTC between network namespaces to the server, which asks a fake LLM."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from fusion.chat_frames import FrameSampler, NewestFrame
from fusion.chat_server import ChatConfig, ChatServer
from fusion.llm_client import LlmConfig
from tests.test_webrtc_link import Child
from transport.impair import NetnsTopology, impairment_unavailable

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                  "--use-fake-device-for-media-stream", "--disable-features=WebRtcHideLocalIpsWithMdns",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--disable-quic"]


class FakeFrame:
    def __init__(self, value: int) -> None:
        self.value = value

    def to_ndarray(self, format: str) -> np.ndarray:  # noqa: A002 - av.VideoFrame's signature
        return np.full((4, 6, 3), self.value, dtype=np.uint8)


class ScriptedTrack:
    """A track whose frames arrive when the test puts them in."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    async def recv(self) -> FakeFrame:
        item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item


async def _settle(newest: NewestFrame, count: int) -> None:
    while newest.decoded < count:
        await asyncio.sleep(0)


async def test_only_the_newest_frame_is_kept_and_stale_samples_are_substituted_and_said_so() -> None:
    track, newest = ScriptedTrack(), NewestFrame()
    newest.start(track)
    sampler = FrameSampler(newest, max_age_ms=300)
    assert sampler.sample() is None  # nothing yet
    for value in (1, 2, 3):
        track.queue.put_nowait(FakeFrame(value))
    await _settle(newest, 3)
    assert track.queue.empty() and newest.decoded == 3  # drained, not queued
    first = sampler.sample()
    assert not first.substituted and first.frame.pixels[0, 0, 0] == 3  # the newest, not the oldest
    again = sampler.sample()  # nothing new arrived: the last good frame, marked
    assert again.substituted and "no new frame" in again.reason and again.frame is first.frame
    track.queue.put_nowait(FakeFrame(4))
    await _settle(newest, 4)
    late = sampler.sample(now_ns=newest.newest.received_ns + 500_000_000)  # it arrives, but 500 ms old
    assert late.substituted and "500 ms old" in late.reason and late.frame.pixels[0, 0, 0] == 4
    assert late.age_ms == pytest.approx(500)
    assert not await newest.wait_newer(sampler.last_index, timeout_s=0.01)  # nothing after frame 4 yet
    track.queue.put_nowait(FakeFrame(5))
    assert await newest.wait_newer(sampler.last_index, timeout_s=5)
    fresh = sampler.sample()
    assert not fresh.substituted and fresh.frame.pixels[0, 0, 0] == 5
    stats = sampler.stats.as_dict()
    assert stats["samples"] == 4 and stats["substituted"] == 2 and stats["substituted_share"] == 0.5
    assert [s.frame.pixels[0, 0, 0] for s in sampler.latest(3)] == [3, 4, 5]  # no frame twice
    track.queue.put_nowait(RuntimeError("track ended"))
    await newest._task
    assert newest.ended == "RuntimeError: track ended"


async def test_the_server_refuses_malformed_offers_by_name_and_counts_them() -> None:
    server = ChatServer(ChatConfig(llm=LlmConfig(url="http://127.0.0.1:9/v1", model="m")))
    port = await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    audio_only = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\n"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/") as page:
                assert page.status == 200 and "RTCPeerConnection" in await page.text()
            for body, error in [
                (b"{not json", "not JSON"),
                (json.dumps({"type": "offer"}).encode(), "non-empty string"),
                (json.dumps({"sdp": "v=0", "type": "answer"}).encode(), "\"type\": \"offer\""),
                (json.dumps({"sdp": audio_only, "type": "offer"}).encode(), "no video"),
                (json.dumps({"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "type": "offer"}).encode(),
                 "cannot answer this offer"),
            ]:
                async with session.post(url + "/offer", data=body) as reply:
                    assert reply.status == 400, body
                    assert error in (await reply.json())["error"], body
            async with session.get(url + "/status") as status:
                counted = (await status.json())["refused"]
        assert counted == {"malformed": 3, "no_video": 1, "bad_sdp": 1}
        assert server.conversations == []
    finally:
        await server.stop()


@pytest.fixture
def topology() -> Iterator[NetnsTopology]:
    reason = impairment_unavailable()
    if reason is not None:
        pytest.skip(f"WebRTC needs two network namespaces (aioice and Chromium skip loopback): {reason}")
    with NetnsTopology(1, prefix="cpch", subnet=206) as topo:
        yield topo


def _start_server_and_llm(topology: NetnsTopology, tmp_path: Path, *, llm_port: int = 8000,
                          fake_args: tuple[str, ...] = (), chat_args: tuple[str, ...] = ()) -> tuple[Child, Child, str]:
    cpstream = [sys.executable, "-m", "launch.cli"]
    hub = topology.exec_prefix(topology.hub)
    llm = Child(hub + cpstream + ["fake-llm", "--port", str(llm_port), "--record", str(tmp_path / "llm.jsonl"),
                                  *fake_args], tmp_path / "llm.err")
    llm.expect("fake-llm:")
    server = Child(hub + cpstream + ["chat", "--llm-url", "http://127.0.0.1:8000/v1", "--model", "fake-vlm",
                                     "--host", topology.hub_address(0), "--port", "8080",
                                     "--report", str(tmp_path / "chat.json"), *chat_args], tmp_path / "chat.err")
    server.expect("chat:")
    return llm, server, f"http://{topology.hub_address(0)}:8080"


# A page that offers a video transceiver without a camera track: the server's error reaches it on the channel.
SILENT_PAGE = """async (url) => {
  const pc = new RTCPeerConnection({iceServers: []});
  pc.addTransceiver("video", {direction: "sendonly"});
  const channel = pc.createDataChannel("chat");
  const error = new Promise((resolve) => { channel.onmessage = (e) => {
    const m = JSON.parse(e.data); if (m.type === "error") resolve(m.message); }; });
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") resolve(); };
  });
  const reply = await fetch(url + "/offer", {method: "POST",
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: "offer"})});
  await pc.setRemoteDescription(await reply.json());
  const timeout = new Promise((resolve) => setTimeout(() => resolve("no error message within 20 s"), 20000));
  return await Promise.race([error, timeout]);
}"""


@pytest.mark.e2e
def test_headless_chromium_streams_its_camera_and_the_page_shows_the_models_answer(
        topology: NetnsTopology, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (Debian's chromium package; `make test` installs it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package drives Chromium")
    llm, server, url = _start_server_and_llm(topology, tmp_path, chat_args=("--first-frame-timeout-s", "3"))
    wrapper = tmp_path / "chromium-in-netns"  # Chromium runs in the remote namespace, talking to Playwright on pipes
    wrapper.write_text(f"#!/bin/sh\nexec {' '.join(topology.exec_prefix(topology.remote(0)))} {CHROMIUM} \"$@\"\n")
    wrapper.chmod(0o755)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=str(wrapper), headless=True,
                args=CHROMIUM_FLAGS + [f"--unsafely-treat-insecure-origin-as-secure={url}"])
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.wait_for_selector("#question:not([disabled])", timeout=30_000)  # the data channel is open
                page.wait_for_function("document.getElementById('status').textContent.includes('frames decoded')",
                                       timeout=30_000)  # the server decodes the camera's frames
                # Meanwhile another page offers video but never sends a frame: it is told, and this one goes on.
                silent = browser.new_page()
                silent.goto(url + "/status")  # same origin as /offer, and no camera
                silent_error = silent.evaluate(SILENT_PAGE, url)
                page.fill("#question", "what do you see?")
                page.click("#ask")
                page.wait_for_selector(".answer[data-done='1']", timeout=30_000)
                answer = page.inner_text(".answer")
                seen = page.get_attribute("#seen", "src")
                errors = page.inner_text("#errors")
            finally:
                browser.close()
    finally:
        for child in (server, llm):
            child.stop()
    assert "You asked: what do you see?" in answer and answer.startswith("model: I see 2 images (640x480, 640x480).")
    assert seen.startswith("data:image/jpeg;base64,")
    assert errors.strip() == ""
    assert silent_error.startswith("no video received in 3 s (no frame decoded)")
    assert json.loads((tmp_path / "chat.json").read_text())["no_video"] == 1
    requests = [json.loads(line) for line in (tmp_path / "llm.jsonl").read_text().splitlines()]
    assert len(requests) == 1 and requests[0]["model"] == "fake-vlm"
    assert requests[0]["question"] == "what do you see?"
    assert requests[0]["image_sizes"] == [[480, 640], [480, 640]]  # real JPEGs of the page's 640x480 canvas


def _send(topology: NetnsTopology, url: str, tmp_path: Path, name: str, *questions: str) -> Child:
    argv = [sys.executable, "-m", "launch.cli", "chat-send", "--server", url, "--camera", "pattern", "--seconds", "1"]
    for question in questions:
        argv += ["--ask", question]
    return Child(topology.exec_prefix(topology.remote(0)) + argv, tmp_path / f"{name}.err")


@pytest.mark.e2e
def test_the_python_sender_follows_the_servers_rate_and_regions_and_an_llm_that_is_down_is_reported(
        topology: NetnsTopology, tmp_path: Path) -> None:
    # The fake LLM listens on 8001; the server asks 8000, where nothing listens: the model is down.
    llm, server, url = _start_server_and_llm(topology, tmp_path, llm_port=8001)
    try:
        down = _send(topology, url, tmp_path, "down", "what does the text say?", "and now?")
        down.expect("connected:", timeout_s=40)
        first, second = down.expect("error:", timeout_s=40), down.expect("error:", timeout_s=40)
        done = json.loads(down.expect("done:", timeout_s=40))
        down.stop()
    finally:
        for child in (server, llm):
            child.stop()
    for error in (first, second):  # each question gets the reason, and the conversation goes on
        assert error.startswith("the model did not answer:") and "http://127.0.0.1:8000/v1/chat/completions" in error
        assert "unreachable" in error
    assert done["fps"] == 6.0  # the server asked for 3 frames per sample (2 a second), not the sender's 10
    assert done["regions"], "the server named where the question looks"
    assert done["server_status"]["frames_decoded"] > 0
    report = json.loads((tmp_path / "chat.json").read_text())
    assert report["llm_errors"] == 2 and report["questions"] == 2 and report["answers"] == 0


def test_a_timecode_survives_lossy_coding_and_a_frame_without_one_reads_none() -> None:
    import cv2

    from transport import timecode

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert timecode.read(np.full((480, 640, 3), 128, np.uint8)) is None
    stamped = timecode.stamp(image.copy(), 1_764_000_000_123_456_789)
    ok, jpeg = cv2.imencode(".jpg", stamped, [cv2.IMWRITE_JPEG_QUALITY, 30])
    assert ok
    assert timecode.read(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)) == 1_764_000_000_123_000_000  # to the millisecond
    with pytest.raises(ValueError, match="at least 400 px wide"):
        timecode.stamp(np.zeros((100, 100, 3), np.uint8), 0)


def test_a_video_frame_goes_to_the_decoder_when_its_last_packet_is_in_not_a_frame_later() -> None:
    from aiortc.rtp import RtpPacket

    from fusion.chat_frames import MarkerJitterBuffer

    def packet(sequence: int, timestamp: int, marker: bool) -> RtpPacket:
        p = RtpPacket(payload_type=96, sequence_number=sequence, timestamp=timestamp, marker=int(marker))
        p._data = bytes([sequence])
        return p

    buffer = MarkerJitterBuffer(capacity=512, is_video=True)
    assert buffer.add(packet(10, 100, False))[1] is None
    frame = buffer.add(packet(11, 100, True))[1]  # aiortc's own rule would wait for packet 12 (the next frame)
    assert frame is not None and frame.data == bytes([10, 11]) and frame.timestamp == 100
    assert buffer.add(packet(12, 200, False))[1] is None
    assert buffer.add(packet(14, 200, True))[1] is None  # packet 13 is missing: the frame is not whole
    assert buffer.last_packet[1:] == (14, True)
    late = buffer.add(packet(13, 200, False))[1]  # its retransmission arrives
    assert late is not None and late.data == bytes([12, 13, 14])


def test_the_python_sender_reads_a_video_file_in_a_loop_and_names_a_source_it_cannot_open(tmp_path: Path) -> None:
    import cv2

    from agents.chat_sender import FrameSource, SenderError

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for value in (40, 200):
        writer.write(np.full((120, 160, 3), value, np.uint8))
    writer.release()
    source = FrameSource(str(path), width=320, height=240)
    frames = [source.read() for _ in range(3)]  # two frames, then the first again
    source.close()
    assert all(f.shape == (240, 320, 3) and f.dtype == np.uint8 for f in frames)
    assert [round(float(f.mean()) / 10) for f in frames] == [4, 20, 4]
    with pytest.raises(SenderError, match="cannot open the video source 'missing.mp4'"):
        FrameSource("missing.mp4")
