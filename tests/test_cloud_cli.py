"""`sllm-cloud serve` as a process: JSON logs, token file, SIGTERM drains and exits 0; bad flags
and bundles are clear errors."""
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sllm.cloud.cli import app
from sllm.modeling.cloud_bundle import write_random_cloud_bundle
from sllm.protos.client import CloudClient, CloudError
from sllm.runtime.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "sllm-cloud"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sllm.cloud.cli"]


def test_serve_process_logs_json_and_stops_on_sigterm(tmp_path):
    write_random_cloud_bundle(tmp_path / "bundle", model_id="sllm-cli", d=16, layers=1, heads=2)
    (tmp_path / "tokens").write_text("# one token a line\ntok-1\n")
    log = tmp_path / "server.log"
    server = ServerProcess(_command() + ["serve", "--bundle", str(tmp_path / "bundle"), "--max-batch", "1",
                                         "--token-file", str(tmp_path / "tokens"), "--grace", "5", "--threads", "1"],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, log_path=log, startup_timeout=90)
    with server:
        start = server.info
        assert start["auth"] and not start["batching"] and start["model_id"] == "sllm-cli"
        with CloudClient(server.address, token="tok-1") as c:
            info = c.model_info(timeout=10)
            assert (info.model_id, info.dim, info.batching, info.max_batch) == ("sllm-cli", 16, False, 1)
            with c.conversation("sllm-cli", 16) as conv:
                assert conv.append([[0.5] * 16, [0.25] * 16]).hidden.shape == (16,)
        with CloudClient(server.address) as c, pytest.raises(CloudError, match="UNAUTHENTICATED"):
            c.model_info(timeout=10)
        server.send(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]  # every line is JSON
    assert events[-3:] == ["signal", "server_draining", "server_stop"]
    assert "session_open" in events and "unauthenticated" in events


def test_serve_refuses_bad_bundles_and_flags(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--bundle", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such bundle directory" in r.output
    write_random_cloud_bundle(tmp_path / "b", d=16, layers=1, heads=2)
    with open(tmp_path / "b" / "cloud.safetensors", "r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = runner.invoke(app, ["serve", "--bundle", str(tmp_path / "b")])
    assert r.exit_code == 2 and "does not match its manifest hash" in r.output
    shutil.rmtree(tmp_path / "b")
    write_random_cloud_bundle(tmp_path / "b", d=16, layers=1, heads=2)
    r = runner.invoke(app, ["serve", "--bundle", str(tmp_path / "b"), "--max-batch", "0"])
    assert r.exit_code == 2 and "max_batch must be >= 1" in r.output
    r = runner.invoke(app, ["serve", "--bundle", str(tmp_path / "b"), "--tls-cert", str(tmp_path / "c.pem")])
    assert r.exit_code == 2 and "both a certificate and a key" in r.output
