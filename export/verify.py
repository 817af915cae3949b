"""Prove the exported graphs equal torch: ONNX checker, output parity, identical greedy tokens.

Parity rule: for every compared output, max |ORT - torch| <= ATOL * max(1, max |torch|),
i.e. 1e-4 absolute for outputs of magnitude <= 1 and 1e-4 relative above (logits).
ORT runs on the CPU provider, chosen deliberately (runtime.providers.cpu_session).

Greedy decoding through ORT (runtime.svae_onnx, the loop the edge runs) must give the
same tokens as torch `decode_sentences`. A sentence whose tokens differ only passes when
the first difference sits on a near-tie: torch's top-2 logits there are within the parity
tolerance, so a 1e-6 difference in arithmetic order can flip it; every such case is listed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import torch

from sllm.modeling.generate import decode_sentences
from sllm.modeling.sentence_vae import SentenceVAE
from sllm.runtime.svae_onnx import DecoderSpec, decode_sentence, decoder_step, encode, greedy_decode

ATOL = 1e-4
TOLERANCE_RULE = f"max|ORT - torch| <= {ATOL:g} * max(1, max|torch|)"


def check_graph(path: Path) -> str:
    """onnx.checker with full shape inference; returns "ok" or the checker's message."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return "ok"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        return f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def _compare(graph: str, source: str, shape: str, output: str, ref: np.ndarray, got: np.ndarray) -> dict:
    if ref.shape != got.shape:
        return {"graph": graph, "inputs": source, "shape": shape, "output": output, "max_abs_diff": None,
                "scale": None, "ok": False, "error": f"shape {got.shape} != torch {ref.shape}"}
    diff = float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return {"graph": graph, "inputs": source, "shape": shape, "output": output, "max_abs_diff": diff,
            "scale": scale, "ok": bool(np.isfinite(diff) and diff <= ATOL * max(1.0, scale))}


def _lengths_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


@torch.inference_mode()
def encoder_parity(model: SentenceVAE, session, real: list[list[int]], seed: int = 0) -> list[dict]:
    """Random token batches at several (batch, length) and real sentences at several batch sizes."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    cases = []
    Lmax = cfg.max_sentence_tokens
    for B, L in sorted({(1, 1), (2, min(7, Lmax)), (5, Lmax), (3, min(2, Lmax))}):
        ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
        lengths = [L] + torch.randint(1, L + 1, (B - 1,), generator=g).tolist()
        cases.append(("random", ids, _lengths_mask(lengths, L)))
    for B in (1, 2, 8):
        chunk = real[:B]
        if len(chunk) == B:
            L = max(len(t) for t in chunk)
            ids = torch.full((B, L), cfg.pad_id, dtype=torch.long)
            for r, t in enumerate(chunk):
                ids[r, : len(t)] = torch.tensor(t)
            cases.append(("real", ids, _lengths_mask([len(t) for t in chunk], L)))
    out = []
    for source, ids, mask in cases:
        ref = model.encoder(ids, mask).numpy()
        got = session.run(["vectors"], {"ids": ids.numpy(), "mask": mask.numpy()})[0]
        out.append(_compare("encoder", source, f"B={ids.shape[0]} L={ids.shape[1]}", "vectors", ref, got))
    return out


@torch.inference_mode()
def decoder_parity(model: SentenceVAE, session, real: list[list[int]], seed: int = 0) -> list[dict]:
    """Random (batch, step, past) cases, incl. past 0 (the first step) and a full-length step;
    real sentences teacher-forced in one call, and decoded step by step, each side with its own cache."""
    cfg, dec = model.cfg, model.decoder
    g = torch.Generator().manual_seed(seed + 1)
    n_pos = cfg.max_sentence_tokens + 1
    out = []
    shapes = [(1, 1, 0), (3, 1, 0), (2, 5, 0), (1, 1, n_pos - 1), (4, 1, 7), (2, 3, 9), (3, n_pos, 0)]
    for B, T, P in shapes:
        if P + T > n_pos:
            continue
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        memory = torch.randn(B, cfg.d_model, generator=g)
        past = torch.randn(dec.n_layers, 2, B, dec.n_heads, P, dec.head_dim, generator=g)
        ref_logits, ref_kv = dec(ids, memory, past)
        logits, kv = decoder_step(session, ids.numpy(), memory.numpy(), past.numpy())
        shape = f"B={B} T={T} P={P}"
        out.append(_compare("decoder", "random", shape, "logits", ref_logits.numpy(), logits))
        out.append(_compare("decoder", "random", shape, "present_kv", ref_kv.numpy(), kv))
    chunk = real[:4]
    if chunk:
        B = len(chunk)
        enc_ids = torch.full((B, max(len(t) for t in chunk)), cfg.pad_id, dtype=torch.long)
        for r, t in enumerate(chunk):
            enc_ids[r, : len(t)] = torch.tensor(t)
        memory = model.encoder(enc_ids, _lengths_mask([len(t) for t in chunk], enc_ids.shape[1]))
        dec_in, _ = model.teacher_forcing_targets(enc_ids, _lengths_mask([len(t) for t in chunk], enc_ids.shape[1]))
        dec_in = dec_in[:, :n_pos]
        ref_logits, ref_kv = dec(dec_in, memory)
        logits, kv = decoder_step(session, dec_in.numpy(), memory.numpy(), dec.empty_kv(B).numpy())
        shape = f"B={B} T={dec_in.shape[1]} P=0"
        out.append(_compare("decoder", "real, teacher-forced", shape, "logits", ref_logits.numpy(), logits))
        out.append(_compare("decoder", "real, teacher-forced", shape, "present_kv", ref_kv.numpy(), kv))
        # step by step: torch and ORT each carry their own cache forward
        t_kv, o_kv = dec.empty_kv(B), dec.empty_kv(B).numpy()
        worst = {"logits": None, "present_kv": None}
        for t in range(dec_in.shape[1]):
            step = dec_in[:, t : t + 1]
            ref_logits, t_kv = dec(step, memory, t_kv)
            logits, o_kv = decoder_step(session, step.numpy(), memory.numpy(), o_kv)
            for name, ref, got in (("logits", ref_logits.numpy(), logits), ("present_kv", t_kv.numpy(), o_kv)):
                row = _compare("decoder", "real, cached steps", f"B={B} T=1 P=0..{dec_in.shape[1] - 1}", name, ref, got)
                if worst[name] is None or not row["ok"] or (worst[name]["ok"] and
                                                           row["max_abs_diff"] > worst[name]["max_abs_diff"]):
                    worst[name] = row
        out.extend(worst.values())
    return out


def _pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), L), pad_id, dtype=torch.long)
    for r, t in enumerate(token_lists):
        ids[r, : len(t)] = torch.tensor(t, dtype=torch.long)
    return ids, _lengths_mask([len(t) for t in token_lists], L)


@torch.inference_mode()
def torch_reconstruct(model: SentenceVAE, token_lists: list[list[int]], batch_size: int = 32) -> list[list[int]]:
    out = []
    for s in range(0, len(token_lists), batch_size):
        ids, mask = _pad(token_lists[s : s + batch_size], model.cfg.pad_id)
        out.extend(decode_sentences(model.decoder, model.encode(ids, mask), model.cfg.max_sentence_tokens))
    return out


def ort_reconstruct(enc_session, dec_session, spec: DecoderSpec, pad_id: int, token_lists: list[list[int]],
                    batch_size: int = 32) -> list[list[int]]:
    out = []
    for s in range(0, len(token_lists), batch_size):
        memory = encode(enc_session, token_lists[s : s + batch_size], pad_id)
        out.extend(greedy_decode(dec_session, memory, spec))
    return out


@torch.inference_mode()
def _top2_gap(model: SentenceVAE, sentence: list[int], prefix: list[int]) -> tuple[float, float]:
    """torch's (top-1 minus top-2 logit, max |logit|) after bos + prefix, for the vector of `sentence`."""
    ids, mask = _pad([sentence], model.cfg.pad_id)
    memory = model.encoder(ids, mask)
    dec_in = torch.tensor([[model.cfg.bos_id] + prefix])
    logits = model.decoder(dec_in, memory)[0][0, -1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1]), float(logits.abs().max())


def greedy_agreement(model: SentenceVAE, enc_session, dec_session, spec: DecoderSpec,
                     token_lists: list[list[int]], batch_size: int = 32) -> tuple[dict, list[list[int]]]:
    """Torch `decode_sentences` vs the ORT loop (ORT encoder -> ORT decoder), sentence by sentence."""
    ref = torch_reconstruct(model, token_lists, batch_size)
    got = ort_reconstruct(enc_session, dec_session, spec, model.cfg.pad_id, token_lists, batch_size)
    differ = []
    for i, (r, o) in enumerate(zip(ref, got)):
        if r != o:
            k = next((j for j, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o)))
            gap, scale = _top2_gap(model, token_lists[i], r[:k])
            differ.append({"index": i, "position": k, "top2_gap": gap,
                           "near_tie": gap <= ATOL * max(1.0, scale)})
    result = {"sentences": len(token_lists), "identical": len(token_lists) - len(differ),
              "differ": differ, "batch_size": batch_size,
              "exact_match_torch": _exact(ref, token_lists), "exact_match_onnx": _exact(got, token_lists),
              "ok": len(token_lists) > 0 and all(d["near_tie"] for d in differ)}
    return result, got


@torch.inference_mode()
def sentence_agreement(model: SentenceVAE, enc_session, sentence_session, spec: DecoderSpec,
                       token_lists: list[list[int]]) -> dict:
    """sentence.onnx (one call per sentence, batch 1) against torch `decode_sentences`, greedy, with the
    repetition controls off and with edge-chat's defaults on (each sentence continues the ones before
    it, so the controls have an answer to look at), from the same ORT sentence vectors. A sentence
    that differs must differ at a near tie of torch's controlled logits, as in `greedy_agreement`."""
    from sllm.modeling.generate import control_repetition
    from sllm.sentences.sampling import AnswerOptions, RepetitionGuard, SamplingConfig

    pad = model.cfg.pad_id
    vectors = [encode(enc_session, token_lists[s : s + 32], pad) for s in range(0, len(token_lists), 32)]
    vectors = np.concatenate(vectors) if vectors else np.zeros((0, model.cfg.d_model), np.float32)
    on = AnswerOptions()
    result: dict = {"sentences": len(token_lists), "ok": len(token_lists) > 0}
    for name, sampling in (("controls_off", SamplingConfig()),
                           ("controls_on", SamplingConfig(repetition_penalty=on.repetition_penalty,
                                                          no_repeat_ngram_size=on.no_repeat_ngram_size,
                                                          no_repeat_sentence=on.no_repeat_sentence))):
        answer: list[list[int]] = []
        differ = []
        for i, v in enumerate(vectors):
            context = answer[-4:]
            memory = torch.from_numpy(v[None])
            ref = decode_sentences(model.decoder, memory, None, sampling, context)[0]
            got = decode_sentence(sentence_session, v, spec, sampling, context)
            if ref != got:
                k = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
                logits = model.decoder(torch.tensor([[model.cfg.bos_id] + ref[:k]]), memory)[0][:, -1]
                guard = RepetitionGuard(sampling, context, model.cfg.eos_id)
                for t in ref[:k]:
                    guard.push(t)
                x = control_repetition(logits, [guard]) if sampling.controls_repetition else logits
                top = torch.topk(x[0], 2).values
                gap = float(top[0] - top[1])
                differ.append({"index": i, "position": k, "top2_gap": gap,
                               "near_tie": gap <= ATOL * max(1.0, float(logits.abs().max()))})
            answer.append(ref)
        result[name] = {"identical": len(vectors) - len(differ), "differ": differ}
        result["ok"] = result["ok"] and all(d["near_tie"] for d in differ)
    return result


def _exact(outputs: list[list[int]], inputs: list[list[int]]) -> float:
    return float(np.mean([o == i for o, i in zip(outputs, inputs)])) if inputs else 0.0


def decode_speed(enc_session, dec_session, spec: DecoderSpec, pad_id: int, token_lists: list[list[int]],
                 repeats: int = 3) -> dict:
    """Batch 1, as the edge decodes: ms to encode a sentence and ms per decoder step (best of `repeats`)."""
    best_enc, best_dec, steps = float("inf"), float("inf"), 0
    for _ in range(repeats):
        t_enc = t_dec = 0.0
        steps = 0
        for toks in token_lists:
            t0 = time.perf_counter()
            memory = encode(enc_session, [toks], pad_id)
            t1 = time.perf_counter()
            out = greedy_decode(dec_session, memory, spec)[0]
            t_dec += time.perf_counter() - t1
            t_enc += t1 - t0
            steps += min(len(out) + 1, spec.max_sentence_tokens)  # + the eos step
        best_enc, best_dec = min(best_enc, t_enc), min(best_dec, t_dec)
    n = max(len(token_lists), 1)
    return {"sentences": len(token_lists), "decoder_steps": steps,
            "encode_ms_per_sentence": 1e3 * best_enc / n, "decode_ms_per_step": 1e3 * best_dec / max(steps, 1),
            "decode_tokens_per_s": steps / best_dec if best_dec > 0 else 0.0}


def interleaved_speed(pairs: list[tuple], spec: DecoderSpec, pad_id: int, token_lists: list[list[int]],
                      rounds: int = 5) -> list[dict]:
    """decode_speed of several (encoder, decoder) session pairs, alternating between them round by
    round and keeping each one's best round, so that load from other processes hits all alike."""
    best: list[dict | None] = [None] * len(pairs)
    for _ in range(rounds):
        for i, (enc, dec) in enumerate(pairs):
            r = decode_speed(enc, dec, spec, pad_id, token_lists, repeats=1)
            if best[i] is None:
                best[i] = r
            else:
                for key in ("encode_ms_per_sentence", "decode_ms_per_step"):
                    best[i][key] = min(best[i][key], r[key])
    for r in best:
        r["decode_tokens_per_s"] = 1e3 / r["decode_ms_per_step"] if r["decode_ms_per_step"] > 0 else 0.0
        r["rounds"] = rounds
    return best


def quantization_effect(token_lists: list[list[int]], spec: DecoderSpec, pad_id: int, fp32: tuple, int8: tuple,
                        fp32_outputs: list[list[int]], speed_sentences: int = 30) -> dict:
    """Exact-match reconstruction and batch-1 decode speed, fp32 graphs vs the int8 ones.
    fp32 / int8: (encoder session, decoder session) pairs; the speed sessions use one thread."""
    q_out = ort_reconstruct(int8[0], int8[1], spec, pad_id, token_lists)
    vec_diff, min_cos = 0.0, 1.0
    for s in range(0, len(token_lists), 32):
        a = encode(fp32[0], token_lists[s : s + 32], pad_id).astype(np.float64)
        b = encode(int8[0], token_lists[s : s + 32], pad_id).astype(np.float64)
        cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        vec_diff, min_cos = max(vec_diff, float(np.abs(a - b).max())), min(min_cos, float(cos.min()))
    sample = token_lists[:speed_sentences]
    speed_fp32, speed_int8 = interleaved_speed([fp32, int8], spec, pad_id, sample)
    return {"sentences": len(token_lists),
            "exact_match_fp32": _exact(fp32_outputs, token_lists), "exact_match_int8": _exact(q_out, token_lists),
            "vectors_max_abs_diff": vec_diff, "vectors_min_cosine": min_cos,
            "same_tokens_as_fp32": float(np.mean([a == b for a, b in zip(q_out, fp32_outputs)])) if q_out else 0.0,
            "speed_fp32": speed_fp32, "speed_int8": speed_int8,
            "decode_speedup": speed_fp32["decode_ms_per_step"] / max(speed_int8["decode_ms_per_step"], 1e-12),
            "encode_speedup": speed_fp32["encode_ms_per_sentence"] / max(speed_int8["encode_ms_per_sentence"], 1e-12)}


def render_markdown(report: dict) -> str:
    """report.json as a short human-readable page."""
    r = report
    lines = [f"# Export verification: {r['model_id']}", "",
             f"- checkpoint: `{r['checkpoint']}` ({r['source_kind']}, weights {r['weights']})",
             f"- result: **{'PASSED' if r['passed'] else 'FAILED'}**",
             f"- runtime: onnxruntime {r['versions']['onnxruntime']} on {r['provider']}, torch {r['versions']['torch']},"
             f" opset {r['opset']}",
             f"- tolerance: {r['tolerance']}", ""]
    lines += ["## ONNX checker", ""] + [f"- {k}: {v}" for k, v in r["checker"].items()] + [""]
    lines += ["## Parity (ORT vs torch)", "", "| graph | inputs | shape | output | max abs diff | max abs torch | ok |",
              "|---|---|---|---|---|---|---|"]
    for c in r["parity"]:
        diff = "-" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.2e}"
        scale = "-" if c["scale"] is None else f"{c['scale']:.3g}"
        lines.append(f"| {c['graph']} | {c['inputs']} | {c['shape']} | {c['output']} | {diff} | {scale} | "
                     f"{'yes' if c['ok'] else 'NO'} |")
    g = r["greedy"]
    lines += ["", "## Greedy decoding: ORT loop vs torch decode_sentences", "",
              f"- sentences: {g['sentences']} ({r['sentence_source']}), decoded in batches of {g['batch_size']}",
              f"- identical token sequences: {g['identical']} / {g['sentences']}",
              f"- exact-match reconstruction: torch {g['exact_match_torch']:.1%}, ONNX fp32 {g['exact_match_onnx']:.1%}"]
    for d in g["differ"]:
        lines.append(f"- sentence {d['index']} differs at token {d['position']} (torch top-2 gap {d['top2_gap']:.2e}, "
                     f"{'near-tie' if d['near_tie'] else 'NOT a near-tie'})")
    q = r.get("quantization")
    if q:
        f32, i8 = q["speed_fp32"], q["speed_int8"]
        lines += ["", f"## int8 ({', '.join(q['graphs'])} quantized)", "",
                  "| | fp32 | int8 |", "|---|---|---|",
                  f"| exact-match reconstruction ({q['sentences']} sentences) | {q['exact_match_fp32']:.1%} | "
                  f"{q['exact_match_int8']:.1%} |",
                  f"| decode ms / step (batch 1, 1 thread, {f32['sentences']} sentences) | "
                  f"{f32['decode_ms_per_step']:.3f} | {i8['decode_ms_per_step']:.3f} |",
                  f"| encode ms / sentence | {f32['encode_ms_per_sentence']:.3f} | {i8['encode_ms_per_sentence']:.3f} |"]
        for name, sizes in q["sizes"].items():
            lines.append(f"| {name} size | {sizes['fp32'] / 2**20:.2f} MiB | {sizes['int8'] / 2**20:.2f} MiB |")
        lines += ["", f"- int8 tokens equal to fp32 tokens: {q['same_tokens_as_fp32']:.1%} of sentences",
                  f"- sentence vectors (what the cloud receives), int8 vs fp32 encoder: max abs diff "
                  f"{q['vectors_max_abs_diff']:.2e}, min cosine {q['vectors_min_cosine']:.6f}",
                  "- int8 weights of: " + "; ".join(f"{g} {'/'.join(t)}" for g, t in q['op_types'].items()),
                  f"- decode speed-up: x{q['decode_speedup']:.2f}, encode speed-up: x{q['encode_speedup']:.2f}",
                  "- the bundle ships the int8 graph(s); fp32 parity above proves the export itself"]
    if r.get("speed"):
        s = r["speed"]
        lines += ["", "## Edge speed (fp32, batch 1, 1 thread)", "",
                  f"- encode {s['encode_ms_per_sentence']:.3f} ms / sentence, decode {s['decode_ms_per_step']:.3f} ms"
                  f" / step ({s['decode_tokens_per_s']:.0f} steps/s) over {s['sentences']} sentences"]
    if r.get("sentence_graph"):
        lines += _sentence_lines(r["sentence_graph"])
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if r.get("regraph"):
        g = r["regraph"]
        lines += ["", f"## Graphs rewritten {g['created']} from {g['from']} (onnxruntime "
                  f"{g['versions']['onnxruntime']})", "",
                  "- ONNX checker: " + ", ".join(f"{k} {v}" for k, v in g["checker"].items()),
                  "- parity max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in g["parity_max"].items()),
                  f"- greedy, ORT loop vs torch: {g['greedy']['identical']} / {g['greedy']['sentences']} identical "
                  f"({g['sentence_source']})"]
        lines += _sentence_lines(g["sentence_graph"])
    return "\n".join(lines) + "\n"


def _sentence_lines(s: dict) -> list[str]:
    out = ["", "## sentence.onnx (one call per sentence) vs torch decode_sentences, greedy", ""]
    for key in ("controls_off", "controls_on"):
        c = s[key]
        out.append(f"- repetition controls {key.split('_')[1]}: {c['identical']} / {s['sentences']} identical"
                   + "".join(f"; sentence {d['index']} differs at token {d['position']} "
                             f"({'near-tie' if d['near_tie'] else 'NOT a near-tie'})" for d in c["differ"]))
    return out
