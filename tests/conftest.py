import gzip
import json
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# two cores in CI: one thread per process keeps torchrun's two ranks from fighting
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "tiny.jsonl.gz")


def tiny_overrides(corpus: Path, cache: Path) -> list[str]:
    return [
        f"data.corpus={json.dumps([str(corpus)])}", "data.vocab_size=300", f"data.cache_dir={cache}",
        "data.val_fraction=0.1",
        "model.d_model=32", "model.n_heads=2", "model.ffn_dim=64", "model.max_sentence_tokens=16",
        "train.batch_size=8", "train.warmup_steps=2", "train.lr=0.003", "train.log_every=1",
        "train.eval_every=0", "train.eval_batches=2", "train.threads=1",
    ]


@pytest.fixture(scope="session")
def tiny_svae_run(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny SentenceVAE run dir trained for 4 steps (about a second). Tests must not modify it: copy first."""
    from training.cli import build_run_config
    from training.tasks.sentence_vae import SentenceVAETask
    from training.trainer import Trainer

    out = tmp_path_factory.mktemp("tiny_svae")
    run = build_run_config(None, tiny_overrides(tiny_corpus, out / "cache") + ["train.max_steps=4"], str(out / "run"))
    Trainer(SentenceVAETask(run, log=lambda *a: None), run.train, run, log=lambda *a: None).fit()
    return out / "run"
