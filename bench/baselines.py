"""The token-level baseline OPT generating greedily, three ways a serving engineer might run it,
each at a chosen thread count (the same trained weights: `models/default/baseline`):

    hf-generate   Hugging Face `generate` with its KV cache (what the paper compares against)
    torch-kv      a tight torch loop: the same weights in `sllm.modeling.opt_block.OPTBlock` (the cloud's blocks)
                  over a cache preallocated for the whole generation and written in place
                  (inference_mode, no cache growth, logits of the last position only)
    onnxruntime   the baseline exported to ONNX with its cache as input/output
                  (`sllm.export.baseline_onnx`, the edge decoder's export path) and a greedy numpy
                  loop stepping it as the edge steps its decoder (`sllm.runtime.svae_onnx.KVSteps`)

Every flavour generates exactly n tokens after the prompt (eos does not stop it) and is timed the
same way: the prefill is the prompt's forward pass and the first token; the throughput is the
other n - 1 tokens over the time from the first token to the last (`BaselineRun`). The greedy
tokens of torch-kv and onnxruntime equal hf-generate's (tests/test_bench_baselines.py).

For other benches: `fastest_generator(baseline_dir, threads)` returns the fastest flavour measured
here (onnxruntime) ready to `.stream(prompt_ids, max_new)`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from sllm.export.baseline_onnx import causal_mask, check_parity, check_supported, export_baseline
from sllm.modeling.opt_block import OPTBlock
from sllm.runtime.providers import cpu_session
from sllm.runtime.svae_onnx import KVSteps

FLAVOURS = ("hf-generate", "torch-kv", "onnxruntime")
LABELS = {"hf-generate": "HF generate", "torch-kv": "torch, preallocated KV", "onnxruntime": "ONNX Runtime + KV"}


@dataclass
class BaselineRun:
    prompt_tokens: int  # including bos
    tokens: int  # tokens generated after the prefill (new_tokens - 1)
    prefill_s: float  # the prompt's forward pass and the first token
    gen_s: float  # from the first new token to the end
    forward_passes: int  # after the prefill

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.gen_s if self.gen_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def key(flavour: str, threads: int) -> str:
    """The name of a flavour at a thread count in the bench's JSON: "onnxruntime_t2"."""
    return f"{flavour.replace('-', '_')}_t{threads}"


def label(flavour: str, threads: int) -> str:
    return f"{LABELS[flavour]}, {threads} thread{'s' * (threads > 1)}"


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads are per process: set them for one generation, then put them back."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _check_length(prompt_ids: list[int], new_tokens: int, max_positions: int) -> None:
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (the first one comes with the prefill)")
    if len(prompt_ids) + new_tokens - 1 > max_positions:
        raise ValueError(f"{len(prompt_ids)} prompt + {new_tokens} new tokens exceed {max_positions} positions")


class _StreamTimer:
    """`timed` for flavours that stream: the clock reads each token as the loop hands it out."""

    name: str
    threads: int
    max_positions: int
    calls: int  # model calls so far (prefill included)

    def stream(self, prompt_ids: list[int], max_new: int) -> Iterator[int]:
        raise NotImplementedError

    def _threads(self):
        return contextlib.nullcontext()

    def timed(self, prompt_ids: list[int], new_tokens: int) -> tuple[BaselineRun, list[int]]:
        _check_length(prompt_ids, new_tokens, self.max_positions)
        with self._threads():  # torch's thread count is set before the clock starts
            calls = self.calls
            t0 = time.perf_counter()
            tokens = self.stream(prompt_ids, new_tokens)
            ids = [next(tokens)]
            t_first = time.perf_counter()
            ids.extend(tokens)
            t_end = time.perf_counter()
        return BaselineRun(len(prompt_ids), new_tokens - 1, t_first - t0, t_end - t_first,
                           self.calls - calls - 1), ids


# ---------------------------------------------------------------- a. Hugging Face generate

class _Clock(BaseStreamer):
    """Records perf_counter() at each put (the prompt first, then every new token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFGenerate:
    """`model.generate`, greedy, with its KV cache, forced to exactly n tokens (min_new_tokens =
    max_new_tokens). A streamer stamps each token as generate hands it out; a forward pre-hook
    counts the model's forward passes."""

    name = "hf-generate"

    def __init__(self, model, threads: int):
        self.model, self.threads = model, threads
        self.max_positions = model.config.max_position_embeddings
        self.description = f"Hugging Face generate with its KV cache, {threads} thread(s)"

    @torch.inference_mode()
    def timed(self, prompt_ids: list[int], new_tokens: int) -> tuple[BaselineRun, list[int]]:
        _check_length(prompt_ids, new_tokens, self.max_positions)
        model = self.model
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        calls = [0]
        hook = model.get_decoder().register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
        clock = _Clock()
        try:
            with torch_threads(self.threads):
                t0 = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                     streamer=clock, pad_token_id=model.config.pad_token_id,
                                     eos_token_id=model.config.eos_token_id)
                t_end = time.perf_counter()
        finally:
            hook.remove()
        produced = out.shape[1] - ids.shape[1]
        if produced != new_tokens or len(clock.times) != new_tokens + 1:
            raise RuntimeError(f"generate produced {produced} tokens ({len(clock.times) - 1} streamed), "
                               f"asked {new_tokens}")
        t_first = clock.times[1]
        run = BaselineRun(len(prompt_ids), new_tokens - 1, t_first - t0, t_end - t_first, calls[0] - 1)
        return run, out[0, ids.shape[1]:].tolist()

    def stream(self, prompt_ids: list[int], max_new: int) -> Iterator[int]:
        """The tokens of one `generate` call (all at once, when it returns: not incremental)."""
        yield from self.timed(prompt_ids, max_new)[1]


# ---------------------------------------------------------------- b. torch, preallocated KV cache

class TorchKV(_StreamTimer):
    """The Hugging Face modules, stepped by hand: one cache [n_layers, 2, 1, H, n, hd] allocated
    per generation for all its n positions, each step writing its keys and values in place and
    attending over a view of the positions so far."""

    name = "torch-kv"

    def __init__(self, model, threads: int):
        check_supported(model.config)
        self.decoder, self.lm_head, self.threads = model.model.decoder, model.lm_head, threads
        self.blocks = [OPTBlock.from_layer(model.config, layer) for layer in self.decoder.layers]
        self.max_positions = model.config.max_position_embeddings
        attn = self.decoder.layers[0].self_attn
        self.kv_dims = (len(self.decoder.layers), attn.num_heads, attn.head_dim)
        self.positions = torch.arange(self.max_positions)
        self.calls = 0
        self.description = f"torch loop over the Hugging Face weights with a preallocated KV cache, {threads} thread(s)"

    def _threads(self):
        return torch_threads(self.threads)

    def _forward(self, ids: torch.Tensor, kv: torch.Tensor, P: int) -> torch.Tensor:
        """ids [1, T] at positions P..P+T-1 -> logits [V] of the last one; writes kv[..., P:P+T, :]."""
        dec, T = self.decoder, ids.shape[1]
        pos = self.positions[P : P + T]
        x = dec.embed_tokens(ids) + dec.embed_positions(None, P, position_ids=pos[None])  # [1, T, d]
        mask = None if T == 1 else causal_mask(P, pos)  # one new token sees every cached one
        for i, block in enumerate(self.blocks):
            def write(k, v, cache=kv[i]):  # cache [2, 1, H, n, hd]
                cache[0, :, :, P : P + T] = k
                cache[1, :, :, P : P + T] = v
                return cache[0, :, :, : P + T], cache[1, :, :, : P + T]
            x = block(x, mask, write)
        x = x[:, -1]  # [1, d]
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        self.calls += 1
        return self.lm_head(x)[0]

    def stream(self, prompt_ids: list[int], max_new: int) -> Iterator[int]:
        """Greedy tokens one at a time, in the caller's torch threads (`timed` sets this flavour's).
        Inference mode is entered per step, never held across a yield (two interleaved streams
        would otherwise restore each other's state out of order)."""
        layers, heads, hd = self.kv_dims
        with torch.inference_mode():
            kv = torch.empty(layers, 2, 1, heads, len(prompt_ids) + max_new - 1, hd)
            ids = torch.tensor([prompt_ids], dtype=torch.long)
        P = 0
        for i in range(max_new):
            with torch.inference_mode():
                token = int(self._forward(ids, kv, P).argmax())
            P += ids.shape[1]
            yield token
            if i + 1 < max_new:
                ids = torch.tensor([[token]])


# ---------------------------------------------------------------- c. ONNX Runtime with its KV cache

class OrtKV(_StreamTimer):
    """baseline.onnx in an ONNX Runtime session (CPU, `threads` intra-op threads) and a greedy
    numpy loop: each step's present is the next one's past (`session.run`, as the edge decoder:
    an I/O binding over preallocated buffers measured no faster, bench/edge_decoder.py)."""

    name = "onnxruntime"

    def __init__(self, session, config, threads: int):
        self.session, self.threads = session, threads
        self.max_positions = config.max_position_embeddings
        self.kv_dims = (config.num_hidden_layers, config.num_attention_heads,
                        config.hidden_size // config.num_attention_heads)
        self.calls = 0
        self.description = (f"the baseline's fused ONNX graph with its KV cache (sllm.export.baseline_onnx), ONNX "
                            f"Runtime CPU, greedy numpy loop, {threads} thread(s)")

    def stream(self, prompt_ids: list[int], max_new: int) -> Iterator[int]:
        steps = KVSteps(self.session, self.kv_dims, 1, len(prompt_ids) + max_new - 1)  # one per stream
        logits = steps.run(np.asarray([prompt_ids], dtype=np.int64))  # [1, 1, V]
        self.calls += 1
        for i in range(max_new):
            token = int(logits[0, -1].argmax())
            yield token
            if i + 1 < max_new:
                logits = steps.run(np.array([[token]], dtype=np.int64))
                self.calls += 1


def weights_key(model) -> str:
    """sha256 of a model's config and every tensor: the name of its cached export."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def onnx_baseline(model, cache: Path) -> Path:
    """cache/baseline-<key>/baseline.onnx, exported once per model (atomically: a killed export
    leaves no file that looks finished)."""
    path = Path(cache) / f"baseline-fused-{weights_key(model)[:16]}" / "baseline.onnx"  # not an older export's
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".baseline.", suffix=".onnx")
        os.close(fd)
        try:
            export_baseline(model, Path(tmp))
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def ort_sessions(model, threads: list[int], cache: Path | None = None) -> dict[int, object]:
    """One checked ORT session of the exported baseline per thread count (cache None: export into
    a temporary folder, gone once the sessions hold the graph)."""
    with contextlib.ExitStack() as stack:
        folder = Path(cache) if cache is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        path = onnx_baseline(model, folder)
        sessions = {n: cpu_session(path, n) for n in threads}
    check_parity(model, sessions[min(threads)])  # a stale or broken cache fails here, loudly
    return sessions


def make_flavours(model, threads: list[int], cache: Path | None = None,
                  flavours: tuple[str, ...] = FLAVOURS) -> list:
    """Every flavour at every thread count, ready to `.timed(prompt_ids, n)`."""
    sessions = ort_sessions(model, threads, cache) if "onnxruntime" in flavours else {}
    made = {"hf-generate": lambda n: HFGenerate(model, n), "torch-kv": lambda n: TorchKV(model, n),
            "onnxruntime": lambda n: OrtKV(sessions[n], model.config, n)}
    return [made[f](n) for f in flavours for n in threads]


def fastest_generator(baseline_dir: Path, threads: int = 1, cache: Path | None = None) -> OrtKV:
    """The fastest token-level baseline measured by `sllm-bench` (docs/results/bench.md): the OPT of
    `baseline_dir` (a baseline bundle, `sllm-export <baseline run>`) in ONNX Runtime with its KV
    cache, `threads` intra-op threads. Its `.stream(prompt_ids, max_new)` yields exactly max_new
    greedy token ids, one at a time as each is computed (eos does not stop it); one object serves
    concurrent streams (each has its own buffers). `cache`: where the ONNX export is kept
    (None: a temporary folder; exporting takes about half a minute on 2 CPU cores)."""
    from sllm.modeling.baseline_bundle import load_baseline_bundle

    return make_flavours(load_baseline_bundle(Path(baseline_dir)).model, [threads], cache, ("onnxruntime",))[0]
