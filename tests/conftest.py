import gzip
import json
import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/, data/, models/ (the code comes from the install)

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


@pytest.fixture(scope="session")
def cloud_bundle(tmp_path_factory) -> Path:
    """A cloud bundle of random grafted OPT blocks (d=32, 2 layers): the wire, batching and limits
    do not care what the weights are. Tests must not modify it."""
    from modeling.cloud_bundle import write_random_cloud_bundle
    from tests.cloud_helpers import D, MODEL_ID

    out = tmp_path_factory.mktemp("cloud-bundle")
    write_random_cloud_bundle(out, model_id=MODEL_ID, d=D, layers=2, heads=4, max_sentences=64)
    return out


@pytest.fixture(scope="session")
def cloud_model(cloud_bundle):
    """The torch model of `cloud_bundle`, as the server loads it (the reference for its outputs)."""
    from modeling.cloud_bundle import load_cloud_bundle

    return load_cloud_bundle(cloud_bundle)[0]


QUIET = dict(log=lambda *a, **k: None)
OPT_TINY = ["opt.hidden_size=32", "opt.num_hidden_layers=2", "opt.num_attention_heads=2", "opt.ffn_dim=64",
            "opt.max_position_embeddings=256"]


def data_overrides(corpus: Path, cache: Path) -> list[str]:
    return [o for o in tiny_overrides(corpus, cache) if not o.startswith("model.")] + [
        "data.max_passage_sentences=12", "data.max_passage_tokens=200", "train.batch_size=2"]


def sllm_overrides(corpus: Path, cache: Path) -> list[str]:
    return data_overrides(corpus, cache) + OPT_TINY + [
        "svae.d_model=32", "svae.n_heads=2", "svae.ffn_dim=64", "svae.max_sentence_tokens=16"]


def _train(cls, task_cls, overrides, out: Path):
    from training.cli import build_run_config
    from training.trainer import Trainer

    run = build_run_config(None, overrides, str(out), cls)
    task = task_cls(run, **QUIET)
    Trainer(task, run.train, run, **QUIET).fit()
    return task


@pytest.fixture(scope="session")
def stage1(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny stage-1 run trained for 30 steps. Tests must not modify it: copy first."""
    from training.config import RunConfig
    from training.tasks.sentence_vae import SentenceVAETask

    out = tmp_path_factory.mktemp("stage1")
    overrides = tiny_overrides(tiny_corpus, out / "cache") + ["train.max_steps=30", "model.max_sentence_tokens=16"]
    _train(RunConfig, SentenceVAETask, overrides, out / "run")
    return out / "run"


@pytest.fixture(scope="session")
def sllm_run(tiny_corpus, stage1, tmp_path_factory) -> Path:
    """A tiny SLLM run grafted on `stage1`, trained for 6 steps. Tests must not modify it: copy first."""
    from training.config import SLLMRunConfig
    from training.tasks.sllm import SLLMTask

    out = tmp_path_factory.mktemp("sllm")
    overrides = sllm_overrides(tiny_corpus, out / "cache") + [f"sllm.svae_checkpoint={stage1}", "train.max_steps=6"]
    _train(SLLMRunConfig, SLLMTask, overrides, out / "run")
    return out / "run"
