"""The summary of scripts/train_ablations.sh: RESULTS/README.md and RESULTS/ablations.json from the runs
(their configs, checkpoints and metrics logs), their datasets, and the evaluation and comparison reports
the script wrote (RESULTS/*.json). L, tokens per sentence vector, is counted over each granularity's
prepared dataset and over the held-out register cut the same way.

    python scripts/ablation_table.py runs/ablations docs/results/ablations
    python scripts/ablation_table.py OUT RESULTS --heldout-documents 20   # L over the register's first 20
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import struct
from pathlib import Path

DEPTH = ("h1", "h2", "h4")
GRANULARITY = {"h1": "comma split, <= 64 tokens a piece (the quality chain's dataset)",
               "nocomma": "no comma split, <= 64 tokens a piece", "max8": "comma split, <= 8 tokens a piece"}
TEXTS = ("validation", "heldout")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_facts(run: Path) -> dict:
    """Target tokens trained on and the median training speed (the metrics log), parameters (the
    latest checkpoint's weights: tied ones are stored once)."""
    seen, speeds = None, []
    try:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            seen = row.get("tokens_seen", seen)
            if "tokens_per_s" in row:
                speeds.append(row["tokens_per_s"])
    except (OSError, ValueError):
        pass
    params = None
    try:
        with open(run / (run / "latest").read_text().strip() / "ema.safetensors", "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        params = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, struct.error):
        pass
    return {"tokens_seen": seen, "tokens_per_s": statistics.median(speeds) if speeds else None, "params": params}


def heldout_pieces(dataset: Path, documents: int) -> dict | None:
    """Pieces and tokens of the held-out register cut as `dataset` was (its tokenizer, comma rule
    and sentence limit): what `--heldout` evaluations read."""
    from sllm.sentences.limit import model_sentences_with_ids
    from sllm.sentences.tokenizer import SentenceTokenizer
    from sllm.training.data.corpus import heldout_dir, load_documents

    manifest = _read(dataset / "manifest.json")
    if manifest is None:
        return None
    s = manifest["settings"]
    tok = SentenceTokenizer.load(dataset)
    docs = load_documents([str(heldout_dir())])
    pieces = tokens = 0
    for doc in docs[:documents] if documents > 0 else docs:
        _, ids = model_sentences_with_ids(doc.text, tok, s["max_sentence_tokens"], s["split_on_comma"])
        pieces, tokens = pieces + len(ids), tokens + sum(len(x) for x in ids)
    return {"pieces": pieces, "tokens": tokens}


def tokens_per_piece(dataset: Path, heldout_documents: int) -> dict:
    """L over the dataset's training and validation splits and over the held-out register."""
    manifest = _read(dataset / "manifest.json") or {}
    counts = manifest.get("counts", {})
    out = {split: counts[key]["tokens"] / counts[key]["sentences"] for split, key in
           (("train", "train"), ("validation", "val")) if counts.get(key, {}).get("sentences")}
    held = heldout_pieces(dataset, heldout_documents)
    if held and held["pieces"]:
        out["heldout"] = held["tokens"] / held["pieces"]
    return out


def collect(out: Path, results: Path, heldout_documents: int) -> dict:
    rows = {}
    for row in dict.fromkeys(DEPTH + tuple(GRANULARITY)):
        svae_cfg = _read(out / f"svae-{row}" / "config.json") or {}
        dataset = svae_cfg.get("data", {}).get("dataset")
        r = {"blocks": svae_cfg.get("model", {}).get("encoder_layers"),
             "max_piece_tokens": svae_cfg.get("model", {}).get("max_sentence_tokens"),
             "split_on_comma": svae_cfg.get("data", {}).get("split_on_comma"), "dataset": dataset,
             "svae": run_facts(out / f"svae-{row}"), "sllm": run_facts(out / f"sllm-{row}"),
             "L": tokens_per_piece(Path(dataset), heldout_documents) if dataset else {}}
        for text in TEXTS:
            for key, report in (("svae", f"svae-{row}-{text}"), ("svae_after_stage2", f"sllm-{row}-svae-{text}")):
                m = (_read(results / f"{report}.json") or {}).get("metrics", {})
                r.setdefault(key + "_eval", {})[text] = {k: m.get(k) for k in ("exact_match", "ppl", "sentences")}
            c = _read(results / f"sllm-{row}-vs-baseline-{text}.json") or {}
            s, b = c.get("sllm", {}), c.get("baseline", {})
            r.setdefault("ppl", {})[text] = {
                "sllm": s.get("ppl"), "baseline": b.get("ppl"), "tokens": s.get("tokens"),
                "passages": c.get("passages"),
                "ratio": s["ppl"] / b["ppl"] if s.get("ppl") and b.get("ppl") else None,
                "baseline_checkpoint": b.get("checkpoint")}
        rows[row] = r
    return rows


def render(out: Path, rows: dict) -> str:
    def fmt(x, spec=".2f"):
        return "—" if x is None else format(x, spec)

    def pair(r, key, field, spec):
        return " / ".join(fmt(r[key][t].get(field), spec) for t in TEXTS)

    base = next((r["ppl"][t]["baseline_checkpoint"] for r in rows.values() for t in TEXTS
                 if r["ppl"][t]["baseline_checkpoint"]), "—")
    lines = ["# Ablations: SentenceVAE depth and sentence granularity", "",
             f"Runs: `{out}` (configs/ablations, `scripts/train_ablations.sh`). Every SentenceVAE is d=256, takes "
             "its token embeddings from the quality chain's pretrained OPT and trains on the same target tokens "
             "(stage 1); every SLLM is grafted on that OPT with it and trains on the same target tokens (stage 2). "
             "Pairs are validation / held-out register (data/heldout, which no run reads). Exact: greedy "
             "reconstruction equal to the input, of evenly spaced pieces (`sllm-train eval`). PPL: token level, "
             f"the SLLM and the OPT it was grafted on (`{base}`) over the same tokens (`sllm-train compare`).", "",
             "## Depth (the paper's Table 1: H1, H2, H4)", "",
             "| SentenceVAE | blocks | params, M | stage 1 / stage 2 tokens, M | exact, stage 1 | SentenceVAE PPL "
             "| exact, after stage 2 | SLLM PPL | PPL / baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for row in DEPTH:
        r = rows[row]
        tokens = " / ".join(fmt(r[k]["tokens_seen"] and r[k]["tokens_seen"] / 1e6) for k in ("svae", "sllm"))
        params = fmt(r["svae"]["params"] and r["svae"]["params"] / 1e6)
        lines.append(f"| svae-{row} | {fmt(r['blocks'], 'd')} | {params} | {tokens} "
                     f"| {pair(r, 'svae_eval', 'exact_match', '.1%')} | {pair(r, 'svae_eval', 'ppl', '.3f')} "
                     f"| {pair(r, 'svae_after_stage2_eval', 'exact_match', '.1%')} | {pair(r, 'ppl', 'sllm', '.2f')} "
                     f"| {pair(r, 'ppl', 'ratio', '.3f')} |")
    lines += ["", "## Granularity (the speed/quality frontier)", "",
              "L: mean tokens a sentence vector stands for (training split / validation / held-out), the factor by "
              "which an SLLM takes fewer OPT steps than the token-level model. The baseline's PPL differs a little "
              "between rows: each row's passages (<= 32 pieces, <= 512 tokens) are cut from its own pieces.", "",
              "| granularity | L | exact, stage 1 | exact, after stage 2 | SLLM PPL | baseline PPL | PPL / baseline |",
              "|---|---|---|---|---|---|---|"]
    for row, label in GRANULARITY.items():
        r = rows[row]
        L = " / ".join(fmt(r["L"].get(k)) for k in ("train", "validation", "heldout"))
        lines.append(f"| {label} (`{row}`) | {L} | {pair(r, 'svae_eval', 'exact_match', '.1%')} "
                     f"| {pair(r, 'svae_after_stage2_eval', 'exact_match', '.1%')} | {pair(r, 'ppl', 'sllm', '.2f')} "
                     f"| {pair(r, 'ppl', 'baseline', '.2f')} | {pair(r, 'ppl', 'ratio', '.3f')} |")
    lines += ["", "Training speed (median target tokens/s, 2 threads): " + "; ".join(
        f"{row} {fmt(r['svae']['tokens_per_s'], ',.0f')} (stage 1), {fmt(r['sllm']['tokens_per_s'], ',.0f')} (stage 2)"
        for row, r in rows.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the runs' folder (runs/ablations)")
    parser.add_argument("results", type=Path, help="where the reports are and the table goes")
    parser.add_argument("--heldout-documents", type=int, default=0,
                        help="count L over the register's first N documents (0 = all)")
    args = parser.parse_args()
    rows = collect(args.out, args.results, args.heldout_documents)
    text = render(args.out, rows)
    (args.results / "README.md").write_text(text)
    (args.results / "ablations.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
