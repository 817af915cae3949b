"""The trainer: torchrun DDP, exact resume, checkpoints that refuse bad input, the CLI."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, tiny_overrides
from safetensors.torch import load_file

from training.checkpoint import CheckpointError
from training.cli import build_run_config
from training.load import load_stage1
from training.trainer import lr_at

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "training.cli", "svae", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = run_dir / (run_dir / "latest").read_text().strip()
    return {name: load_file(str(ckpt / f"{name}.safetensors")) for name in ("model", "ema", "optimizer")}


def test_torchrun_ddp_stop_and_resume_matches_uninterrupted(tiny_corpus, tmp_path):
    common = tiny_overrides(tiny_corpus, tmp_path / "cache") + ["train.max_steps=8", "train.save_every=100"]
    _torchrun(["--out", str(tmp_path / "straight"), *common])
    _torchrun(["--out", str(tmp_path / "resumed"), *common, "train.stop_at_step=3"])
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 2
    proc = _torchrun(["--out", str(tmp_path / "resumed"), *common])
    assert "resumed from" in proc.stderr

    straight, resumed = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    for part in straight:
        assert straight[part].keys() == resumed[part].keys()
        for key in straight[part]:
            assert torch.equal(straight[part][key], resumed[part][key]), f"{part}:{key} differs after resume"
    rows = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all(r["tokens_per_s"] > 0 for r in train_rows)
    # the run learned something: loss at the end is below the loss at the start
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]


def test_lr_schedule_warmup_then_cosine():
    run = build_run_config(None, ["train.lr=0.01", "train.warmup_steps=10", "train.max_steps=110",
                                  "train.min_lr_ratio=0.1"], None)
    cfg = run.train
    assert lr_at(0, cfg) == pytest.approx(1e-5)  # 1/1000 of the base rate, as in the paper
    assert lr_at(10, cfg) == pytest.approx(0.01)
    assert lr_at(60, cfg) == pytest.approx(0.0055)
    assert lr_at(110, cfg) == pytest.approx(0.001)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


@pytest.fixture(scope="module")
def trained_run(tiny_svae_run) -> Path:
    return tiny_svae_run


def test_checkpoint_loads_with_its_tokenizer(trained_run):
    trained = load_stage1(trained_run)
    assert trained.tokenizer.vocab_size == trained.model.cfg.vocab_size
    assert trained.run.data.segmentation_version


def _copy_checkpoint(run_dir: Path, dest: Path) -> Path:
    import shutil

    src = run_dir / (run_dir / "latest").read_text().strip()
    shutil.copytree(src, dest)
    return dest


def test_truncated_checkpoint_is_refused(trained_run, tmp_path):
    ckpt = _copy_checkpoint(trained_run, tmp_path / "ckpt")
    weights = ckpt / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_stage1(ckpt)


def test_garbage_weights_are_refused_even_without_manifest(trained_run, tmp_path):
    ckpt = _copy_checkpoint(trained_run, tmp_path / "ckpt")
    (ckpt / "ema.safetensors").write_bytes(b"\x00garbage" * 10)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_stage1(ckpt)
    from training.checkpoint import load_tensors

    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_tensors(ckpt / "ema.safetensors")


def test_config_that_does_not_match_weights_is_refused(trained_run, tmp_path):
    from training.checkpoint import MANIFEST, sha256_file

    ckpt = _copy_checkpoint(trained_run, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["d_model"] = 64
    cfg["model"]["n_heads"] = 4
    (ckpt / "config.json").write_text(json.dumps(cfg))
    manifest = json.loads((ckpt / MANIFEST).read_text())  # re-sign so only the mismatch is left
    manifest["sha256"]["config.json"] = sha256_file(ckpt / "config.json")
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="do not match the config"):
        load_stage1(ckpt)


def test_tokenizer_that_does_not_match_model_is_refused(trained_run, tmp_path, tiny_corpus):
    from sentences.tokenizer import train_bpe
    from training.checkpoint import MANIFEST, sha256_file

    ckpt = _copy_checkpoint(trained_run, tmp_path / "ckpt")
    other = train_bpe(["some other text entirely, with other words."] * 50, vocab_size=280)
    other.save(ckpt)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for name in manifest["sha256"]:
        manifest["sha256"][name] = sha256_file(ckpt / name)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_stage1(ckpt)


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_stage1(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_stage1(tmp_path / "empty")


def test_cli_eval_reports_metrics_and_paper_inputs(trained_run, tmp_path):
    env = dict(os.environ)
    report = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "-m", "training.cli", "eval", str(trained_run), "--n-exact", "20",
                           "--n-loss", "50", "--report", str(report)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    assert "validation PPL" in text and "exact-match reconstruction" in text
    assert "Yao yao ling xian!" in text
    data = json.loads(report.with_suffix(".json").read_text())
    assert data["metrics"]["ppl"] == pytest.approx(2.718281828 ** data["metrics"]["loss"], rel=1e-6)
    assert len(data["table2"]) == 8


def test_cli_reports_bad_input_without_traceback(tmp_path):
    env = dict(os.environ)
    (tmp_path / "bad.json").write_text("{not json")
    for args in (["eval", str(tmp_path / "nope")], ["svae", "--config", str(tmp_path / "bad.json")],
                 ["svae", "model.d_model=30", "model.n_heads=4"], ["svae", "train.no_such_key=1"]):
        proc = subprocess.run([sys.executable, "-m", "training.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr, args


def test_cli_plot_adds_exact_match_per_checkpoint_and_caches_it(tiny_corpus, tmp_path):
    from typer.testing import CliRunner

    from training.cli import app, build_run_config
    from training.data.sentence_data import prepare_data
    from training.evaluate import exact_match
    from training.exact_curve import CACHE_FILE
    from training.tasks.sentence_vae import SentenceVAETask
    from training.trainer import Trainer

    overrides = tiny_overrides(tiny_corpus, tmp_path / "cache") + [
        "train.max_steps=6", "train.save_every=3", "train.keep_checkpoints=5"]
    run = build_run_config(None, overrides, str(tmp_path / "run"))
    Trainer(SentenceVAETask(run, log=lambda *a: None), run.train, run, log=lambda *a: None).fit()
    png = tmp_path / "curve.png"
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "--out", str(png), "--exact-match", "30"])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (tmp_path / "run" / CACHE_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    last = load_stage1(tmp_path / "run")
    val = prepare_data(last.run.data, last.model.cfg.max_sentence_tokens, log=lambda *a: None).val
    assert rows[-1]["exact_match"] == exact_match(last, val, 30)["exact_match"]
    # a second plot reads the cache instead of decoding again
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "--out", str(png), "--exact-match", "30"])
    assert res.exit_code == 0 and len((tmp_path / "run" / CACHE_FILE).read_text().splitlines()) == 2
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "nope"), "--exact-match", "30"])
    assert res.exit_code != 0 and "no complete checkpoints" in res.output


def test_sigterm_saves_at_a_step_boundary_and_the_run_resumes(tiny_corpus, tmp_path):
    import signal

    out = tmp_path / "run"
    args = [sys.executable, "-m", "training.cli", "svae", "--out", str(out),
            *tiny_overrides(tiny_corpus, tmp_path / "cache"), "train.max_steps=100000", "train.save_every=100000"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().count("\n") >= 2:
            assert proc.poll() is None and time.monotonic() < deadline, "no training rows (or it exited)"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: saving step" in err
    saved = json.loads((out / (out / "latest").read_text().strip() / "trainer_state.json").read_text())
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert saved["step"] >= max(logged) >= 2
    resumed = subprocess.run(args[:-2] + [f"train.max_steps={saved['step'] + 2}"], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ}, timeout=240)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    assert (out / "latest").read_text().strip() == f"checkpoints/step_{saved['step'] + 2:08d}"
