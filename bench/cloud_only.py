"""The cloud-only baseline: the token-level OPT generates on the server and streams each token as
it is made, so a conversation pays the network round trip once per answer, not per token or
sentence. A bench-only gRPC service (generic handler, raw bytes, no .proto):

    /sllm.bench.CloudOnly/Generate   unary -> stream
      request:  int32 little-endian [max_new, prompt id, prompt id, ...]
      replies:  one int32 little-endian token id each, as soon as it is generated

    python -m bench.cloud_only --baseline models/default/baseline --port 0 --threads 1
    # logs {"event": "server_start", "address": ...} on stderr, serves until SIGTERM / Ctrl-C

The generator is pluggable: any object with `.stream(prompt_ids, max_new) -> Iterator[int]`
(greedy, exactly max_new tokens). `--generator hf` is the Hugging Face model's own forward with
its KV cache, token by token; `auto` takes the fastest token-level generator of bench/baselines.py
when that module offers one, else hf.
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
    """(generator, what it is in words). kind: hf, or auto (bench.baselines' fastest, else hf);
    cache: where bench.baselines may keep its export between runs."""
    from sllm.modeling.baseline_bundle import load_baseline_bundle

    if kind == "auto":
        fast = _fastest_from_baselines(baseline_dir, threads, cache)
        if fast is not None:
            return fast
    loaded = load_baseline_bundle(baseline_dir)
    return HFGreedy(loaded.model), "Hugging Face OPT forward with its KV cache, token by token (torch eager)"


def _fastest_from_baselines(baseline_dir: Path, threads: int, cache: Path | None):
    """bench.baselines' fastest token-level generator, when it has one with `.stream` (another
    helper writes that module: tried, never required)."""
    try:
        from bench import baselines
    except ImportError:
        return None
    factory = getattr(baselines, "fastest_generator", None)
    if factory is None:
        return None
    generator = factory(baseline_dir, threads, cache)
    if not hasattr(generator, "stream"):
        return None
    return generator, getattr(generator, "description", type(generator).__name__)


def serve(generator, port: int = 0, host: str = "127.0.0.1") -> tuple[grpc.Server, int]:
    def generate(request: bytes, context) -> Iterator[bytes]:
        try:
            prompt, max_new = decode_request(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for token in generator.stream(prompt, max_new):
            yield np.int32(token).tobytes()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_stream_rpc_method_handler(generate)  # no (de)serializers: raw bytes both ways
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Generate": handler}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


class CloudOnlyClient:
    """`stream(prompt_ids, max_new)`: the tokens as the server streams them."""

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target)
        self.call = self.channel.unary_stream(METHOD)

    def stream(self, prompt_ids: list[int], max_new: int) -> Iterator[int]:
        for reply in self.call(encode_request(prompt_ids, max_new)):
            yield int(np.frombuffer(reply, dtype="<i4")[0])

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
    print(json.dumps({"event": "server_start", "address": f"127.0.0.1:{port}", "generator": what}),
          file=sys.stderr, flush=True)
    stop.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
