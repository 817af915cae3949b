"""Passages for stage 2 (SLLM) and the token-level baseline: runs of consecutive sentences.

A document is segmented losslessly (whitespace and line breaks stay at the start of
the sentence that follows them) and cut into passages of at most
`max_passage_sentences` sentences and `max_passage_tokens` tokens. Each sentence
carries a flag: does it end a paragraph (the next sentence starts after a blank line,
or the document ends)? That flag is the termination head's target: an SLLM writes
one paragraph, then stops.

The SLLM and the baseline read the very same passages and token ids: the baseline's
sequence is bos + the passage's sentence tokens, concatenated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sllm.sentences.limit import model_sentences
from sllm.sentences.tokenizer import SentenceTokenizer
from sllm.training.config import DataConfig
from sllm.training.data.corpus import Document
from sllm.training.data.sentence_data import SentenceTokens, _fingerprint, load_split_corpus, tokenize_sentences


@dataclass
class Passages:
    sentences: SentenceTokens  # every sentence of every passage, in order
    starts: np.ndarray  # int64 [P + 1]: passage p is sentences starts[p]:starts[p+1]
    para_end: np.ndarray  # bool [N sentences]: the sentence ends a paragraph (stop target)

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def token_counts(self) -> np.ndarray:  # [P] tokens per passage
        return self.sentences.offsets[self.starts[1:]] - self.sentences.offsets[self.starts[:-1]]

    def save(self, path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=self.sentences.ids, offsets=self.sentences.offsets, starts=self.starts,
                 para_end=self.para_end)
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "Passages":
        with np.load(path) as z:
            return cls(SentenceTokens(z["ids"], z["offsets"]), z["starts"], z["para_end"])


def _ends_paragraph(next_sentence: str | None) -> bool:
    if next_sentence is None:
        return True
    lead = next_sentence[: len(next_sentence) - len(next_sentence.lstrip())]
    return lead.count("\n") >= 2


def build_passages(docs: list[Document], tok: SentenceTokenizer, max_tokens: int, split_on_comma: bool,
                   max_sentences: int, max_passage_tokens: int) -> Passages:
    texts: list[str] = []
    para_end: list[bool] = []
    doc_bounds = [0]
    for doc in docs:
        pieces = model_sentences(doc.text, tok, max_tokens, split_on_comma)
        texts.extend(pieces)
        para_end.extend(_ends_paragraph(pieces[i + 1] if i + 1 < len(pieces) else None) for i in range(len(pieces)))
        doc_bounds.append(len(texts))
    sentences = tokenize_sentences(texts, tok)
    if len(sentences) != len(texts):
        raise ValueError("a non-blank sentence encoded to no tokens")  # the tokenizer is byte-level: cannot happen
    lengths = sentences.lengths
    starts = [0]
    for a, b in zip(doc_bounds[:-1], doc_bounds[1:]):
        i, n_tok = a, 0
        for j in range(a, b):  # greedy cut: a new passage when either limit would be passed
            if j > i and (j - i >= max_sentences or n_tok + lengths[j] > max_passage_tokens):
                starts.append(j)
                i, n_tok = j, 0
            n_tok += int(lengths[j])
        if b > starts[-1]:
            starts.append(b)
    return Passages(sentences, np.array(starts, dtype=np.int64), np.array(para_end, dtype=bool))


@dataclass
class PreparedPassages:
    tokenizer: SentenceTokenizer
    train: Passages
    val: Passages


def _split_passages(corpus, name: str, cfg: DataConfig, max_tokens: int, log=print) -> Passages:
    """One split's passages ("train" or "val"), cached."""
    key = _fingerprint(corpus.key, "passages-v1", str(cfg.max_passage_sentences), str(cfg.max_passage_tokens))
    docs = corpus.train_docs if name == "train" else corpus.val_docs
    path = corpus.cache / f"passages-{key}-{name}.npz"
    if path.is_file():
        p = Passages.load(path)
    else:
        p = build_passages(docs, corpus.tokenizer, max_tokens, cfg.split_on_comma, cfg.max_passage_sentences,
                           cfg.max_passage_tokens)
        p.save(path)
    log(f"{name}: {len(docs)} documents, {len(p)} passages, {len(p.sentences)} sentences, "
        f"{int(p.sentences.offsets[-1])} tokens")
    return p


def prepare_passages(cfg: DataConfig, max_tokens: int, log=print) -> PreparedPassages:
    corpus = load_split_corpus(cfg, max_tokens, log)
    train = _split_passages(corpus, "train", cfg, max_tokens, log)
    val = _split_passages(corpus, "val", cfg, max_tokens, log)
    if len(val) == 0:
        log("warning: the validation split has no passages")
    return PreparedPassages(corpus.tokenizer, train, val)


def prepare_validation_passages(cfg: DataConfig, max_tokens: int, log=print) -> Passages:
    """The validation passages only (the same cache files as prepare_passages')."""
    return _split_passages(load_split_corpus(cfg, max_tokens, log), "val", cfg, max_tokens, log)


# ---------------------------------------------------------------- batches

@dataclass
class PassageBatch:
    ids: torch.Tensor  # [B, T, L] sentence tokens, right-padded
    token_mask: torch.Tensor  # [B, T, L] True = real token
    sentence_mask: torch.Tensor  # [B, T] True = real sentence
    para_end: torch.Tensor  # [B, T] True = the sentence ends a paragraph

    def to(self, device) -> "PassageBatch":
        return PassageBatch(*(t.to(device) for t in (self.ids, self.token_mask, self.sentence_mask, self.para_end)))


def collate_passages(p: Passages, index: np.ndarray, pad_id: int) -> PassageBatch:
    counts = p.starts[index + 1] - p.starts[index]  # [B] sentences
    B, T = len(index), int(counts.max())
    L = max(int(p.sentences.lengths[p.starts[i] : p.starts[i + 1]].max()) for i in index)
    ids = np.full((B, T, L), pad_id, dtype=np.int64)
    lengths = np.zeros((B, T), dtype=np.int64)
    para_end = np.zeros((B, T), dtype=bool)
    for b, i in enumerate(index):
        for t, s in enumerate(range(p.starts[i], p.starts[i + 1])):
            a, e = p.sentences.offsets[s], p.sentences.offsets[s + 1]
            ids[b, t, : e - a] = p.sentences.ids[a:e]
            lengths[b, t] = e - a
        para_end[b, : counts[b]] = p.para_end[p.starts[i] : p.starts[i + 1]]
    lengths_t = torch.from_numpy(lengths)
    token_mask = torch.arange(L)[None, None, :] < lengths_t[:, :, None]
    return PassageBatch(torch.from_numpy(ids), token_mask, lengths_t > 0, torch.from_numpy(para_end))


def collate_token_sequences(p: Passages, index: np.ndarray, pad_id: int, bos_id: int):
    """The baseline's view of the same passages: ids [B, 1+N] = bos + all sentence tokens (right-padded),
    mask [B, 1+N], first_end [B] = index just past the first sentence (bos + its tokens)."""
    counts = p.token_counts[index]
    ids = np.full((len(index), 1 + int(counts.max())), pad_id, dtype=np.int64)
    ids[:, 0] = bos_id
    first_end = np.zeros(len(index), dtype=np.int64)
    for b, i in enumerate(index):
        a, e = p.sentences.offsets[p.starts[i]], p.sentences.offsets[p.starts[i + 1]]
        ids[b, 1 : 1 + e - a] = p.sentences.ids[a:e]
        first_end[b] = 1 + p.sentences.offsets[p.starts[i] + 1] - a
    mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(1 + counts)[:, None]
    return torch.from_numpy(ids), mask, torch.from_numpy(first_end)
