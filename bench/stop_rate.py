"""Do answers end by themselves on text the model was not trained on? (issue 25, item 5)

    python -m bench.stop_rate data/heldout/encyclopedia.jsonl.gz data/corpus/austen.jsonl.gz --prompts 30

For each corpus file: documents in a seeded order, the first third of each document's sentences
(documents of at least 4) as a prompt, one greedy answer per prompt with edge-chat's defaults (a
fresh conversation each, against a local `sllm-cloud serve` of MODEL/cloud). Prints how each answer
ended (the stop head = `stop`, or the sentence cap) and the answers' lengths in sentences."""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import statistics
from pathlib import Path

from sllm import edge
from sllm.runtime.server_process import ServerProcess


def prompts_from(path: Path, n: int, seed: int = 0) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        docs = [json.loads(line)["text"] for line in f]
    random.Random(seed).shuffle(docs)
    out = []
    for doc in docs:
        pieces = [p for p in doc.replace("\n", " ").split(". ") if p.strip()]  # sentences, roughly
        if len(pieces) >= 4:
            out.append(". ".join(pieces[: len(pieces) // 3]) + ".")
        if len(out) == n:
            break
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", nargs="+", type=Path, help=".jsonl or .jsonl.gz files with a text field")
    ap.add_argument("--model", type=Path, default=Path("models/default"))
    ap.add_argument("--prompts", type=int, default=30)
    args = ap.parse_args(argv)
    runtime = edge.load_runtime(args.model / "edge", threads=1)
    with ServerProcess.serve(args.model / "cloud", threads=1) as server:
        for path in args.corpus:
            ends, lengths = collections.Counter(), []
            for prompt in prompts_from(path, args.prompts):
                with edge.connect(server.address, runtime) as chat:
                    answer = chat.ask(prompt)
                    answer.text()
                    ends[answer.end.reason] += 1
                    lengths.append(len(answer.sentences))
            total = sum(ends.values())
            print(f"{path}: {ends.get('stop', 0)}/{total} answers ended by the stop head; ends {dict(ends)}; "
                  f"sentences per answer median {statistics.median(lengths)} (min {min(lengths)}, max {max(lengths)})")


if __name__ == "__main__":
    main()
