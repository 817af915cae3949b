"""Output throughput after the prefill (paper Table 3): the SLLM against every token-level baseline
flavour, on the same prompts:

    SLLM end to end   edge runtime (ONNX Runtime) + a real cloud server over gRPC on loopback
    SLLM in-process   edge runtime + the cloud engine called directly (no gRPC)
    SLLM + speculation  the end to end path through the edge's own stepper (edge.remote.RemoteStepper)
                      speculating N sentences ahead, against a server of its own that guesses with the
                      edge's graphs (bench.rtt's speculation row): the cloud's chain for the next sentence
                      (decode, encode, step) runs on the other core while the edge decodes and checks
                      this one. Greedy, so its outputs must equal the end to end path's (counted)
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
SPEC = "sllm_spec"  # the speculation path, when there is one
RUN_KEYS = {"sllm_e2e": "e2e", "sllm_inproc": "inproc", SPEC: "spec"}  # its runs' key in a prompt's record


def spec_label(n: int) -> str:
    return f"SLLM end to end + speculation (N = {n})"


def speculating_server(models, n: int, threads: int, wire_dtype: str, work: Path):
    """The speculation path's server, not started (bench.rtt's speculation row: `sllm-cloud serve` of the
    model's cloud/ with --speculate-max n, guessing with its edge/ graphs), and address -> its stepper."""
    from bench import rtt

    rt = models.runtime
    # the token-level rows' fields (baseline bundle, their generator) are not read by an SLLM row
    ctx = rtt.Ctx(models.root, rt, None, models.cloud_manifest, work, threads, wire_dtype, "auto",
                  int(rt.bundle.manifest["bos_id"]), rt.path)
    variant = rtt.speculation_variant(n)
    server, _ = variant.server(ctx)
    return server, lambda address: sllm_loop.SpeculatingStepper(variant.connect(ctx, address))
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
                   baseline_threads: tuple[int, ...] = (1, 2), cache: Path | None = None,
                   spec_stepper: sllm_loop.SpeculatingStepper | None = None) -> dict:
    """spec_stepper: the speculation path (`speculating_server`'s), or None for no such row."""
    rt, engine = models.runtime, models.engine
    grpc_stepper = sllm_loop.GrpcStepper(client, rt.model_id, rt.d_model, wire_dtype)
    local_stepper = sllm_loop.EngineStepper(engine)
    steppers = {"sllm_e2e": grpc_stepper, "sllm_inproc": local_stepper}
    if spec_stepper is not None:
        steppers[SPEC] = spec_stepper
    max_sentences = engine.max_positions
    max_positions = models.baseline.config.max_position_embeddings
    bos = int(rt.bundle.manifest["bos_id"])
    flavours = baselines.make_flavours(models.baseline, list(baseline_threads), cache)
    keys = {baselines.key(f.name, f.threads): f for f in flavours}

    # warm-up: first calls allocate, load kernels and open the channel
    warm = text.prompts(8, 1)[0]
    for stepper in steppers.values():
        sllm_loop.generate(rt, stepper, warm, 8, max_sentences)
    for f in flavours:
        f.timed([bos] + flatten(warm), 8)

    plan = [(P, T, text.prompts(P, repeats)) for P in prompt_tokens for T in output_tokens]
    runs: list[list[dict]] = [[] for _ in plan]
    notes: set[str] = set()
    turn = 0
    for r in range(rounds):
        for i, (P, T, prompts) in enumerate(plan):
            for prompt in prompts:
                runs[i].append({"round": r, **_one_prompt(rt, steppers, keys, client, prompt, T, max_sentences,
                                                           max_positions, bos, turn, notes, f"prompt {P}/output {T}")})
                turn += 1
                advance()
    sllm = [p for p in (*SLLM_PATHS, SPEC) if p in steppers]
    points = [_point(P, T, point_runs, sllm, keys, rounds) for (P, T, _), point_runs in zip(plan, runs)]
    labels = {**SLLM_LABELS, **({SPEC: spec_label(spec_stepper.runner.speculate)} if spec_stepper else {})}
    return _summary(points, sllm, labels, keys, rounds, wire_dtype, sorted(notes))


def _one_prompt(rt, steppers: dict, keys: dict, client, prompt, T: int, max_sentences: int,
                max_positions: int, bos: int, turn: int, notes: set, where: str) -> dict:
    """One prompt on every path: the SLLM end to end, then the others in a rotated order."""
    before = client.stats()
    e2e = sllm_loop.generate(rt, steppers["sllm_e2e"], prompt, T, max_sentences)
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
    others = [*(p for p in steppers if p != "sllm_e2e"), *keys]
    for path in others[turn % len(others):] + others[: turn % len(others)]:
        if path in steppers:
            run = out[RUN_KEYS[path]] = sllm_loop.generate(rt, steppers[path], prompt, T, max_sentences).as_dict()
            run["same_output_as_e2e"] = run["output"] == e2e.output
            if path == SPEC:
                s = steppers[path].stats
                run.update(accepted=s.accepted, corrected=s.corrected, declined=s.declined)
        else:
            run, tokens[path] = keys[path].timed(ids, n)
            out["baselines"][path] = run.as_dict()
    reference = next((tokens[k] for k, f in keys.items() if f.name == HF_REFERENCE), None)
    for path, run in out["baselines"].items():
        run["same_tokens_as_hf"] = None if reference is None else tokens[path] == reference
    return out


def _path_runs(runs: list[dict], path: str) -> list[dict]:
    """A path's runs among a point's prompt records."""
    return [x[RUN_KEYS[path]] if path in RUN_KEYS else x["baselines"][path] for x in runs]


def _rates_by_round(runs: list[dict], paths: list[str], rounds: int) -> dict[str, list[float]]:
    """{path: [tokens/s of this point in round 0, 1, ...]}."""
    return {path: [_rate(_path_runs([x for x in runs if x["round"] == r], path)) for r in range(rounds)]
            for path in paths}


def _point(P: int, T: int, runs: list[dict], sllm: list[str], keys: dict, rounds: int) -> dict:
    e2e_runs = [x["e2e"] for x in runs]
    sllm_runs = [r for p in sllm for r in _path_runs(runs, p)]
    by_round = _rates_by_round(runs, [*sllm, *keys], rounds)
    prefill = {p: _path_runs(runs, p) for p in [*sllm, *keys]}
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
        "ended": sorted({r["ended"] for r in sllm_runs}),
        "runs": runs,
    }


def _summary(points: list[dict], sllm: list[str], labels: dict, keys: dict, rounds: int, wire_dtype: str,
             notes: list[str]) -> dict:
    paths = [*sllm, *keys]
    # one figure per path and round: the mean over points (the paper's "mean output throughput")
    per_round = {p: [float(np.mean([pt["tokens_per_s_by_round"][p][r] for pt in points])) for r in range(rounds)]
                 for p in paths}
    fastest = max(keys, key=lambda k: statistics.median(per_round[k]))

    def ratios(path: str, base: str) -> dict:  # paired round by round: both ran under the same load
        return _spread([a / b if b else float("nan") for a, b in zip(per_round[path], per_round[base])])

    vs = {k: {RUN_KEYS[p]: ratios(p, k) for p in sllm} for k in keys}
    for pt in points:
        s = pt["tokens_per_s"]
        s["baseline"] = s[fastest]
        pt["prefill_ms"]["baseline"] = pt["prefill_ms"][fastest]
        for p in sllm:
            pt[f"ratio_{RUN_KEYS[p]}"] = s[p] / s[fastest] if s[fastest] else float("nan")
    mean = {p: float(statistics.median(per_round[p])) for p in paths}
    mean["baseline"] = mean[fastest]
    reference = next((k for k, f in keys.items() if f.name == HF_REFERENCE), None)
    agree = {k: [r["baselines"][k]["same_tokens_as_hf"] for pt in points for r in pt["runs"]]
             for k in keys if k != reference}
    out = {
        "rounds": rounds, "paths": paths,
        "labels": {**labels, **{k: baselines.label(f.name, f.threads) for k, f in keys.items()}},
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
        "breakdown": breakdown(points, [RUN_KEYS[p] for p in sllm], list(keys), fastest),
    }
    if SPEC in sllm:
        spec = vs[fastest]["spec"]
        out.update(ratio_spec=spec["median"], ratio_spec_range=[spec["min"], spec["max"]],
                   speculation=speculation_summary(points, ratios(SPEC, "sllm_e2e")))
    return out


def speculation_summary(points: list[dict], vs_e2e: dict) -> dict:
    """The speculation path against the plain end to end one: outputs identical (greedy must), the
    guesses accepted / corrected / declined per run, its tok/s over the plain path's (paired by round)."""
    runs = [r["spec"] for p in points for r in p["runs"]]
    counts = {k: [r[k] for r in runs] for k in ("accepted", "corrected", "declined")}
    checked = sum(counts["accepted"]) + sum(counts["corrected"])
    return {"runs": len(runs), "identical_outputs": sum(r["same_output_as_e2e"] for r in runs),
            "accepted": sum(counts["accepted"]), "corrected": sum(counts["corrected"]),
            "declined": sum(counts["declined"]),
            "per_run": {k: _spread([float(v) for v in vs]) for k, vs in counts.items()},
            "acceptance": sum(counts["accepted"]) / checked if checked else 0.0, "ratio_vs_e2e": vs_e2e}


def breakdown(points: list[dict], paths: list[str], keys: list[str], fastest: str) -> dict:
    """Where the generation time goes, over all runs: cloud steps and wire bytes per output token,
    and the edge encode / cloud step / edge decode shares of the time after the prefill (paths: the
    SLLM runs' keys, "e2e", "inproc", "spec"; wire bytes where measured, the e2e path's)."""
    out = {}
    for path in paths:
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
