"""Sentence decoding (paper Eq. 4): from sentence vectors back to token ids.

`decode_sentences` decodes incrementally with the decoder's KV cache;
`decode_full_recompute` re-runs the whole prefix each step (reference for tests and
benchmarks). Both share one loop, so for the same seed they draw the same random numbers.
The repetition controls (sentences.sampling) see `answer`, the earlier sentences of the answer
being decoded; the edge (runtime.sampling) applies them the same way, in float32.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sllm.sentences.sampling import RepetitionGuard, SamplingConfig, advance, guards_for


def make_generator(sampling: SamplingConfig, device: torch.device | str) -> torch.Generator | None:
    """A seeded generator for `sampling.seed`, or None (global RNG) when unseeded or greedy."""
    if sampling.greedy or sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def control_repetition(logits: torch.Tensor, guards: list[RepetitionGuard]) -> torch.Tensor:
    """logits [B, V] with each row's repetition penalty applied and its banned tokens at -inf."""
    x = logits.float().clone()
    for row, guard in zip(x, guards):
        idx = guard.penalized()
        if idx:
            v, p = row[idx], torch.tensor(guard.penalty, dtype=torch.float32, device=row.device)
            row[idx] = torch.where(v > 0, v / p, v * p)
        row[guard.banned()] = float("-inf")
    return x


def pick_next(logits: torch.Tensor, sampling: SamplingConfig,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B] (greedy, or temperature / top-k / top-p sampling)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature  # [B, V]
    V = logits.shape[-1]
    if 0 < sampling.top_k < V:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= sampling.top_p, float("-inf"))  # top token always stays
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]


def decode_sentences(decoder, memory: torch.Tensor, max_tokens: int | None = None,
                     sampling: SamplingConfig | None = None, answer: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """Decode sentence vectors memory [B, d] with the KV cache.

    Returns one token list per row, without bos and eos. A row stops at eos or after
    min(max_tokens, cfg.max_sentence_tokens) tokens; bos/eos ids come from decoder.cfg.
    answer: the earlier sentences of the answer every row continues (repetition controls).
    """
    return _decode(decoder, memory, max_tokens, sampling, True, answer)


def decode_full_recompute(decoder, memory: torch.Tensor, max_tokens: int | None = None,
                          sampling: SamplingConfig | None = None,
                          answer: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """Same as `decode_sentences`, recomputing the whole prefix each step (no cache)."""
    return _decode(decoder, memory, max_tokens, sampling, False, answer)


@torch.inference_mode()
def _decode(decoder, memory, max_tokens, sampling, use_cache: bool, answer=()) -> list[list[int]]:
    cfg = decoder.cfg
    sampling = sampling if sampling is not None else SamplingConfig()
    if memory.dim() != 2 or memory.shape[1] != cfg.d_model:
        raise ValueError(f"memory must be [batch, {cfg.d_model}], got {tuple(memory.shape)}")
    if max_tokens is None:
        max_tokens = cfg.max_sentence_tokens
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    limit = min(max_tokens, cfg.max_sentence_tokens)  # no positions beyond max_sentence_tokens
    B = memory.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    if B == 0 or limit == 0:
        return out
    device = memory.device
    generator = make_generator(sampling, device)
    guards = guards_for(sampling, answer, cfg.eos_id, B)  # None: no repetition control
    rows = list(range(B))  # original row of each live row
    step_in = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=device)  # [A, 1] next input
    seq = step_in  # [A, n+1] live prefixes (full recompute only)
    kv = decoder.empty_kv(B, memory.dtype, device) if use_cache else None
    was_training = decoder.training
    decoder.eval()
    try:
        for _ in range(limit):
            if use_cache:
                logits, kv = decoder(step_in, memory, kv)  # [A, 1, V], [n_layers, 2, A, H, n+1, hd]
            else:
                logits, _ = decoder(seq, memory)  # [A, n+1, V]
            last = logits[:, -1] if guards is None else control_repetition(logits[:, -1], guards)  # [A, V]
            nxt = pick_next(last, sampling, generator)  # [A]
            if guards is not None:
                guards = advance(guards, nxt.tolist(), cfg.eos_id)
            keep = []
            for j, tok in enumerate(nxt.tolist()):
                if tok != cfg.eos_id:
                    out[rows[j]].append(tok)
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch
                idx = torch.tensor(keep, device=device)
                rows = [rows[j] for j in keep]
                memory, nxt = memory[idx], nxt[idx]
                if use_cache:
                    kv = kv[:, :, idx]
                else:
                    seq = seq[idx]
            step_in = nxt[:, None]  # [A, 1]
            if not use_cache:
                seq = torch.cat((seq, step_in), dim=1)
    finally:
        decoder.train(was_training)
    return out
