"""`edge-chat serve` (sllm.edge.gateway): the official `openai` client against the real gateway, a real cloud
server on 127.0.0.1 and the shipped model (models/default). Answers equal what `edge-chat` prints with the same
settings; a follow-up appends only its new sentences (the cloud's own counters); branches from one prefix both
answer right; unsupported parameters, a bad key, an oversized request and a lost cloud get OpenAI-shaped errors;
a client that goes away stops the cloud work."""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from cloud_helpers import running_server
from gateway_helpers import running_gateway
from helpers import ROOT
from typer.testing import CliRunner

from sllm import edge
from sllm.edge.cli import app
from sllm.protos.client import CloudClient

MODEL = ROOT / "models" / "default"
FIRST, SECOND, THIRD = ("It is a truth universally acknowledged,", "She laughed. Then she was gone.",
                        "The rain fell on the old town.")


@pytest.fixture(scope="module")
def gateway(server, runtime):
    with running_gateway(f"127.0.0.1:{server.port}", runtime, api_key=None, max_tokens=512,
                         max_request_bytes=64 * 1024) as (url, pool):
        yield url, pool


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _edge_chat(server, *args, stdin: str | None = None) -> list[list[dict]]:
    """`edge-chat --json` against `server`: the sentence lines of each turn."""
    r = CliRunner().invoke(app, ["--server", f"127.0.0.1:{server.port}", "--bundle", str(MODEL / "edge"),
                                 "--threads", "1", "--json", *map(str, args)], input=stdin)
    assert r.exit_code == 0, r.output
    turns = [[]]
    for line in r.stdout.splitlines():
        ev = json.loads(line)
        if ev["event"] == "sentence":
            turns[-1].append(ev)
        elif ev["event"] == "turn_end":
            turns[-1].append(ev)
            turns.append([])
    return turns[:-1]


def _text(turn: list[dict]) -> str:
    return "".join(e["text"] for e in turn if e["event"] == "sentence")


def _stats(server):
    with CloudClient(f"127.0.0.1:{server.port}") as c:
        return c.stats()


def test_chat_completion_equals_edge_chat_streamed_or_not(client, server, runtime):
    [turn] = _edge_chat(server, "--prompt", FIRST)
    expected, end = _text(turn), turn[-1]
    got = client.chat.completions.create(model=runtime.model_id, messages=[{"role": "user", "content": FIRST}])
    assert got.choices[0].message.content == expected
    assert got.choices[0].finish_reason == ("stop" if end["reason"] in ("stop", "empty", "repeat") else "length")
    tokens = sum(e["tokens"] for e in turn if e["event"] == "sentence")
    assert got.usage.completion_tokens == tokens
    assert got.usage.prompt_tokens == sum(len(s) for s in runtime.prompt_sentences(FIRST))

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(model=runtime.model_id, messages=[{"role": "user", "content": FIRST}],
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected
    assert pieces == [e["text"] for e in turn if e["event"] == "sentence"]  # one chunk per sentence
    assert finish == got.choices[0].finish_reason and usage.completion_tokens == tokens


def test_sampled_completion_equals_edge_chat(client, server, runtime):
    [turn] = _edge_chat(server, "--prompt", FIRST, "--temperature", 0.9, "--top-p", 0.95, "--seed", 7)
    got = client.chat.completions.create(model=runtime.model_id, messages=[{"role": "user", "content": FIRST}],
                                         temperature=0.9, top_p=0.95, seed=7)
    assert got.choices[0].message.content == _text(turn)


def test_completions_endpoint(client, server, runtime):
    [turn] = _edge_chat(server, "--prompt", SECOND, "--max-sentences", 3)
    got = client.completions.create(model=runtime.model_id, prompt=SECOND, extra_body={"max_sentences": 3})
    assert got.choices[0].text == _text(turn)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=runtime.model_id, prompt=SECOND, extra_body={"max_sentences": 3}, stream=True))
    assert streamed == _text(turn)


def test_a_follow_up_appends_only_its_new_sentences(client, server, runtime, gateway):
    pool = gateway[1]
    first, second = _edge_chat(server, stdin=f"{THIRD}\n{SECOND}\n")
    a1 = client.chat.completions.create(model=runtime.model_id, messages=[{"role": "user", "content": THIRD}])
    assert a1.choices[0].message.content == _text(first)
    before, extended = _stats(server), pool.extended
    a2 = client.chat.completions.create(model=runtime.model_id, messages=[
        {"role": "user", "content": THIRD}, {"role": "assistant", "content": a1.choices[0].message.content},
        {"role": "user", "content": SECOND}])
    after = _stats(server)
    assert a2.choices[0].message.content == _text(second)  # as edge-chat's second turn
    assert pool.extended == extended + 1
    assert after.sessions_opened_total == before.sessions_opened_total  # the same cloud session
    new = len(runtime.prompt_sentences(SECOND))
    answered = sum(1 for e in second if e["event"] == "sentence")
    # the cloud ran the new prompt's sentences and the answer's, nothing of the first turn again
    assert after.sentences_total - before.sentences_total == new + answered
    assert a2.usage.prompt_tokens == (a1.usage.prompt_tokens + a1.usage.completion_tokens
                                      + sum(len(s) for s in runtime.prompt_sentences(SECOND)))


def test_two_branches_from_one_prefix(client, server, runtime, gateway):
    prompt = "A letter came in the morning."
    _, to_second = _edge_chat(server, stdin=f"{prompt}\n{SECOND}\n")
    _, to_third = _edge_chat(server, stdin=f"{prompt}\n{THIRD}\n")
    a1 = client.chat.completions.create(model=runtime.model_id, messages=[{"role": "user", "content": prompt}])
    history = [{"role": "user", "content": prompt}, {"role": "assistant", "content": a1.choices[0].message.content}]
    forked = gateway[1].forked
    answers = {}

    def ask(text):
        answers[text] = client.chat.completions.create(model=runtime.model_id, messages=[
            *history, {"role": "user", "content": text}]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(t,)) for t in (SECOND, THIRD)]  # at once: one must branch
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == {SECOND: _text(to_second), THIRD: _text(to_third)}
    assert gateway[1].forked == forked + 1
    # and again, one after the other: the held conversation has moved on, the branch opens from its prefix
    ask(SECOND)
    assert answers[SECOND] == _text(to_second)


def test_max_tokens_and_stop_strings(client, server, runtime):
    [turn] = _edge_chat(server, "--prompt", FIRST, "--max-sentences", 4, "--stop-threshold", 1)
    full = _text(turn)
    got = client.chat.completions.create(model=runtime.model_id, messages=[{"role": "user", "content": FIRST}],
                                         max_tokens=5, extra_body={"max_sentences": 4, "stop_threshold": 1.0})
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 5
    assert full.startswith(got.choices[0].message.content) and got.choices[0].message.content
    word = turn[1]["text"].split()[1]  # a word of the second sentence
    cut = full.index(word)
    for stream in (False, True):
        kwargs = dict(model=runtime.model_id, messages=[{"role": "user", "content": FIRST}], stop=[word],
                      extra_body={"max_sentences": 4, "stop_threshold": 1.0})
        if stream:
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            r = client.chat.completions.create(**kwargs)
            text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert text == full[:cut] and finish == ["stop"]


@pytest.mark.parametrize("extra", [{"n": 2}, {"logprobs": True}, {"best_guess": 1}, {"logit_bias": {"1": 5}},
                                   {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                                   {"temperature": -1}, {"max_tokens": 100000}])
def test_unsupported_parameters_are_openai_shaped_400s(client, runtime, extra):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=runtime.model_id, messages=[{"role": "user", "content": FIRST}],
                                       extra_body=extra)
    body = info.value.body
    assert info.value.status_code == 400 and body["message"] and body["type"] == "invalid_request_error"
    assert body["param"] in (*extra, None)


@pytest.mark.parametrize("messages", [[{"role": "user", "content": "   "}], [{"role": "tool", "content": "x"}],
                                      [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], []])
def test_bad_messages_are_400s(client, runtime, messages):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=runtime.model_id, messages=messages)
    assert info.value.body["message"]


def test_roles_are_plain_text_in_order(client, server, runtime):
    """A system message and a user message are their sentences one after the other (each segmented on its own):
    the API's answer to the two texts as one prompt."""
    system, user = "You are a storyteller.", "She laughed."
    with edge.connect(f"127.0.0.1:{server.port}", runtime) as chat:
        expected = chat.ask([system, user], max_sentences=3).text()
        assert chat.context_sentences > len(runtime.prompt_sentences(system) + runtime.prompt_sentences(user))
    got = client.chat.completions.create(model=runtime.model_id, extra_body={"max_sentences": 3}, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": user}])
    assert got.choices[0].message.content == expected
    assert got.usage.prompt_tokens == sum(len(s) for t in (system, user) for s in runtime.prompt_sentences(t))


def test_models_and_unknown_model(client, runtime):
    assert [m.id for m in client.models.list()] == [runtime.model_id]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": FIRST}])


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_unknown_routes_and_methods_answer_in_openai_error_shape(gateway):
    status, err = _post(gateway[0] + "/v1/embeddings", b"{}")
    assert status == 404 and err["error"]["code"] == "not_found" and "/v1/chat/completions" in err["error"]["message"]
    status, err = _post(gateway[0] + "/v1/models", b"{}")  # a POST where only GET is served
    assert status == 405 and err["error"]["code"] == "method_not_allowed"


def test_api_key_and_request_size(server, runtime):
    with running_gateway(f"127.0.0.1:{server.port}", runtime, api_key="k3y", max_request_bytes=2048) as (url, _):
        body = json.dumps({"messages": [{"role": "user", "content": FIRST}], "max_sentences": 1}).encode()
        status, err = _post(url + "/v1/chat/completions", body)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        status, _ = _post(url + "/v1/chat/completions", body, {"Authorization": "Bearer wrong"})
        assert status == 401
        status, ok = _post(url + "/v1/chat/completions", body, {"Authorization": "Bearer k3y"})
        assert status == 200 and ok["choices"][0]["message"]["content"]
        big = json.dumps({"messages": [{"role": "user", "content": "x. " * 2000}]}).encode()
        status, err = _post(url + "/v1/chat/completions", big, {"Authorization": "Bearer k3y"})
        assert status == 413 and err["error"]["code"] == "request_too_large"
        status, err = _post(url + "/v1/chat/completions", b"{not json", {"Authorization": "Bearer k3y"})
        assert status == 400 and "not JSON" in err["error"]["message"]


def test_a_cloud_that_is_gone_is_a_502_not_a_hang(runtime):
    with running_server(MODEL / "cloud", threads=1) as srv:
        address = f"127.0.0.1:{srv.port}"
    with running_gateway(address, runtime) as (url, _):
        t0 = time.monotonic()
        status, err = _post(url + "/v1/chat/completions",
                            json.dumps({"messages": [{"role": "user", "content": FIRST}]}).encode())
        assert status == 502 and err["error"]["type"] == "cloud_unreachable"
        assert "cannot reach the cloud server" in err["error"]["message"]
        assert time.monotonic() - t0 < 30


def test_a_client_that_goes_away_stops_the_cloud_work(server, runtime, gateway):
    url = gateway[0]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"messages": [{"role": "user", "content": "Once more the bells rang."}], "stream": True,
            "max_sentences": 60, "stop_threshold": 1.0, "no_repeat_sentence": False}
    before = _stats(server).steps_total
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    lines = 0
    while lines < 2:  # the role chunk and the first sentence
        if response.readline().startswith(b"data: "):
            lines += 1
    conn.sock.close()  # the client goes away mid-answer
    conn.close()
    time.sleep(2.0)
    settled = _stats(server).steps_total
    time.sleep(1.0)
    assert _stats(server).steps_total == settled  # nothing more is stepped
    assert settled - before < 30  # far from the 60 sentences asked


def test_edge_chat_serve_command(server, runtime, tmp_path):
    """The command itself: `edge-chat serve` in its own process says where it listens, serves the page and the
    API, and leaves on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "sllm.edge", "serve", "--server", f"127.0.0.1:{server.port}",
                             "--bundle", str(MODEL / "edge"), "--threads", "1", "--port", "0",
                             "--max-sentences", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "SLLM_EDGE_API_KEY": ""})
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "serving" and ready["model_id"] == runtime.model_id
        with urllib.request.urlopen(ready["url"], timeout=30) as r:
            assert b"/v1/chat/completions" in r.read()
        status, got = _post(ready["url"] + "v1/chat/completions",
                            json.dumps({"messages": [{"role": "user", "content": FIRST}]}).encode())
        assert status == 200 and got["choices"][0]["end_reason"] in ("stop", "max_sentences", "empty", "repeat")
        [turn] = _edge_chat(server, "--prompt", FIRST, "--max-sentences", 2)
        assert got["choices"][0]["message"]["content"] == _text(turn)  # the command's own defaults apply
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM, proc.stderr.read()  # as edge-chat on SIGTERM


def test_the_overhead_bench_runs(tmp_path):
    """bench.gateway, one round: it answers through both paths (the same text, asserted inside) and reports."""
    from bench.gateway import render, run

    r = run(MODEL, rounds=1)
    assert r["sentence_samples"] == r["sentences_per_answer"] == 8
    assert r["per_sentence_ms"]["min"] > 0 and r["around_answer_ms"]["median"] > 0
    assert "per streamed sentence" in render(r)


def test_a_cloud_that_refuses_is_a_503_with_the_reason(runtime):
    with running_server(MODEL / "cloud", threads=1, tokens=["right-token"]) as srv:
        address = f"127.0.0.1:{srv.port}"
        with running_gateway(address, runtime) as (url, _):  # the gateway sends no token
            status, err = _post(url + "/v1/chat/completions",
                                json.dumps({"messages": [{"role": "user", "content": FIRST}]}).encode())
    assert status == 503 and err["error"]["type"] == "cloud_unavailable"
    assert err["error"]["code"] == "unauthenticated" and "bearer token" in err["error"]["message"]


def test_concurrent_requests_are_answered_at_the_same_time(client, runtime):
    """Two streamed answers started together run side by side (each in its own worker thread and cloud
    session): each one's first sentence comes before the other's last."""
    barrier, spans = threading.Barrier(2), {}

    def ask(name):
        barrier.wait()
        times = []
        for chunk in client.chat.completions.create(
                model=runtime.model_id, stream=True, messages=[{"role": "user", "content": f"{name} came home."}],
                extra_body={"max_sentences": 8, "stop_threshold": 1.0}):
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.monotonic())
        spans[name] = (times[0], times[-1])

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("Anna", "Tom")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    (a_first, a_last), (t_first, t_last) = spans["Anna"], spans["Tom"]
    assert a_first < t_last and t_first < a_last
