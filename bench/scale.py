"""Aggregate cloud throughput with N concurrent edge clients against one server (the client loop
of `bench/cloud_throughput.py`: conversations of a 4-sentence prompt then single-sentence steps,
as fast as answers come back, vectors random, float16 on the wire).

A step answers one sentence, so the cloud's token rate is steps/s x L (mean tokens per sentence
of the validation text): each client decodes its own sentences on its own edge device, which is
why the edge decode does not enter this figure.
"""
from __future__ import annotations

from typing import Callable

from bench import cloud_throughput

STEPS_PER_CONVERSATION = 60


def run_scale(address: str, token: str | None, model_id: str, d: int, clients: list[int], seconds: float,
              warmup: float, tokens_per_sentence: float, advance: Callable[[], None] = lambda: None) -> dict:
    rows = []
    for n in clients:
        r = cloud_throughput.run_point(address, model_id, d, n, seconds, warmup, STEPS_PER_CONVERSATION, token)
        rows.append({**r, "tokens_per_s": r["steps_per_s"] * tokens_per_sentence})
        advance()
    return {"rows": rows, "seconds_per_point": seconds, "warmup_s": warmup, "tokens_per_sentence": tokens_per_sentence}
