"""SentenceVAE evaluation: loss, PPL (paper Eq. 10), exact-match reconstruction, Table 2."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from sllm.modeling.generate import SamplingConfig, decode_sentences
from sllm.modeling.losses import token_nll_sum
from sllm.modeling.sentence_vae import pad_token_lists
from sllm.sentences.limit import model_sentences
from sllm.training.data.dataset import Sentences
from sllm.training.data.sentence_data import collate, prepare_validation
from sllm.training.load import TrainedSentenceVAE
from sllm.training.tasks.common import unwrap
from sllm.training.text_data import VALIDATION, TextSource

# The eight inputs of the paper's Table 2, verbatim.
PAPER_TABLE2_INPUTS = [
    "Hello,",
    "What\u2019s your name?",
    "What\u2019s your problem?",
    "Hello, my dear friend",
    "Today is Friday.",
    "One two three four five six seven eight nine ten~",
    "Hahaha.. and you?",
    "Yao yao ling xian!",
]
LENGTH_BUCKETS = [(1, 8), (9, 16), (17, 32), (33, 64), (65, 10_000)]


@torch.no_grad()
def validation_loss(model: nn.Module, data: Sentences, n: int, batch_size: int) -> dict[str, float]:
    """Cross-entropy per target token (sentence tokens + eos) and PPL (paper Eq. 10)."""
    model = unwrap(model).eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        index = np.arange(start, min(n, start + batch_size))
        ids, mask = (t.to(device) for t in collate(data, index, model.cfg.pad_id))
        _, targets = model.teacher_forcing_targets(ids, mask)
        nll, k = token_nll_sum(model(ids, mask), targets)
        total, count = total + float(nll), count + int(k)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": float(np.exp(loss)), "tokens": float(count)}


@torch.no_grad()
def reconstruct_ids(trained: TrainedSentenceVAE, sentences: list[list[int]], batch_size: int = 128,
                    sampling: SamplingConfig | None = None) -> list[list[int]]:
    """Encode each token list to one vector and decode it back (greedy unless `sampling` says otherwise)."""
    model, cfg = trained.model, trained.model.cfg
    out: list[list[int]] = []
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start : start + batch_size]
        ids, mask = pad_token_lists(chunk, cfg.pad_id)
        memory = model.encode(ids, mask)
        out.extend(decode_sentences(model.decoder, memory, cfg.max_sentence_tokens, sampling or SamplingConfig()))
    return out


def _reconstruct_many(trained: TrainedSentenceVAE, texts: list[str],
                      sampling: SamplingConfig | None = None) -> list[list[dict]]:
    """For each text, its non-blank pieces (split as in training, each within the token
    limit, never truncated) with their reconstructions; all pieces decode in one batch."""
    tok, limit = trained.tokenizer, trained.model.cfg.max_sentence_tokens
    split_on_comma = trained.run.data.split_on_comma
    pieces = [model_sentences(t, tok, limit, split_on_comma) for t in texts]
    flat = [p for ps in pieces for p in ps]
    ids = tok.encode_batch(flat) if flat else []
    outputs = reconstruct_ids(trained, ids, sampling=sampling) if ids else []
    rows = [{"input": p, "tokens": len(i), "output": tok.decode(o), "exact": o == i}
            for p, i, o in zip(flat, ids, outputs)]
    ends = np.cumsum([len(ps) for ps in pieces])
    return [rows[end - len(ps) : end] for ps, end in zip(pieces, ends)]


def reconstruct_text(trained: TrainedSentenceVAE, text: str, sampling: SamplingConfig | None = None) -> list[dict]:
    """Reconstruct free text piece by piece: {"input", "tokens", "output", "exact"} per
    non-blank piece. The pieces' inputs are `text` minus blank pieces; "" or only whitespace gives []."""
    return _reconstruct_many(trained, [text], sampling)[0]


def reconstruct_texts(trained: TrainedSentenceVAE, texts: list[str]) -> list[dict]:
    """One row per input (the paper's Table 2). An input over the token limit is split,
    not truncated: its output joins the pieces' outputs and it is exact if every piece is."""
    return [{"input": t, "tokens": sum(r["tokens"] for r in rows), "output": "".join(r["output"] for r in rows),
             "exact": all(r["exact"] for r in rows)}
            for t, rows in zip(texts, _reconstruct_many(trained, texts))]


def reconstruct_documents(trained: TrainedSentenceVAE, texts: list[str]) -> list[dict]:
    """`reconstruct_text`'s rows for every piece of every text, in order (all decoded in one batch)."""
    return [row for rows in _reconstruct_many(trained, texts) for row in rows]


def validation_sentences(trained: TrainedSentenceVAE, log=print, text: TextSource = VALIDATION) -> Sentences:
    """The validation split of the run a checkpoint came from (or `text`), tokenized and segmented as
    the checkpoint's own run did."""
    data_cfg = text.data_config(trained.run.data, trained.path)
    return prepare_validation(data_cfg, trained.model.cfg.max_sentence_tokens, log=log)


def exact_match(trained: TrainedSentenceVAE, data: Sentences, n: int, batch_size: int = 128) -> dict[str, float]:
    """Share of `n` evenly spaced sentences whose greedy reconstruction equals the input, overall and by length."""
    index = np.unique(np.linspace(0, len(data) - 1, num=min(n, len(data))).astype(np.int64))
    sentences = [data.sentence(int(i)) for i in index]
    t0 = time.perf_counter()
    outputs = reconstruct_ids(trained, sentences, batch_size)
    elapsed = time.perf_counter() - t0
    hits = np.array([o == s for o, s in zip(outputs, sentences)])
    lengths = np.array([len(s) for s in sentences])
    result = {"exact_match": float(hits.mean()), "sentences": float(len(hits)),
              "exact_match_le16": float(hits[lengths <= 16].mean()) if (lengths <= 16).any() else float("nan"),
              "decode_s": elapsed}
    for lo, hi in LENGTH_BUCKETS:
        sel = (lengths >= lo) & (lengths <= hi)
        if sel.any():
            result[f"exact_match_{lo}_{hi}"] = float(hits[sel].mean())
            result[f"count_{lo}_{hi}"] = float(sel.sum())
    return result


def evaluate_sentence_vae(trained: TrainedSentenceVAE, val: Sentences, n_loss: int = 20_000,
                          n_exact: int = 1000, batch_size: int = 128) -> dict:
    metrics = validation_loss(trained.model, val, min(n_loss, len(val)), batch_size)
    metrics.update(exact_match(trained, val, n_exact, batch_size))
    return {"metrics": metrics, "table2": reconstruct_texts(trained, PAPER_TABLE2_INPUTS)}


def render_markdown(report: dict, title: str = "SentenceVAE evaluation") -> str:
    m = report["metrics"]
    lines = [f"## {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| validation loss (CE per token) | {m['loss']:.4f} |", f"| validation PPL | {m['ppl']:.3f} |",
              f"| exact-match reconstruction ({int(m['sentences'])} sentences) | {m['exact_match']:.1%} |",
              f"| exact match, sentences of <= 16 tokens | {m['exact_match_le16']:.1%} |"]
    for lo, hi in LENGTH_BUCKETS:
        if f"exact_match_{lo}_{hi}" in m:
            lines.append(f"| exact match, {lo}-{hi} tokens (n={int(m[f'count_{lo}_{hi}'])}) | {m[f'exact_match_{lo}_{hi}']:.1%} |")
    lines += ["", "Paper Table 2 inputs:", "", "| # | input | tokens | output | exact |", "|---|---|---|---|---|"]
    for i, row in enumerate(report["table2"], 1):
        out = row["output"].replace("|", "\\|").replace("\n", "\\n")
        lines.append(f"| {i} | {row['input']} | {row['tokens']} | {out} | {'yes' if row['exact'] else 'no'} |")
    return "\n".join(lines) + "\n"
