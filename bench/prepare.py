"""Dataset preparation at scale: a synthetic corpus of a chosen size through `sllm-train prepare`.
Rate in MB of text per second per worker, and the peak memory of the preparing processes.

    python -m bench.prepare                               # 1 GB of text, one worker per core
    python -m bench.prepare --size-mb 200 --workers 2     # smaller
    python -m bench.prepare --size-mb 50 --workers 1,2 --json /tmp/prep.json

The corpus: JSON-lines files of 64 MB, documents of paragraphs of sentences of pseudo-words (a
Zipf vocabulary of 20,000, mixed punctuation, some run-on sentences over the 64-token limit), made
with a seed. The tokenizer (a byte-level BPE of 8192, trained on its first 4 MB) is fixed, so the
run measures what a preparation with a given tokenizer does: the split plan's two passes over the
corpus, then segmenting, tokenizing and writing the shards. Rates count the corpus's characters
(ASCII here: one byte each). Memory: resident set of `sllm-train prepare` and its workers, sampled
every 0.1 s: the largest sum, and the largest single process. The corpus and dataset go to
--dir (default: a temporary folder, deleted after).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

FILE_MB = 64


def synthetic_corpus(folder: Path, size_mb: float, seed: int = 0) -> int:
    """Write about size_mb MB of text as JSON-lines files into `folder`; -> characters written.
    Vectorised by blocks of a million words (the corpus is generated at tens of MB/s)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = 1 / np.arange(1, 27) ** 0.9
    words = ["".join(rng.choice(letters, size=int(n), p=weights / weights.sum())) for n in rng.integers(1, 11, 20_000)]
    vocab, capitalised = np.array(words, dtype=object), np.array([w.capitalize() for w in words], dtype=object)
    zipf = 1 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    marks = np.array([".", ".", ".", "?", "!", ";", ":", ","], dtype=object)
    folder.mkdir(parents=True, exist_ok=True)
    total, n_file, f, in_file, doc = 0, 0, None, FILE_MB * 1e6, 0
    while total < size_mb * 1e6:
        n = 1_000_000
        w = rng.choice(len(words), size=n, p=zipf)
        lengths = np.where(rng.random(n) < 0.02, rng.integers(60, 120, n), rng.integers(3, 22, n))  # 2% run-on
        ends = np.cumsum(lengths)
        ends = ends[ends < n] - 1  # the last word of each sentence
        first = np.zeros(n, dtype=bool)
        first[0], first[ends[:-1] + 1] = True, True
        piece = np.where(first, capitalised[w], vocab[w])
        suffix = np.where(rng.random(n) < 0.03, ",", "").astype(object)
        suffix[ends] = rng.choice(marks, size=len(ends))
        sep = np.full(n, " ", dtype=object)
        para = ends[rng.random(len(ends)) < 0.2]  # a paragraph ends after a fifth of the sentences
        sep[para] = "\n\n"
        sep[para[rng.random(len(para)) < 0.15]] = "\0"  # and a document after some paragraphs
        for text in "".join((piece + suffix + sep).tolist()).split("\0")[:-1]:
            if in_file >= FILE_MB * 1e6:
                if f is not None:
                    f.close()
                f, in_file = open(folder / f"part-{n_file:04d}.jsonl", "w"), 0
                n_file += 1
            f.write(json.dumps({"source": f"synthetic{doc % 3}", "text": text}) + "\n")
            total, in_file, doc = total + len(text), in_file + len(text), doc + 1
            if total >= size_mb * 1e6:
                break
    f.close()
    return total


def _tree_rss(pid: int) -> list[int]:
    """Resident bytes of `pid` and every descendant (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            out.append(rss)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return out


def run_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int, shard_mb: float) -> dict:
    cmd = [sys.executable, "-m", "sllm.training.cli", "prepare", str(corpus), "--out", str(out), "--tokenizer",
           str(tokenizer), "--workers", str(workers), "--shard-mb", str(shard_mb)]
    peak = {"sum": 0, "single": 0}
    t0 = time.perf_counter()
    # one core per worker: tokenizers' own thread pool off, so "per worker" means per core
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def sample() -> None:
        while proc.poll() is None:
            sizes = _tree_rss(proc.pid)
            if sizes:
                peak["sum"], peak["single"] = max(peak["sum"], sum(sizes)), max(peak["single"], max(sizes))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"sllm-train prepare failed:\n{err[-3000:]}")
    plan = re.search(r"planned in ([\d.]+) s", err)
    write = re.search(r"\(([\d.]+) s to write, (\d+) worker", err)
    return {"workers": int(write[2]), "wall_s": wall, "split_plan_s": float(plan[1]), "write_s": float(write[1]),
            "peak_rss_sum_mib": peak["sum"] / 2**20, "peak_rss_process_mib": peak["single"] / 2**20,
            "dataset_mib": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=1000.0, help="text to generate, MB (default 1000: ~1 GB)")
    ap.add_argument("--workers", default=str(os.cpu_count() or 1), help="comma-separated worker counts to run")
    ap.add_argument("--shard-mb", type=float, default=256.0)
    ap.add_argument("--dir", type=Path, default=None, help="keep the corpus and datasets here")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from sllm.sentences.tokenizer import train_bpe

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        corpus = root / "corpus"
        t0 = time.perf_counter()
        chars = synthetic_corpus(corpus, args.size_mb)
        print(f"corpus: {chars / 1e6:.0f} MB of text in {len(list(corpus.iterdir()))} file(s), written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        sample = (json.loads(line)["text"] for line in open(next(iter(sorted(corpus.iterdir())))))
        head, n = [], 0
        for text in sample:
            head.append(text)
            n += len(text)
            if n > 4e6:
                break
        train_bpe(head, vocab_size=8192).save(root / "tokenizer")
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            out = root / f"dataset-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            r = run_prepare(corpus, root / "tokenizer", out, workers, args.shard_mb)
            r.update(text_mb=chars / 1e6, mb_per_s=chars / 1e6 / r["wall_s"],
                     mb_per_s_per_worker=chars / 1e6 / r["write_s"] / r["workers"])
            rows.append(r)
            print(f"{r['workers']} worker(s): {r['wall_s']:.0f} s in all ({r['split_plan_s']:.0f} s split plan, "
                  f"{r['write_s']:.0f} s writing): {r['mb_per_s']:.2f} MB/s overall, "
                  f"{r['mb_per_s_per_worker']:.2f} MB/s per worker while writing; peak RSS "
                  f"{r['peak_rss_sum_mib']:.0f} MiB all processes, {r['peak_rss_process_mib']:.0f} MiB the largest; "
                  f"dataset {r['dataset_mib']:.0f} MiB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps({"size_mb": args.size_mb, "cpus": os.cpu_count(), "runs": rows}, indent=2))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
