"""The training-throughput bench, the GPU check script's CPU paths and the paper recipe's dry run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

from bench.train_throughput import measure


def test_measure_leaves_the_first_window_out():
    rows = [{"step": 5, "tokens_seen": 100, "tokens_per_s": 10.0},  # 10 s of warm-up
            {"step": 10, "tokens_seen": 300, "tokens_per_s": 100.0},  # 200 tokens in 2 s
            {"step": 15, "tokens_seen": 700, "tokens_per_s": 200.0, "mfu": 0.5}]  # 400 tokens in 2 s
    m = measure(rows, warmup=5)
    assert m["tokens_per_s"] == pytest.approx(600 / 4) and m["timed_steps"] == 10 and m["mfu"] == 0.5
    assert m["first_window_tokens_per_s"] == pytest.approx(10.0)


def test_the_bench_trains_a_stage_and_reports_tokens_per_second(tmp_path):
    out = tmp_path / "tt.json"
    tiny = ["model.d_model=32", "model.n_heads=2", "model.ffn_dim=64", "train.batch_size=8"]
    proc = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--stages", "svae", "--steps", "4",
                           "--warmup", "2", "--threads", "1", "--documents", "40", "--json", str(out),
                           *(a for o in tiny for a in ("--set", o))],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    svae = result["stages"]["svae"]
    assert svae["tokens_per_s"] > 0 and svae["timed_steps"] == 2 and svae["device"] == "cpu"
    assert svae["mfu"] is None  # MFU only on CUDA
    assert result["load_before"] >= 0 and "load average" in proc.stdout and "| svae |" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_gpu_check_fails_clearly_without_cuda_and_dry_runs():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "no CUDA device" in proc.stderr
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--steps", "50"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "configs/paper/sllm-125m.json (sllm)" in proc.stdout
    assert "--steps 50" in proc.stdout and "train.compile=true" in proc.stdout


def test_the_paper_recipe_dry_run_sizes_and_lists_every_step(tmp_path):
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "config.json").write_text("{}")
    proc = subprocess.run(["bash", "scripts/train_paper.sh", "125m", "--pretrained", str(opt), "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "configs/paper/baseline-125m.json (opt_baseline)" in proc.stdout
    steps = [line for line in proc.stderr.splitlines() if line.startswith("+ ")]
    assert [s.split()[1:3] for s in steps] == [["sllm-train", "prepare"], ["sllm-train", "svae"],
                                               ["sllm-train", "sllm"], ["sllm-train", "baseline"],
                                               ["sllm-export", "runs/paper/sllm-125m-h1"],
                                               ["sllm-export", "runs/paper/baseline-125m"], ["python", "-m"]]
    assert f"opt.pretrained={opt}" in steps[2] and f"--tokenizer {opt}" in steps[0]
    assert f"init.embeddings_from={opt}" in steps[1]
    bad = subprocess.run(["bash", "scripts/train_paper.sh", "7b"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "SIZE must be" in bad.stderr
