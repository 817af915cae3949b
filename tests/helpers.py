"""Shared test helpers (not fixtures: those are in conftest.py): the tiny corpus, tiny run configs,
training a run in-process, and a sitecustomize that makes torch unimportable."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/, data/, models/ (the code comes from the install)
# a sitecustomize.py for PYTHONPATH: torch and transformers raise ImportError (the edge must not need them)
NO_TORCH_BLOCKER = """\
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked: the edge must not import it")
        return None

sys.meta_path.insert(0, _NoTorch())
"""


def _make_sentence(rng: random.Random) -> str:
    subjects = ["The king", "A small dog", "My sister", "The people", "Our nation", "The old house", "She", "He"]
    verbs = ["loves", "sees", "builds", "remembers", "guards", "finds", "praises", "leaves"]
    objects = ["the river", "a letter", "the garden", "his friend", "the city", "her book", "the law", "a song"]
    ends = [".", "!", "?", ";", ","]
    return f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(ends)}"


def write_tiny_corpus(path: Path, docs: int = 24, sentences_per_doc: int = 20, seed: int = 0) -> Path:
    """A small JSONL.gz corpus with two sources, so splits and training stay fast."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for i in range(docs):
            text = " ".join(_make_sentence(rng) for _ in range(sentences_per_doc))
            f.write(json.dumps({"source": f"src{i % 2}", "doc": f"d{i}", "text": text}) + "\n")
    return path


def tiny_overrides(corpus: Path, cache: Path) -> list[str]:
    return [
        f"data.corpus={json.dumps([str(corpus)])}", "data.vocab_size=300", f"data.cache_dir={cache}",
        "data.val_fraction=0.1",
        "model.d_model=32", "model.n_heads=2", "model.ffn_dim=64", "model.max_sentence_tokens=16",
        "train.batch_size=8", "train.warmup_steps=2", "train.lr=0.003", "train.log_every=1",
        "train.eval_every=0", "train.eval_batches=2", "train.threads=1",
    ]


QUIET = dict(log=lambda *a, **k: None)
OPT_TINY = ["opt.hidden_size=32", "opt.num_hidden_layers=2", "opt.num_attention_heads=2", "opt.ffn_dim=64",
            "opt.max_position_embeddings=256"]


def data_overrides(corpus: Path, cache: Path) -> list[str]:
    return [o for o in tiny_overrides(corpus, cache) if not o.startswith("model.")] + [
        "data.max_passage_sentences=12", "data.max_passage_tokens=200", "train.batch_size=2"]


def sllm_overrides(corpus: Path, cache: Path) -> list[str]:
    return data_overrides(corpus, cache) + OPT_TINY + [
        "svae.d_model=32", "svae.n_heads=2", "svae.ffn_dim=64", "svae.max_sentence_tokens=16"]


def train_run(cls, task_cls, overrides, out: Path):
    """Train a run in this process (quietly); returns the task."""
    from sllm.training.cli import build_run_config  # torch: only where a run is trained
    from sllm.training.trainer import Trainer

    run = build_run_config(None, overrides, str(out), cls)
    task = task_cls(run, **QUIET)
    Trainer(task, run.train, run, **QUIET).fit()
    return task


def prepared_token_means(data: Path) -> tuple[float, float, float]:
    """A prepared dataset's training split (sllm-train prepare's shards): (tokens per piece, its eos
    counted; tokens per passage; stage-2 target tokens per passage, its first piece being context)."""
    import numpy as np

    sentences = tokens = passages = stage2 = 0
    for shard in sorted((data / "shards").iterdir()):
        s = np.load(shard / "train.sentences.npy", mmap_mode="r")
        p = np.asarray(np.load(shard / "train.passages.npy", mmap_mode="r"))
        in_passage = s[p[1:]] - s[p[:-1]]
        first = s[p[:-1] + 1] - s[p[:-1]]
        sentences, tokens, passages = sentences + len(s) - 1, tokens + int(s[-1] - s[0]), passages + len(p) - 1
        stage2 += int((in_passage - first).sum() + (np.diff(p) - 1).sum())
    return (tokens + sentences) / sentences, tokens / passages, stage2 / passages
