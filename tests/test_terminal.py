"""Terminal manners of every command (runtime/console.py, runtime/roles.py, protos/tls_probe.py):
--version, help that fits 80 columns with whole option names and no `<bool>`, edge-chat's one-line
exit where ONNX Runtime is missing, stderr notices on a line of their own, a TLS/plaintext mismatch
named as such, and gRPC's own log lines only with --verbose. Real servers, real console scripts."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from cloud_helpers import running_server, self_signed_cert
from typer.testing import CliRunner

from sllm import __version__
from sllm.protos.tls_probe import speaks_tls
from sllm.runtime.console import Terminal

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"
BIN = Path(sys.executable).parent
COMMANDS = ("edge-chat", "sllm-cloud", "sllm-train", "sllm-export")
# a sitecustomize.py for PYTHONPATH: onnxruntime cannot be found (a cloud-only install)
NO_ORT = """\
import sys

class _NoOrt:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError("onnxruntime is not installed here")
        return None

sys.meta_path.insert(0, _NoOrt())
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRPC_VERBOSITY", "GRPC_TRACE")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_every_command_prints_its_version(tmp_path):
    procs = {c: subprocess.Popen([str(BIN / c), "--version"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for c in COMMANDS}
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out, err) == (0, f"{command} (sllm) {__version__}\n", ""), command


def _apps() -> dict[str, typer.Typer]:
    from sllm.cloud.cli import app as cloud
    from sllm.edge.cli import app as edge
    from sllm.export.cli import app as export
    from sllm.training.cli import app as train

    return {"edge-chat": edge, "sllm-cloud": cloud, "sllm-train": train, "sllm-export": export}


@pytest.mark.parametrize("name", COMMANDS)
def test_help_fits_80_columns_with_whole_option_names(name):
    app = _apps()[name]
    top = typer.main.get_command(app)
    commands = {(): top}
    for sub, command in getattr(top, "commands", {}).items():
        commands[(sub,)] = command
    for args, command in commands.items():
        result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"}, prog_name=name)
        assert result.exit_code == 0, result.output
        text = result.output
        too_wide = [line for line in text.splitlines() if len(line) > 80]
        assert not too_wide, f"{name} {' '.join(args)}: {too_wide}"
        assert "<bool>" not in text and "…" not in text, text
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("-"):
                    assert opt in text, f"{name} {' '.join(args)} --help lacks {opt}:\n{text}"


def test_edge_chat_help_lists_version_and_verbose(tmp_path):
    proc = _run([BIN / "edge-chat", "--help"], tmp_path, env=_env(COLUMNS="80"))
    assert proc.returncode == 0, proc.stderr
    assert "--version" in proc.stdout and "--verbose" in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80


def test_edge_chat_without_onnxruntime_fails_in_one_line(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NO_ORT)
    proc = _run([BIN / "edge-chat", "--prompt", "Hello."], tmp_path, env=_env(PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: `edge-chat` needs the edge install (missing here: onnxruntime): "
                                  "pip install '.[edge]'"), proc.stderr
    assert f"sllm-{__version__}-py3-none-any.whl[edge]'" in proc.stderr


def test_a_notice_during_an_answer_starts_on_its_own_line(monkeypatch):
    """stdout and stderr into one stream, as on a terminal: the notice is not glued to the answer."""
    from sllm.edge import cli

    shared = io.StringIO()
    monkeypatch.setattr(sys, "stdout", shared)
    monkeypatch.setattr(sys, "stderr", shared)
    cli.TERMINAL.reset()
    cli.TERMINAL.out("It holds the United Kingdom,")
    cli._note("the cloud session was lost; rebuilt it")
    cli._note("a second notice")
    cli.TERMINAL.out(" and more.")
    cli.TERMINAL.out("\n")
    cli._note("after the answer")
    assert shared.getvalue() == ("It holds the United Kingdom,\nedge-chat: the cloud session was lost; rebuilt it\n"
                                 "edge-chat: a second notice\n and more.\nedge-chat: after the answer\n")


def test_terminal_remembers_what_stdout_holds(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    t = Terminal()
    t.out("half a line")
    assert t.midline
    t.notice("note")
    assert t.midline  # stdout itself still has its line open
    t.out(" ends.\n")
    assert not t.midline
    t.notice("again")
    assert (out.getvalue(), err.getvalue()) == ("half a line ends.\n", "\nnote\nagain\n")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One TLS and one plaintext server of models/default."""
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    with running_server(MODEL / "cloud", tls_cert=str(cert), tls_key=str(key), threads=1) as tls, \
            running_server(MODEL / "cloud", threads=1) as plain:
        yield {"tls": f"127.0.0.1:{tls.port}", "plain": f"127.0.0.1:{plain.port}", "cert": cert}


def test_the_probe_tells_tls_from_plaintext(servers, tmp_path):
    assert speaks_tls(servers["tls"]) is True
    assert speaks_tls(servers["plain"]) is False
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = f"127.0.0.1:{s.getsockname()[1]}"
    assert speaks_tls(free) is None
    assert speaks_tls("unix:/tmp/nothing.sock") is None


def test_a_tls_mismatch_is_named_with_the_flag_that_fixes_it(servers):
    from sllm import edge

    runtime = edge.load_runtime(MODEL / "edge", device="cpu", threads=1)
    with pytest.raises(edge.EdgeError) as plaintext_client:
        edge.connect(servers["tls"], runtime, connect_timeout=5)
    assert "speaks TLS and this client plaintext: pass --tls-ca" in str(plaintext_client.value)
    with pytest.raises(edge.EdgeError) as tls_client:
        edge.connect(servers["plain"], runtime, tls_ca=servers["cert"], connect_timeout=5)
    assert "speaks plaintext (no TLS) and this client TLS: leave out --tls" in str(tls_client.value)
    with edge.connect(servers["tls"], runtime, tls_ca=servers["cert"], connect_timeout=5) as chat:
        assert chat.ask("Hello there.", max_sentences=1).text()


def test_grpc_logs_only_with_verbose(servers, tmp_path):
    """A TLS client against a plaintext server: gRPC core logs the failed handshake itself. Without
    --verbose the user sees the one error line, even with gRPC's logging asked for in the environment."""
    cmd = [BIN / "edge-chat", "--server", servers["plain"], "--tls-ca", servers["cert"], "--bundle", MODEL / "edge",
           "--prompt", "Hello.", "--threads", "1"]
    env = _env(GRPC_VERBOSITY="DEBUG", GRPC_TRACE="handshaker")
    quiet = _run(cmd, tmp_path, env=env)
    assert quiet.returncode == 2 and quiet.stdout == ""
    assert quiet.stderr.count("\n") == 1, quiet.stderr
    assert quiet.stderr.startswith(f"error: the cloud server at {servers['plain']} speaks plaintext (no TLS)")
    loud = _run([*cmd, "--verbose"], tmp_path, env=env)
    assert loud.returncode == 2
    lines = loud.stderr.splitlines()
    assert len(lines) > 1 and lines[-1] == quiet.stderr.rstrip("\n"), loud.stderr
