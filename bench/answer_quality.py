"""Do answers end, and do they loop? The shipped model's answers under several decoding settings.

    python -m bench.answer_quality                 # all 195 validation paragraphs, 9 settings (5-10 min)
    python -m bench.answer_quality --quick         # 12 prompts, 4 settings: a smoke test

Prompts: the first piece of each paragraph of the validation split (the bundled corpus, split as
in training), token ids as the edge segments them. Each setting answers every prompt with the edge
sentence loop as edge-chat runs it (edge/ in ONNX Runtime, cloud/ in this process through the
engine), up to --max-sentences.

How the stop rule is applied: each setting runs once with the stop rule off, recording P(stop)
before every sentence; the answer under threshold t is that run cut before the first sentence
whose P(stop) >= t. That is exactly the text the loop gives with threshold t (stopping only ends
the loop; sentence i samples with seed + i either way), and it lets one run give every threshold.

Per setting, at the bundle's threshold (and the real paragraphs' figures beside them):
  distinct-1/2     distinct token n-grams / all n-grams, over all answers (n-grams within an answer)
  repeated         share of answers holding a sentence identical to an earlier one of the same answer
  sentences/tokens answer length (mean; sentences also median); "stopped" = share ended by the stop
                   head before the cap; the length histogram beside the real paragraphs' one
  PPL              of the answers' tokens under the token-level baseline (models/default/baseline),
                   each answer given bos + its prompt: fluency as another model of the corpus sees it
Sampled settings draw with seed = prompt index (sentence i: + i), so a run is reproducible.
Writes docs/results/answer-quality.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from bench.config import ROOT
from bench.models import load_models
from bench.sllm_loop import EngineStepper, PastStop
from sllm.edge.loop import SentenceEvent, TurnEnd, sentence_loop
from sllm.runtime.sampling import Sampling
from sllm.sentences.sampling import (DEFAULT_NO_REPEAT_NGRAM, DEFAULT_NO_REPEAT_SENTENCE, DEFAULT_REPETITION_PENALTY,
                                     StopCalibration, stop_decision)

GREEDY = Sampling()
SAMPLED = Sampling(temperature=0.8, top_p=0.9)


@dataclass(frozen=True)
class Setting:
    name: str
    sampling: Sampling  # seeded per prompt when sampled


def settings(quick: bool) -> list[Setting]:
    defaults = dict(repetition_penalty=DEFAULT_REPETITION_PENALTY, no_repeat_ngram_size=DEFAULT_NO_REPEAT_NGRAM,
                    no_repeat_sentence=DEFAULT_NO_REPEAT_SENTENCE)
    chosen = ("edge-chat defaults (penalty {repetition_penalty:g}, no-repeat {no_repeat_ngram_size}-gram, "
              "sentence guard {no_repeat_sentence})").format(**defaults)
    controls = [("no controls", {}), ("penalty 1.2", dict(repetition_penalty=1.2)),
                ("penalty 1.5", dict(repetition_penalty=1.5)), ("no-repeat 3-gram", dict(no_repeat_ngram_size=3)),
                ("sentence guard", dict(no_repeat_sentence=True)),
                ("penalty 1.2 + sentence guard", dict(repetition_penalty=1.2, no_repeat_sentence=True)),
                (chosen, defaults)]
    sampled = [controls[0], controls[-1]]
    if quick:
        controls = sampled
    out = [Setting(f"greedy, {name}", replace(GREEDY, **kw)) for name, kw in controls]
    out += [Setting(f"T=0.8 top-p 0.9, {name}", replace(SAMPLED, **kw)) for name, kw in sampled]
    return out


# ---------------------------------------------------------------- prompts and real paragraphs

def validation_paragraphs(runtime, model_dir: Path) -> list[list[list[int]]]:
    """The validation split's paragraphs, each a list of its pieces' token ids (the edge's segmentation)."""
    from sllm.training.config import DataConfig
    from sllm.training.data.corpus import load_documents, split_documents
    from sllm.training.data.passage_data import build_passages

    data = DataConfig()
    svae_config = model_dir / "svae" / "config.json"
    if svae_config.is_file():  # the split the shipped model was trained with
        data = DataConfig(**{k: v for k, v in json.loads(svae_config.read_text())["data"].items()
                             if k in ("corpus", "val_fraction", "split_seed")})
    _, val = split_documents(load_documents(data.corpus or None), data.val_fraction, data.split_seed)
    p = build_passages(val, runtime.tokenizer, runtime.max_sentence_tokens, runtime.split_on_comma, 10**9, 10**9)
    ends = np.flatnonzero(p.para_end)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [[p.sentences.sentence(int(i)) for i in range(a, b + 1)] for a, b in zip(starts, ends)]


# ---------------------------------------------------------------- running and cutting

@dataclass
class Trace:
    sentences: list[list[int]]
    p_stop: list[float]  # P(stop) before each sentence, and after the last one
    ended: str  # the loop's reason with the stop rule off: max_sentences, empty, repeat, context_full


def run_setting(runtime, engine, prompts: list[list[int]], sampling: Sampling, max_sentences: int) -> list[Trace]:
    stepper = EngineStepper(engine)
    out = []
    for i, prompt in enumerate(prompts):
        s = sampling if sampling.greedy else replace(sampling, seed=i)
        stepper.open()
        events = list(sentence_loop(runtime, PastStop(stepper), [prompt], s, room=engine.max_positions - 1,
                                    max_sentences=max_sentences))
        said = [e for e in events if isinstance(e, SentenceEvent)]
        end: TurnEnd = events[-1]
        # P(stop) before each sentence, then at the step after the last one (before an empty or repeated decode)
        out.append(Trace([e.ids for e in said], [e.stop_probability for e in said] + [end.stop_probability],
                         end.reason))
    stepper.close()
    return out


def cut(trace: Trace, threshold: float | None, max_sentences: int, min_sentences: int = 1,
        calibration: StopCalibration | None = None) -> tuple[list[list[int]], str]:
    """The answer the loop gives with this threshold (None: no stop rule) and stop calibration (the rule
    edge-chat applies, `stop_decision`), and why it ended."""
    if threshold is not None:
        for i in range(min_sentences, min(max_sentences, len(trace.p_stop))):
            if stop_decision(False, trace.p_stop[i], threshold, calibration, i):
                return trace.sentences[:i], "stop"
    return trace.sentences, trace.ended


# ---------------------------------------------------------------- measures

def distinct(answers: list[list[list[int]]], n: int) -> float:
    grams, total = set(), 0
    for a in answers:
        tokens = [t for s in a for t in s]
        for j in range(len(tokens) - n + 1):
            grams.add(tuple(tokens[j : j + n]))
            total += 1
    return len(grams) / total if total else float("nan")


def repeats_a_sentence(answer: list[list[int]]) -> bool:
    return len({tuple(s) for s in answer}) < len(answer)


def answer_measures(answers: list[list[list[int]]], reasons: list[str], max_sentences: int) -> dict:
    lengths = [len(a) for a in answers]
    return {"answers": len(answers), "distinct_1": distinct(answers, 1), "distinct_2": distinct(answers, 2),
            "repeated_sentence": float(np.mean([repeats_a_sentence(a) for a in answers])),
            "mean_sentences": float(np.mean(lengths)),
            "mean_tokens": float(np.mean([sum(len(s) for s in a) for a in answers])),
            "median_sentences": float(np.median(lengths)),
            "stopped": float(np.mean([r == "stop" and len(a) < max_sentences for a, r in zip(answers, reasons)])),
            "empty": float(np.mean([n == 0 for n in lengths])),
            "length_histogram": np.bincount(lengths, minlength=max_sentences + 1).tolist()}


def baseline_ppl(baseline, bos_id: int, prompts: list[list[int]], answers: list[list[list[int]]]) -> float:
    """exp(mean NLL) of the answers' tokens under the baseline, each after bos + its prompt."""
    import torch

    from sllm.modeling.losses import IGNORE_INDEX, token_nll_sum

    total, count = 0.0, 0
    with torch.inference_mode():
        for prompt, answer in zip(prompts, answers):
            tokens = [t for s in answer for t in s]
            if not tokens:
                continue
            ids = torch.tensor([[bos_id, *prompt, *tokens]])
            targets = ids[:, 1:].clone()
            targets[:, : len(prompt)] = IGNORE_INDEX  # the prompt is context, not scored
            nll, n = token_nll_sum(baseline(input_ids=ids).logits[:, :-1], targets)
            total, count = total + float(nll), count + int(n)
    return math.exp(total / count) if count else float("nan")


def real_measures(paragraphs: list[list[list[int]]], max_sentences: int) -> dict:
    """The same measures for the real continuations: each paragraph after its first piece, cut at the cap."""
    answers = [p[1 : 1 + max_sentences] for p in paragraphs]
    reasons = ["stop" if len(p) - 1 < max_sentences else "max_sentences" for p in paragraphs]
    return {**answer_measures(answers, reasons, max_sentences),
            "paragraph_pieces": {q: float(np.percentile([len(p) for p in paragraphs], q))
                                 for q in (10, 25, 50, 75, 90)}}


# ---------------------------------------------------------------- the run

def measure(model_dir: Path, n_prompts: int, max_sentences: int, quick: bool, threads: int,
            thresholds: list[float], log=print) -> dict:
    t0 = time.perf_counter()
    models = load_models(model_dir, threads)
    rt = models.runtime
    paragraphs = validation_paragraphs(rt, model_dir)
    if n_prompts:
        keep = np.unique(np.linspace(0, len(paragraphs) - 1, num=min(n_prompts, len(paragraphs))).astype(int))
        paragraphs = [paragraphs[i] for i in keep]
    prompts = [p[0] for p in paragraphs]
    calibration = rt.bundle.stop_calibration  # edge-chat's default rule: calibrated where the bundle has it
    bundle_threshold = calibration.threshold if calibration is not None else rt.bundle.stop_threshold
    log(f"{len(prompts)} prompts (first pieces of validation paragraphs); bundle stop threshold {bundle_threshold}"
        f"{' (calibrated)' if calibration is not None else ''}")
    real = real_measures(paragraphs, max_sentences)
    if models.baseline_trained:
        real["ppl"] = baseline_ppl(models.baseline, rt.tokenizer.bos_id, prompts,
                                   [p[1 : 1 + max_sentences] for p in paragraphs])
    rows = []
    # a bundle without a threshold stops on the head's argmax: P(stop) > 0.5 (ties aside)
    levels = {"bundle": 0.5 if bundle_threshold is None else bundle_threshold,
              **{f"{t:g}": t for t in sorted(thresholds)}, "none": None}
    for setting in settings(quick):
        t = time.perf_counter()
        traces = run_setting(rt, models.engine, prompts, setting.sampling, max_sentences)
        row = {"setting": setting.name, "sampling": asdict(setting.sampling), "seconds": time.perf_counter() - t,
               "ended_without_stop_rule": {k: sum(tr.ended == k for tr in traces) for k in {tr.ended for tr in traces}}}
        for key, threshold in levels.items():
            cuts = [cut(tr, threshold, max_sentences, calibration=calibration if key == "bundle" else None)
                    for tr in traces]
            answers, reasons = [c[0] for c in cuts], [c[1] for c in cuts]
            m = answer_measures(answers, reasons, max_sentences)
            if key == "bundle":
                if models.baseline_trained:
                    m["ppl"] = baseline_ppl(models.baseline, rt.tokenizer.bos_id, prompts, answers)
                m["examples"] = [rt.tokenizer.decode([t for s in a for t in s]) for a in answers[:3]]
            row[key] = {"threshold": threshold, **m}
        rows.append(row)
        b = row["bundle"]
        log(f"{setting.name}: stopped {b['stopped']:.0%}, repeated {b['repeated_sentence']:.0%}, "
            f"distinct-2 {b['distinct_2']:.2f}, {b['mean_sentences']:.1f} sentences, "
            f"PPL {b.get('ppl', float('nan')):.1f} "
            f"({row['seconds']:.0f} s)")
    return {"model": str(model_dir), "model_id": rt.model_id, "prompts": len(prompts), "max_sentences": max_sentences,
            "bundle_threshold": bundle_threshold, "bundle_calibrated": calibration is not None, "thresholds": levels, "quick": quick, "real": real, "settings": rows,
            "prompt_examples": [rt.tokenizer.decode(p) for p in prompts[:3]],
            "baseline": models.baseline_source, "seconds": time.perf_counter() - t0}


def render(r: dict) -> str:
    real, cap, rows = r["real"], r["max_sentences"], r["settings"]

    def line(name: str, m: dict) -> str:
        return (f"| {name} | {m['stopped']:.0%} | {m['empty']:.0%} | {m['repeated_sentence']:.0%} | "
                f"{m['distinct_1']:.2f} | {m['distinct_2']:.2f} | {m['mean_sentences']:.1f} / "
                f"{m['median_sentences']:g} | {m['mean_tokens']:.0f} | "
                f"{m.get('ppl', float('nan')):.1f} |")

    intro = (f"{r['prompts']} prompts (the first piece of each validation paragraph), up to {cap} sentences, stop "
             f"threshold {r['bundle_threshold']} (the bundle's{', on the calibrated P(stop)' if r.get('bundle_calibrated') else ''}; the other thresholds on the raw P(stop)). `python -m bench.answer_quality"
             f"{' --quick' if r['quick'] else ''}`; {r['seconds']:.0f} s.")
    header = (f"| setting | stopped < {cap} | empty | repeated sentence | distinct-1 | distinct-2 | sentences "
              "(mean / median) | tokens | baseline PPL |")
    lines = [f"# Answer quality: {r['model_id']}", "", intro, "", header, "|---|---|---|---|---|---|---|---|---|",
             line("real paragraphs (after their first piece)", real)]
    lines += [line(row["setting"], row["bundle"]) for row in rows]
    lines += ["", "Answer lengths in sentences (number of answers of 0, 1, ... sentences), at the bundle's "
              "threshold:", "",
              "| | " + " | ".join(str(i) for i in range(cap + 1)) + " |", "|---|" + "---|" * (cap + 1),
              "| real paragraphs | " + " | ".join(str(x) for x in real["length_histogram"]) + " |"]
    lines += [f"| {row['setting']} | " + " | ".join(str(x) for x in row["bundle"]["length_histogram"]) + " |"
              for row in rows]
    keys = [k for k in r["thresholds"] if k != "bundle"]
    lines += ["", f"Share of answers the stop head ends before {cap} sentences, by threshold:", "",
              "| setting | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {row['setting']} | " + " | ".join(f"{row[k]['stopped']:.0%}" for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--prompts", type=int, default=0, help="0 = every validation paragraph")
    ap.add_argument("--max-sentences", type=int, default=8)
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "answer-quality")
    a = ap.parse_args(argv)
    n = a.prompts or (12 if a.quick else 0)
    result = measure(a.model, n, a.max_sentences, a.quick, a.threads, a.thresholds)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
