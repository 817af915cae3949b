"""Sentences as token ids, cached on disk, served in length-bucketed batches.

The whole corpus is segmented and tokenized once (seconds for the bundled
20 MB) and kept as one flat int32 array plus offsets. Batches are built per
epoch from a seeded permutation, so (seed, epoch, batch index) is enough to
resume exactly where a run stopped.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sllm.sentences.limit import model_sentences
from sllm.sentences.segment import SEGMENTATION_VERSION
from sllm.sentences.tokenizer import SentenceTokenizer, train_bpe
from sllm.training.checkpoint import resolve_checkpoint
from sllm.training.config import DataConfig
from sllm.training.data.corpus import Document, load_documents, split_documents

CACHE_FORMAT = 1


@dataclass
class SentenceTokens:
    """N sentences: sentence i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int32 [total_tokens]
    offsets: np.ndarray  # int64 [N + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sentence(self, i: int) -> list[int]:
        return self.ids[self.offsets[i] : self.offsets[i + 1]].tolist()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=self.ids, offsets=self.offsets)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "SentenceTokens":
        with np.load(path) as z:
            return cls(ids=z["ids"], offsets=z["offsets"])


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


def _fingerprint(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _corpus_fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.source}\0{d.doc_id}\0{len(d.text)}\0".encode())
        h.update(d.text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


@dataclass
class PreparedData:
    tokenizer: SentenceTokenizer
    train: SentenceTokens
    val: SentenceTokens
    val_sentences: list[str]


@dataclass
class SplitCorpus:
    """The corpus split by document, its tokenizer, and a cache key prefix for derived data."""

    train_docs: list[Document]
    val_docs: list[Document]
    tokenizer: SentenceTokenizer
    cache: Path
    key: str  # changes with the corpus, the tokenizer, the segmentation and the split


def _tokenizer_dir(path: str) -> Path:
    """A tokenizer file or dir as given; a training run dir (its `latest` file) means its last checkpoint."""
    p = Path(path)
    if p.is_dir() and (p / "latest").is_file():
        return resolve_checkpoint(p)
    return p


def load_split_corpus(cfg: DataConfig, max_tokens: int, log=print) -> SplitCorpus:
    """Load the corpus, split it by document, and load (or train and cache) the tokenizer."""
    docs = load_documents(cfg.corpus or None)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed)
    corpus_id = _corpus_fingerprint(docs)
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    if cfg.tokenizer:
        tok = SentenceTokenizer.load(_tokenizer_dir(cfg.tokenizer))
    else:
        tok_dir = cache / f"tokenizer-{_fingerprint(corpus_id, str(cfg.vocab_size), str(cfg.val_fraction), str(cfg.split_seed))}"
        if (tok_dir / "tokenizer.json").is_file():
            tok = SentenceTokenizer.load(tok_dir)
        else:
            log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on {len(train_docs)} documents")
            tok = train_bpe((d.text for d in train_docs), vocab_size=cfg.vocab_size)
            tok.save(tok_dir)

    tok_id = hashlib.sha256(json.dumps(tok.to_json_str()).encode()).hexdigest()[:16]
    key = _fingerprint(str(CACHE_FORMAT), corpus_id, tok_id, SEGMENTATION_VERSION, str(cfg.split_on_comma),
                       str(max_tokens), str(cfg.val_fraction), str(cfg.split_seed))
    return SplitCorpus(train_docs, val_docs, tok, cache, key)


def _split_tokens(corpus: SplitCorpus, name: str, cfg: DataConfig, max_tokens: int,
                  log=print) -> tuple[SentenceTokens, list[str]]:
    """One split ("train" or "val") tokenized (cached): its tokens, and its sentence texts (val only)."""
    part = corpus.train_docs if name == "train" else corpus.val_docs
    path = corpus.cache / f"sentences-{corpus.key}-{name}.npz"
    text_path = corpus.cache / f"sentences-{corpus.key}-{name}.json"
    if path.is_file() and text_path.is_file():
        tokens = SentenceTokens.load(path)
        texts = json.loads(text_path.read_text())
    else:
        texts = segment_documents(part, corpus.tokenizer, max_tokens, cfg.split_on_comma)
        tokens = tokenize_sentences(texts, corpus.tokenizer)
        tokens.save(path)
        text_path.write_text(json.dumps(texts if name == "val" else []))
    log(f"{name}: {len(part)} documents, {len(tokens)} sentences, {int(tokens.offsets[-1])} tokens")
    return tokens, texts


def prepare_data(cfg: DataConfig, max_tokens: int, log=print) -> PreparedData:
    """Load the corpus, split it, get a tokenizer, and tokenize both splits (cached)."""
    corpus = load_split_corpus(cfg, max_tokens, log)
    train, _ = _split_tokens(corpus, "train", cfg, max_tokens, log)
    val, val_sentences = _split_tokens(corpus, "val", cfg, max_tokens, log)
    return PreparedData(corpus.tokenizer, train, val, val_sentences)


def prepare_validation(cfg: DataConfig, max_tokens: int, log=print) -> SentenceTokens:
    """The validation split only, tokenized (cached; the same files as prepare_data's): what an
    evaluation reads, without tokenizing the training split."""
    return _split_tokens(load_split_corpus(cfg, max_tokens, log), "val", cfg, max_tokens, log)[0]


# ---------------------------------------------------------------- batching

def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, bucket: bool) -> list[np.ndarray]:
    """The batches of one epoch, as index arrays; the same for every process."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).numpy()
    if bucket:
        # sort within windows of 64 batches: little padding, still random across windows
        window = batch_size * 64
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks])
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if bucket:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
    return batches


def collate(data: SentenceTokens, index: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, Lmax] right-padded with pad_id, mask [B, Lmax] (True = real token)."""
    lengths = data.lengths[index]
    ids = np.full((len(index), int(lengths.max())), pad_id, dtype=np.int64)
    for row, (i, n) in enumerate(zip(index, lengths)):
        ids[row, :n] = data.ids[data.offsets[i] : data.offsets[i] + n]
    ids_t = torch.from_numpy(ids)
    mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]
    return ids_t, mask
