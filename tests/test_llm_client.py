"""The chat-completions client against the fake OpenAI-compatible server, on 127.0.0.1."""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator

import aiohttp
import cv2
import numpy as np
import pytest
from aiohttp import web

from fusion.llm_client import LlmClient, LlmConfig, LlmError, build_messages, chat_completions_url, jpeg_data_url
from launch.fake_llm import FakeLlm, fake_answer

MODEL = "fake/vision-7b"


def camera_frame(height: int = 240, width: int = 320) -> np.ndarray:
    """A seeded RGB frame: [H, W, 3] uint8."""
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
async def fake() -> AsyncIterator[FakeLlm]:
    server = FakeLlm()
    await server.start()
    yield server
    await server.stop()


def client_for(url: str, **overrides: object) -> LlmClient:
    return LlmClient(LlmConfig(url=url, model=MODEL, **overrides))


async def test_streamed_answer_arrives_in_pieces_and_fake_records_request(fake: FakeLlm) -> None:
    question = "Is the crossing clear?"
    async with client_for(fake.url, api_key="sk-test") as client:
        pieces = [piece async for piece in client.stream(question, [jpeg_data_url(camera_frame())])]

    assert len(pieces) > 1, "the answer should arrive in several pieces"
    assert "".join(pieces) == "I see 1 image (320x240). You asked: Is the crossing clear?"
    (request,) = await fake.wait_for_requests(1, timeout_s=1.0)
    assert request.model == MODEL
    assert request.question == question
    assert request.image_sizes == [(240, 320)]
    assert request.authorization == "Bearer sk-test"
    assert request.body is not None and request.body["stream"] is True and request.body["max_tokens"] == 300
    assert request.body["messages"][0]["role"] == "system"
    assert client.counters == {"requests": 1, "answers": 1, "errors": 0}


async def test_history_is_sent_as_text_turns_before_the_question(fake: FakeLlm) -> None:
    history = [{"role": "user", "content": "What is ahead?"}, {"role": "assistant", "content": "A truck."}]
    async with client_for(fake.url, system_prompt="") as client:
        answer = await client.ask("Is it moving?", [jpeg_data_url(camera_frame(64, 96))] * 2, history)

    assert answer == fake_answer("Is it moving?", [(64, 96), (64, 96)])
    (request,) = fake.requests
    messages = request.body["messages"]
    assert messages[:2] == history, "no system turn when the prompt is empty; history verbatim, as text"
    assert messages[2]["role"] == "user" and messages[2]["content"][0] == {"type": "text", "text": "Is it moving?"}
    assert request.num_images == 2


async def test_json_answer_when_server_does_not_stream(fake: FakeLlm) -> None:
    fake.ignore_stream = True
    async with client_for(fake.url) as client:
        pieces = [piece async for piece in client.stream("Any people?", [jpeg_data_url(camera_frame())])]

    assert pieces == ["I see 1 image (320x240). You asked: Any people?"], "one piece from the JSON completion"
    assert fake.requests[0].body["stream"] is True, "the client asked for a stream all the same"
    assert client.counters["answers"] == 1


async def test_endpoint_down_names_the_url() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    async with client_for(url, first_token_timeout_s=2.0) as client:
        with pytest.raises(LlmError, match="unreachable") as caught:
            await client.ask("Hello?", [])
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in str(caught.value)
    assert client.counters == {"requests": 1, "answers": 0, "errors": 1}


async def test_http_error_carries_status_and_server_message(fake: FakeLlm) -> None:
    fake.fail_status = 500
    fake.fail_message = "CUDA out of memory"
    async with client_for(fake.url) as client:
        with pytest.raises(LlmError, match=r"HTTP 500: CUDA out of memory") as caught:
            await client.ask("Hello?", [])
    assert fake.url in str(caught.value)
    assert client.counters["errors"] == 1


async def test_bad_request_gets_400_with_message(fake: FakeLlm) -> None:
    url = chat_completions_url(fake.url)
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"not json") as response:
            assert response.status == 400
            assert "not JSON" in (await response.json())["error"]["message"]
        async with session.post(url, json={"model": MODEL, "messages": []}) as response:
            assert response.status == 400
            assert "messages" in (await response.json())["error"]["message"]
    assert len(fake.requests) == 2 and fake.requests[0].body is None


async def test_response_that_is_not_the_protocol_is_an_error() -> None:
    async def html_page(request: web.Request) -> web.Response:
        return web.Response(text="<html>login</html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", html_page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with client_for(f"http://127.0.0.1:{runner.addresses[0][1]}") as client:
            with pytest.raises(LlmError, match="text/html with no Server-Sent Events"):
                await client.ask("Hello?", [])
    finally:
        await runner.cleanup()


async def test_slow_endpoint_times_out_before_first_piece(fake: FakeLlm) -> None:
    fake.delay_s = 5.0  # stop() in the fixture cuts the server's wait short
    async with client_for(fake.url, first_token_timeout_s=0.2) as client:
        with pytest.raises(LlmError, match=r"timed out: no first piece of the answer within 0.2 s") as caught:
            await client.ask("Hello?", [])
    assert fake.url in str(caught.value)
    await fake.wait_for_requests(1, timeout_s=1.0)  # the request did reach the server
    assert client.counters == {"requests": 1, "answers": 0, "errors": 1}


async def test_slow_generation_times_out_on_the_whole_answer(fake: FakeLlm) -> None:
    fake.piece_delay_s = 5.0
    async with client_for(fake.url, first_token_timeout_s=2.0, timeout_s=0.3) as client:
        pieces: list[str] = []
        with pytest.raises(LlmError, match=r"timed out: no whole answer within 0.3 s"):
            async for piece in client.stream("Hello?", []):
                pieces.append(piece)
    assert pieces == ["I see "], "the first piece arrives before the timeout"


async def test_wait_for_requests_times_out_clearly(fake: FakeLlm) -> None:
    with pytest.raises(TimeoutError, match="0 of 1 requests"):
        await fake.wait_for_requests(1, timeout_s=0.05)


@pytest.mark.parametrize(("url", "expected"), [
    ("http://gpu-box:8000", "http://gpu-box:8000/v1/chat/completions"),
    ("http://gpu-box:8000/", "http://gpu-box:8000/v1/chat/completions"),
    ("http://localhost:11434/v1", "http://localhost:11434/v1/chat/completions"),
    ("http://localhost:11434/v1/", "http://localhost:11434/v1/chat/completions"),
    ("https://api.example.com/v1/chat/completions", "https://api.example.com/v1/chat/completions"),
    ("https://example.com/openai", "https://example.com/openai/v1/chat/completions"),
])
def test_chat_completions_url(url: str, expected: str) -> None:
    assert chat_completions_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://gpu-box/v1", "gpu-box:8000", "localhost", "http://"])
def test_chat_completions_url_rejects_non_http(url: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        chat_completions_url(url)


def test_jpeg_data_url_round_trip_keeps_size_and_colour_order() -> None:
    image = np.zeros((48, 64, 3), np.uint8)
    image[..., 0] = 250  # pure red in RGB
    url = jpeg_data_url(image, quality=95)

    assert url.startswith("data:image/jpeg;base64,")
    decoded_bgr = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert decoded_bgr.shape == (48, 64, 3)
    decoded_rgb = cv2.cvtColor(decoded_bgr, cv2.COLOR_BGR2RGB)
    assert np.abs(decoded_rgb.astype(int) - image.astype(int)).max() <= 8, "red must stay red (BGR handled)"


@pytest.mark.parametrize("bad", [
    np.zeros((48, 64), np.uint8),
    np.zeros((48, 64, 4), np.uint8),
    np.zeros((48, 64, 3), np.float32),
    np.zeros((0, 64, 3), np.uint8),
])
def test_jpeg_data_url_rejects_bad_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=rf"shape \({bad.shape[0]}, 64.*dtype {bad.dtype}"):
        jpeg_data_url(bad)


def test_build_messages_rejects_bad_history() -> None:
    with pytest.raises(ValueError, match="history turn 0"):
        build_messages("q", [], [{"role": "system", "content": "x"}], "prompt")
