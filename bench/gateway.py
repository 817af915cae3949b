"""What `edge-chat serve` adds to an answer, against calling the Python API directly.

    python -m bench.gateway            # 20 rounds; docs/results/gateway.{json,md}
    python -m bench.gateway --quick    # 5 rounds

One cloud server (its own process, models/default), the gateway app (sllm.edge.gateway, on uvicorn, in this
process: what `edge-chat serve` runs) and an HTTP client in a process of its own (http.client, one connection).
Each round answers the same prompt with the same options (greedy, 8 sentences: the stop rule off) three ways,
one after the other: the Python API (`edge.connect` + `ask().text()`, a new conversation), the gateway
non-streamed and streamed (a new conversation each: a single message).

- per request: the client's time for the whole answer minus the time the API's own calls took inside the
  gateway for it (edge.connect until the answer's end: what the gateway adds around them); and, noisier, minus
  the direct API's time for the same answer (paired by round);
- per streamed sentence: when the client has parsed a sentence's chunk minus when the edge's sentence loop handed
  that sentence to its caller (`Answer.__next__`, timed in this process; both clocks are CLOCK_MONOTONIC):
  the gateway's whole path for one sentence (worker thread -> event loop -> JSON -> SSE -> socket -> client).
Medians with min and max; the load average before and after is recorded (a shared machine).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

from bench.summary import bench_parser, spread, spread_cell, write_results
from sllm import edge
from sllm.edge import api
from sllm.edge.conversations import Conversations
from sllm.edge.gateway import create_app, serve
from sllm.runtime.server_process import ServerProcess

PROMPT = "It is a truth universally acknowledged, that a single man must be in want of a wife."
OPTIONS = {"max_sentences": 8, "stop_threshold": 1.0}

# the HTTP client, in its own process: one request per stdin line {"url", "body"}, one JSON line back with its
# times (perf_counter: CLOCK_MONOTONIC, the same clock as the gateway process's)
CLIENT = r"""
import http.client, json, sys, time, urllib.parse
conn = None
for line in sys.stdin:
    job = json.loads(line)
    u = urllib.parse.urlsplit(job["url"])
    conn = conn or http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    body = json.dumps(job["body"])
    t0 = time.perf_counter()
    conn.request("POST", u.path, body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    chunks = []
    if job["body"].get("stream"):
        while True:
            raw = r.readline()
            if not raw or raw.strip() == b"data: [DONE]":
                if raw: r.read()
                break
            if raw.startswith(b"data: "):
                c = json.loads(raw[6:])
                if c["choices"] and c["choices"][0]["delta"].get("content"):
                    chunks.append(time.perf_counter())
        text = None
    else:
        text = json.loads(r.read())["choices"][0]["message"]["content"]
    print(json.dumps({"t0": t0, "t1": time.perf_counter(), "chunks": chunks, "text": text}), flush=True)
"""


class _Yields:
    """When the sentence loop handed each sentence to its caller (Answer.__next__ returned) and when the answer
    ended (it raised StopIteration), in this process."""

    def __init__(self):
        self.times: list[float] = []
        self.ends: list[float] = []
        original = api.Answer.__next__

        def timed(answer):
            try:
                event = original(answer)
            except StopIteration:
                self.ends.append(time.perf_counter())
                raise
            self.times.append(time.perf_counter())
            return event

        self._original = original
        api.Answer.__next__ = timed

    def restore(self) -> None:
        api.Answer.__next__ = self._original


def run(model, rounds: int, threads: int = 1) -> dict:
    load_before = os.getloadavg()
    server = ServerProcess.serve(model / "cloud", "--grace", "1", threads=threads, tokens=[])
    server.start()
    yields, client, box = _Yields(), None, {}
    try:
        address = server.address
        runtime = edge.load_runtime(model / "edge", threads=threads)
        options = edge.AnswerOptions(**OPTIONS)
        connects: list[float] = []

        def open_chat():  # the API's work in the gateway starts here: edge.connect, as in ask_api
            connects.append(time.perf_counter())
            return edge.connect(address, runtime, options=options)

        pool = Conversations(open_chat, 4 * rounds + 8)
        app = create_app(pool, runtime.model_id, defaults=options)
        started = threading.Event()
        threading.Thread(target=serve, args=(app, "127.0.0.1", 0), daemon=True,
                         kwargs={"ready": lambda a, stop: (box.update(address=a, stop=stop), started.set())}).start()
        assert started.wait(30)
        url = f"http://{box['address']}/v1/chat/completions"
        client = subprocess.Popen([sys.executable, "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)

        def ask_gateway(stream: bool) -> dict:
            client.stdin.write(json.dumps({"url": url, "body": {"messages": [{"role": "user", "content": PROMPT}],
                                                                "stream": stream}}) + "\n")
            client.stdin.flush()
            return json.loads(client.stdout.readline())

        def ask_api() -> tuple[float, str]:
            t0 = time.perf_counter()
            chat = edge.connect(address, runtime, options=options)
            text = chat.ask(PROMPT).text()
            t1 = time.perf_counter()
            chat.close()
            return t1 - t0, text

        for _ in range(2):  # warm-up: sessions, channels, ONNX Runtime
            ask_api(), ask_gateway(False), ask_gateway(True)
        per_request, per_request_streamed, per_sentence, api_ms, sentences = [], [], [], [], []
        around, around_streamed = [], []
        for _ in range(rounds):
            api_s, api_text = ask_api()
            del connects[:], yields.ends[:]
            plain = ask_gateway(False)
            around.append((plain["t1"] - plain["t0"] - (yields.ends[-1] - connects[-1])) * 1e3)
            assert plain["text"] == api_text, "the gateway answered otherwise than the API"
            del yields.times[:], connects[:], yields.ends[:]
            streamed = ask_gateway(True)
            handed = list(yields.times)
            around_streamed.append((streamed["t1"] - streamed["t0"] - (yields.ends[-1] - connects[-1])) * 1e3)
            assert len(handed) == len(streamed["chunks"]), (len(handed), len(streamed["chunks"]))
            api_ms.append(api_s * 1e3)
            per_request.append((plain["t1"] - plain["t0"] - api_s) * 1e3)
            per_request_streamed.append((streamed["t1"] - streamed["t0"] - api_s) * 1e3)
            per_sentence += [(c - y) * 1e3 for c, y in zip(streamed["chunks"], handed)]
            sentences.append(len(handed))
        client.stdin.close()
        client.wait(30)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        if "stop" in box:
            box["stop"]()
        server.stop()
        yields.restore()
    return {"rounds": rounds, "sentences_per_answer": statistics.median(sentences), "threads": threads,
            "api_answer_ms": spread(api_ms), "per_request_ms": spread(per_request),
            "around_answer_ms": spread(around), "around_answer_streamed_ms": spread(around_streamed),
            "per_request_streamed_ms": spread(per_request_streamed), "per_sentence_ms": spread(per_sentence),
            "sentence_samples": len(per_sentence), "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "prompt": PROMPT, "options": OPTIONS}


def render(r: dict) -> str:
    ms = "{:.2f}"
    return "\n".join([
        "# Gateway overhead: `edge-chat serve` against the Python API", "",
        f"`python -m bench.gateway`, {r['date_utc']} UTC, {r['cores']} cores shared (load average "
        f"{r['load_average_before'][0]} before, {r['load_average_after'][0]} after), {r['rounds']} rounds, "
        f"{r['sentences_per_answer']:g} sentences an answer, greedy, ONNX Runtime and the cloud with "
        f"{r['threads']} thread each. Median (min-max), milliseconds.", "",
        "| what | ms |", "|---|---|",
        f"| one answer through the Python API (connect + ask, new conversation) | {spread_cell(r['api_answer_ms'], ms)} |",
        f"| gateway per request, non-streamed: the client's time minus the API's work inside the gateway "
        f"(edge.connect until the answer's end) | {spread_cell(r['around_answer_ms'], ms)} |",
        f"| the same, streamed | {spread_cell(r['around_answer_streamed_ms'], ms)} |",
        f"| gateway per request, non-streamed (minus the direct API's time, same round: noisy) | "
        f"{spread_cell(r['per_request_ms'], ms)} |",
        f"| gateway per request, streamed (minus the direct API's time, same round: noisy) | "
        f"{spread_cell(r['per_request_streamed_ms'], ms)} |",
        f"| gateway per streamed sentence (loop hands it over -> client has parsed its chunk; "
        f"{r['sentence_samples']} sentences) | {spread_cell(r['per_sentence_ms'], ms)} |", ""])


def main(argv=None) -> None:
    ap = bench_parser(__doc__, "5 rounds instead of 20")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    results = run(args.model, 5 if args.quick else args.rounds)
    results["command"] = "python -m bench.gateway" + (" --quick" if args.quick else "")
    print(write_results(args.out, "gateway", results, render))


if __name__ == "__main__":
    main()
