"""What the standalone benches (bench/rtt.py, bench/cloud_cost.py) share: their common options,
min / median / max of repeated measurements, its markdown cell, and the JSON + markdown pair they write."""
from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """A parser with the options every standalone bench has: --model, --out, and --quick (`quick`
    says what it shrinks to); its description is the first paragraph of `doc`."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--quick", action="store_true", help=quick)
    return ap


def spread(values: list[float]) -> dict:
    return {"min": float(min(values)), "median": float(statistics.median(values)), "max": float(max(values))}


def spread_cell(s: dict, fmt: str) -> str:
    """'median (min-max)' with `fmt` (e.g. '{:.1f}') for each."""
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def write_results(out: Path, stem: str, results: dict, render: Callable[[dict], str]) -> str:
    """OUT/STEM.json and OUT/STEM.md (render(results)); returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    markdown = render(results)
    (out / f"{stem}.md").write_text(markdown)
    return markdown
