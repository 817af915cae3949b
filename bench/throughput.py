"""Output throughput after the prefill (paper Table 3), three ways on the same prompts:

    SLLM end to end   edge runtime (ONNX Runtime) + a real cloud server over gRPC on loopback
    SLLM in-process   edge runtime + the cloud engine called directly (no gRPC)
    baseline          the token-level OPT, Hugging Face generate with its KV cache

Each prompt runs on the three paths in turn (interleaved, so background load falls on all alike);
the baseline generates exactly as many tokens as the SLLM produced end to end for that prompt.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from bench import baseline_gen, sllm_loop
from bench.texts import ValidationText, flatten


def _sum(runs: list[dict], key: str) -> float:
    return float(sum(r[key] for r in runs))


def _rate(runs: list[dict]) -> float:
    """tokens / seconds over all runs of a point (a long run weighs more than a short one)."""
    seconds = _sum(runs, "gen_s")
    return _sum(runs, "tokens") / seconds if seconds > 0 else 0.0


def run_throughput(models, text: ValidationText, prompt_tokens: list[int], output_tokens: list[int], repeats: int,
                   client, wire_dtype: str, advance: Callable[[], None] = lambda: None) -> dict:
    rt, engine, base = models.runtime, models.engine, models.baseline
    grpc_stepper = sllm_loop.GrpcStepper(client, rt.model_id, rt.d_model, wire_dtype)
    local_stepper = sllm_loop.EngineStepper(engine)
    max_sentences = engine.max_positions
    max_positions = base.config.max_position_embeddings
    bos = int(rt.bundle.manifest["bos_id"])

    # warm-up: first calls allocate, load kernels and open the channel
    warm = text.prompts(8, 1)[0]
    sllm_loop.generate(rt, grpc_stepper, warm, 8, max_sentences)
    sllm_loop.generate(rt, local_stepper, warm, 8, max_sentences)
    baseline_gen.generate(base, [bos] + flatten(warm), 8)

    points, notes = [], []
    for P in prompt_tokens:
        prompts = text.prompts(P, repeats)
        for T in output_tokens:
            runs = []
            for prompt in prompts:
                before = client.stats()
                e2e = sllm_loop.generate(rt, grpc_stepper, prompt, T, max_sentences)
                after = client.stats()
                inproc = sllm_loop.generate(rt, local_stepper, prompt, T, max_sentences)
                ids = [bos] + flatten(prompt)
                n = max(2, min(e2e.tokens, max_positions - len(ids)))
                if n < e2e.tokens:
                    notes.append(f"prompt {P}/output {T}: the baseline's {max_positions} positions cap its output at "
                                 f"{n} tokens (the SLLM made {e2e.tokens})")
                b = baseline_gen.generate(base, ids, n)
                runs.append({"e2e": {**e2e.as_dict(), "server_forward_passes":
                                     int(after.forward_passes_total - before.forward_passes_total)},
                             "inproc": inproc.as_dict(), "baseline": b.as_dict()})
                advance()
            e2e_runs, in_runs, b_runs = ([r[k] for r in runs] for k in ("e2e", "inproc", "baseline"))
            rates = {"sllm_e2e": _rate(e2e_runs), "sllm_inproc": _rate(in_runs), "baseline": _rate(b_runs)}
            points.append({
                "prompt_tokens_target": P, "output_tokens_target": T,
                "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in e2e_runs])),
                "prompt_sentences": float(np.mean([r["prompt_sentences"] for r in e2e_runs])),
                "output_tokens": float(np.mean([r["tokens"] for r in e2e_runs])),
                "output_sentences": float(np.mean([r["sentences"] for r in e2e_runs])),
                "baseline_output_tokens": float(np.mean([r["tokens"] + 1 for r in b_runs])),
                "tokens_per_s": rates,
                "ratio_e2e": rates["sllm_e2e"] / rates["baseline"] if rates["baseline"] else float("nan"),
                "ratio_inproc": rates["sllm_inproc"] / rates["baseline"] if rates["baseline"] else float("nan"),
                "prefill_ms": {"sllm_e2e": 1e3 * float(np.mean([r["prefill_s"] for r in e2e_runs])),
                               "sllm_inproc": 1e3 * float(np.mean([r["prefill_s"] for r in in_runs])),
                               "baseline": 1e3 * float(np.mean([r["prefill_s"] for r in b_runs]))},
                "ended": sorted({r["ended"] for r in e2e_runs + in_runs}),
                "runs": runs,
            })
    mean = {k: float(np.mean([p["tokens_per_s"][k] for p in points])) for k in ("sllm_e2e", "sllm_inproc", "baseline")}
    return {"points": points, "mean_tokens_per_s": mean,
            "ratio_e2e": mean["sllm_e2e"] / mean["baseline"], "ratio_inproc": mean["sllm_inproc"] / mean["baseline"],
            "wire_dtype": wire_dtype, "notes": sorted(set(notes)), "breakdown": breakdown(points)}


def breakdown(points: list[dict]) -> dict:
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
    b = [r["baseline"] for p in points for r in p["runs"]]
    out["baseline"] = {"tokens": _sum(b, "tokens"),
                       "forward_passes_per_token": _sum(b, "forward_passes") / max(_sum(b, "tokens"), 1)}
    return out
