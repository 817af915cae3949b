"""The cloud-only baseline: the token-level OPT generates on the server and streams its tokens as
they are made, so a conversation pays the network round trip once per answer, not per token or
sentence. A bench-only gRPC service (generic handler, raw bytes, no .proto):

    /sllm.bench.CloudOnly/Generate   unary -> stream
      request:  int32 little-endian [max_new, prompt id, prompt id, ...]
      replies:  int32 little-endian token ids: every token made since the previous reply (at least one)

    python -m bench.cloud_only --baseline models/default/baseline --port 0 --threads 1
    # logs {"event": "server_start", "address": ..., "generator": ..., "streaming": ...} on stderr,
    # serves until SIGTERM / Ctrl-C

Streaming as a serving stack does it (vLLM, TGI: the engine loop never waits for the client): the
engine generates in a thread of its own, and each reply carries the tokens made since the last one
was sent. While a send is quicker than a token that is one token per reply, sent the moment it
is made; when sends fall behind (a loaded machine), a reply carries several, so the per-message
cost of gRPC never slows generation down (as vLLM's output collector merges the deltas a slow
reader has not taken yet).

The generator is pluggable: any object with `.stream(prompt_ids, max_new) -> Iterator[int]`
(greedy, exactly max_new tokens). `--generator auto` (the default) is the fastest token-level engine
the project has, bench.baselines.fastest_generator: the fused ONNX export of the baseline with its
KV cache in ONNX Runtime; `hf` is the Hugging Face model's own forward with its KV cache.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from queue import SimpleQueue
from typing import Self

import grpc
import numpy as np

SERVICE = "sllm.bench.CloudOnly"
METHOD = f"/{SERVICE}/Generate"


def encode_request(prompt_ids: list[int], max_new: int) -> bytes:
    return np.asarray([max_new, *prompt_ids], dtype="<i4").tobytes()


def decode_request(raw: bytes) -> tuple[list[int], int]:
    values = np.frombuffer(raw, dtype="<i4")
    if len(values) < 2 or values[0] < 1:
        raise ValueError("a request is [max_new >= 1, at least one prompt id] as int32")
    return values[1:].tolist(), int(values[0])


class HFGreedy:
    """The Hugging Face OPT's forward with its own KV cache (DynamicCache), one token per call, greedy."""

    def __init__(self, model):
        import inspect

        from transformers.cache_utils import DynamicCache

        self.model, self.new_cache = model.eval(), lambda: DynamicCache(config=model.config)
        # transformers 5.24 renamed the cache argument (past_key_values -> cache)
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def stream(self, prompt_ids: list[int], max_new: int) -> Iterator[int]:
        import torch

        with torch.inference_mode():
            cache = self.new_cache()  # filled in place by every forward
            ids = torch.tensor([prompt_ids])
            for _ in range(max_new):
                logits = self.model(input_ids=ids, use_cache=True, **{self.cache_kwarg: cache}).logits
                token = int(logits[0, -1].argmax())
                yield token
                ids = torch.tensor([[token]])


def make_generator(kind: str, baseline_dir: Path, threads: int, cache: Path | None = None):
    """(generator, what it is in words). kind: auto (bench.baselines' fastest: the fused ONNX graph
    with its KV cache) or hf; cache: where bench.baselines keeps its ONNX export between runs."""
    if kind == "auto":
        from bench.baselines import fastest_generator

        fast = fastest_generator(baseline_dir, threads, cache)
        return fast, fast.description
    from sllm.modeling.baseline_bundle import load_baseline_bundle

    return HFGreedy(load_baseline_bundle(baseline_dir).model), ("Hugging Face OPT forward with its KV cache, "
                                                               "token by token (torch eager)")


STREAMING = "gRPC server streaming, each reply the tokens made since the previous one (no per-token round trip)"
_END = object()


def made_since_last_send(tokens: Iterator[int]) -> Iterator[list[int]]:
    """`tokens`, generated in a thread of their own, handed out as lists: each one every token made
    since the previous list was taken (at least one, in order). Closing this iterator stops the
    generation after its next token (a client that went away)."""
    made: SimpleQueue = SimpleQueue()
    stop = threading.Event()

    def generate() -> None:
        try:
            for token in tokens:
                made.put(token)
                if stop.is_set():
                    break
        except Exception as e:  # noqa: BLE001 - handed to the sender, which raises it
            made.put(e)
        finally:
            if hasattr(tokens, "close"):
                tokens.close()  # in the thread that ran it: a generator's context (inference mode) exits here
        made.put(_END)

    threading.Thread(target=generate, name="cloud-only-generate", daemon=True).start()
    try:
        while True:
            items = [made.get()]
            while not made.empty():
                items.append(made.get())
            ids = []
            for item in items:
                if item is _END:
                    if ids:
                        yield ids
                    return
                if isinstance(item, Exception):
                    raise item
                ids.append(item)
            yield ids
    finally:
        stop.set()


def serve(generator, port: int = 0, host: str = "127.0.0.1") -> tuple[grpc.Server, int]:
    def generate(request: bytes, context) -> Iterator[bytes]:
        try:
            prompt, max_new = decode_request(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for ids in made_since_last_send(generator.stream(prompt, max_new)):
            yield np.asarray(ids, dtype="<i4").tobytes()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_stream_rpc_method_handler(generate)  # no (de)serializers: raw bytes both ways
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Generate": handler}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


class CloudOnlyClient:
    """`chunks(prompt_ids, max_new)`: the token ids of each reply as it comes; `stream`: the tokens."""

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target)
        self.call = self.channel.unary_stream(METHOD)

    def chunks(self, prompt_ids: list[int], max_new: int) -> Iterator[list[int]]:
        for reply in self.call(encode_request(prompt_ids, max_new)):
            yield np.frombuffer(reply, dtype="<i4").tolist()

    def stream(self, prompt_ids: list[int], max_new: int) -> Iterator[int]:
        for ids in self.chunks(prompt_ids, max_new):
            yield from ids

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, default=Path("models/default/baseline"))
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch / ORT intra-op threads")
    ap.add_argument("--generator", choices=("auto", "hf"), default="auto")
    ap.add_argument("--cache", type=Path, default=Path("runs/bench/cache"),
                    help="where an exported generator (auto) is kept between runs")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    generator, what = make_generator(args.generator, args.baseline, args.threads, args.cache)
    server, port = serve(generator, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps({"event": "server_start", "address": f"127.0.0.1:{port}", "generator": what,
                      "streaming": STREAMING}),
          file=sys.stderr, flush=True)
    stop.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
