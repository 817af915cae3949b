"""Prepared datasets: `sllm-train prepare` (streaming split, parallel workers, shards, resume) and
training that reads them (memory-mapped, per-rank batches, exact resume, flat memory)."""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, tiny_overrides
from safetensors.torch import load_file

from sllm.sentences.tokenizer import SentenceTokenizer, train_bpe
from sllm.training.data import prepare as prep
from sllm.training.data import split as split_mod
from sllm.training.data.corpus import Document, load_documents, split_documents
from sllm.training.data.dataset import PreparedDataset
from sllm.training.data.passage_data import build_passages
from sllm.training.data.prepare import PrepareConfig, prepare_dataset
from sllm.training.data.sampler import EpochBatches, permute
from sllm.training.data.sentence_data import segment_documents, tokenize_sentences
from sllm.training.data.shards import DatasetError
from sllm.training.data.split import plan_split

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
QUIET = lambda *a, **k: None  # noqa: E731
WORDS = "the king a dog my sister people nation house river letter garden friend city book law song".split()


def _sentence(rng: random.Random, long: bool = False) -> str:
    n = rng.randint(40, 80) if long else rng.randint(3, 9)  # long: over any tiny sentence limit, cut in pieces
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice(".!?;,")


def write_corpus(folder: Path, docs: int = 40, seed: int = 0) -> Path:
    """Two JSON-lines files (one gzip'd, three sources, blank lines and a blank document among them)
    and two .txt files: paragraphs, long run-on sentences, documents of very different sizes."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def text() -> str:
        paragraphs = [" ".join(_sentence(rng, long=rng.random() < 0.05) for _ in range(rng.randint(1, 8)))
                      for _ in range(rng.randint(1, 6))]
        return "\n\n".join(paragraphs)

    with gzip.open(folder / "a.jsonl.gz", "wt") as f:
        for i in range(docs):
            f.write(json.dumps({"source": f"s{i % 3}", "doc": f"d{i % 17}", "text": text()}) + "\n")  # ids repeat
            if i == 5:
                f.write("\n" + json.dumps({"text": "   "}) + "\n")
    with open(folder / "b.jsonl", "w") as f:
        for i in range(docs // 2):
            f.write(json.dumps({"text": text()}) + "\n")
    for name in ("c", "d"):
        (folder / f"{name}.txt").write_text(text())
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_bpe((d.text for d in load_documents([str(corpus)])), vocab_size=300).save(out)
    return out


def _cfg(corpus: Path, **kw) -> PrepareConfig:
    base = dict(corpus=[str(corpus)], vocab_size=300, max_sentence_tokens=12, val_fraction=0.1,
                max_passage_sentences=6, max_passage_tokens=40, shard_mb=0.004)
    return PrepareConfig(**{**base, **kw})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------- the split

def _random_docs(rng: random.Random) -> list[Document]:
    sizes = {f"src{i}": rng.choice([1, 1, 2, 3, 7, 30, 120]) for i in range(rng.randint(1, 5))}
    docs = [Document(s, f"{s}-{rng.randint(0, n)}", "x") for s, n in sizes.items() for _ in range(n)]  # ids repeat
    rng.shuffle(docs)
    return docs


def test_the_streamed_split_is_split_documents(monkeypatch):
    """The two-pass plan holds out exactly the documents split_documents holds out (today's rule, so
    results stay comparable), also when its buffers are cut back many times and ids repeat."""
    monkeypatch.setattr(split_mod, "_CHUNK", 3)
    rng = random.Random(0)
    checked = 0
    for trial in range(60):
        docs = _random_docs(rng)
        for fraction, seed in ((0.02, 0), (0.3, 1), (0.0, 0), (0.6, trial)):
            plan = plan_split(lambda: iter(docs), fraction, seed)
            _, val = split_documents(docs, fraction, seed)
            held = [i for i, d in enumerate(docs) if plan.is_val(d, i)]
            expected = [i for i, d in enumerate(docs) if any(d is v for v in val)]
            assert held == expected, (trial, fraction, seed)
            checked += len(held)
    assert checked > 100
    bundled = load_documents(None)
    plan = plan_split(lambda: iter(bundled), 0.02, 0)
    assert [d for i, d in enumerate(bundled) if plan.is_val(d, i)] == split_documents(bundled, 0.02, 0)[1]


# ---------------------------------------------------------------- the dataset

def test_a_prepared_dataset_holds_what_the_in_memory_pipeline_makes(corpus, tmp_path, monkeypatch):
    """Sentences (segmented, cut to the limit, tokenized), passages and paragraph ends of both splits,
    across several shards, equal those of the in-memory pipeline the trainer used before. The views
    keep two shards mapped here (the open-file bound), so reading them unmaps and maps again."""
    from sllm.training.data import dataset as dataset_mod

    monkeypatch.setattr(dataset_mod, "_mapped_shards_limit", lambda: 2)
    logs: list[str] = []
    out = prepare_dataset(_cfg(corpus), tmp_path / "ds", workers=1, log=logs.append)
    ds = PreparedDataset.open(out)
    assert len(ds.manifest["shards"]) >= 3, "the test needs several shards"
    assert any(line.startswith("tokenizer: byte-level BPE trained here") for line in logs)
    tok = ds.tokenizer
    docs = load_documents([str(corpus)])
    train, val = split_documents(docs, 0.1, 0)
    assert tok.to_json_str() == train_bpe((d.text for d in train), vocab_size=300).to_json_str()
    for name, part in (("train", train), ("val", val)):
        ref = tokenize_sentences(segment_documents(part, tok, 12, True), tok)
        sentences = ds.sentences(name)
        assert len(sentences) == len(ref) > 0
        assert [sentences.sentence(i) for i in range(len(ref))] == [ref.sentence(i) for i in range(len(ref))]
        assert (sentences.lengths(np.arange(len(ref))[::-1]) == ref.lengths[::-1]).all()
        assert max(ref.lengths) == 12  # long sentences were cut to the limit
        p_ref = build_passages(part, tok, 12, True, 6, 40)
        passages = ds.passages(name)
        assert len(passages) == len(p_ref)
        index = np.arange(len(p_ref))
        assert (passages.sentence_counts(index) == np.diff(p_ref.starts)).all()
        assert (passages.token_counts(index) == np.add.reduceat(ref.lengths, p_ref.starts[:-1])).all()
        flags = np.concatenate([passages.passage(i)[2] for i in index])
        assert (flags == p_ref.para_end).all() and 0 < flags.mean() < 1
        tokens, offsets, _ = passages.passage(len(p_ref) - 1)
        assert tokens.tolist() == sum((ref.sentence(i) for i in range(p_ref.starts[-2], p_ref.starts[-1])), [])
        assert ds.manifest["counts"][name]["documents"] == len(part)
        assert sum(len(vars(sh)) > 2 for sh in sentences.shards) <= 2  # mapped: folder, split + arrays
    assert ds.manifest["token_dtype"] == "<u2" and ds.longest_passage_tokens("train") <= 40 + 12


def test_shards_are_identical_whatever_the_worker_count(corpus, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "TASK_CHARS", 1500)  # many tasks, so two workers really share them
    outs = {}
    for workers in (1, 2):
        logs: list[str] = []
        outs[workers] = prepare_dataset(_cfg(corpus, tokenizer=str(tokenizer_dir)), tmp_path / f"w{workers}",
                                        workers=workers, log=logs.append)
        assert any(f"with {workers} worker(s)" in line for line in logs), logs
    one, two = _files(outs[1]), _files(outs[2])
    assert one.keys() == two.keys() and len([k for k in one if k.endswith(".npy")]) >= 30
    assert [k for k in one if one[k] != two[k]] == []


KILL_IN_SHARD_2 = """
import os, sys
from sllm.training.data import shards
from sllm.training.data.prepare import PrepareConfig, prepare_dataset
real_add = shards.ShardWriter.add
def add(self, split, part):  # killed while writing the third shard (two are finished)
    if self.final.name == "00002":
        os._exit(9)
    real_add(self, split, part)
shards.ShardWriter.add = add
prepare_dataset(PrepareConfig(**{cfg!r}), sys.argv[1], workers=1, log=lambda *a: None)
"""


def test_a_killed_preparation_resumes_after_its_last_whole_shard(corpus, tokenizer_dir, tmp_path):
    """A kill mid-shard leaves two whole shards and a hidden half one; the next run keeps the whole
    ones (verified, not rewritten), drops the half one and ends byte-identical to an uninterrupted
    run. A shard damaged later fails its hash and is written again."""
    cfg = _cfg(corpus, tokenizer=str(tokenizer_dir))
    straight = prepare_dataset(cfg, tmp_path / "straight", workers=1, log=QUIET)
    out = tmp_path / "killed"
    script = KILL_IN_SHARD_2.format(cfg={k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-3000:]
    shards = out / "shards"
    names = sorted(p.name for p in shards.iterdir())
    assert names[1:] == ["00000", "00001"] and names[0].startswith(".00002.tmp-"), names
    assert not (out / "manifest.json").exists()
    kept = {p: p.stat().st_mtime_ns for p in (shards / "00000").iterdir()}

    logs: list[str] = []
    prepare_dataset(cfg, out, workers=1, log=logs.append)
    assert any("2 shard(s) already written and verified" in line for line in logs), logs
    assert {p: p.stat().st_mtime_ns for p in (shards / "00000").iterdir()} == kept
    assert _files(out) == _files(straight)

    tokens = shards / "00001" / "train.tokens.npy"
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash can tell
    tokens.write_bytes(bytes(data))
    logs.clear()
    prepare_dataset(cfg, out, workers=1, log=logs.append)
    assert any("00001 fails its hashes" in line for line in logs), logs
    assert _files(out) == _files(straight)
    with pytest.raises(DatasetError, match="damaged"):  # a reader checks sizes, not hashes: cut a file short
        (shards / "00000" / "val.passages.npy").write_bytes(b"")
        PreparedDataset.open(out)


def test_a_preparation_refuses_other_settings_other_inputs_and_strange_folders(corpus, tokenizer_dir, tmp_path):
    cfg = _cfg(corpus, tokenizer=str(tokenizer_dir))
    out = prepare_dataset(cfg, tmp_path / "ds", workers=1, log=QUIET)
    with pytest.raises(DatasetError, match="other settings"):
        prepare_dataset(_cfg(corpus, tokenizer=str(tokenizer_dir), val_fraction=0.2), out, log=QUIET)
    changed = write_corpus(tmp_path / "changed")
    (changed / "c.txt").write_text("Another text.")
    with pytest.raises(DatasetError, match="other inputs"):
        prepare_dataset(_cfg(changed, tokenizer=str(tokenizer_dir)), out, log=QUIET)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="holds other files"):
        prepare_dataset(cfg, tmp_path / "home", log=QUIET)
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"


def test_an_evaluation_prepares_the_validation_split_only(corpus, tokenizer_dir, tmp_path):
    """Without data.dataset, what reads only validation data (eval, compare, the exporter's stop
    threshold) prepares only that split, unless the whole dataset is in the cache already; a
    validation-only dataset cannot be trained on."""
    from sllm.training.config import DataConfig
    from sllm.training.data.passage_data import prepare_passages, prepare_validation_passages
    from sllm.training.data.sentence_data import prepare_validation

    data = DataConfig(corpus=[str(corpus)], tokenizer=str(tokenizer_dir), val_fraction=0.1,
                      cache_dir=str(tmp_path / "cache"), max_passage_sentences=6, max_passage_tokens=40)
    val = prepare_validation(data, 12, log=QUIET)
    only = PreparedDataset.open(next((tmp_path / "cache").iterdir()))
    assert only.settings["only_val"] and only.manifest["counts"]["train"]["tokens"] == 0
    full = prepare_passages(data, 12, log=QUIET)
    assert len(list((tmp_path / "cache").iterdir())) == 2 and not full.dataset.settings["only_val"]
    ref = full.dataset.sentences("val")
    assert [val.sentence(i) for i in range(len(val))] == [ref.sentence(i) for i in range(len(ref))]
    assert prepare_validation_passages(data, 12, log=QUIET).shards[0].folder.parent.parent == full.dataset.path
    with pytest.raises(DatasetError, match="validation split only"):
        prepare_passages(DataConfig(**{**data.__dict__, "corpus": [], "dataset": str(only.path)}), 12, log=QUIET)


def test_cli_prepare_then_errors_in_one_line(corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sllm.training.cli", "prepare"]
    ok = subprocess.run([*cmd, str(corpus), "--out", str(tmp_path / "ds"), "--vocab-size", "300",
                         "--max-sentence-tokens", "12", "--max-documents", "10", "--workers", "1"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-3000:]
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["counts"]["train"]["documents"] + manifest["counts"]["val"]["documents"] == 10
    assert manifest["settings"]["max_sentence_tokens"] == 12 and len(manifest["tokenizer"]["sha256"]) == 64
    for args, message in (([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")], "not found"),
                          ([str(corpus), "--out", str(tmp_path / "ds"), "--vocab-size", "400"], "other settings")):
        proc = subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr


# ---------------------------------------------------------------- batches

def test_the_epoch_order_is_a_permutation_that_needs_no_memory():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        for key in (0, 1, 12345):
            p = permute(np.arange(n), n, key)
            assert sorted(p.tolist()) == list(range(n))
            assert (permute(np.arange(n)[::-1], n, key) == p[::-1]).all()  # any position, in any order
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert (a != b).mean() > 0.9 and abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.15

    lengths = np.random.default_rng(0).integers(1, 60, size=1000)
    sampler = EpochBatches(1000, lambda i: lengths[i], batch_size=7, seed=3, bucket=True)
    assert len(sampler) == 142
    for epoch in (0, 1):
        batches = [sampler.batch(epoch, b) for b in range(len(sampler))]
        items = np.concatenate(batches)
        assert len(set(items.tolist())) == len(items) == 142 * 7  # each item at most once an epoch
        assert all((np.diff(lengths[b]) >= 0).all() for b in batches)  # bucketed: sorted within a batch
        spread = np.mean([np.ptp(lengths[b]) for b in batches])
        assert spread < 5, spread  # little padding (unsorted batches of 7 span ~45 tokens here)
        again = EpochBatches(1000, lambda i: lengths[i], batch_size=7, seed=3, bucket=True)
        assert all((again.batch(epoch, b) == batches[b]).all() for b in (141, 0, 70))  # any order, same batch
    assert not (sampler.batch(0, 0) == sampler.batch(1, 0)).all()


# ---------------------------------------------------------------- training on it

def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "sllm.training.cli", "svae", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_torchrun_training_on_a_prepared_dataset_resumes_exactly(corpus, tmp_path):
    """`sllm-train prepare`, then 2 DDP ranks train on data.dataset: stopped at step 3 and resumed, the
    run ends with the same weights, EMA and optimizer state as one never stopped; the checkpoint
    records each rank's next batch and the dataset; another dataset cannot resume it."""
    ds = tmp_path / "ds"
    subprocess.run([sys.executable, "-m", "sllm.training.cli", "prepare", str(corpus), "--out", str(ds),
                    "--vocab-size", "300", "--max-sentence-tokens", "16", "--val-fraction", "0.1",
                    "--shard-mb", "0.004", "--workers", "1"], check=True, capture_output=True, timeout=120)
    common = [o for o in tiny_overrides(corpus, tmp_path / "cache") if not o.startswith("data.corpus")] + [
        f"data.dataset={ds}", "train.max_steps=8", "train.save_every=100", "train.batch_size=4"]
    _torchrun(["--out", str(tmp_path / "straight"), *common])
    _torchrun(["--out", str(tmp_path / "resumed"), *common, "train.stop_at_step=3"])
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    manifest = json.loads((ds / "manifest.json").read_text())
    assert state["data"] == {"dataset_id": manifest["dataset_id"], "epoch": state["epoch"],
                             "next_batch": [state["pos"] * 2, state["pos"] * 2 + 1]}
    assert len(manifest["shards"]) >= 3
    assert "resumed from" in _torchrun(["--out", str(tmp_path / "resumed"), *common]).stderr
    for part in ("model", "ema", "optimizer"):
        a, b = (load_file(str(r / (r / "latest").read_text().strip() / f"{part}.safetensors"))
                for r in (tmp_path / "straight", tmp_path / "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert not (tmp_path / "cache").exists()  # it read the prepared dataset, prepared nothing itself

    from sllm.training.checkpoint import CheckpointError
    from sllm.training.cli import build_run_config
    from sllm.training.tasks.sentence_vae import SentenceVAETask
    from sllm.training.trainer import Trainer

    other = prepare_dataset(_cfg(corpus, tokenizer=str(ds), max_sentence_tokens=16, shard_mb=1.0), tmp_path / "other",
                            workers=1, log=QUIET)
    run = build_run_config(None, [o for o in common if not o.startswith("data.dataset")] + [
        f"data.dataset={other}", "train.max_steps=9"], str(tmp_path / "straight"))
    with pytest.raises(CheckpointError, match="trained on prepared dataset"):
        Trainer(SentenceVAETask(run, log=QUIET), run.train, run, log=QUIET).fit()
    bad = build_run_config(None, common + ["model.max_sentence_tokens=20"], str(tmp_path / "x"))
    with pytest.raises(DatasetError, match="max_sentence_tokens=16"):
        SentenceVAETask(bad, log=QUIET)


SYNTHETIC_SHARD_SENTENCES = 500_000


def _synthetic_dataset(out: Path, tok: SentenceTokenizer, shards: int) -> Path:
    """A prepared dataset of random tokens written by the real shard writer (preparing text of this
    size would take minutes): 8-token sentences, 10-sentence passages, 50-sentence documents."""
    from sllm.training.data.shards import ShardWriter, SplitPart, shard_name, token_dtype, write_json

    rng = np.random.default_rng(0)
    records = []
    for s in range(shards):
        writer = ShardWriter(out / "shards" / shard_name(s), token_dtype(tok.vocab_size))
        for split, n in (("train", SYNTHETIC_SHARD_SENTENCES), ("val", 2000)):
            para_end = np.zeros(n, dtype=bool)
            para_end[4::5] = True
            writer.add(split, SplitPart(rng.integers(3, tok.vocab_size, n * 8).astype(np.uint16), np.full(n, 8),
                                        para_end, np.full(n // 50, 50), np.full(n // 10, 10)))
        records.append(writer.finish({"index": s, "start": {}, "end": {}, "chars": 0}))
    tok.save(out)
    record = {"settings": {**PrepareConfig(max_sentence_tokens=16, val_fraction=0.1).settings()},
              "corpus": ["synthetic"], "segmentation_version": "synthetic", "inputs": [],
              "tokenizer": {"sha256": prep.tokenizer_sha256(tok), "vocab_size": tok.vocab_size}}
    write_json(out / "manifest.json", prep._manifest(record, records))
    return out


MEASURE_TRAINING = textwrap.dedent("""
    import json, sys, threading, time
    from sllm.training.cli import build_run_config
    from sllm.training.tasks.sentence_vae import SentenceVAETask
    from sllm.training.trainer import Trainer

    def rss_anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    peak, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.005)
    threading.Thread(target=sample, daemon=True).start()
    run = build_run_config(None, json.loads(sys.argv[1]), sys.argv[2])
    task = SentenceVAETask(run, log=lambda *a: None)
    Trainer(task, run.train, run, log=lambda *a: None).fit()
    done.set()
    print(json.dumps({"peak_anon": max(peak[0], rss_anon()), "sentences": len(task.data.train)}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
def test_training_memory_does_not_grow_with_the_dataset(tmp_path):
    """The same run on 0.5 M and 4 M training sentences (8 and 64 MB of tokens, 4 and 32 MB of
    sentence offsets): the process's own (anonymous) memory peaks within a few MB; loading the
    tokens and offsets, or one epoch's order, would add ~100 MB. Mapped shard pages are page cache."""
    tok = train_bpe(["The king sees the river. My sister finds a letter."] * 20, vocab_size=280)
    peaks = {}
    for shards in (1, 8):
        ds = _synthetic_dataset(tmp_path / f"ds{shards}", tok, shards)
        overrides = [f"data.dataset={ds}", "data.val_fraction=0.1", "model.d_model=32", "model.n_heads=2",
                     "model.ffn_dim=64", "model.max_sentence_tokens=16", "train.batch_size=64", "train.max_steps=40",
                     "train.warmup_steps=2", "train.log_every=10", "train.save_every=40", "train.eval_every=0",
                     "train.eval_batches=2", "train.threads=1"]
        proc = subprocess.run([sys.executable, "-c", MEASURE_TRAINING, json.dumps(overrides),
                               str(tmp_path / f"r{shards}")], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["sentences"] == shards * SYNTHETIC_SHARD_SENTENCES
        peaks[shards] = result["peak_anon"]
    assert abs(peaks[8] - peaks[1]) < 15 * 2**20, {k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()}


def test_an_exported_data_config_reproduces_the_prepared_split_elsewhere(corpus, tmp_path):
    """An export's svae/config.json names no path of the training machine: the prepared dataset is
    replaced by what it was prepared from, which gives the same validation sentences."""
    from sllm.training.config import DataConfig
    from sllm.training.svae_folder import portable_data, validation_token_lists

    ds = PreparedDataset.open(prepare_dataset(_cfg(corpus, val_fraction=0.2, split_seed=3, split_on_comma=False),
                                              tmp_path / "ds", workers=1, log=QUIET))
    trained = DataConfig(dataset=str(ds.path), tokenizer=str(tmp_path / "somewhere"), vocab_size=8192)
    portable = portable_data(trained, ds.tokenizer.vocab_size)
    assert portable.dataset == portable.tokenizer == "" and portable.vocab_size == 300
    assert (portable.corpus, portable.val_fraction, portable.split_seed, portable.split_on_comma) == \
        ([str(corpus)], 0.2, 3, False)
    val = ds.sentences("val")
    assert validation_token_lists(portable, ds.tokenizer, 12, len(val) + 10) == \
        [val.sentence(i) for i in range(len(val))]
    assert portable_data(portable, 300) == portable  # a corpus config stays as it is
