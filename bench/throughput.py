"""Output throughput after the prefill (paper Table 3): the SLLM against every token-level baseline
flavour, on the same prompts:

    SLLM end to end   edge runtime (ONNX Runtime) + a real cloud server over gRPC on loopback
    SLLM in-process   edge runtime + the cloud engine called directly (no gRPC)
    baselines         the token-level OPT three ways (`bench.baselines`: Hugging Face generate,
                      a torch loop with a preallocated KV cache, ONNX Runtime with its KV cache),
                      each at every thread count asked for

Each prompt runs on every path in turn: the SLLM end to end first (its output length sets the
baselines'), then the others in an order that rotates from prompt to prompt, so background load
and a 2-thread session's spinning pool fall on all alike. Every baseline generates exactly as many
tokens as the SLLM produced end to end for that prompt. The whole plan runs `rounds` times; each
round gives one figure per path (the mean over (prompt, output) points of tokens/s), and the
report shows min / median / max over rounds. The headline ratio is against the fastest baseline
(highest median), paired round by round.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import baselines, sllm_loop
from bench.texts import ValidationText, flatten

SLLM_PATHS = ("sllm_e2e", "sllm_inproc")
SLLM_LABELS = {"sllm_e2e": "SLLM end to end (gRPC)", "sllm_inproc": "SLLM in-process"}
HF_REFERENCE = "hf-generate"  # the other flavours' greedy tokens are checked against its


def _sum(runs: list[dict], key: str) -> float:
    return float(sum(r[key] for r in runs))


def _rate(runs: list[dict]) -> float:
    """tokens / seconds over all runs of a point (a long run weighs more than a short one)."""
    seconds = _sum(runs, "gen_s")
    return _sum(runs, "tokens") / seconds if seconds > 0 else 0.0


def _spread(xs: list[float]) -> dict:
    return {"min": float(min(xs)), "median": float(statistics.median(xs)), "max": float(max(xs))}


def run_throughput(models, text: ValidationText, prompt_tokens: list[int], output_tokens: list[int], repeats: int,
                   client, wire_dtype: str, advance: Callable[[], None] = lambda: None, rounds: int = 3,
                   baseline_threads: tuple[int, ...] = (1, 2), cache: Path | None = None) -> dict:
    rt, engine = models.runtime, models.engine
    grpc_stepper = sllm_loop.GrpcStepper(client, rt.model_id, rt.d_model, wire_dtype)
    local_stepper = sllm_loop.EngineStepper(engine)
    max_sentences = engine.max_positions
    max_positions = models.baseline.config.max_position_embeddings
    bos = int(rt.bundle.manifest["bos_id"])
    flavours = baselines.make_flavours(models.baseline, list(baseline_threads), cache)
    keys = {baselines.key(f.name, f.threads): f for f in flavours}

    # warm-up: first calls allocate, load kernels and open the channel
    warm = text.prompts(8, 1)[0]
    sllm_loop.generate(rt, grpc_stepper, warm, 8, max_sentences)
    sllm_loop.generate(rt, local_stepper, warm, 8, max_sentences)
    for f in flavours:
        f.timed([bos] + flatten(warm), 8)

    plan = [(P, T, text.prompts(P, repeats)) for P in prompt_tokens for T in output_tokens]
    runs: list[list[dict]] = [[] for _ in plan]
    notes: set[str] = set()
    turn = 0
    for r in range(rounds):
        for i, (P, T, prompts) in enumerate(plan):
            for prompt in prompts:
                runs[i].append({"round": r, **_one_prompt(rt, grpc_stepper, local_stepper, keys, client, prompt, T,
                                                           max_sentences, max_positions, bos, turn, notes,
                                                           f"prompt {P}/output {T}")})
                turn += 1
                advance()
    points = [_point(P, T, point_runs, keys, rounds) for (P, T, _), point_runs in zip(plan, runs)]
    return _summary(points, keys, rounds, wire_dtype, sorted(notes))


def _one_prompt(rt, grpc_stepper, local_stepper, keys: dict, client, prompt, T: int, max_sentences: int,
                max_positions: int, bos: int, turn: int, notes: set, where: str) -> dict:
    """One prompt on every path: the SLLM end to end, then the others in a rotated order."""
    before = client.stats()
    e2e = sllm_loop.generate(rt, grpc_stepper, prompt, T, max_sentences)
    after = client.stats()
    ids = [bos] + flatten(prompt)
    n = max(2, min(e2e.tokens, max_positions - len(ids)))
    if n < e2e.tokens:
        notes.add(f"{where}: the baseline's {max_positions} positions cap its output at {n} tokens (the SLLM "
                  f"made {e2e.tokens})")
    out = {"e2e": {**e2e.as_dict(), "server_forward_passes": int(after.forward_passes_total
                                                                 - before.forward_passes_total)},
           "baselines": {}}
    tokens = {}
    others = ["sllm_inproc", *keys]
    for path in others[turn % len(others):] + others[: turn % len(others)]:
        if path == "sllm_inproc":
            out["inproc"] = sllm_loop.generate(rt, local_stepper, prompt, T, max_sentences).as_dict()
        else:
            run, tokens[path] = keys[path].timed(ids, n)
            out["baselines"][path] = run.as_dict()
    reference = next((tokens[k] for k, f in keys.items() if f.name == HF_REFERENCE), None)
    for path, run in out["baselines"].items():
        run["same_tokens_as_hf"] = None if reference is None else tokens[path] == reference
    return out


def _rates_by_round(runs: list[dict], keys: dict, rounds: int) -> dict[str, list[float]]:
    """{path: [tokens/s of this point in round 0, 1, ...]}."""
    out = {}
    for path, get in (("sllm_e2e", lambda x: x["e2e"]), ("sllm_inproc", lambda x: x["inproc"]),
                      *((k, lambda x, k=k: x["baselines"][k]) for k in keys)):
        out[path] = [_rate([get(x) for x in runs if x["round"] == r]) for r in range(rounds)]
    return out


def _point(P: int, T: int, runs: list[dict], keys: dict, rounds: int) -> dict:
    e2e_runs, in_runs = [x["e2e"] for x in runs], [x["inproc"] for x in runs]
    by_round = _rates_by_round(runs, keys, rounds)
    prefill = {"sllm_e2e": e2e_runs, "sllm_inproc": in_runs, **{k: [x["baselines"][k] for x in runs] for k in keys}}
    return {
        "prompt_tokens_target": P, "output_tokens_target": T,
        "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in e2e_runs])),
        "prompt_sentences": float(np.mean([r["prompt_sentences"] for r in e2e_runs])),
        "output_tokens": float(np.mean([r["tokens"] for r in e2e_runs])),
        "output_sentences": float(np.mean([r["sentences"] for r in e2e_runs])),
        "baseline_output_tokens": float(np.mean([x["baselines"][k]["tokens"] + 1 for x in runs for k in keys])),
        "tokens_per_s_by_round": by_round,
        "tokens_per_s": {path: float(statistics.median(v)) for path, v in by_round.items()},
        "prefill_ms": {path: 1e3 * float(np.median([r["prefill_s"] for r in rs])) for path, rs in prefill.items()},
        "ended": sorted({r["ended"] for r in e2e_runs + in_runs}),
        "runs": runs,
    }


def _summary(points: list[dict], keys: dict, rounds: int, wire_dtype: str, notes: list[str]) -> dict:
    paths = [*SLLM_PATHS, *keys]
    # one figure per path and round: the mean over points (the paper's "mean output throughput")
    per_round = {p: [float(np.mean([pt["tokens_per_s_by_round"][p][r] for pt in points])) for r in range(rounds)]
                 for p in paths}
    fastest = max(keys, key=lambda k: statistics.median(per_round[k]))

    def ratios(sllm: str, base: str) -> dict:  # paired round by round: both ran under the same load
        return _spread([a / b if b else float("nan") for a, b in zip(per_round[sllm], per_round[base])])

    vs = {k: {"e2e": ratios("sllm_e2e", k), "inproc": ratios("sllm_inproc", k)} for k in keys}
    for pt in points:
        s = pt["tokens_per_s"]
        s["baseline"] = s[fastest]
        pt["prefill_ms"]["baseline"] = pt["prefill_ms"][fastest]
        pt["ratio_e2e"] = s["sllm_e2e"] / s[fastest] if s[fastest] else float("nan")
        pt["ratio_inproc"] = s["sllm_inproc"] / s[fastest] if s[fastest] else float("nan")
    mean = {p: float(statistics.median(per_round[p])) for p in paths}
    mean["baseline"] = mean[fastest]
    reference = next((k for k, f in keys.items() if f.name == HF_REFERENCE), None)
    agree = {k: [r["baselines"][k]["same_tokens_as_hf"] for pt in points for r in pt["runs"]]
             for k in keys if k != reference}
    return {
        "rounds": rounds, "paths": paths,
        "labels": {**SLLM_LABELS, **{k: baselines.label(f.name, f.threads) for k, f in keys.items()}},
        "baselines": {k: {"flavour": f.name, "threads": f.threads, "description": f.description}
                      for k, f in keys.items()},
        "tokens_per_s_by_round": per_round,
        "tokens_per_s": {p: _spread(per_round[p]) for p in paths},
        "mean_tokens_per_s": mean,  # medians over rounds; "baseline" = the fastest flavour
        "fastest_baseline": fastest,
        "ratio_e2e": vs[fastest]["e2e"]["median"], "ratio_inproc": vs[fastest]["inproc"]["median"],
        "ratio_e2e_range": [vs[fastest]["e2e"]["min"], vs[fastest]["e2e"]["max"]],
        "ratio_inproc_range": [vs[fastest]["inproc"]["min"], vs[fastest]["inproc"]["max"]],
        "ratios_vs": vs,
        "hf_reference": reference,  # whose greedy tokens the others are checked against
        "same_tokens_as_hf": {k: (float(np.mean(v)) if None not in v else None) for k, v in agree.items()},
        "points": points, "wire_dtype": wire_dtype, "notes": notes,
        "breakdown": breakdown(points, list(keys), fastest),
    }


def breakdown(points: list[dict], keys: list[str], fastest: str) -> dict:
    """Where the generation time goes, over all runs: cloud steps and wire bytes per output token,
    and the edge encode / cloud step / edge decode shares of the time after the prefill."""
    out = {}
    for path in ("e2e", "inproc"):
        runs = [r[path] for p in points for r in p["runs"]]
        tokens, gen = _sum(runs, "tokens"), _sum(runs, "gen_s")
        split = {k: _sum(runs, f"{k}_s") / gen if gen else 0.0 for k in ("encode", "step", "decode")}
        split["other"] = max(0.0, 1.0 - sum(split.values()))
        row = {"tokens": tokens, "sentences": _sum(runs, "sentences"),
               "tokens_per_sentence": tokens / max(_sum(runs, "sentences"), 1),
               "cloud_steps_per_token": _sum(runs, "cloud_steps") / max(tokens, 1),
               "time_split": split,
               "ms_per_sentence": {k: 1e3 * _sum(runs, f"{k}_s") / max(_sum(runs, "sentences"), 1)
                                   for k in ("encode", "step", "decode")}}
        if path == "e2e":
            row["wire_bytes_per_token"] = (_sum(runs, "request_bytes") + _sum(runs, "reply_bytes")) / max(tokens, 1)
            row["wire_bytes_per_step"] = ((_sum(runs, "request_bytes") + _sum(runs, "reply_bytes"))
                                          / max(_sum(runs, "cloud_steps"), 1))
            # the server's own count, prefill included (one forward pass per prompt)
            row["server_forward_passes_per_token"] = ((_sum(runs, "server_forward_passes") - len(runs))
                                                      / max(tokens, 1))
        out[path] = row
    per = {}
    for k in keys:
        b = [r["baselines"][k] for p in points for r in p["runs"]]
        per[k] = {"tokens": _sum(b, "tokens"),
                  "forward_passes_per_token": _sum(b, "forward_passes") / max(_sum(b, "tokens"), 1)}
    out["baseline"] = {**per[fastest], "flavour": fastest, "flavours": per}
    return out
