"""`python -m bench.install_footprint`: what the edge install costs beside the full dev env.

    python -m bench.install_footprint                      # .venv-edge vs .venv, markdown on stdout
    python -m bench.install_footprint --runs 20 --chat-runs 5

For each env: its size on disk and its biggest packages; the wall time of `edge-chat --help`
(the interpreter start plus the CLI's imports; runs interleaved between the envs, min/median/max);
the peak resident memory (max RSS of that process, from wait4 in a small launcher) and wall time of one greedy
`edge-chat --prompt ... --max-sentences 3` turn against a real cloud server for models/default,
started in this process (the full env: run this from .venv). The edge env is built with
scripts/setup_edge.sh when missing. What each figure does and does not show: docs/install.md.
"""
from __future__ import annotations

from sllm.runtime.roles import require_role

require_role("bench", "python -m bench.install_footprint")  # it starts a cloud server in this process

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "It is a truth universally acknowledged, that a single man must be in want of a wife."
MIB = 1 << 20


def _disk_bytes(paths) -> int:
    """Disk usage (allocated blocks) of files and folders, each inode once, links not followed."""
    seen, total = set(), 0
    stack = [Path(p) for p in paths]
    while stack:
        p = stack.pop()
        try:
            st = p.lstat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
        if p.is_dir() and not p.is_symlink():
            try:
                stack.extend(p.iterdir())
            except OSError:
                pass
    return total


def _site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"error: no site-packages in {env}")
    return found[0]


def packages_by_size(env: Path) -> list[tuple[str, int]]:
    """(distribution, disk bytes of the files its RECORD lists), biggest first."""
    site = _site_packages(env)
    sizes = []
    for info in site.glob("*.dist-info"):
        name = info.name[: -len(".dist-info")].rsplit("-", 1)[0]
        record = info / "RECORD"
        files = set()
        if record.exists():
            for line in record.read_text(errors="replace").splitlines():
                rel = line.split(",", 1)[0]
                if rel:
                    files.add((site / rel).resolve() if ".." in rel else site / rel)
        sizes.append((name, _disk_bytes(files | {info})))
    return sorted(sizes, key=lambda kv: -kv[1])


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# Runs one command and writes "wall_s max_rss" of that process to argv[1]. A small process of its
# own: on Linux a child's max RSS starts at the RSS of the process it was spawned from (fork and
# vfork+exec both carry the parent's high-water mark over), so spawning edge-chat straight from
# this process (torch loaded, a few hundred MiB) would report this process's size, not edge-chat's.
_LAUNCHER = """\
import os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write(f"{wall} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def measure(cmd: list[str], cwd: Path, timeout: float) -> tuple[float, float, str]:
    """(wall s, max RSS MiB, stdout) of one run of `cmd` (an absolute path first), timed and measured
    by a small launcher process (see _LAUNCHER)."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as result:
        try:
            proc = subprocess.run([sys.executable, "-S", "-E", "-c", _LAUNCHER, result.name, *cmd], cwd=cwd,
                                  env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"error: {' '.join(cmd)} ran past {timeout:g} s") from None
        fields = result.read().split()
    if proc.returncode != 0 or len(fields) != 3 or fields[2] != "0":
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}, {fields}):\n{proc.stderr}")
    wall, rss = float(fields[0]), int(fields[1])
    rss_mib = rss / MIB if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    return wall, rss_mib, proc.stdout


def _spread(values: list[float], fmt: str) -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.install_footprint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--edge-env", type=Path, default=ROOT / ".venv-edge", help="the edge-only env")
    ap.add_argument("--full-env", type=Path, default=ROOT / ".venv", help="the full dev env")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "default", help="folder with edge/ and cloud/")
    ap.add_argument("--runs", type=int, default=10, help="edge-chat --help runs per env (interleaved)")
    ap.add_argument("--chat-runs", type=int, default=3, help="edge-chat turns per env (interleaved)")
    ap.add_argument("--top", type=int, default=6, help="biggest packages listed per env")
    args = ap.parse_args(argv)

    if not (args.edge_env / "bin" / "edge-chat").exists() and args.edge_env == ROOT / ".venv-edge":
        print("building .venv-edge (scripts/setup_edge.sh) ...", file=sys.stderr)
        subprocess.run([str(ROOT / "scripts" / "setup_edge.sh")], cwd=ROOT, check=True, timeout=1200)
    envs = {"edge": args.edge_env.resolve(), "full": args.full_env.resolve()}
    for name, env in envs.items():
        if not (env / "bin" / "edge-chat").exists():
            raise SystemExit(f"error: no edge-chat in the {name} env {env}")

    from sllm.cloud.config import ServerConfig
    from sllm.cloud.server import CloudServer

    cwd = Path("/")  # outside the checkout: each env runs its installed code
    help_s = {name: [] for name in envs}
    for _ in range(args.runs):
        for name, env in envs.items():
            print(f"edge-chat --help ({name}) ...", file=sys.stderr)
            wall, _, _ = measure([str(env / "bin" / "edge-chat"), "--help"], cwd, 120)
            help_s[name].append(wall)

    chat_s = {name: [] for name in envs}
    chat_rss = {name: [] for name in envs}
    answers = {}
    server = CloudServer.from_bundle(args.model / "cloud", ServerConfig(port=0))
    server.start()
    try:
        target = f"127.0.0.1:{server.port}"
        for _ in range(args.chat_runs):
            for name, env in envs.items():
                print(f"edge-chat --prompt ({name}) ...", file=sys.stderr)
                wall, rss, out = measure(
                    [str(env / "bin" / "edge-chat"), "--server", target, "--bundle", str(args.model / "edge"),
                     "--prompt", PROMPT, "--max-sentences", "3", "--threads", "1"], cwd, 300)
                chat_s[name].append(wall)
                chat_rss[name].append(rss)
                answers.setdefault(name, out)
    finally:
        server.stop(grace=0)

    sizes = {name: _disk_bytes([env]) for name, env in envs.items()}
    pkgs = {name: packages_by_size(env) for name, env in envs.items()}

    print(f"Measured on {platform.machine()} with {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"edge = `{envs['edge'].name}` (`pip install \".[edge]\"`), full = `{envs['full'].name}` "
          f"(`.[dev]`: every role). Timings: min / median / max.\n")
    print("| | edge install | full dev env |")
    print("|---|---|---|")
    print(f"| size on disk | {sizes['edge'] / MIB:,.0f} MiB | {sizes['full'] / MIB:,.0f} MiB |")
    print(f"| installed distributions | {len(pkgs['edge'])} | {len(pkgs['full'])} |")
    top = {name: ", ".join(f"{n} {b / MIB:,.0f}" for n, b in pkgs[name][: args.top]) for name in envs}
    print(f"| biggest packages, MiB | {top['edge']} | {top['full']} |")
    print(f"| `edge-chat --help`, s ({args.runs} runs) | {_spread(help_s['edge'], '{:.2f}')} | "
          f"{_spread(help_s['full'], '{:.2f}')} |")
    print(f"| `edge-chat --prompt ... --max-sentences 3`, s ({args.chat_runs} runs) | "
          f"{_spread(chat_s['edge'], '{:.2f}')} | {_spread(chat_s['full'], '{:.2f}')} |")
    print(f"| its peak resident memory (max RSS), MiB | {_spread(chat_rss['edge'], '{:.0f}')} | "
          f"{_spread(chat_rss['full'], '{:.0f}')} |")
    same = "same" if answers.get("edge") == answers.get("full") else "DIFFERENT"
    print(f"\nThe greedy answers of the two envs: {same} text.")
    return 0 if same == "same" else 1


if __name__ == "__main__":
    raise SystemExit(main())
