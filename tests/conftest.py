"""Fixtures shared by the suite; plain helpers are in helpers.py, cloud ones in cloud_helpers.py.

tests/ is not a package: pytest puts this folder (not the checkout) on sys.path, so `helpers` and
`cloud_helpers` import as top-level modules and every project package comes from the install."""
import os
from pathlib import Path

import pytest
from helpers import ROOT, sllm_overrides, tiny_overrides, train_run, write_tiny_corpus

# two cores in CI: one thread per process keeps torchrun's two ranks from fighting
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "tiny.jsonl.gz")


@pytest.fixture(scope="session")
def tiny_svae_run(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny SentenceVAE run dir trained for 4 steps (about a second). Tests must not modify it: copy first."""
    from sllm.training.cli import build_run_config
    from sllm.training.tasks.sentence_vae import SentenceVAETask
    from sllm.training.trainer import Trainer

    out = tmp_path_factory.mktemp("tiny_svae")
    run = build_run_config(None, tiny_overrides(tiny_corpus, out / "cache") + ["train.max_steps=4"], str(out / "run"))
    Trainer(SentenceVAETask(run, log=lambda *a: None), run.train, run, log=lambda *a: None).fit()
    return out / "run"


@pytest.fixture(scope="session")
def cloud_bundle(tmp_path_factory) -> Path:
    """A cloud bundle of random grafted OPT blocks (d=32, 2 layers): the wire, batching and limits
    do not care what the weights are. Tests must not modify it."""
    from cloud_helpers import MODEL_ID, D

    from sllm.modeling.cloud_bundle import write_random_cloud_bundle

    out = tmp_path_factory.mktemp("cloud-bundle")
    write_random_cloud_bundle(out, model_id=MODEL_ID, d=D, layers=2, heads=4, max_sentences=64)
    return out


@pytest.fixture(scope="session")
def cloud_model(cloud_bundle):
    """The torch model of `cloud_bundle`, as the server loads it (the reference for its outputs)."""
    from sllm.modeling.cloud_bundle import load_cloud_bundle

    return load_cloud_bundle(cloud_bundle)[0]


@pytest.fixture(scope="session")
def stage1(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny stage-1 run trained for 30 steps. Tests must not modify it: copy first."""
    from sllm.training.config import RunConfig
    from sllm.training.tasks.sentence_vae import SentenceVAETask

    out = tmp_path_factory.mktemp("stage1")
    overrides = tiny_overrides(tiny_corpus, out / "cache") + ["train.max_steps=30", "model.max_sentence_tokens=16"]
    train_run(RunConfig, SentenceVAETask, overrides, out / "run")
    return out / "run"


@pytest.fixture(scope="session")
def sllm_run(tiny_corpus, stage1, tmp_path_factory) -> Path:
    """A tiny SLLM run grafted on `stage1`, trained for 6 steps. Tests must not modify it: copy first."""
    from sllm.training.config import SLLMRunConfig
    from sllm.training.tasks.sllm import SLLMTask

    out = tmp_path_factory.mktemp("sllm")
    overrides = sllm_overrides(tiny_corpus, out / "cache") + [f"sllm.svae_checkpoint={stage1}", "train.max_steps=6"]
    train_run(SLLMRunConfig, SLLMTask, overrides, out / "run")
    return out / "run"


@pytest.fixture(scope="session")
def sllm_export(sllm_run, tmp_path_factory) -> Path:
    """`sllm_run` exported once (edge/, cloud/, svae/), verified on 4 sentences. Tests must not modify
    it: copy first."""
    from sllm.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("sllm_export") / "model"
    export_checkpoint(sllm_run, out, n_verify=4)
    return out


# The bundled default model, served on 127.0.0.1, and its edge runtime: a module that tests another
# model defines its own `server` / `runtime`, which override these.
@pytest.fixture(scope="module")
def server():
    from cloud_helpers import running_server

    with running_server(ROOT / "models" / "default" / "cloud", threads=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def runtime():
    from sllm import edge

    return edge.load_runtime(ROOT / "models" / "default" / "edge", threads=1)
