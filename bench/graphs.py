"""Before/after for the exported graphs: node counts and per-token decode time of torch's own export
(`sllm.export.onnx_export`, `baseline_onnx.export_baseline_torch`) against the fused graphs
(`sllm.modeling.fused_onnx`), and the edge decoder's per-token loop against sentence.onnx (one run()
per sentence), repetition controls off and on (edge-chat's defaults).

    python -m bench.graphs                                  # models/default -> docs/results/graphs.*
    python -m bench.graphs --quick --out /tmp/graphs        # a smoke test
    python -m bench.graphs --refuse-busy                    # exit 3 instead of flagging a loaded machine

Both SentenceVAE graphs are built from the same weights (MODEL/svae), the baseline's from MODEL/baseline.
A round decodes every validation sentence vector once per variant (batch 1, greedy, one thread, as
the edge decodes h_t; with controls on, each sentence continues the ones before it), in an order that
rotates each round. ms per token = wall time / tokens made (a sentence's eos step counts as a token).
The baseline: a greedy run of N tokens after a short prompt, one token per run() with its KV cache.
Load before and during the run is sampled (bench.machine.LoadMonitor) and printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def _ort_nodes(path: Path) -> int:
    """Nodes after ONNX Runtime's own optimisations (what it runs)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return len(onnx.load(so.optimized_model_filepath).graph.node)


def _nodes(path: Path) -> dict:
    import onnx

    return {"file": len(onnx.load(str(path)).graph.node), "after_ort_optimisation": _ort_nodes(path)}


def build(model_dir: Path, tmp: Path, log) -> dict:
    """Both exports of both models into tmp -> paths."""
    import torch

    from sllm.modeling import fused_onnx
    from sllm.export.baseline_onnx import export_baseline, export_baseline_torch
    from sllm.export.onnx_export import export_decoder, export_encoder
    from sllm.modeling.svae_bundle import load_svae_folder

    svae = load_svae_folder(model_dir / "svae")
    paths = {"torch": {}, "fused": {}}
    log("torch export of the SentenceVAE graphs (the graphs before)")
    paths["torch"]["encoder"] = export_encoder(svae.encoder, tmp / "enc-torch.onnx")
    paths["torch"]["decoder"] = export_decoder(svae.decoder, tmp / "dec-torch.onnx")
    paths["fused"]["encoder"] = fused_onnx.save(fused_onnx.encoder_graph(svae.encoder), tmp / "enc-fused.onnx")
    paths["fused"]["decoder"] = fused_onnx.save(fused_onnx.decoder_graph(svae.decoder), tmp / "dec-fused.onnx")
    paths["fused"]["sentence"] = fused_onnx.save(
        fused_onnx.sentence_graph(svae.decoder, svae.cfg.bos_id, svae.cfg.eos_id), tmp / "sentence.onnx")
    if (model_dir / "baseline" / "config.json").is_file():
        from transformers import OPTForCausalLM

        log("baseline OPT: torch export and fused graph")
        opt = OPTForCausalLM.from_pretrained(model_dir / "baseline", torch_dtype=torch.float32).eval()
        paths["torch"]["baseline"] = export_baseline_torch(opt, tmp / "base-torch.onnx")
        paths["fused"]["baseline"] = export_baseline(opt, tmp / "base-fused.onnx")
        paths["opt"] = opt
    paths["svae"] = svae
    return paths


def run(model_dir: Path, sentences: int, rounds: int, baseline_tokens: int, refuse: bool, log=print) -> dict:
    from bench.machine import LoadMonitor, machine_info
    from bench.texts import validation_text
    from sllm.runtime.svae_onnx import decode_vectors
    from sllm.export.baseline_onnx import OPTWithKV
    from sllm.runtime.edge_bundle import load_edge_bundle
    from sllm.runtime.providers import cpu_session
    from sllm.runtime.svae_onnx import KVSteps, encode
    from sllm.sentences.sampling import AnswerOptions, SamplingConfig

    bundle = load_edge_bundle(model_dir / "edge", 1)
    spec, m = bundle.spec, bundle.manifest
    text = validation_text(bundle.tokenizer, spec.max_sentence_tokens, bool(m["split_on_comma"]), None)
    timed = text.sentences[:sentences]
    chat = AnswerOptions()
    samplings = {"off": SamplingConfig(), "on": SamplingConfig(
        repetition_penalty=chat.repetition_penalty, no_repeat_ngram_size=chat.no_repeat_ngram_size,
        no_repeat_sentence=chat.no_repeat_sentence)}
    with tempfile.TemporaryDirectory(prefix="graphs-") as tmp:
        paths = build(model_dir, Path(tmp), log)
        nodes = {kind: {g: _nodes(p) for g, p in paths[kind].items()} for kind in ("torch", "fused")}
        s = {k: {g: cpu_session(p, 1) for g, p in paths[k].items()} for k in ("torch", "fused")}
        vectors = encode(s["fused"]["encoder"], timed, int(m["pad_id"]))
        variants = {}  # name -> decode(vector, sampling, answer) -> tokens
        for kind in ("torch", "fused"):
            variants[f"{kind} decoder.onnx, per-token loop"] = (lambda v, smp, ans, d=s[kind]["decoder"]:
                                                               decode_vectors(d, v[None], spec, smp, None, ans)[0])
        variants["fused sentence.onnx, one call"] = (lambda v, smp, ans: decode_vectors(
            s["fused"]["decoder"], v[None], spec, smp, None, ans, s["fused"]["sentence"])[0])

        def decode_all(fn, smp):
            answer, out = [], []
            for v in vectors:
                toks = fn(v, smp, answer[-4:])
                out.append(toks)
                answer.append(toks)
            return out, sum(min(len(t) + 1, spec.max_sentence_tokens) for t in out)

        def baseline_run(session):
            opt = paths["opt"]
            prompt = np.array([[2] + timed[0][:8]], dtype=np.int64)
            a = opt.model.decoder.layers[0].self_attn
            steps = KVSteps(session, (len(opt.model.decoder.layers), opt.config.num_attention_heads, a.head_dim), 1,
                            opt.config.max_position_embeddings)
            tok = steps.run(prompt)[:, -1].argmax(-1)
            t0 = time.perf_counter()
            out = []
            for _ in range(baseline_tokens):
                out.append(int(tok[0]))
                tok = steps.run(tok[:, None])[:, -1].argmax(-1)
            return out, time.perf_counter() - t0

        jobs = [(name, c) for name in variants for c in samplings]
        if "baseline" in s["fused"]:
            jobs += [("torch baseline.onnx", None), ("fused baseline.onnx", None)]
        ms = {j: [] for j in jobs}
        tokens = {}
        for name, c in jobs[:3]:  # warm-up
            decode_all(variants[name], samplings[c]) if c else None
        log(f"{len(timed)} sentences, {rounds} rounds x {len(jobs)} variants")
        with LoadMonitor(refuse=refuse) as load:
            for r in range(rounds):
                for name, c in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:
                    if c is None:
                        kind = name.split()[0]
                        out, dt = baseline_run(s[kind]["baseline"])
                        ms[(name, c)].append(1e3 * dt / baseline_tokens)
                        tokens.setdefault((name, c), out)
                        continue
                    t0 = time.perf_counter()
                    out, n = decode_all(variants[name], samplings[c])
                    ms[(name, c)].append(1e3 * (time.perf_counter() - t0) / n)
                    tokens.setdefault((name, c), out)
    ref = {c: tokens[("torch decoder.onnx, per-token loop", c)] for c in samplings}
    rows = []
    for (name, c), xs in ms.items():
        same = None if c is None else float(np.mean([a == b for a, b in zip(tokens[(name, c)], ref[c])]))
        rows.append({"variant": name, "controls": c, "ms_per_token": _spread(xs), "rounds": xs,
                     "same_tokens_as_torch_export_loop": same})
    base = tokens.get(("torch baseline.onnx", None))
    return {"machine": machine_info(ROOT, 1), "load": load.summary(), "load_note": load.describe(),
            "model": str(model_dir), "sentences": len(timed), "rounds": rounds, "baseline_tokens": baseline_tokens,
            "baseline_same_tokens": None if base is None else base == tokens[("fused baseline.onnx", None)],
            "nodes": nodes, "rows": rows}


def render(r: dict) -> str:
    m = r["machine"]
    lines = ["# Exported graphs: torch's export vs the fused graphs, and one call per sentence", "",
             f"{m['cpu']}, {m['cores']} cores, 1 thread, onnxruntime {m['versions'].get('onnxruntime')}, "
             f"commit {m['git_commit']}, {m['date_utc']} UTC. Load: {r['load_note']}.", "",
             "## Graph nodes (file / after ONNX Runtime's optimisations)", "", "| graph | torch export | fused |",
             "|---|---|---|"]
    for g in r["nodes"]["fused"]:
        t, f = r["nodes"]["torch"].get(g), r["nodes"]["fused"][g]
        before = "-" if t is None else f"{t['file']} / {t['after_ort_optimisation']}"
        lines.append(f"| {g} | {before} | {f['file']} / {f['after_ort_optimisation']} |")
    lines += ["", f"## ms per token, batch 1, greedy ({r['sentences']} validation sentences; baseline: "
              f"{r['baseline_tokens']} tokens), min / median / max over {r['rounds']} interleaved rounds", "",
              "| variant | repetition controls | ms / token | same tokens as the torch export's loop |",
              "|---|---|---|---|"]
    for row in r["rows"]:
        t = row["ms_per_token"]
        same = "-" if row["same_tokens_as_torch_export_loop"] is None else f"{row['same_tokens_as_torch_export_loop']:.0%}"
        lines.append(f"| {row['variant']} | {row['controls'] or '-'} | {t['min']:.3f} / {t['median']:.3f} / "
                     f"{t['max']:.3f} | {same} |")
    if r["baseline_same_tokens"] is not None:
        lines.append(f"\nBaseline greedy tokens, torch export vs fused: {'identical' if r['baseline_same_tokens'] else 'DIFFERENT'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.machine import LoadedMachine

    p = argparse.ArgumentParser(prog="python -m bench.graphs", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--quick", action="store_true", help="30 sentences, 3 rounds")
    p.add_argument("--sentences", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--baseline-tokens", type=int, default=64)
    p.add_argument("--refuse-busy", action="store_true", help="exit 3 when other processes loaded the machine")
    a = p.parse_args(argv)
    if a.quick:
        a.sentences, a.rounds = 30, 3
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        r = run(a.model, a.sentences, a.rounds, a.baseline_tokens, a.refuse_busy, log)
    except LoadedMachine as e:
        print(f"refused: {e}", file=sys.stderr)
        return 3
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "graphs.json").write_text(json.dumps(r, indent=2) + "\n")
    (a.out / "graphs.md").write_text(render(r))
    print(render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
