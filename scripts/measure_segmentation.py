"""Sentence statistics of the bundled corpus with and without comma splitting.

Trains a byte-level BPE on the training split (as the trainer does), segments
the training documents both ways and prints counts, lengths in tokens and
speed. The numbers behind docs/segmentation.md.

    python scripts/measure_segmentation.py [--vocab 8192] [--corpus PATH ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sllm.sentences.limit import is_blank, split_to_token_limit  # noqa: E402
from sllm.sentences.segment import SEGMENTATION_VERSION, split_sentences  # noqa: E402
from sllm.sentences.tokenizer import train_bpe  # noqa: E402
from sllm.training.data.corpus import load_documents, split_documents  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--corpus", nargs="*", default=None, help="files or folders; default: the bundled corpus")
    ap.add_argument("--max-tokens", type=int, default=64, help="the paper's cap, for the token-limit pass")
    args = ap.parse_args()

    docs = load_documents(args.corpus)
    train, val = split_documents(docs)
    chars = sum(len(d.text) for d in train)
    print(f"{len(docs)} documents: {len(train)} train, {len(val)} val; {chars / 1e6:.1f} M characters of training text")

    t = time.perf_counter()
    tok = train_bpe((d.text for d in train), vocab_size=args.vocab)
    print(f"BPE vocab {tok.vocab_size} trained in {time.perf_counter() - t:.1f} s; segmentation {SEGMENTATION_VERSION}\n")

    print("| split_on_comma | sentences | mean tokens | median | > 32 | > 64 | max | segmentation speed | pieces after 64-token cap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for comma in (False, True):
        t = time.perf_counter()
        sentences = [s for d in train for s in split_sentences(d.text, comma)]
        seconds = time.perf_counter() - t
        assert "".join(sentences) == "".join(d.text for d in train)  # lossless over the whole split
        sentences = [s for s in sentences if not is_blank(s)]
        encoded = tok.encode_batch(sentences)
        lengths = np.array([len(x) for x in encoded])
        capped = sum(len(split_to_token_limit(s, tok, args.max_tokens)) if n > args.max_tokens else 1
                     for s, n in zip(sentences, lengths))
        print(f"| {comma} | {len(sentences):,} | {lengths.mean():.1f} | {np.median(lengths):.0f} | "
              f"{(lengths > 32).mean():.1%} | {(lengths > 64).mean():.1%} | {lengths.max()} | "
              f"{chars / seconds / 1e6:.1f} M chars/s ({seconds:.1f} s) | {capped:,} |")


if __name__ == "__main__":
    main()
