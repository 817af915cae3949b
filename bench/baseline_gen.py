"""One timed token-by-token generation of the baseline OPT: Hugging Face `generate`, greedy, with
its KV cache, forced to exactly `new_tokens` tokens (min_new_tokens = max_new_tokens, so eos
cannot end it early and both models produce the same number of tokens).

A streamer stamps the time of each token as `generate` hands it out: the prefill ends when the
first new token appears (the prompt's forward pass predicts it), and the throughput after the
prefill is (new_tokens - 1) tokens over the time from that first token to the end of `generate`.
A forward pre-hook counts the model's forward passes, to show one pass per token.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers.generation.streamers import BaseStreamer


class _Clock(BaseStreamer):
    """Records perf_counter() at each put (the prompt first, then every new token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


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


@torch.inference_mode()
def generate(model, prompt_ids: list[int], new_tokens: int) -> BaselineRun:
    """Greedy generation of exactly `new_tokens` (>= 2) tokens after `prompt_ids` (bos + tokens)."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (the first one comes with the prefill)")
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    calls = [0]
    hook = model.get_decoder().register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    clock = _Clock()
    try:
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
        raise RuntimeError(f"generate produced {produced} tokens ({len(clock.times) - 1} streamed), asked {new_tokens}")
    t_first = clock.times[1]
    return BaselineRun(len(prompt_ids), new_tokens - 1, t_first - t0, t_end - t_first, calls[0] - 1)
