"""`sllm-train prepare`: a corpus in, a prepared dataset out (the format is in `shards`). Torch-free.

Streaming: the corpus is read one document at a time, twice for the split plan (`split`) and once
to write it; workers get about TASK_CHARS of text at a time, at most two pieces each in flight, and
the parent appends their arrays to the shard files. Memory stays flat whatever the corpus size
(but for the split plan's 40 bytes per validation document).

Deterministic: shards end at fixed places of the corpus (the first document boundary past
`shard_mb` of text) and the parent writes results in corpus order, so the files are byte-identical
for any number of workers. Resumable: a shard folder appears whole or not at all; a restart checks
the finished ones against their hashes and continues after the last good one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, count
from pathlib import Path

import numpy as np

from sllm.runtime.artifacts import resolve_checkpoint
from sllm.runtime.files import sha256_file
from sllm.sentences.segment import SEGMENTATION_VERSION
from sllm.sentences.tokenizer import SentenceTokenizer, train_bpe
from sllm.training.data.corpus import CorpusError, Position, corpus_files, iter_documents
from sllm.training.data.shards import (
    ARRAYS,
    FORMAT,
    MANIFEST,
    PREPARE_RECORD,
    SHARDS_DIR,
    SPLITS,
    VERSION,
    DatasetError,
    ShardWriter,
    SplitPart,
    shard_name,
    token_dtype,
    verify_shard,
    write_json,
)
from sllm.training.data.split import SplitPlan, plan_split
from sllm.training.data.units import document_units

TASK_CHARS = 1_000_000  # text per worker task: small enough to bound memory, large enough to amortise IPC


@dataclass
class PrepareConfig:
    """Everything a prepared dataset depends on; saved in its manifest."""

    corpus: list[str] = field(default_factory=list)  # files or folders; [] = the bundled corpus
    # tokenizer.json, a folder holding one, or a training run (its last checkpoint's); "" = train a
    # byte-level BPE of vocab_size on the training split
    tokenizer: str = ""
    vocab_size: int = 8192
    max_sentence_tokens: int = 64  # the model's sentence limit: longer sentences are cut, never truncated
    split_on_comma: bool = True
    # share of documents held out, per source; 1 = all of them: text to evaluate on, not to train on
    val_fraction: float = 0.02
    split_seed: int = 0
    max_passage_sentences: int = 64  # stage 2 / baseline passages
    max_passage_tokens: int = 1000
    max_documents: int = 0  # read only the corpus's first N documents; 0 = all
    only_val: bool = False  # the validation split alone (what an evaluation reads): no training tokens
    shard_mb: float = 256.0  # text per shard, in millions of characters

    def validate(self) -> None:
        if not 0 <= self.val_fraction <= 1:
            raise DatasetError(f"val_fraction must be in [0, 1], got {self.val_fraction}")
        if self.val_fraction >= 1 and not self.tokenizer:
            raise DatasetError("val_fraction=1 holds out every document: no training text to train a tokenizer on; "
                               "give the model's (--tokenizer)")
        if min(self.max_sentence_tokens, self.max_passage_sentences, self.max_passage_tokens) < 1:
            raise DatasetError("max_sentence_tokens, max_passage_sentences and max_passage_tokens must be positive")
        if self.shard_mb <= 0 or self.max_documents < 0:
            raise DatasetError("shard_mb must be positive and max_documents >= 0")

    @classmethod
    def for_run(cls, data, max_sentence_tokens: int) -> "PrepareConfig":
        """The preparation a run's DataConfig asks for (the sentence limit is its model's)."""
        return cls(corpus=list(data.corpus), tokenizer=data.tokenizer, vocab_size=data.vocab_size,
                   max_sentence_tokens=max_sentence_tokens, split_on_comma=data.split_on_comma,
                   val_fraction=data.val_fraction, split_seed=data.split_seed,
                   max_passage_sentences=data.max_passage_sentences, max_passage_tokens=data.max_passage_tokens)

    def settings(self) -> dict:
        """What the content depends on besides the inputs' and the tokenizer's bytes (paths left out:
        a moved corpus is the same corpus)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("corpus", "tokenizer")}


def tokenizer_dir(path: str) -> Path:
    """A tokenizer file or folder as given; a training run (its `latest` file) means its last checkpoint."""
    p = Path(path)
    if p.is_dir() and (p / "latest").is_file():
        return resolve_checkpoint(p)
    return p


def tokenizer_sha256(tok: SentenceTokenizer) -> str:
    return hashlib.sha256(tok.to_json_str().encode()).hexdigest()


def prepare_dataset(cfg: PrepareConfig, out: Path, workers: int = 0, log=print, wait: bool = False,
                    verify: bool = True) -> Path:
    """Prepare (or finish preparing) `cfg`'s corpus into `out`. workers <= 0: one per CPU core.
    wait: queue behind another process preparing `out` instead of failing. verify: re-hash the
    shards of a dataset that is already complete."""
    cfg.validate()
    out = Path(out)
    with _locked(out, wait):
        files = corpus_files(cfg.corpus)
        inputs = [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files]
        record, plan, tok = _start(cfg, out, files, inputs, log)
        if (out / MANIFEST).is_file():
            manifest = json.loads((out / MANIFEST).read_text())
            if manifest.get("prepare") == _record_id(record) and (
                    not verify or all(verify_shard(out / SHARDS_DIR / s["name"]) for s in manifest["shards"])):
                log(f"{out}: already prepared")
                return out
            (out / MANIFEST).unlink()
        done = _whole_shards(out, log)
        start, ordinal = Position(), 0
        if done:
            end = done[-1]["end"]
            start, ordinal = Position(end["file"], end["line"]), end["document"]
            log(f"{out}: {len(done)} shard(s) already written and verified; continuing at document {ordinal}")
        n_tasks = max(1, -(-int(plan.chars * (cfg.val_fraction if cfg.only_val else 1)) // TASK_CHARS))
        workers = max(1, min(workers if workers > 0 else (os.cpu_count() or 1), n_tasks))
        t0 = time.perf_counter()
        done += _write_shards(out, files, plan, cfg, tok, len(done), start, ordinal, workers, log)
        manifest = _manifest(record, done)
        write_json(out / MANIFEST, manifest)
        c = manifest["counts"]
        log(f"{out}: {len(done)} shard(s); train {c['train']['documents']} documents, {c['train']['sentences']} "
            f"sentences, {c['train']['tokens']} tokens; validation {c['val']['documents']} documents, "
            f"{c['val']['sentences']} sentences, {c['val']['tokens']} tokens ({time.perf_counter() - t0:.1f} s to "
            f"write, {workers} worker(s))")
    return out


def cache_path(cfg: PrepareConfig, cache_dir: Path) -> Path:
    """Where `cached_dataset` keeps the dataset of `cfg`: a hash of the settings, inputs and tokenizer."""
    tok_id = tokenizer_sha256(SentenceTokenizer.load(tokenizer_dir(cfg.tokenizer))) if cfg.tokenizer else "bpe"
    ident = {"format": VERSION, "segmentation": SEGMENTATION_VERSION, "settings": cfg.settings(),
             "inputs": [sha256_file(f) for f in corpus_files(cfg.corpus)], "tokenizer": tok_id}
    return Path(cache_dir) / f"dataset-{hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]}"


def cached_dataset(cfg: PrepareConfig, cache_dir: Path, workers: int = 0, log=print) -> Path:
    """The dataset of `cfg` in `cache_dir`, prepared on first use (a training run without data.dataset)."""
    out = cache_path(cfg, cache_dir)
    if (out / MANIFEST).is_file():
        return out
    log(f"preparing the corpus into {out} (once; `sllm-train prepare` does this ahead of training)")
    return prepare_dataset(cfg, out, workers, log, wait=True, verify=False)


# ---------------------------------------------------------------- the steps

@contextlib.contextmanager
def _locked(folder: Path, wait: bool):
    """One preparer per folder (torchrun's ranks, two commands): an flock on folder/.lock."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; do not run two preparations of one folder at once
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise DatasetError(f"{folder} is being prepared by another process") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _documents(files: list[Path], max_documents: int):
    for i, (doc, _) in enumerate(iter_documents(files)):
        if max_documents and i >= max_documents:
            return
        yield doc


def _start(cfg: PrepareConfig, out: Path, files: list[Path], inputs: list[dict], log):
    """(prepare.json's record, split plan, tokenizer): a resumed preparation's own, checked against
    `cfg` and the inputs; else planned, trained or loaded, and written to `out`."""
    path = out / PREPARE_RECORD
    if path.is_file():
        record = json.loads(path.read_text())
        mine = {"settings": cfg.settings(), "segmentation_version": SEGMENTATION_VERSION,
                "inputs": [(i["bytes"], i["sha256"]) for i in inputs]}
        theirs = {"settings": record["settings"], "segmentation_version": record["segmentation_version"],
                  "inputs": [(i["bytes"], i["sha256"]) for i in record["inputs"]]}
        for key in mine:
            if mine[key] != theirs[key]:
                if key == "settings":
                    detail = ", ".join(f"{k}={theirs[key].get(k)!r} there, {v!r} now" for k, v in mine[key].items()
                                       if theirs[key].get(k) != v)
                else:
                    detail = "the corpus files differ" if key == "inputs" else f"{theirs[key]} there, {mine[key]} now"
                raise DatasetError(f"{out} holds a preparation with other {key.replace('_', ' ')} ({detail}): "
                                   "use another folder or delete it")
        tok = SentenceTokenizer.load(out)
        if cfg.tokenizer and tokenizer_sha256(SentenceTokenizer.load(tokenizer_dir(cfg.tokenizer))) != \
                record["tokenizer"]["sha256"]:
            raise DatasetError(f"{out} was prepared with another tokenizer than {cfg.tokenizer}: use another folder")
        if tokenizer_sha256(tok) != record["tokenizer"]["sha256"]:
            raise DatasetError(f"{out}/tokenizer.json was changed after the preparation started: delete {out}")
        return record, SplitPlan.from_dict(record["plan"]), tok
    ours = {".lock", SHARDS_DIR, "tokenizer.json", "tokenizer_meta.json"}  # what a killed start leaves
    strangers = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
    if strangers:
        raise DatasetError(f"{out} holds other files ({', '.join(strangers[:5])}): prepare into a new or empty folder")
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    t0 = time.perf_counter()
    plan = plan_split(lambda: _documents(files, cfg.max_documents), cfg.val_fraction, cfg.split_seed)
    if plan.documents == 0:
        raise CorpusError(f"the corpus is empty: no text in {', '.join(map(str, files))}")
    log(f"split: {plan.documents} documents ({plan.chars / 1e6:.1f} M characters) in {len(plan.sources)} source(s) "
        f"planned in {time.perf_counter() - t0:.1f} s")
    if cfg.tokenizer:
        tok = SentenceTokenizer.load(tokenizer_dir(cfg.tokenizer))
        source = str(cfg.tokenizer)
    else:
        t0 = time.perf_counter()
        train_texts = (d.text for i, d in enumerate(_documents(files, cfg.max_documents)) if not plan.is_val(d, i))
        tok = train_bpe(train_texts, vocab_size=cfg.vocab_size)
        source = f"byte-level BPE trained here on the training split (vocab_size {cfg.vocab_size})"
        log(f"tokenizer: {source}, {time.perf_counter() - t0:.1f} s")
    tok.save(out)
    record = {"format": FORMAT, "version": VERSION, "settings": cfg.settings(), "corpus": list(cfg.corpus),
              "segmentation_version": SEGMENTATION_VERSION, "inputs": inputs, "plan": plan.to_dict(),
              "tokenizer": {"sha256": tokenizer_sha256(tok), "source": source, "vocab_size": tok.vocab_size,
                            "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id}}
    write_json(path, record)
    return record, plan, tok


def _record_id(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _whole_shards(out: Path, log) -> list[dict]:
    """The verified records of shards 0, 1, ... up to the first missing or damaged one; that one,
    any after it and half-written hidden folders are removed."""
    folder = out / SHARDS_DIR
    records: list[dict] = []
    for i in count():
        record = verify_shard(folder / shard_name(i)) if (folder / shard_name(i)).is_dir() else None
        if record is None:
            if (folder / shard_name(i)).exists():
                log(f"{folder / shard_name(i)} fails its hashes: writing it again")
            break
        records.append(record)
    keep = {shard_name(i) for i in range(len(records))}
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return records


def _write_shards(out: Path, files: list[Path], plan: SplitPlan, cfg: PrepareConfig, tok: SentenceTokenizer,
                  first: int, start: Position, ordinal: int, workers: int, log) -> list[dict]:
    dtype = token_dtype(tok.vocab_size)
    shard_chars = max(1, int(cfg.shard_mb * 1e6))
    records: list[dict] = []
    pending: deque = deque()  # ("task", shard, future) and ("end", shard, record), in corpus order
    writer: ShardWriter | None = None
    t_shard = time.perf_counter()

    def drain(limit: int) -> None:
        nonlocal writer, t_shard
        while len(pending) > limit:
            kind, index, payload = pending.popleft()
            if writer is None:
                writer = ShardWriter(out / SHARDS_DIR / shard_name(index), dtype)
            if kind == "task":
                for split, part in zip(SPLITS, payload.result()):
                    writer.add(split, part)
                continue
            record = writer.finish(payload)
            writer = None
            records.append(record)
            seconds = max(time.perf_counter() - t_shard, 1e-6)
            t_shard = time.perf_counter()
            c = record["counts"]
            log(f"shard {shard_name(index)}: {c['train']['documents'] + c['val']['documents']} documents, "
                f"{c['train']['tokens'] + c['val']['tokens']} tokens, {record['chars'] / 1e6 / seconds:.2f} MB/s "
                f"of text with {workers} worker(s)")

    settings = (cfg.max_sentence_tokens, cfg.split_on_comma, cfg.max_passage_sentences, cfg.max_passage_tokens)
    init = (tok.to_json_str(), tok.pad_id, tok.bos_id, tok.eos_id, settings, dtype.str, workers > 1)
    try:
        with _executor(workers, init) as pool:
            index, docs, task_chars, chars = first, [], 0, 0
            shard_start = {"file": start.file, "line": start.line, "document": ordinal}
            end = shard_start
            for doc, pos in iter_documents(files, start):
                if cfg.max_documents and ordinal >= cfg.max_documents:
                    break
                is_val = plan.is_val(doc, ordinal)
                ordinal += 1
                end = {"file": pos.file, "line": pos.line, "document": ordinal}
                if cfg.only_val and not is_val:
                    continue
                docs.append((doc.text, is_val))
                task_chars += len(doc.text)
                chars += len(doc.text)
                if task_chars >= TASK_CHARS or chars >= shard_chars:
                    pending.append(("task", index, pool.submit(_process, docs)))
                    docs, task_chars = [], 0
                if chars >= shard_chars:
                    pending.append(("end", index, {"index": index, "start": shard_start, "end": end, "chars": chars}))
                    index, shard_start, chars = index + 1, end, 0
                drain(2 * workers)
            if docs:
                pending.append(("task", index, pool.submit(_process, docs)))
            if chars:
                pending.append(("end", index, {"index": index, "start": shard_start, "end": end, "chars": chars}))
            drain(0)
    except BaseException:
        if writer is not None:
            writer.abandon()
        for item in pending:
            if isinstance(item[2], Future):
                item[2].cancel()
        raise
    return records


def _manifest(record: dict, shards: list[dict]) -> dict:
    counts = {s: {a: sum(r["counts"][s][a] for r in shards) for a in ARRAYS} for s in SPLITS}
    longest = {s: {k: max((r["longest"][s][k] for r in shards), default=0) for k in ("sentence", "passage")}
               for s in SPLITS}
    body = {"format": FORMAT, "version": VERSION, "prepare": _record_id(record), "settings": record["settings"],
            "corpus": record["corpus"], "segmentation_version": record["segmentation_version"],
            "tokenizer": record["tokenizer"], "token_dtype": token_dtype(record["tokenizer"]["vocab_size"]).str,
            "inputs": record["inputs"], "counts": counts, "longest_tokens": longest,
            "shards": [{"name": shard_name(r["index"]), "files": r["files"], "counts": r["counts"],
                        "longest": r["longest"]} for r in shards]}
    ident = {k: body[k] for k in ("settings", "segmentation_version", "tokenizer", "shards")}
    body["dataset_id"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return body


# ---------------------------------------------------------------- workers

class _Inline:
    """The executor of a single worker: this process, no pickling."""

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _executor(workers: int, init: tuple):
    if workers == 1:
        _init_worker(*init[:-1], False)
        return _Inline()
    # spawn, not fork: the caller may be a training process with torch's threads running
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=init)


_WORKER: dict = {}


def _init_worker(tokenizer_json: str, pad: int, bos: int, eos: int, settings: tuple, dtype: str,
                 one_thread: bool) -> None:
    if one_thread:  # one process per core already: tokenizers' own thread pool would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER.update(tok=SentenceTokenizer(Tokenizer.from_str(tokenizer_json), pad, bos, eos), settings=settings,
                   dtype=np.dtype(dtype))


def _process(docs: list[tuple[str, bool]]) -> tuple[SplitPart, SplitPart]:
    """Segment and tokenize a run of documents: (its training part, its validation part)."""
    tok, (max_tokens, comma, max_s, max_t), dtype = _WORKER["tok"], _WORKER["settings"], _WORKER["dtype"]
    acc = {s: ([], [], [], []) for s in SPLITS}  # sentence ids, paragraph ends, document sizes, passage sizes
    for text, is_val in docs:
        ids, para_end, passages = document_units(text, tok, max_tokens, comma, max_s, max_t)
        a = acc["val" if is_val else "train"]
        a[0].extend(ids)
        a[1].extend(para_end)
        a[2].append(len(ids))
        a[3].extend(passages)
    parts = []
    for s in SPLITS:
        ids, para_end, doc_sizes, passages = acc[s]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        parts.append(SplitPart(np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum())), lengths,
                               np.array(para_end, dtype=bool), np.array(doc_sizes, dtype=np.int64),
                               np.array(passages, dtype=np.int64)))
    return parts[0], parts[1]
