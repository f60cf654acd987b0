"""dream-serve, tested with the official ``openai`` client against a server started here on 127.0.0.1."""

import base64
import io
import socket
import threading
import time

import json
import urllib.error
import urllib.request
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from runtime.pipeline import Pipeline
from runtime.serve import Server, build_parser, main

MODEL = "tiny-test"


def start_server(srv: Server):
    """uvicorn in a thread on a free 127.0.0.1 port; returns (url, stop)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    userver = uvicorn.Server(uvicorn.Config(srv.app(), log_level="warning"))
    thread = threading.Thread(target=userver.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if userver.started:
            break
        time.sleep(0.05)
    assert userver.started

    def stop():
        userver.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(zoo):
    _, bundle = zoo.with_drafter("gqa_nosplit", "random")
    srv = Server(Pipeline.from_bundle(bundle), MODEL, max_queue=2)
    url, stop = start_server(srv)
    yield srv, url, client_for(url)
    stop()


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, dict]:
    """A raw request (the standard library: what the openai client cannot send, e.g. broken JSON)."""
    req = urllib.request.Request(url, data=body, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def data_url(path, fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.open(path).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_plain_image_and_streaming_answers_equal_the_pipeline(served, images):
    srv, url, client = served
    pipe = srv.pipe
    text_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the image."}]
    want = pipe.chat(text_msgs, max_new_tokens=16)
    r = client.chat.completions.create(model=MODEL, messages=text_msgs, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == want.num_new_tokens
    assert r.choices[0].finish_reason == ("length" if want.stop_reason == "max_new_tokens" else "stop")
    # an image as a base64 data URL; speculative decoding through an extra field
    img_msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images["astronaut"])}},
                                             {"type": "text", "text": "What color is the circle?"}]}]
    want = pipe.generate(str(images["astronaut"]), "What color is the circle?", max_new_tokens=20, speculative=False)
    r = client.chat.completions.create(model=MODEL, messages=img_msgs, temperature=0, max_tokens=20,
                                       extra_body={"speculative": True})
    assert r.choices[0].message.content == want.text
    extras = r.model_extra["dream"]
    assert extras["speculative"] is True and extras["mean_accept_length"] >= 1 and extras["stop_reason"] == want.stop_reason
    # streamed: the deltas join to the same text; usage on request
    stream = client.chat.completions.create(model=MODEL, messages=img_msgs, temperature=0, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == want.num_new_tokens
    # seed, top_p, stop
    a = client.chat.completions.create(model=MODEL, messages=text_msgs, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    b = client.chat.completions.create(model=MODEL, messages=text_msgs, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content == pipe.chat(text_msgs, temperature=1.0, top_p=0.9, seed=7, max_new_tokens=12).text
    full = want.text
    if len(full) >= 6:
        stop = full[3:6]
        r = client.chat.completions.create(model=MODEL, messages=img_msgs, temperature=0, max_tokens=20, stop=[stop])
        assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_models_and_health(served):
    srv, url, client = served
    assert [m.id for m in client.models.list()] == [MODEL]
    status, health = http("GET", f"{url}/health")
    assert status == 200 and health["status"] == "ok" and health["max_queue"] == 2


def test_bad_requests_get_openai_errors(served, images):
    srv, url, client = served
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=msgs)
    broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-b64"}},
                                           {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(openai.BadRequestError, match="broken base64"):
        client.chat.completions.create(model=MODEL, messages=broken)
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(images["coffee"])}},
                                          {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(openai.BadRequestError, match="allow-local-files"):
        client.chat.completions.create(model=MODEL, messages=local)
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="remote image URLs"):
        client.chat.completions.create(model=MODEL, messages=remote)
    huge = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images["huge"])}},
                                         {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(openai.APIStatusError, match="pixels") as info:
        client.chat.completions.create(model=MODEL, messages=huge)
    assert info.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="context") as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert info.value.code == "context_length_exceeded"
    for bad in [dict(temperature=-1), dict(top_p=2), dict(n=2), dict(max_tokens=0), dict(stop=[""])]:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=msgs, **bad)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    status, err = http("POST", f"{url}/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in err["error"]["message"]
    old = srv.max_body_bytes
    srv.max_body_bytes = 2000
    try:
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
        status, err = http("POST", f"{url}/v1/chat/completions", big)
        assert status == 413 and err["error"]["code"] == "request_too_large"
    finally:
        srv.max_body_bytes = old
    status, err = http("GET", f"{url}/nowhere")
    assert status == 404 and err["error"]["type"] == "not_found_error"
    # the server is still fine
    assert client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=4).choices


def test_queue_bound_gives_429(served):
    """max_queue=2: with the pipeline held, two requests wait and the third is refused at once."""
    srv, url, client = served
    msgs = [{"role": "user", "content": "Describe the image."}]
    results = []
    srv.pipe.lock.acquire()
    try:
        threads = []
        for i in range(2):
            t = threading.Thread(target=lambda: results.append(
                client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=4)))
            t.start()
            threads.append(t)
            for _ in range(200):
                if srv.in_flight == i + 1:
                    break
                time.sleep(0.02)
        assert srv.in_flight == 2
        with pytest.raises(openai.RateLimitError, match="busy"):
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
    finally:
        srv.pipe.lock.release()
    for t in threads:
        t.join(60)
    assert len(results) == 2 and results[0].choices[0].message.content == results[1].choices[0].message.content


def test_client_disconnect_stops_generation(served):
    srv, url, client = served
    msgs = [{"role": "user", "content": "Describe the image in detail."}]
    budget = srv.pipe.max_positions - 64
    long = srv.pipe.chat(msgs, max_new_tokens=budget, temperature=1.0, seed=3)  # a sampled answer that runs long
    assert long.num_new_tokens > 200
    before = srv.counts["cancelled"]
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=budget, temperature=1.0, seed=3,
                                            stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    for _ in range(300):
        if srv.counts["cancelled"] > before:
            break
        time.sleep(0.02)
    assert srv.counts["cancelled"] == before + 1
    assert srv.last["stop_reason"] == "cancelled" and srv.last["completion_tokens"] < long.num_new_tokens


def test_cli_defaults_and_errors(tmp_path, capsys):
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.allow_local_files
    assert main(["--bundle", str(tmp_path / "missing")]) == 2
    assert "bundle folder does not exist" in capsys.readouterr().err


def test_parse_messages_pure(images):
    from runtime.openai_api import ApiError, parse_messages

    msgs = parse_messages([{"role": "developer", "content": "x"},
                           {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(images["coffee"])}},
                                                        {"type": "text", "text": "hi"}]}], allow_local_files=True)
    assert msgs[0]["role"] == "system" and np.array(msgs[1]["content"][0]["image"]).shape[2] == 3
    with pytest.raises(ApiError, match="last message"):
        parse_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], False)


def test_smolvlm_tiny_served(tiny, images):
    """The built-in model behind the server: an image question answered as the pipeline answers it."""
    _, bundle = tiny
    srv = Server(Pipeline.from_bundle(bundle), "smolvlm-tiny")
    url, stop = start_server(srv)
    try:
        client = client_for(url)
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images["coffee"], "JPEG")}},
                                             {"type": "text", "text": "What color is the circle?"}]}]
        r = client.chat.completions.create(model="smolvlm-tiny", messages=msgs, temperature=0, max_tokens=24)
        import base64 as b64

        raw = b64.b64decode(data_url(images["coffee"], "JPEG").split(",", 1)[1])
        want = srv.pipe.generate(Image.open(io.BytesIO(raw)), "What color is the circle?", max_new_tokens=24)
        assert r.choices[0].message.content == want.text and want.text.strip()
        assert r.choices[0].finish_reason == "stop" and want.stop_reason == "stop_token"
    finally:
        stop()


def test_resent_conversation_reuses_the_previous_request(served, images):
    """OpenAI-style clients resend the whole conversation each turn: the server keeps the last request's K/V, so
    the second turn reports cached prompt tokens and still answers as a fresh call does; other images: none."""
    srv, url, client = served
    img = {"type": "image_url", "image_url": {"url": data_url(images["chelsea"])}}
    turn1 = [{"role": "user", "content": [img, {"type": "text", "text": "Describe the image."}]}]
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, temperature=0, max_tokens=12)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "How many shapes are there?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, temperature=0, max_tokens=12,
                                        extra_body={"speculative": True})
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 1  # all of turn 1's prompt
    want = srv.pipe.chat([{"role": "user", "content": [{"type": "image", "image": str(images["chelsea"])},
                                                        {"type": "text", "text": "Describe the image."}]}] + turn2[1:],
                         max_new_tokens=12)
    assert r2.choices[0].message.content == want.text and want.cached_tokens == 0
    other = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images["rocket"])}},
                                          {"type": "text", "text": "Describe the image."}]}]
    r3 = client.chat.completions.create(model=MODEL, messages=other, temperature=0, max_tokens=4)
    assert r3.usage.prompt_tokens_details.cached_tokens == 0  # other pixels: nothing reused
