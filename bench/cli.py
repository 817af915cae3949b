"""`python -m bench` (from a checkout): the paper's Tables 1 and 3, measured on this machine in one run.

    python -m bench --quick                                   # a few minutes on models/default
    python -m bench --model models/default --out docs/results  # the full run (trains SentenceVAE H1/H2/H4)
    python -m bench --sllm-run runs/sllm-small --baseline-run runs/baseline-small   # + recomputed PPL

Writes OUT/bench.md (our figures beside the paper's), OUT/bench.json (every figure) and
OUT/bench-*.png; progress goes to stderr. What each figure means: docs/bench.md.
Exit status: 0 done; 2 a benchmark that cannot run as asked (missing bundle, bad option).
"""
from __future__ import annotations

from sllm.runtime.roles import require_role

require_role("bench", "python -m bench")  # before anything heavy: one line, not a traceback, in an edge install

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

from bench.config import RECORDED_PPL, RECORDED_SVAE, RECORDED_SVAE_CONFIG, ROOT, SVAE_BASE_CONFIG, BenchConfig


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 epilog="Lists are comma-separated. Options left out take the full or --quick preset.")
    ap.add_argument("--model", type=Path, default=Path("models/default"), help="folder with edge/, cloud/ and "
                    "optionally baseline/ (sllm-export of a baseline run)")
    ap.add_argument("--out", type=Path, default=Path("docs/results"), help="where bench.md, bench.json, PNGs go")
    ap.add_argument("--work", type=Path, default=Path("runs/bench"), help="SentenceVAE variant runs and data caches")
    ap.add_argument("--quick", action="store_true", help="a few minutes: fewer lengths and repetitions, clients "
                    "1,4,16, recorded quality figures instead of training")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each process (edge, server, baseline)")
    ap.add_argument("--corpus", action="append", default=None, help="validation text source (file or folder; "
                    "repeatable); default: the bundled corpus")
    g = ap.add_argument_group("throughput")
    g.add_argument("--prompt-tokens", type=_ints, help="prompt lengths in tokens (whole sentences, at least this)")
    g.add_argument("--output-tokens", type=_ints, help="output lengths in tokens (the SLLM stops past it)")
    g.add_argument("--repeats", type=int, help="prompts per (prompt, output) length")
    g.add_argument("--rounds", type=int, help="repetitions of the whole throughput plan (min/median/max over them)")
    g.add_argument("--baseline-threads", type=_ints, help="thread counts of every baseline flavour")
    g.add_argument("--wire-dtype", choices=("float16", "float32"), help="sentence vectors on the wire")
    g.add_argument("--speculate", type=int, help="the row 'SLLM end to end + speculation': sentences the cloud may "
                   "guess ahead (a server of its own, --speculate-max N); 0 = no such row (default 8)")
    g = ap.add_argument_group("memory and time split")
    g.add_argument("--context-tokens", type=_ints, help="context lengths for the KV-cache fit")
    g.add_argument("--decoder-runs", type=int, help="timed runs per decoder-step row")
    g = ap.add_argument_group("scale")
    g.add_argument("--clients", type=_ints, help="concurrent clients against one server")
    g.add_argument("--scale-seconds", type=float, help="measured seconds per client count")
    g = ap.add_argument_group("quality")
    g.add_argument("--sllm-run", type=Path, help="SLLM run/checkpoint: recompute the comparable PPL (with --baseline-run)")
    g.add_argument("--baseline-run", type=Path, help="baseline run/checkpoint for the PPL")
    g.add_argument("--ppl-passages", type=int, help="validation passages for the recomputed PPL (0 = all)")
    g.add_argument("--svae-layers", type=_ints, help="SentenceVAE depths to train (1,2,4 = H1, H2, H4)")
    g.add_argument("--svae-steps", type=int, help="training steps per variant")
    g.add_argument("--svae-batch", type=int, help="sentences per step")
    g.add_argument("--svae-eval-sentences", type=int, help="validation sentences for loss/PPL (0 = all)")
    g.add_argument("--svae-exact-sentences", type=int, help="validation sentences for exact match")
    g.add_argument("--no-svae", action="store_true", help="do not train the variants (report the recorded H1)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return ap


FLAG_FIELDS = ("prompt_tokens", "output_tokens", "repeats", "rounds", "baseline_threads", "wire_dtype", "speculate",
               "context_tokens", "decoder_runs", "clients", "scale_seconds", "sllm_run", "baseline_run", "ppl_passages",
               "svae_layers", "svae_steps", "svae_batch", "svae_eval_sentences", "svae_exact_sentences")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    given = {f: getattr(args, f) for f in FLAG_FIELDS if getattr(args, f) is not None}
    given.update(model=args.model, out=args.out, work=args.work, threads=args.threads, corpus=args.corpus or [])
    if args.no_svae:
        given["train_svae"] = False
    cfg = BenchConfig.quick_preset(**given) if args.quick else BenchConfig(**given)
    cfg.validate()
    return cfg


def run(cfg: BenchConfig, command: str, progress) -> dict:
    """Every measurement, in order; returns the results dict (bench.json)."""
    from bench import kv_memory, quality, scale, svae_variants, throughput
    from bench.decoder_latency import measure_bundle_decoder
    from bench.machine import LoadMonitor, machine_info
    from bench.models import load_models
    from bench.texts import validation_text
    from sllm.edge.local import LocalServer
    from sllm.protos.client import CloudClient

    t0 = time.perf_counter()
    with progress.section("load the models"):
        models = load_models(cfg.model, cfg.threads, cfg.seed)
        rt = models.runtime
        progress.log(f"SLLM {models.model_id}; baseline: {models.baseline_source}")
    with progress.section("validation text"):
        text = validation_text(rt.tokenizer, rt.max_sentence_tokens, rt.split_on_comma, cfg.corpus)
        L = text.mean_tokens_per_sentence
        progress.log(f"{text.source}; L = {L:.2f} tokens per sentence")

    spec_server = None
    with progress.section("start the cloud server(s) (loopback)"):
        server = LocalServer(models.cloud_dir, threads=cfg.threads, device="cpu").start()
        if cfg.speculate:
            spec_server, spec_stepper_at = throughput.speculating_server(models, cfg.speculate, cfg.threads,
                                                                         cfg.wire_dtype, cfg.work)
            try:
                spec_server.start()
            except BaseException:
                server.stop()
                raise
            progress.log(f"speculating server (--speculate-max {cfg.speculate}) at {spec_server.address}")
    load = LoadMonitor().__enter__()  # other processes' CPU before and during the timed sections
    try:
        with CloudClient(server.address, server.token) as client:
            n = len(cfg.prompt_tokens) * len(cfg.output_tokens) * cfg.repeats * cfg.rounds
            with progress.section("throughput: SLLM and baselines", n) as advance:
                tput = throughput.run_throughput(models, text, cfg.prompt_tokens, cfg.output_tokens, cfg.repeats,
                                                 client, cfg.wire_dtype, advance, cfg.rounds,
                                                 tuple(cfg.baseline_threads), cfg.work / "baseline-onnx",
                                                 spec_stepper_at(spec_server.address) if spec_server else None)
        if spec_server is not None:
            spec_server.stop()  # idle from here on; the scale section has the machine to one server
        with progress.section("scale: concurrent clients", len(cfg.clients)) as advance:
            scaled = scale.run_scale(server.address, server.token, rt.model_id, rt.d_model, cfg.clients,
                                     cfg.scale_seconds, cfg.scale_warmup, L, advance)
    finally:
        server.stop()
        if spec_server is not None:
            spec_server.stop()

    with progress.section("KV cache vs context"):
        kv = kv_memory.measure_kv(rt, models.engine, models.baseline, text, cfg.context_tokens,
                                  int(rt.bundle.manifest["bos_id"]))
    with progress.section("decoder step: ORT vs torch"):
        dec = measure_bundle_decoder(rt.path, rt.bundle.manifest, cfg.decoder_pasts, cfg.decoder_runs, cfg.threads)
    load.__exit__(None, None, None)
    progress.log(f"load: {load.describe()}")

    baseline_id = models.baseline_manifest["model_id"] if models.baseline_manifest else None
    with progress.section("quality: PPL"):
        if cfg.sllm_run is not None:
            ppl = quality.recomputed_ppl(cfg.sllm_run, cfg.baseline_run, cfg.ppl_passages, rt.model_id, baseline_id,
                                         progress.log)
        else:
            ppl = quality.recorded_ppl(RECORDED_PPL, rt.model_id, baseline_id)
    if cfg.train_svae:
        with progress.section("quality: SentenceVAE H1/H2/H4", len(cfg.svae_layers)) as advance:
            svae = svae_variants.run_variants(cfg.svae_layers, cfg.svae_steps, cfg.svae_batch, cfg.threads, cfg.work,
                                              SVAE_BASE_CONFIG, rt.path, cfg.corpus, cfg.svae_eval_sentences,
                                              cfg.svae_exact_sentences, progress.log, advance)
    else:
        svae = svae_variants.recorded_h1(RECORDED_SVAE, RECORDED_SVAE_CONFIG, int(rt.bundle.manifest["vocab_size"]))

    m = rt.bundle.manifest
    note = None
    if not models.baseline_trained:
        note = (f"The benchmarked baseline is untrained ({cfg.model}/baseline is absent): speed and KV figures hold, "
                "its quality is not available; the PPL above comes from the training runs, not from it.")
    return {
        "command": command, "mode": "quick" if cfg.quick else "full", "wall_s": time.perf_counter() - t0,
        "machine": machine_info(ROOT, cfg.threads), "load": load.summary(), "load_note": load.describe(),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "models": {"model_dir": str(cfg.model), "model_id": rt.model_id, "d_model": rt.d_model,
                   "edge_decoder_layers": int(m["n_layers"]), "vocab": int(m["vocab_size"]),
                   "cloud_layers": models.engine.num_layers,
                   "cloud_params": sum(p.numel() for p in models.engine.model.parameters()),
                   "baseline_trained": models.baseline_trained, "baseline_source": models.baseline_source,
                   "baseline_model_id": baseline_id,
                   "baseline_params": sum(p.numel() for p in models.baseline.parameters())},
        "text": {"source": text.source, "sentences": len(text.sentences), "tokens": text.tokens,
                 "mean_tokens_per_sentence": L},
        "throughput": tput, "kv": kv, "decoder_step": dec, "scale": scaled,
        "quality": {"ppl": ppl, "svae": svae, "baseline_note": note},
    }


def write_outputs(results: dict, out: Path) -> dict[str, Path]:
    from bench import plots, report

    out.mkdir(parents=True, exist_ok=True)
    made = [plots.throughput_plot(results["throughput"], out), plots.kv_plot(results["kv"], out),
            plots.svae_plot(results["quality"].get("svae"), out), plots.scale_plot(results.get("scale"), out)]
    results["plots"] = [p for p in made if p]
    paths = {"markdown": out / "bench.md", "json": out / "bench.json"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths["markdown"].write_text(report.render(results) + report.companions(out))
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)

    from transformers.utils import logging as hf_logging

    from bench.models import BenchError
    from bench.progress import BenchProgress
    from sllm.edge.chat import EdgeError
    from sllm.runtime.manifest import BundleError

    hf_logging.set_verbosity_error()  # generate()'s advice about generation flags is noise here
    t0 = time.perf_counter()
    try:
        with BenchProgress(enabled=not args.no_progress) as progress:
            results = run(cfg, shlex.join(["python", "-m", "bench", *argv]), progress)
            results["wall_s"] = time.perf_counter() - t0
            paths = write_outputs(results, cfg.out)
    except (BenchError, BundleError, EdgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {paths['markdown']}, {paths['json']} and {len(results['plots'])} plot(s) in "
          f"{results['wall_s'] / 60:.1f} min")
    from bench.report import summary

    print("\n".join(summary(results)))
    return 0


if __name__ == "__main__":
    main()
