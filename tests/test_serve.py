"""`afm serve` on loopback with the tiny model: the official openai client for chat, streams,
adapters as models and errors; raw httpx for malformed bodies, limits and disconnects; the
manifest against the files' own hashes; private mode end to end in a real `afm serve` process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openafm.adapters import save_adapter
from openafm.adapters.registry import user_adapters_dir
from openafm.cli.common import load_named
from openafm.runtime import AdapterCache, Engine, SamplingParams, load_pretrained
from openafm.serve import ServeConfig, create_app
from openafm.serve.worker import ModelWorker
from tests.conftest import make_tiny
from tests.test_adapters import random_adapter

ANSWER_TOKENS = 12


class LiveServer:
    """A real uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, config: ServeConfig, worker: ModelWorker | None = None) -> None:
        self.app = create_app(config, worker, loader=load_named)
        self.worker: ModelWorker = self.app.state.worker
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while (health := httpx.get(f"{self.url}/health")).status_code != 200:
            assert health.json()["status"] == "loading", health.text
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir) -> Iterator[tuple[LiveServer, Path]]:
    """The tiny model with two adapters of its own and one trained on another base."""
    root = tmp_path_factory.mktemp("served-adapters")
    model = make_tiny()
    save_adapter(random_adapter(model, "alpha", 1), root / "served" / "alpha")
    save_adapter(random_adapter(model, "beta", 2, rank=4), root / "extra" / "beta")
    stranger = random_adapter(model, "gamma", 3)
    stranger.metadata["base_signature"] = "0" * 64
    save_adapter(stranger, root / "extra" / "gamma")
    config = ServeConfig(
        model=str(tiny_dir),
        adapters=(root / "served",),
        private=False,
        max_body_bytes=4096,
        max_tokens_default=ANSWER_TOKENS,
    )
    with LiveServer(config) as server:
        server.wait_ready()
        yield server, root


@pytest.fixture(scope="module")
def reference(tiny_dir, served) -> Engine:
    """An engine built as the server builds its own, to compare answers with."""
    _, root = served
    pretrained = load_pretrained(tiny_dir)
    cache = AdapterCache(
        pretrained.model, pretrained.signature, resolve=lambda name: root / "served" / name
    )
    return Engine(
        pretrained.model, pretrained.tokenizer, prefill_dtype=torch.bfloat16, adapters=cache
    )


def _alone(engine: Engine, text: str, adapter: str | None = None, n: int = ANSWER_TOKENS):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": text}])
    return engine.generate([ids], SamplingParams(max_tokens=n), adapters=adapter)[0], len(ids)


def test_models_list_the_base_and_its_adapters_with_their_parent(served, tiny_dir):
    server, _ = served
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {tiny_dir.name, "alpha"}
    assert models["alpha"].model_extra["parent"] == tiny_dir.name
    assert models[tiny_dir.name].model_extra["parent"] is None


def test_chat_answers_as_the_engine_does_alone_with_usage(served, reference, tiny_dir):
    server, _ = served
    client = server.client()
    for model, adapter in ((tiny_dir.name, None), ("alpha", "alpha")):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi there"}], temperature=0
        )
        alone, prompt_tokens = _alone(reference, "hi there", adapter)
        assert reply.choices[0].message.content == alone.text
        assert reply.choices[0].finish_reason == alone.finish_reason
        assert reply.usage.prompt_tokens == prompt_tokens
        assert reply.usage.completion_tokens == alone.completion_tokens
    plain = client.completions.create(
        model=tiny_dir.name, prompt="abc", max_tokens=5, temperature=0
    )
    ids = reference.tokenizer.encode("abc")
    expected = reference.generate([ids], SamplingParams(max_tokens=5))[0]
    assert plain.choices[0].text == expected.text and plain.usage.prompt_tokens == len(ids)


def test_streams_carry_the_same_text_then_usage_then_done(served, tiny_dir):
    server, _ = served
    client = server.client()
    messages = [{"role": "user", "content": "stream me"}]
    whole = client.chat.completions.create(model="alpha", messages=messages, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="alpha",
            messages=messages,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == whole.choices[0].finish_reason
    body = {"model": tiny_dir.name, "prompt": "x", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_n_choices_and_seeded_sampling_are_reproducible(served, tiny_dir):
    server, _ = served
    client = server.client()
    ask = {
        "model": tiny_dir.name,
        "messages": [{"role": "user", "content": "pick"}],
        "temperature": 1.0,
        "seed": 7,
        "n": 3,
    }
    first = client.chat.completions.create(**ask)
    again = client.chat.completions.create(**ask)
    assert len(first.choices) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice has its own seed
    fixed = client.completions.create(
        model=tiny_dir.name, prompt="a", max_tokens=20, extra_body={"ignore_eos": True}
    )
    assert fixed.usage.completion_tokens == 20 and fixed.choices[0].finish_reason == "length"


def test_json_schema_answers_parse_and_follow_the_schema(served, tiny_dir):
    server, _ = served
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "check", "schema": schema}}
    reply = server.client().chat.completions.create(
        model=tiny_dir.name,
        messages=[{"role": "user", "content": "json please"}],
        response_format=fmt,
        max_tokens=60,
        temperature=1.0,
        seed=3,
        n=3,
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        answer = json.loads(choice.message.content)
        assert (
            set(answer) == {"ok", "n"}
            and isinstance(answer["ok"], bool)
            and answer["n"] in (1, 2, 3)
        )
    bad = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={
            "model": tiny_dir.name,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}},
        },
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_errors_have_openais_shape_and_never_echo_the_request(served, tiny_dir):
    server, _ = served
    client = server.client()
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(
            model="CANARY-MODEL", messages=[{"role": "user", "content": "x"}]
        )
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.completions.create(model=tiny_dir.name, prompt="y" * 400)
    assert long_prompt.value.body["code"] == "context_length_exceeded"
    url = f"{server.url}/v1/chat/completions"
    bad = httpx.post(url, json={"model": tiny_dir.name, "messages": [], "temperature": "CANARY"})
    assert bad.status_code == 400 and "CANARY" not in bad.text
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    junk = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert junk.status_code == 400 and junk.json()["error"]["param"] == "body"
    huge = httpx.post(
        url, json={"model": "m", "messages": [{"role": "user", "content": "z" * 5000}]}
    )
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404


def test_adapters_load_and_unload_at_run_time_and_a_strangers_is_refused(served):
    server, root = served
    client = server.client()
    url = f"{server.url}/v1/adapters"
    loaded = httpx.post(url, json={"name": "beta", "path": str(root / "extra" / "beta")})
    assert loaded.status_code == 200 and loaded.json()["parent"] == server.worker.name
    assert "beta" in {m.id for m in client.models.list().data}
    reply = client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "b"}]
    )
    assert reply.choices[0].message.content is not None
    refused = httpx.post(url, json={"name": "gamma", "path": str(root / "extra" / "gamma")})
    assert refused.status_code == 400 and "trained on base" in refused.json()["error"]["message"]
    assert httpx.delete(f"{url}/beta").json()["deleted"] is True
    assert httpx.delete(f"{url}/beta").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "b"}])


def test_a_client_that_leaves_mid_stream_frees_its_row_and_rows_are_zeroed(served, tiny_dir):
    server, _ = served
    body = {"model": tiny_dir.name, "prompt": "go", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        next(response.iter_lines())
    batcher = server.worker.batcher
    deadline = time.monotonic() + 10
    while batcher.active or batcher.waiting:
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.02)
    assert not any(t.any() for t in batcher.cache._storage)


def test_manifest_names_the_served_files_by_their_sha256(served, tiny_dir):
    server, root = served
    manifest = httpx.get(f"{server.url}/v1/manifest").json()
    files = manifest["model"]["files_sha256"]
    for path in tiny_dir.iterdir():
        assert files[path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
    weights = root / "served" / "alpha" / "adapter.safetensors"
    assert (
        manifest["adapters"]["alpha"]["adapter.safetensors"]
        == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    assert len(manifest["code_sha256"]) == 64 and manifest["openafm_version"]


def test_metrics_count_requests_and_tokens(served):
    server, _ = served
    text = httpx.get(f"{server.url}/metrics").text
    assert 'openafm_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "openafm_generation_tokens_total" in text and "openafm_time_to_first_token" in text


FIELDS = ["model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream"]
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=st.dictionaries(st.sampled_from(FIELDS), JUNK, max_size=6), raw=st.binary(max_size=64))
def test_fuzzed_bodies_never_crash_the_server_or_leak_a_trace(served, body, raw):
    server, _ = served
    body.setdefault("max_tokens", 2)
    url = f"{server.url}/v1/chat/completions"
    for response in (
        httpx.post(url, json=body, timeout=60),
        httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=60),
    ):
        assert response.status_code in (200, 400, 404, 413, 422), response.text
        assert "Traceback" not in response.text and 'File "' not in response.text
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/health").status_code == 200


class SlowWorker(ModelWorker):
    """Loads only when told to, so /health can be seen while loading."""

    go = threading.Event()

    def load(self) -> None:
        self.go.wait(timeout=60)
        super().load()


def test_health_is_503_while_loading_and_the_queue_limit_gives_429(tiny_dir):
    from openafm.serve.metrics import Metrics

    config = ServeConfig(model=str(tiny_dir), private=False, max_batch=1, max_queue=1, api_key="k")
    worker = SlowWorker(config, Metrics())
    with LiveServer(config, worker) as server:
        assert httpx.get(f"{server.url}/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as loading:
            server.client("k").models.list()
        assert loading.value.status_code == 503
        SlowWorker.go.set()
        server.wait_ready()
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        worker._stop.set()  # the batcher stops stepping: requests wait in the queue
        worker._thread.join()
        body = {"model": tiny_dir.name, "prompt": "q", "stream": True}
        headers = {"authorization": "Bearer k"}
        with contextlib.ExitStack() as streams:
            for _ in range(2):  # one row, one queue place
                response = streams.enter_context(
                    httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers)
                )
                assert response.status_code == 200
            full = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            worker.batcher.cancel_all()
            worker.batcher.step()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_0_serves_on_a_free_port_and_says_which(tmp_path, tiny_dir):
    command = [sys.executable, "-m", "openafm", "serve", "--model", str(tiny_dir), "--port", "0"]
    server = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    port = 0
    try:
        for line in server.stderr:  # the log ends at the ready event, or the process's end
            if '"event": "ready"' in line:
                port = json.loads(line.split("afm: ", 1)[1])["port"]
                break
        assert port > 0, "no ready event"
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    assert server.returncode == 0


SLOW_LOAD = """
import sys, time, torch
import openafm.cli.common as common
from openafm.cli.main import app
load = common.load_named
def slow(model):  # native work for a while, as a large model's load is
    a, end = torch.randn(256, 256), time.monotonic() + 3
    while time.monotonic() < end:
        a = (a @ a).tanh()
    return load(model)
common.load_named = slow
app(args=sys.argv[1:], prog_name="afm")
"""


def test_sigterm_while_the_model_loads_stops_with_status_0(tmp_path, tiny_dir):
    command = [sys.executable, "-c", SLOW_LOAD, "serve", "--model", str(tiny_dir), "--port", "0"]
    server = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if "Application startup complete" in line:  # serving /health (503) while it loads
            break
    server.send_signal(signal.SIGTERM)
    _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err[-2000:]  # not aborted by exiting under the loader
    assert '"event": "ready"' not in err  # stopped before it served


@pytest.mark.slow
def test_private_mode_keeps_no_trace_of_a_request_anywhere(tmp_path, tiny_dir):
    """A real `afm -v serve` process at DEBUG: a canary sent in prompts, bad fields, model
    and adapter names appears in no output, log, metric or file; nothing is written while it
    serves; SIGTERM stops it with status 0."""
    canary = "CANARY-7f3a9c"
    home = tmp_path / "home"
    home.mkdir()
    port = _free_port()
    env = {**os.environ, "OPENAFM_HOME": str(home), "HOME": str(home)}
    command = [sys.executable, "-m", "openafm", "-v", "serve", "--model", str(tiny_dir)]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "no server"
            time.sleep(0.1)
        before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
        model = tiny_dir.name
        ask = [{"role": "user", "content": f"remember {canary} please"}]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        client.chat.completions.create(model=model, messages=ask, max_tokens=8)
        list(client.chat.completions.create(model=model, messages=ask, max_tokens=8, stream=True))
        client.completions.create(model=model, prompt=canary, max_tokens=4)
        chat = f"{url}/v1/chat/completions"
        replies = [
            httpx.post(chat, json={"model": canary, "messages": ask}),
            httpx.post(chat, json={"model": model, "messages": ask, "temperature": canary}),
            httpx.post(chat, json={"model": model, "messages": [{"role": canary, "content": "x"}]}),
            httpx.post(chat, content=canary.encode()),
            httpx.post(f"{url}/v1/adapters", json={"name": "x", "path": f"/nowhere/{canary}"}),
            httpx.post(
                chat, json={"model": model, "messages": [{"role": "user", "content": canary * 99}]}
            ),
        ]
        metrics = httpx.get(f"{url}/metrics").text
        after = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err[-2000:]
    assert all(r.status_code >= 400 for r in replies)
    for text in (out, err, metrics, *(r.text for r in replies)):
        assert canary not in text
    assert "openafm_blocked_file_writes_total 0.0" in metrics
    assert before == after  # nothing written or touched under its folders while serving
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert canary.encode() not in path.read_bytes(), path
    assert '"event": "request"' in err and '"event": "ready"' in err


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "smollm2-135m-palettized"])
def test_the_real_models_serve_their_shipped_adapters_and_json(model):
    email = (
        "Hi team, the quarterly review moves from Tuesday to Thursday at 3pm in room 4B."
        " Please bring your updated numbers. Thanks, Dana"
    )
    with LiveServer(ServeConfig(model=model, private=False)) as server:
        server.wait_ready()
        client = server.client()
        served = {m.id for m in client.models.list().data}
        features = {"summarize-email", "summarize-dialogue"}
        # the assistant was trained on the float base; the palettized model has its own feature adapters
        assistant = {"assistant"} if model == "smollm2-135m-instruct" else set()
        shipped = {model, *features, *assistant}
        # a developer's own adapters for this base are served too; nothing else is
        own = (
            {p.name for p in user_adapters_dir().iterdir()}
            if user_adapters_dir().is_dir()
            else set()
        )
        assert shipped <= served and served - shipped <= own
        for name in sorted(shipped):
            reply = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": email}],
                max_tokens=24,
                temperature=0,
            )
            assert reply.choices[0].message.content.strip(), name
        schema = {
            "type": "object",
            "properties": {
                "animal": {"type": "string", "maxLength": 16},
                "legs": {"type": "integer", "minimum": 0, "maximum": 8},
            },
            "required": ["animal", "legs"],
            "additionalProperties": False,
        }
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Describe a cat as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
            max_tokens=48,
            temperature=0,
        )
        parsed = json.loads(answer.choices[0].message.content)
        assert set(parsed) == {"animal", "legs"} and 0 <= parsed["legs"] <= 8
