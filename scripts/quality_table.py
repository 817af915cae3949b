"""The summary of scripts/train_quality.sh: RESULTS/README.md from the runs' token counts (their
metrics logs) and the comparison and evaluation reports (RESULTS/*.json) the script wrote.

    python scripts/quality_table.py runs/quality docs/results/quality
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CHAINS = {  # row -> (the runs it took, from scratch, in order; the report its PPLs come from; which side)
    "SLLM, the paper's recipe (grafted on the pretrained OPT)": (
        ["baseline-pretrain", "svae-init", "sllm-pretrained"], "sllm-pretrained-vs-baseline-continued", "sllm"),
    "SLLM from scratch": (["svae-scratch", "sllm-scratch"], "sllm-scratch-vs-baseline-continued", "sllm"),
    "token-level OPT, continued": (["baseline-pretrain", "baseline-continued"],
                                   "sllm-pretrained-vs-baseline-continued", "baseline"),
    "token-level OPT, pretrained only (the recipe's start, as is)": (
        ["baseline-pretrain"], "sllm-pretrained-vs-baseline-pretrain", "baseline"),
}
TEXTS = ("validation", "heldout")


def progress(run: Path) -> tuple[int | None, int]:
    """(target tokens the run trained on, its last logged step), as its metrics log last recorded them."""
    seen, last = None, 0
    try:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            seen, last = row.get("tokens_seen", seen), row.get("step", last)
    except (OSError, ValueError):
        return None, 0
    return seen, last


def tokens_seen(run: Path) -> int | None:
    return progress(run)[0]


def unfinished(run: Path) -> str:
    """"" for a run that reached its schedule's last step; else " (training: step S of N)"."""
    last = progress(run)[1]
    planned = (_read(run / "config.json") or {}).get("train", {}).get("max_steps")
    return f" (training: step {last} of {planned})" if planned and last < planned else ""


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ppl(results: Path, report: str, side: str, text: str) -> float | None:
    data = _read(results / (f"{report}-{text}.json" if text else f"{report}.json"))
    return data[side]["ppl"] if data else None


def render(out: Path, results: Path) -> str:
    def fmt(x, spec=".2f"):
        return "—" if x is None else format(x, spec)

    lines = ["# The paper's recipe at equal total tokens", "",
             f"Runs: `{out}` (configs/quality, `scripts/train_quality.sh`). Tokens: target tokens each step trained "
             "on (stage 1: sentence tokens + eos; stage 2: next-sentence tokens + eos; baseline: passage tokens), "
             "summed over the steps a model took from random weights. PPL: token level, both models over the same "
             "tokens (`sllm-train compare`); held-out: the bundled encyclopedia register, which no run reads.", "",
             "| model | steps (tokens, M) | total tokens, M | validation PPL | held-out PPL | PPL / continued OPT "
             "(validation, held-out) |", "|---|---|---|---|---|---|"]
    base = {t: _ppl(results, "sllm-pretrained-vs-baseline-continued", "baseline", t) for t in TEXTS}
    for name, (runs, report, side) in CHAINS.items():
        counts = [tokens_seen(out / r) for r in runs]
        steps = ", ".join(f"{r} ({fmt(c and c / 1e6)}){unfinished(out / r)}" for r, c in zip(runs, counts))
        total = None if None in counts else sum(counts) / 1e6
        ppl = {t: _ppl(results, report, side, t) for t in TEXTS}
        ratio = ", ".join(fmt(ppl[t] / base[t] if ppl[t] and base[t] else None) for t in TEXTS)
        lines.append(f"| {name} | {steps} | {fmt(total)} | {fmt(ppl['validation'])} | {fmt(ppl['heldout'])} | "
                     f"{ratio} |")
    lines += ["", "SentenceVAE reconstruction (greedy exact match) and PPL, before stage 2:", "",
              "| SentenceVAE | validation exact | validation PPL | held-out exact | held-out PPL |", "|---|---|---|---|---|"]
    for svae in ("svae-init", "svae-scratch"):
        m = {t: (_read(results / f"{svae}-{t}.json") or {}).get("metrics", {}) for t in TEXTS}
        lines.append(f"| {svae}{unfinished(out / svae)} | {fmt(m['validation'].get('exact_match'), '.1%')} | {fmt(m['validation'].get('ppl'))} "
                     f"| {fmt(m['heldout'].get('exact_match'), '.1%')} | {fmt(m['heldout'].get('ppl'))} |")
    as_is = _ppl(results, "paper-sllm-heldout-vs-baseline-pretrain", "baseline", "")
    sllm = _ppl(results, "paper-sllm-heldout-vs-baseline-pretrain", "sllm", "")
    tuned = _ppl(results, "paper-sllm-heldout-vs-baseline-heldout", "baseline", "")
    lines += ["", "The paper's protocol on the held-out register (trained on its 98%, scored on its other 2% of "
              "documents): the OPT as pretrained on the corpus, never shown the register (the paper's baseline, "
              "evaluated as downloaded), the SLLM grafted from it and trained about one epoch on the register, and "
              "that OPT trained the same epoch (the row the paper leaves out):", "",
              "| model | register tokens trained on, M | PPL | SLLM PPL / this |", "|---|---|---|---|"]
    for name, run, ppl in (("OPT, pretrained, as is", None, as_is),
                           ("SLLM grafted on it, ~1 epoch on the register", "sllm-heldout", sllm),
                           ("OPT, pretrained, ~1 epoch on the register", "baseline-heldout", tuned)):
        seen = tokens_seen(out / run) if run else 0
        lines.append(f"| {name} | {fmt(seen and seen / 1e6)} | {fmt(ppl)} | {fmt(sllm / ppl if sllm and ppl else None)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    out, results = Path(sys.argv[1]), Path(sys.argv[2])
    text = render(out, results)
    (results / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
