"""Stage 1's data: the sentences of a prepared dataset, served as padded batches.

A run reads the prepared dataset `data.dataset` (made by `sllm-train prepare`) or, without one,
prepares its corpus into `data.cache_dir` on first use. Either way training reads memory-mapped
token arrays, never text; which sentences form a batch is `sampler.EpochBatches`' business.
`segment_documents` and `tokenize_sentences` stay for small in-memory users (export, bench).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sllm.sentences.limit import model_sentences
from sllm.sentences.tokenizer import SentenceTokenizer
from sllm.training.config import DataConfig
from sllm.training.data.corpus import Document
from sllm.training.data.dataset import PreparedDataset, Sentences
from sllm.training.data.prepare import PrepareConfig, cache_path, cached_dataset, tokenizer_dir, tokenizer_sha256
from sllm.training.data.shards import MANIFEST, DatasetError


def open_dataset(cfg: DataConfig, max_tokens: int, log=print, passages: bool = False,
                 val_only: bool = False) -> PreparedDataset:
    """The run's prepared dataset: data.dataset, checked against the run's settings, or the corpus
    prepared into data.cache_dir (once). `passages`: the run also reads passages (stage 2, baseline).
    `val_only`: only the validation split is read (an evaluation), so without data.dataset a
    validation-only dataset is prepared, unless the whole one is already there."""
    if not cfg.dataset:
        prep = PrepareConfig.for_run(cfg, max_tokens)
        if val_only and not (cache_path(prep, cfg.cache_dir) / MANIFEST).is_file():
            prep.only_val = True  # minutes of tokenizing saved on a large corpus
        return PreparedDataset.open(cached_dataset(prep, cfg.cache_dir, log=log))
    ds = PreparedDataset.open(cfg.dataset)
    if ds.settings.get("only_val") and not val_only:
        raise DatasetError(f"{cfg.dataset} holds the validation split only: prepare the corpus without it for training")
    if cfg.corpus:
        raise DatasetError("data.corpus and data.dataset are both set: a prepared dataset's corpus was fixed when it "
                           "was prepared; leave data.corpus empty")
    wanted = {"max_sentence_tokens": max_tokens, "split_on_comma": cfg.split_on_comma,
              "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}
    if passages:
        wanted.update(max_passage_sentences=cfg.max_passage_sentences, max_passage_tokens=cfg.max_passage_tokens)
    for key, value in wanted.items():
        if ds.settings[key] != value:
            where = "the model's max_sentence_tokens" if key == "max_sentence_tokens" else f"data.{key}"
            raise DatasetError(f"{cfg.dataset} was prepared with {key}={ds.settings[key]!r} but this run has "
                               f"{where}={value!r}: change the run or prepare the corpus again with that setting")
    if cfg.tokenizer:
        if tokenizer_sha256(SentenceTokenizer.load(tokenizer_dir(cfg.tokenizer))) != ds.manifest["tokenizer"]["sha256"]:
            raise DatasetError(f"{cfg.dataset} was tokenized with another tokenizer than data.tokenizer="
                               f"{cfg.tokenizer}: prepare it with `sllm-train prepare --tokenizer {cfg.tokenizer}`")
    return ds


@dataclass
class PreparedData:
    tokenizer: SentenceTokenizer
    train: Sentences
    val: Sentences
    dataset: PreparedDataset


def prepare_data(cfg: DataConfig, max_tokens: int, log=print) -> PreparedData:
    """The run's dataset (prepared on first use), its tokenizer and both splits' sentences."""
    ds = open_dataset(cfg, max_tokens, log)
    log(ds.describe())
    return PreparedData(ds.tokenizer, ds.sentences("train"), ds.sentences("val"), ds)


def prepare_validation(cfg: DataConfig, max_tokens: int, log=print) -> Sentences:
    """The validation sentences only: what an evaluation reads."""
    return open_dataset(cfg, max_tokens, log, val_only=True).sentences("val")


def collate(data: Sentences, index: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, Lmax] right-padded with pad_id, mask [B, Lmax] (True = real token)."""
    lengths = data.lengths(index)
    ids = np.full((len(index), int(lengths.max())), pad_id, dtype=np.int64)
    for row, i in enumerate(index):
        ids[row, : lengths[row]] = data.tokens(int(i))
    mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]
    return torch.from_numpy(ids), mask


# ---------------------------------------------------------------- in memory (small users)

@dataclass
class SentenceTokens:
    """N sentences in memory: sentence i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int32 [total_tokens]
    offsets: np.ndarray  # int64 [N + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sentence(self, i: int) -> list[int]:
        return self.ids[self.offsets[i] : self.offsets[i + 1]].tolist()


def segment_documents(docs: list[Document], tok: SentenceTokenizer, max_tokens: int, split_on_comma: bool) -> list[str]:
    """All non-blank sentences of `docs`, each at most `max_tokens` tokens."""
    return [s for d in docs for s in model_sentences(d.text, tok, max_tokens, split_on_comma)]


def tokenize_sentences(sentences: list[str], tok: SentenceTokenizer) -> SentenceTokens:
    encoded = [ids for ids in tok.encode_batch(sentences) if ids]
    lengths = np.fromiter((len(x) for x in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in encoded for t in x), dtype=np.int32, count=int(offsets[-1]))
    return SentenceTokens(ids=flat, offsets=offsets)
