"""Do answers end by themselves, and near where the text's paragraph ends, on text the model was not
trained on?

    python -m bench.stop_rate data/heldout/encyclopedia.jsonl.gz data/corpus/techdocs.jsonl.gz \
        data/corpus/austen.jsonl.gz --prompts 30 [--raw-stop] [--stop-threshold P] [--json OUT]

For each corpus file: documents in a seeded order, the first third of each document's sentences
(documents of at least 4, cut roughly at ". ") as a prompt, one greedy answer per prompt with
edge-chat's defaults (a fresh conversation each, against a local `sllm-cloud serve` of MODEL/cloud).
data/corpus/* is the training corpus (its documents here are mostly training ones: in-domain text);
data/heldout/* is a register training never reads.

What it prints, per file:
- how each answer ended (the stop rule = `stop`, or the sentence cap) and the answers' lengths;
- P(stop) by answer position n (the step after n answered sentences: the one the stop rule reads
  there), raw and as the rule sees it (calibrated, when the bundle has a stop calibration);
- the reference: r = the model sentences left in the prompt's paragraph in the source document
  (its text after the prompt, up to the next blank line; at least 1: an answer is never empty).
  Answer level: a stop is *near* the paragraph end when |n - r| <= --window sentences; stop
  precision = near stops / answers the stop rule ended; stop recall = near stops / answers whose r
  is within the cap (the ones the rule could end near it).
  Sentence level, on the document's own text (teacher forced: the prompt, then the paragraph's real
  sentences one by one, up to the cap): at each position n the rule says stop or not, and the truth
  is n == r; precision and recall of "stop" over those positions.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sllm import edge
from sllm.protos.client import CloudClient
from sllm.runtime.server_process import ServerProcess
from sllm.sentences.limit import sentence_token_ids
from sllm.sentences.sampling import AnswerOptions, stop_decision, with_bundle_stop


@dataclass
class Case:
    prompt: str
    rest: str  # the document's text after the prompt


def prompts_from(path: Path, n: int, seed: int = 0) -> list[Case]:
    """The first third of each document's ". "-pieces (documents of at least 4), and what follows it."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        docs = [json.loads(line)["text"] for line in f]
    random.Random(seed).shuffle(docs)
    out = []
    for doc in docs:
        flat = doc.replace("\n", " ")  # same length: offsets in it are offsets in doc
        parts, starts, at = flat.split(". "), [], 0
        for p in parts:
            starts.append(at)
            at += len(p) + 2
        kept = [i for i, p in enumerate(parts) if p.strip()]  # sentences, roughly
        if len(kept) >= 4:
            cut = kept[: len(kept) // 3]
            end = starts[cut[-1]] + len(parts[cut[-1]]) + 1  # through the "." of the prompt's last piece
            out.append(Case(". ".join(parts[i] for i in cut) + ".", doc[end:]))
        if len(out) == n:
            break
    return out


def paragraph_rest(rest: str) -> str:
    """The rest of the prompt's paragraph: up to the next blank line (training's paragraph end)."""
    return re.split(r"\n[ \t]*\n", rest, maxsplit=1)[0]


def _quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    q = np.quantile(values, [0.5, 0.9, 1.0])
    return f"{q[0]:.2f}/{q[1]:.2f}/{q[2]:.2f}"


def _pr(tp: int, said: int, positives: int) -> str:
    return (f"precision {tp}/{said} = {tp / said:.2f}" if said else "precision -/0") + ", " + (
        f"recall {tp}/{positives} = {tp / positives:.2f}" if positives else "recall -/0")


def run_file(path: Path, server: ServerProcess, runtime, options: AnswerOptions, n: int, window: int) -> dict:
    rule = with_bundle_stop(options, runtime.bundle.stop_threshold, runtime.bundle.stop_calibration)
    cal, cap = rule.stop_calibration, options.max_sentences
    ends, lengths = collections.Counter(), []
    raw_at, rule_at = collections.defaultdict(list), collections.defaultdict(list)
    stops = near = reachable = near_reachable = 0
    errors = []
    tf = collections.Counter()  # teacher forced: positions, said, tp, positives
    first_tf = []
    tok, limit, comma = runtime.tokenizer, runtime.max_sentence_tokens, runtime.split_on_comma
    for case in prompts_from(path, n):
        r = max(len(sentence_token_ids(paragraph_rest(case.rest), tok, limit, comma)), 1)
        with edge.connect(server.address, runtime, options=options) as chat:
            answer = chat.ask(case.prompt)
            answer.text()
        said = len(answer.sentences)
        ends[answer.end.reason] += 1
        lengths.append(said)
        steps = [s.stop_probability for s in answer.sentences[1:]] + [answer.end.stop_probability]
        for k, p in enumerate(steps, start=1):  # the step after k answered sentences
            raw_at[k].append(p)
            rule_at[k].append(cal.probability(p, k) if cal else p)
        if 1 <= r <= cap:
            reachable += 1
        if answer.end.reason == "stop":
            stops += 1
            errors.append(said - r)
            if abs(said - r) <= window:
                near += 1
                near_reachable += 1 <= r <= cap
        # the document's own paragraph, sentence by sentence, after the prompt
        truth = sentence_token_ids(paragraph_rest(case.rest), tok, limit, comma)[:cap]
        if not truth:
            continue
        prompt = runtime.prompt_sentences(case.prompt)
        with CloudClient(server.address) as client:
            with client.conversation(runtime.model_id, runtime.d_model) as conv:
                conv.append(runtime.encode(prompt))
                first = 0
                for k, ids in enumerate(truth, start=1):
                    step = conv.append(runtime.encode([ids]))
                    stop = stop_decision(step.stop, step.stop_probability, rule.stop_threshold, cal, k)
                    end = k == r
                    tf["positions"] += 1
                    tf["said"] += stop
                    tf["tp"] += stop and end
                    tf["positives"] += end
                    first = first or (k if stop else 0)
                first_tf.append(first)
    total = sum(ends.values())
    hist = collections.Counter(lengths)
    out = {"file": str(path), "answers": total, "stopped": stops, "ends": dict(ends),
           "length_histogram": {k: hist[k] for k in sorted(hist)},
           "length_median": statistics.median(lengths), "window": window,
           "stop_precision": near / stops if stops else None,
           "stop_recall": near_reachable / reachable if reachable else None,
           "stop_minus_reference": errors,
           "p_stop_by_position": {k: {"raw": raw_at[k], "rule": rule_at[k]} for k in sorted(raw_at)},
           "teacher_forced": dict(tf), "teacher_forced_first_stop": first_tf}
    print(f"{path}: {stops}/{total} answers ended by the stop rule; ends {dict(ends)}; sentences per answer median "
          f"{statistics.median(lengths)} (min {min(lengths)}, max {max(lengths)}); lengths {out['length_histogram']}")
    print(f"  vs the document's paragraph end (|n - r| <= {window}): {_pr(near, stops, 0).split(',')[0]}, recall "
          f"{near_reachable}/{reachable}" + (f" = {near_reachable / reachable:.2f}" if reachable else "") +
          (f"; stop - reference median {statistics.median(errors):+g}" if errors else ""))
    print(f"  teacher forced on the paragraph's own sentences ({tf['positions']} positions, {tf['positives']} "
          f"paragraph ends within the cap): {_pr(tf['tp'], tf['said'], tf['positives'])}")
    print("  P(stop) by answer position n, median/p90/max, raw | " + ("calibrated (what the rule thresholds)" if cal
                                                                      else "the rule reads it raw"))
    for k in sorted(raw_at):
        print(f"    n={k}: {_quantiles(raw_at[k])} | {_quantiles(rule_at[k])}  ({len(raw_at[k])} answers)")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", nargs="+", type=Path, help=".jsonl or .jsonl.gz files with a text field")
    ap.add_argument("--model", type=Path, default=Path("models/default"))
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--window", type=int, default=2, help="a stop within this many sentences of the paragraph end "
                                                          "is near it")
    ap.add_argument("--raw-stop", action="store_true", help="decide on the head's raw P(stop) (edge-chat --raw-stop)")
    ap.add_argument("--stop-threshold", type=float, default=None, help="edge-chat's --stop-threshold")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    options = replace(AnswerOptions(), calibrate_stop=not args.raw_stop, stop_threshold=args.stop_threshold)
    runtime = edge.load_runtime(args.model / "edge", threads=1)
    with ServerProcess.serve(args.model / "cloud", threads=1) as server:
        results = [run_file(path, server, runtime, options, args.prompts, args.window) for path in args.corpus]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
