"""Token-level perplexity of an SLLM and of the token-level baseline over the same tokens.

Scored tokens, for both models: the tokens of sentences 2..n of each held-out passage
(the first sentence is context for both: the SLLM has no vector that predicts it).
Both PPLs are exp(total NLL / number of scored tokens), with the same denominator.

SLLM NLL of a passage (sentences s_1..s_n, hidden states h_1..h_n):
    sum_{t=1}^{n-1} -log p_dec(s_{t+1} tokens, eos | h_t)   decoder given the predicted vector
  + sum_{t=1}^{n}   -log p_stop(flag_t | h_t)               termination head: paragraph ends or not
The SLLM pays for the eos that ends each sentence and for every stop flag; the
baseline has no such terms (sentence ends are implicit in its token stream), so the
comparison leans against the SLLM, never for it.

Baseline NLL: sum of -log p(token | bos, all earlier tokens) over the same tokens.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from sllm.modeling.config import ConfigError
from sllm.modeling.losses import IGNORE_INDEX, _token_nll, next_token_logits
from sllm.modeling.sllm import SLLM
from sllm.training.data.corpus import CorpusError
from sllm.training.data.dataset import Passages
from sllm.training.data.passage_data import collate_passages, collate_token_sequences, prepare_validation_passages
from sllm.training.load import load_baseline, load_sllm
from sllm.training.text_data import VALIDATION, TextSource


def _result(nll: float, tokens: int, **extra: float) -> dict[str, float]:
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(tokens), **extra}


@torch.no_grad()
def sllm_token_nll(model: SLLM, data: Passages, index: np.ndarray, batch_size: int = 8) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    pad = model.svae.cfg.pad_id
    total = decode_total = 0.0
    tokens = decode_targets = stop_right = sentences = 0
    for start in range(0, len(index), batch_size):
        b = collate_passages(data, index[start : start + batch_size], pad).to(device)
        hidden, stop_logits = model(b.ids, b.token_mask, b.sentence_mask)
        decode_nll, n_targets, n_sentences = model.next_sentence_loss(hidden, b.ids, b.token_mask, b.sentence_mask)
        stop_targets = SLLM.stop_targets(b.sentence_mask, b.para_end)
        stop_nll = float(_token_nll(stop_logits, stop_targets, IGNORE_INDEX).sum())
        total += float(decode_nll) + stop_nll
        decode_total += float(decode_nll)
        decode_targets += n_targets
        tokens += n_targets - n_sentences  # minus the eos that ends each decoded sentence
        real = stop_targets != IGNORE_INDEX
        stop_right += int((stop_logits.argmax(-1)[real] == stop_targets[real]).sum())
        sentences += int(real.sum())
    return _result(total, tokens, decode_loss=decode_total / max(decode_targets, 1),
                   stop_accuracy=stop_right / max(sentences, 1))


@torch.no_grad()
def baseline_token_nll(model, data: Passages, index: np.ndarray, batch_size: int, pad_id: int,
                       bos_id: int) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(index), batch_size):
        ids, mask, first_end = (t.to(device) for t in collate_token_sequences(
            data, index[start : start + batch_size], pad_id, bos_id))
        logits, targets = next_token_logits(model, ids, mask)  # target j is ids[:, j+1]
        position = torch.arange(1, ids.shape[1], device=device)[None, :]  # [1, N-1]
        targets = targets.masked_fill(position < first_end[:, None], IGNORE_INDEX)  # first sentence: context
        total += float(_token_nll(logits, targets, IGNORE_INDEX).sum())
        tokens += int((targets != IGNORE_INDEX).sum())
    return _result(total, tokens)


def compare_sllm_baseline(sllm_path, baseline_path=None, n_passages: int = 0, log=print,
                          text: TextSource = VALIDATION) -> dict:
    """baseline_path None: the baseline/ of the export folder `sllm_path` (models/default). `text`: what
    is scored, the SLLM run's validation split or any text, cut into passages with the SLLM's own
    tokenizer and segmentation."""
    sllm = load_sllm(sllm_path)
    base = load_baseline(sllm_path if baseline_path is None else baseline_path)
    if sllm.tokenizer.to_json_str() != base.tokenizer.to_json_str():
        raise ConfigError(f"the SLLM ({sllm.path}, vocab {sllm.tokenizer.vocab_size}) and the baseline ({base.path}, "
                          f"vocab {base.tokenizer.vocab_size}) use different tokenizers: their PPLs would not compare")
    data_cfg = text.data_config(sllm.run.data, sllm.tokenizer_dir or sllm.path)
    val = prepare_validation_passages(data_cfg, sllm.model.svae.cfg.max_sentence_tokens, log=log)
    # n_passages: spread evenly over the text (its first ones may all be of one source)
    index = (np.arange(len(val)) if n_passages <= 0 or n_passages >= len(val) else
             np.unique(np.linspace(0, len(val) - 1, num=n_passages).astype(np.int64)))
    tok = base.tokenizer
    s = sllm_token_nll(sllm.model, val, index, 8)
    b = baseline_token_nll(base.model, val, index, 8, tok.pad_id, tok.bos_id)
    assert s["tokens"] == b["tokens"], "scored token sets differ"
    if s["tokens"] == 0:
        raise CorpusError(f"{text.label}: nothing to score; the PPL counts the sentences after the first of each "
                          "passage, and no passage has two")
    return {"passages": int(len(index)), "text": text.label, "sllm": {**s, "checkpoint": str(sllm.path)},
            "baseline": {**b, "checkpoint": str(base.path)}}


def render_comparison(result: dict) -> str:
    s, b = result["sllm"], result["baseline"]
    label = result.get("text", VALIDATION.label)
    lines = [
        f"{label[:1].upper()}{label[1:]}: {result['passages']} passages, {int(s['tokens'])} scored tokens "
        "(sentences 2..n of each passage)",
        "",
        "| model | token NLL | PPL | checkpoint |",
        "|---|---|---|---|",
        f"| SLLM | {s['loss']:.4f} | {s['ppl']:.2f} | {s['checkpoint']} |",
        f"| baseline OPT | {b['loss']:.4f} | {b['ppl']:.2f} | {b['checkpoint']} |",
        "",
        f"SLLM decoder loss per target (tokens + eos): {s['decode_loss']:.4f}; stop-flag accuracy {s['stop_accuracy']:.3f}",
    ]
    return "\n".join(lines) + "\n"
