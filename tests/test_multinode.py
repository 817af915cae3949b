"""Multi-node DDP: two torchrun launchers ("nodes", one process each) meet through a c10d rendezvous
on loopback and train exactly as one launcher with two processes does.

Exactly, not to a tolerance: in both layouts the job has two ranks on CPU with one thread each,
rank r reads batches r, r + 2, ... of the same prepared dataset, and gloo all-reduces the
gradients of the same two ranks with the same algorithm, so every float operation happens in
the same order. Which launcher's process becomes rank 0 is up to the rendezvous (join order);
it does not matter, since both run the same command."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, tiny_overrides, write_tiny_corpus
from safetensors.torch import load_file

from sllm.training.data.prepare import PrepareConfig, prepare_dataset

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
LIMIT_S = 150  # both launches together; a hung rendezvous fails the test instead of the suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher_args: list[str], train_args: list[str]) -> subprocess.Popen:
    # on failure `_kill` ends the launcher and every worker below it (the workers have sessions of their own)
    # LOGLEVEL=INFO: the launchers log their rendezvous and exit barrier, so a hang says where it was
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "LOGLEVEL": "INFO"}
    return subprocess.Popen([TORCHRUN, *launcher_args, "--max-restarts=0", "-m", "sllm.training.cli", "svae",
                             *train_args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its workers in sessions of their own, so its
    process group does not hold them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def _kill(p: subprocess.Popen) -> None:
    """A launcher and its workers, all of them."""
    for pid in _tree(p.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def _wait_all(procs: list[subprocess.Popen], deadline: float) -> list[str]:
    """Every launcher's output once all have exited 0; past the deadline, all are killed and the test
    fails with every launcher's output (one that hangs is often waiting for another)."""
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
            assert p.returncode == 0, out[-4000:]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                _kill(p)
        tails = [f"--- launcher {i} (exit {p.wait()}):\n"
                 f"{(outputs[i] if i < len(outputs) else p.communicate()[0] or '')[-3000:]}"
                 for i, p in enumerate(procs)]
        pytest.fail(f"the launchers did not finish within {LIMIT_S} s\n" + "\n".join(tails))
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
    return outputs


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / (run_dir / "latest").read_text().strip() / "model.safetensors"))


def test_two_nodes_of_one_process_train_exactly_as_one_node_of_two(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus.jsonl.gz")
    ds = prepare_dataset(PrepareConfig(corpus=[str(corpus)], vocab_size=300, max_sentence_tokens=16,
                                       val_fraction=0.1, shard_mb=0.004), tmp_path / "ds", workers=1,
                         log=lambda *a, **k: None)
    assert len(json.loads((ds / "manifest.json").read_text())["shards"]) >= 2  # ranks read across shards
    common = [o for o in tiny_overrides(corpus, tmp_path / "cache") if not o.startswith("data.corpus")] + [
        f"data.dataset={ds}", "train.max_steps=6", "train.save_every=100", "train.batch_size=4"]
    deadline = time.monotonic() + LIMIT_S

    one_node = _launch(["--standalone", "--nnodes=1", "--nproc_per_node=2"],
                       ["--out", str(tmp_path / "one-node"), *common])
    _wait_all([one_node], deadline)  # one job at a time: two cores

    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [_launch(["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                      "--rdzv-id=sllm-multinode-test", "--local-addr=127.0.0.1", f"--node-rank={n}"],
                     ["--out", str(tmp_path / "two-nodes"), *common]) for n in range(2)]
    outputs = _wait_all(nodes, deadline)
    assert "2 process(es)" in "".join(outputs)  # one job of two ranks, not two jobs of one

    one, two = _losses(tmp_path / "one-node"), _losses(tmp_path / "two-nodes")
    assert [s for s, _ in one] == list(range(1, 7))
    assert two == one  # the same floats, step by step
    a, b = _final_model(tmp_path / "one-node"), _final_model(tmp_path / "two-nodes")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert one[-1][1] < one[0][1]  # and it trained
