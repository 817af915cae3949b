"""Stage 2's and the baseline's data: the passages of a prepared dataset, served as padded batches.

A passage is a run of consecutive sentences of one document (`units`: at most
`max_passage_sentences` sentences and `max_passage_tokens` tokens); each sentence carries the
flag "ends a paragraph", the termination head's target. The SLLM and the baseline read the very
same passages and token ids: the baseline's sequence is bos + the passage's tokens, concatenated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sllm.sentences.limit import model_sentences
from sllm.sentences.tokenizer import SentenceTokenizer
from sllm.training.config import DataConfig
from sllm.training.data.corpus import Document
from sllm.training.data.dataset import Passages, PreparedDataset
from sllm.training.data.sentence_data import SentenceTokens, open_dataset, tokenize_sentences
from sllm.training.data.units import cut_passages, paragraph_ends


@dataclass
class PreparedPassages:
    tokenizer: SentenceTokenizer
    train: Passages
    val: Passages
    dataset: PreparedDataset


def prepare_passages(cfg: DataConfig, max_tokens: int, log=print) -> PreparedPassages:
    """The run's dataset (prepared on first use), its tokenizer and both splits' passages."""
    ds = open_dataset(cfg, max_tokens, log, passages=True)
    log(ds.describe())
    val = ds.passages("val")
    if len(val) == 0:
        log("warning: the validation split has no passages")
    return PreparedPassages(ds.tokenizer, ds.passages("train"), val, ds)


def prepare_validation_passages(cfg: DataConfig, max_tokens: int, log=print) -> Passages:
    """The validation passages only."""
    return open_dataset(cfg, max_tokens, log, passages=True, val_only=True).passages("val")


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
    items = [p.passage(int(i)) for i in index]  # (tokens, sentence offsets, para_end) each
    B, T = len(items), max(len(para_end) for _, _, para_end in items)
    L = max(int(np.diff(offsets).max()) for _, offsets, _ in items)
    ids = np.full((B, T, L), pad_id, dtype=np.int64)
    lengths = np.zeros((B, T), dtype=np.int64)
    para_end = np.zeros((B, T), dtype=bool)
    for b, (tokens, offsets, ends) in enumerate(items):
        for t in range(len(ends)):
            a, e = offsets[t], offsets[t + 1]
            ids[b, t, : e - a] = tokens[a:e]
            lengths[b, t] = e - a
        para_end[b, : len(ends)] = ends
    lengths_t = torch.from_numpy(lengths)
    token_mask = torch.arange(L)[None, None, :] < lengths_t[:, :, None]
    return PassageBatch(torch.from_numpy(ids), token_mask, lengths_t > 0, torch.from_numpy(para_end))


def collate_token_sequences(p: Passages, index: np.ndarray, pad_id: int, bos_id: int):
    """The baseline's view of the same passages: ids [B, 1+N] = bos + all sentence tokens (right-padded),
    mask [B, 1+N], first_end [B] = index just past the first sentence (bos + its tokens)."""
    items = [p.passage(int(i)) for i in index]
    counts = np.array([len(tokens) for tokens, _, _ in items], dtype=np.int64)
    ids = np.full((len(index), 1 + int(counts.max())), pad_id, dtype=np.int64)
    ids[:, 0] = bos_id
    first_end = np.zeros(len(index), dtype=np.int64)
    for b, (tokens, offsets, _) in enumerate(items):
        ids[b, 1 : 1 + len(tokens)] = tokens
        first_end[b] = 1 + offsets[1]
    mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(1 + counts)[:, None]
    return torch.from_numpy(ids), mask, torch.from_numpy(first_end)


# ---------------------------------------------------------------- in memory (small users)

@dataclass
class DocumentPassages:
    """Passages of a few documents, in memory (bench, tests): the same cut as a prepared dataset's."""

    sentences: SentenceTokens  # every sentence of every passage, in order
    starts: np.ndarray  # int64 [P + 1]: passage p is sentences starts[p]:starts[p+1]
    para_end: np.ndarray  # bool [N sentences]: the sentence ends a paragraph (stop target)

    def __len__(self) -> int:
        return len(self.starts) - 1


def build_passages(docs: list[Document], tok: SentenceTokenizer, max_tokens: int, split_on_comma: bool,
                   max_sentences: int, max_passage_tokens: int) -> DocumentPassages:
    texts: list[str] = []
    para_end: list[bool] = []
    sizes: list[int] = []
    for doc in docs:
        pieces = model_sentences(doc.text, tok, max_tokens, split_on_comma)
        texts.extend(pieces)
        para_end.extend(paragraph_ends(pieces))
        sizes.extend(cut_passages([len(ids) for ids in tok.encode_batch(pieces)], max_sentences, max_passage_tokens)
                     if pieces else [])
    sentences = tokenize_sentences(texts, tok)
    if len(sentences) != len(texts):
        raise ValueError("a non-blank sentence encoded to no tokens")  # the tokenizer is byte-level: cannot happen
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
    return DocumentPassages(sentences, starts, np.array(para_end, dtype=bool))
