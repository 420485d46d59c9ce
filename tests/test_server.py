"""`caddtree serve` in a subprocess on a free loopback port, driven by the real `openai` client and
by raw HTTP: lossless greedy replies, streaming, OpenAI's error shapes, auth, the bounded queue,
clients that leave mid-stream, a bounded concurrent load, and SIGTERM."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import httpx
import openai
import pytest

from caddtree.cli import main
from caddtree.models.drafter_io import random_drafter, save_drafter
from tests.tiny import tiny_model, tiny_target, tiny_tokenizer

PROMPTS = ["w3 w4 w5", "w7 w2 w9 w11", "w20 w21"]
NAME = "tiny"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-models")
    tiny_model("llama", vocab_size=32, layers=4).save_pretrained(root / "target")
    tiny_tokenizer(32).save_pretrained(root / "target")
    save_drafter(random_drafter(tiny_target("llama", vocab_size=32, layers=4), num_layers=1, block_size=8),
                 root / "drafter")
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A `caddtree serve` process; `url` ends in /v1."""

    def __init__(self, dirs: Path, cache: Path, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        command = [sys.executable, "-m", "caddtree", "serve", "--port", str(self.port), "--model-name", NAME,
                   "--target", str(dirs / "target"), "--drafter", str(dirs / "drafter"), "--device", "cpu", *extra]
        env = {**os.environ, "CADDTREE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.process.communicate()[1]}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not answer /health within 120 s")

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=10).json()

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err


def stopped_cleanly(code: int, err: str) -> bool:
    """uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: exit 0 or by SIGTERM,
    with the server's own closing line and no traceback."""
    return code in (0, -signal.SIGTERM) and "server stopped" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    running = Server(model_dirs, tmp_path_factory.mktemp("cache"), "--max-queue", "64")
    yield running
    code, err = running.stop()
    assert stopped_cleanly(code, err), (code, err)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ar_texts(model_dirs, tmp_path_factory):
    """`caddtree generate --method ar` on each prompt: (chat reply, raw completion)."""
    os.environ["CADDTREE_CACHE"] = str(tmp_path_factory.mktemp("cli-cache"))
    texts = {}
    for prompt in PROMPTS:
        for raw in (False, True):
            argv = ["generate", prompt, "--method", "ar", "--json", "--max-new-tokens", "12", "--device", "cpu",
                    "--target", str(model_dirs / "target"), "--drafter", str(model_dirs / "drafter")]
            out = subprocess.run([sys.executable, "-m", "caddtree", *argv, *(["--raw"] if raw else [])],
                                 capture_output=True, text=True, check=True).stdout
            texts[prompt, raw] = json.loads(out)["text"]
    return texts


# --- the real client: lossless, streaming and not ------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_and_completion_equal_ar(client, ar_texts, prompt):
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == ar_texts[prompt, False]
    assert chat.usage.prompt_tokens > 0  # the tiny model may end its reply before 12 tokens
    assert (chat.usage.completion_tokens == 12) == (chat.choices[0].finish_reason == "length")
    stats = chat.model_extra["caddtree"]
    assert stats["method"] == "caddtree" and stats["tau"] >= 1 and stats["rounds"] >= 1
    completion = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert completion.choices[0].text == ar_texts[prompt, True]
    assert (completion.usage.completion_tokens == 12) == (completion.choices[0].finish_reason == "length")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streams_carry_the_same_text_and_end_with_statistics(client, ar_texts, prompt):
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ar_texts[prompt, False]
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert (last.usage.completion_tokens == 12) == (last.choices[0].finish_reason == "length")
    assert last.usage.completion_tokens == chat_tokens(client, prompt)
    assert last.model_extra["caddtree"]["rounds"] >= 1
    pieces = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == ar_texts[prompt, True]


def chat_tokens(client, prompt: str) -> int:
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=12, temperature=0)
    return reply.usage.completion_tokens


def test_the_raw_stream_ends_with_done(server):
    body = {"model": NAME, "prompt": "w3 w4", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_strings_end_the_reply_before_them(client, ar_texts):
    full = ar_texts[PROMPTS[0], True]
    stop = full.split()[2]
    reply = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert reply.choices[0].text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_models_and_health(client, server):
    assert [model.id for model in client.models.list()] == [NAME]
    assert server.health()["status"] == "ok"


def test_sampling_with_a_seed_repeats(client):
    ask = lambda: client.completions.create(model=NAME, prompt="w5 w6", max_tokens=10, temperature=1.0, seed=7)  # noqa: E731
    assert ask().choices[0].text == ask().choices[0].text


# --- errors: OpenAI's shape, the right status -----------------------------------------------------


def post(server, path, payload, **headers):
    content = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    response = httpx.post(server.url + path, content=content, headers={"content-type": "application/json", **headers},
                          timeout=60)
    return response.status_code, response.json()


@pytest.mark.parametrize("payload, status, words", [
    (b"{not json", 400, "invalid request"),
    ({"model": NAME, "prompt": "w3", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "w3", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "w3", "temperature": "hot"}, 400, "temperature"),
    ({"model": NAME, "prompt": ["w3", "w4"]}, 400, "one string"),
    ({"model": NAME, "prompt": "w3", "n": 2}, 400, "n"),
    ({"prompt": "w3"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "w3"}, 404, "'gpt-4' is not served here"),
    ({"model": NAME, "prompt": " ".join(["w3"] * 400)}, 400, "the model's context holds 256"),
    ({"model": NAME, "prompt": "   "}, 400, "the prompt is empty"),
    ({"model": NAME, "prompt": "w3", "seed": 2**64}, 400, "seed"),
])
def test_bad_requests_get_openai_errors(server, payload, status, words):
    code, body = post(server, "/completions", payload)
    assert code == status and set(body) == {"error"} and words in body["error"]["message"], body
    assert body["error"]["type"] and "Traceback" not in json.dumps(body)


def test_bad_chat_messages(server):
    code, body = post(server, "/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 3}]})
    assert code == 400 and "messages.0.content" in body["error"]["message"]
    code, body = post(server, "/chat/completions", {"model": NAME, "messages": []})
    assert code == 400 and "messages" in body["error"]["message"]


# --- a client that leaves mid-stream, and a bounded concurrent load --------------------------------


def leave_mid_stream(server, max_tokens=200):
    body = {"model": NAME, "prompt": "w3 w4 w5", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=60) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index == 3:
                break  # closes the connection with the generation still going


def test_a_client_that_leaves_cancels_its_generation(server, client, ar_texts):
    before = server.health()["cancelled"]
    leave_mid_stream(server)
    deadline = time.monotonic() + 30
    while server.health()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()["cancelled"] == before + 1
    reply = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert reply.choices[0].text == ar_texts[PROMPTS[1], True]


def one_load_request(server, kind: int, ar_texts):
    """Returns (kind, status, whether its answer was right)."""
    prompt = PROMPTS[kind % len(PROMPTS)]
    if kind % 4 == 0:
        code, body = post(server, "/completions", {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0})
        return "whole", code, body["choices"][0]["text"] == ar_texts[prompt, True]
    if kind % 4 == 1:
        body = {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/completions", json=body, timeout=120) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        text = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])
        return "stream", response.status_code, events[-1] == "[DONE]" and text == ar_texts[prompt, True]
    if kind % 4 == 2:
        leave_mid_stream(server)
        return "left", 200, True
    code, body = post(server, "/completions", b'{"model": "tiny", "prompt": ')
    return "malformed", code, body["error"]["type"] == "invalid_request_error"


def test_a_bounded_concurrent_load_keeps_every_answer_right(server, ar_texts):
    sizes = []
    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            outcomes = list(pool.map(lambda kind: one_load_request(server, kind, ar_texts), range(32)))
        assert all(right for _, _, right in outcomes), outcomes
        assert all(code == (400 if kind == "malformed" else 200) for kind, code, _ in outcomes), outcomes
        health = server.health()
        assert health["status"] == "ok"
        sizes.append(server.rss_kib())
    assert sizes[-1] < sizes[0] * 1.10 + 8192, f"server memory grew across rounds: {sizes} KiB"


# --- separate servers: auth, a full queue, SIGTERM -------------------------------------------------


def test_auth(model_dirs, tmp_path):
    server = Server(model_dirs, tmp_path, "--api-key", "s3cret", "--method", "ar")
    try:
        payload = {"model": NAME, "prompt": "w3", "max_tokens": 2}
        code, body = post(server, "/completions", payload)
        assert code == 401 and "no API key" in body["error"]["message"] and body["error"]["code"] == "invalid_api_key"
        code, body = post(server, "/completions", payload, authorization="Bearer wrong")
        assert code == 401 and "wrong API key" in body["error"]["message"]
        assert post(server, "/completions", payload, authorization="Bearer s3cret")[0] == 200
        good = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert [model.id for model in good.models.list()] == [NAME]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="nope", max_retries=0).models.list()
        assert server.health()["status"] == "ok"  # health needs no key
    finally:
        assert stopped_cleanly(*server.stop())


def test_a_full_queue_answers_503_at_once(model_dirs, tmp_path):
    server = Server(model_dirs, tmp_path, "--max-queue", "1", "--method", "ar")
    try:
        payload = {"model": NAME, "prompt": "w3 w4", "max_tokens": 200, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda _: post(server, "/completions", payload), range(8)))
        codes = sorted(code for code, _ in results)
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) == {200, 503}, codes
        busy = next(body for code, body in results if code == 503)
        assert busy["error"]["code"] == "queue_full"
        assert post(server, "/completions", payload)[0] == 200  # and serving goes on
    finally:
        assert stopped_cleanly(*server.stop())


def test_sigterm_finishes_the_reply_in_flight_and_exits_cleanly(model_dirs, tmp_path):
    server = Server(model_dirs, tmp_path, "--method", "ar")
    body = {"model": NAME, "prompt": "w3 w4", "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    code, err = server.stop()
    assert stopped_cleanly(code, err), (code, err)


def test_serve_argument_errors(capsys):
    from caddtree.cli import _check_bindable

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert "cannot serve on 127.0.0.1" in capsys.readouterr().err
    _check_bindable("::1", 0)  # an IPv6 host is checked as an IPv6 address, as uvicorn binds it
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err


# --- in process: clients that leave a whole reply, or the queue ------------------------------------


class EndlessPair:
    """A pair whose generation sends text until its job is cancelled, so a client can leave mid-way."""

    def __init__(self):
        self.target = tiny_target("llama", vocab_size=32, layers=1)

    def generate(self, prompt, raw, on_text, **options):
        while not on_text("w3 "):
            time.sleep(0.05)
        return SimpleNamespace(finish_reason="length")


def test_clients_that_leave_a_whole_reply_or_the_queue_are_counted_and_log_no_traceback(caplog):
    import threading

    import uvicorn

    from caddtree.server.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(EndlessPair(), NAME, {}), port=port, log_config=None))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"

        def leave_after_a_second():
            body = {"model": NAME, "prompt": "w3 w4", "max_tokens": 100}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(base + "/v1/completions", json=body, timeout=1.0)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # one generating, one waiting behind it
            list(pool.map(lambda _: leave_after_a_second(), range(2)))
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health").json()["cancelled"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(base + "/health").json() | {"status": "ok"} == {
            "status": "ok", "model": NAME, "waiting": 0, "running": False, "completed": 0, "cancelled": 2,
            "rejected": 0, "failed": 0}
    finally:
        server.should_exit = True
        thread.join(30)
    assert not [record for record in caplog.records if record.levelname == "ERROR" or record.exc_info]
