"""The trainer: torchrun DDP, exact resume, checkpoints that refuse bad input, the CLI."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, tiny_overrides
from safetensors.torch import load_file

from sllm.runtime.artifacts import resolve_checkpoint
from sllm.runtime.files import sha256_file
from sllm.training.checkpoint import CheckpointError
from sllm.training.cli import build_run_config
from sllm.training.load import load_stage1
from sllm.training.trainer import lr_at

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "sllm.training.cli", "svae", *args]
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
    from sllm.training.checkpoint import load_tensors

    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_tensors(ckpt / "ema.safetensors")


def test_config_that_does_not_match_weights_is_refused(trained_run, tmp_path):
    from sllm.training.checkpoint import MANIFEST, sha256_file

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
    from sllm.sentences.tokenizer import train_bpe
    from sllm.training.checkpoint import MANIFEST, sha256_file

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
    proc = subprocess.run([sys.executable, "-m", "sllm.training.cli", "eval", str(trained_run), "--n-exact", "20",
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
        proc = subprocess.run([sys.executable, "-m", "sllm.training.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr, args


def test_cli_plot_adds_exact_match_per_checkpoint_and_caches_it(tiny_corpus, tmp_path):
    from typer.testing import CliRunner

    from sllm.training.cli import app, build_run_config
    from sllm.training.data.sentence_data import prepare_data
    from sllm.training.evaluate import exact_match
    from sllm.training.exact_curve import CACHE_FILE
    from sllm.training.tasks.sentence_vae import SentenceVAETask
    from sllm.training.trainer import Trainer

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
    args = [sys.executable, "-m", "sllm.training.cli", "svae", "--out", str(out),
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


# ---------------------------------------------------------------- kills at bad moments (issue 14.6)

def _fit(run_dir: Path, overrides: list[str], config: Path | None = None) -> list[str]:
    """Train (or resume) `run_dir` in this process; the log lines."""
    from sllm.training.tasks.sentence_vae import SentenceVAETask
    from sllm.training.trainer import Trainer

    lines: list[str] = []
    run = build_run_config(config, overrides, str(run_dir))
    log = lambda *a: lines.append(" ".join(map(str, a)))  # noqa: E731
    Trainer(SentenceVAETask(run, log=lambda *a: None), run.train, run, log=log).fit()
    return lines


def _metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "loss" not in r]


def _hidden(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


KILL_BETWEEN_RENAMES = """
import os, shutil, sys
from pathlib import Path
from sllm.training import checkpoint as ckpt
final, src = Path(sys.argv[1]), Path(sys.argv[2])
real, calls = os.replace, []
def replace(a, b):  # replace_dir: the old folder aside, then (killed here) the new one in
    calls.append((a, b))
    if len(calls) == 2:
        os._exit(9)
    real(a, b)
os.replace = replace
ckpt.write_checkpoint_dir(final, lambda d: [shutil.copy2(p, d / p.name) for p in src.iterdir()
                                            if p.name != "manifest.json"])
"""


def test_a_kill_between_the_two_renames_loses_nothing(tiny_svae_run, tmp_path):
    """Re-writing a checkpoint that exists renames the old one aside, the new one in, then deletes the
    old one. A kill between the renames leaves `latest` naming a missing folder; the next start puts
    the complete new folder in its place, removes the old one and resumes from it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_svae_run, run)
    step4 = run / "checkpoints" / "step_00000004"
    saved = {p.name: p.read_bytes() for p in step4.iterdir()}
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(step4),
                           str(tiny_svae_run / step4.relative_to(run))], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert not step4.exists() and (run / "latest").read_text().strip() == "checkpoints/step_00000004"
    hidden = _hidden(run)
    assert [h.split(".")[2].split("-")[0] for h in hidden] == ["old", "tmp"], hidden
    with pytest.raises(CheckpointError, match="holds no complete one"):  # what a loader sees meanwhile
        load_stage1(run)

    log = _fit(run, ["train.max_steps=6"], run / "config.json")
    assert any(line.startswith(f"recovered {step4} from .step_00000004.tmp-") for line in log), log
    assert any(line.startswith("removed ") and ".step_00000004.old-" in line for line in log), log
    assert f"resumed from {step4} at step 4" in log, log
    assert _hidden(run) == [] and (run / "latest").read_text().strip() == "checkpoints/step_00000006"
    train, _ = _metrics(run)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert saved.keys() <= {p.name for p in (run / "checkpoints").glob("step_*/*")}


def test_resume_falls_back_to_the_newest_complete_checkpoint_and_logs_no_row_twice(tiny_corpus, tmp_path):
    """`latest` naming a missing checkpoint, then a checkpoint with a corrupt file: resume takes the
    newest complete one and says so; metrics.jsonl loses the rows after that step (and a torn last
    line) and gets them again, so the run's log equals that of a run never interrupted, losses
    included; re-running the finished run adds no row and re-writes no checkpoint."""
    common = tiny_overrides(tiny_corpus, tmp_path / "cache") + [
        "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=3", "train.eval_every=2"]
    _fit(tmp_path / "straight", common)
    run = tmp_path / "run"
    _fit(run, common + ["train.stop_at_step=4"])
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]

    # `latest` names a checkpoint that is not there: loaders and the trainer take step 4, and say so
    (run / "latest").write_text("checkpoints/step_00000099\n")
    notes: list[str] = []
    assert resolve_checkpoint(run, notify=notes.append) == ckpts / "step_00000004"
    assert "step_00000099, which is not a complete checkpoint: using the newest complete one" in notes[0]
    log = _fit(run, common + ["train.stop_at_step=4"])
    assert any("step_00000099" in line and "resuming from the newest complete checkpoint" in line for line in log), log
    assert (run / "latest").read_text().strip() == "checkpoints/step_00000004"

    # step 4 is corrupt: resume from step 2; rows after step 2 go, a torn last line too
    weights = ckpts / "step_00000004" / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    log = _fit(run, common)
    assert any("corrupt or truncated" in line and "resuming from the newest complete checkpoint" in line
               and line.endswith("step_00000002") for line in log), log
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in log
    assert any("dropped 4 row(s) after step 2" in line for line in log), log  # train 3, 4, val 4, torn
    train, evals = _metrics(run)
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [2, 4, 6]
    straight_train, straight_evals = _metrics(tmp_path / "straight")
    assert [r["loss"] for r in train] == [r["loss"] for r in straight_train]  # an exact continuation
    assert [r["val_loss"] for r in evals] == [r["val_loss"] for r in straight_evals]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]

    # the run is finished: running it again evaluates, but logs nothing twice and writes no checkpoint
    before, mtime = (run / "metrics.jsonl").read_text(), (ckpts / "step_00000006").stat().st_mtime_ns
    _fit(run, common)
    assert (run / "metrics.jsonl").read_text() == before
    assert (ckpts / "step_00000006").stat().st_mtime_ns == mtime


def test_stale_hidden_checkpoint_folders_are_removed_only_when_ours_and_unused(tmp_path):
    """At start, the hidden folders of killed checkpoint writes go: ours by name, whose writing
    process is gone (or is this one); a name without a pid only once it is an hour old. A complete
    one whose checkpoint is missing is renamed into place. Anything else stays."""
    from sllm.training.checkpoint import LEGACY_STALE_AFTER_S, MANIFEST, clean_stale_writes

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    ckpts = tmp_path / "checkpoints"
    gone = [f".step_00000002.tmp-{dead}-abcd_123", f".step_00000004.old-{dead}",
            f".step_00000006.tmp-{os.getpid()}-zzzzzzzz", ".step_00000008.k2x_9abc"]
    kept = [".step_00000010.tmp-1-abcdefgh",  # pid 1 is alive: maybe being written right now
            ".step_00000012.qqqqqqqq",  # no pid and fresh
            ".step_something", ".cache", "step_00000004"]
    for name in gone + kept:
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "model.safetensors").write_bytes(b"half")
    (ckpts / "step_00000004" / MANIFEST).write_text('{"sha256": {}}')
    old = time.time() - LEGACY_STALE_AFTER_S - 60
    os.utime(ckpts / ".step_00000008.k2x_9abc", (old, old))
    (ckpts / f".step_00000014.tmp-{dead}-aaaaaaaa").write_text("a file, not a folder of ours")
    kept.append(f".step_00000014.tmp-{dead}-aaaaaaaa")
    # a complete folder whose checkpoint is missing: a kill between replace_dir's renames
    complete = ckpts / f".step_00000016.tmp-{dead}-bbbbbbbb"
    complete.mkdir()
    (complete / "trainer_state.json").write_text('{"step": 16}')
    hashes = {"trainer_state.json": sha256_file(complete / "trainer_state.json")}
    (complete / MANIFEST).write_text(json.dumps({"sha256": hashes}))

    log: list[str] = []
    clean_stale_writes(ckpts, log.append)
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(kept + ["step_00000016"])
    assert json.loads((ckpts / "step_00000016" / "trainer_state.json").read_text())["step"] == 16
    assert sum(line.startswith("removed ") for line in log) == len(gone)
    assert any("left" in line and ".step_00000010.tmp-1-" in line and "process 1" in line for line in log)
    assert any(line.startswith(f"recovered {ckpts / 'step_00000016'}") for line in log)


def test_every_file_and_the_folder_are_fsynced_before_the_renames(tmp_path, monkeypatch):
    """Re-writing a checkpoint: fsync of each file and of the new folder, then the old folder renamed
    aside, the new one in, the old one deleted, and the parent folder fsynced (the renames durable)."""
    from sllm.training.checkpoint import write_checkpoint_dir

    final = tmp_path / "checkpoints" / "step_00000001"
    write_checkpoint_dir(final, lambda d: (d / "old.bin").write_bytes(b"old"))
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_checkpoint_dir(final, lambda d: [(d / n).write_bytes(b"new") for n in ("a.bin", "b.json")])
    renames = [e for e in events if e[0] == "replace"]
    tmp, old = renames[1][1], renames[0][2]
    assert renames == [("replace", str(final), old), ("replace", tmp, str(final))]
    assert Path(tmp).name.startswith(f".step_00000001.tmp-{os.getpid()}-") and Path(old).name.startswith(".step_")
    synced_before = {e[1] for e in events[: events.index(renames[0])] if e[0] == "fsync"}
    assert {f"{tmp}/a.bin", f"{tmp}/b.json", f"{tmp}/manifest.json", tmp} <= synced_before
    assert events[-1] == ("fsync", str(final.parent))
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_00000001"]
    assert sorted(p.name for p in final.iterdir()) == ["a.bin", "b.json", "manifest.json"]
