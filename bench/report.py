"""The results dict -> bench.md: our figures beside the paper's, then one section per measurement
with how it was counted (docs/bench.md explains each in full)."""
from __future__ import annotations

from pathlib import Path

from bench import paper

PATH_NAMES = {"sllm_e2e": "SLLM end to end", "sllm_inproc": "SLLM in-process", "baseline": "baseline OPT"}


def _n(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _delta(x: float) -> str:
    return f"{x:+.1%}"


def _paper_throughput() -> str:
    h1 = paper.TABLE3["SLLM-125M-H1"]
    best = max(paper.TABLE3.items(), key=lambda kv: kv[1]["sllm_tps"] / kv[1]["opt_tps"])
    return (f"{paper.THROUGHPUT_125M_H1:.2f}x for SLLM-125M-H1 ({h1['sllm_tps']} vs {h1['opt_tps']} tok/s, "
            f"{h1['tps_delta']}); up to {paper.THROUGHPUT_MAX:.2f}x ({best[0]}: {best[1]['sllm_tps']} vs "
            f"{best[1]['opt_tps']}, {best[1]['tps_delta']})")


def header(r: dict) -> list[str]:
    m, mod, text = r["machine"], r["models"], r["text"]
    v = m["versions"]
    ort = v.get("onnxruntime") or v.get("onnxruntime-gpu")
    lines = [
        "# Benchmark: the SLLM vs the token-level OPT (paper Tables 1 and 3, on this machine)",
        "",
        f"`{r['command']}`: {r['mode']} mode, wall time {r['wall_s'] / 60:.1f} min, {m['date_utc']} UTC.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU used'}; "
        f"{m['threads']} thread(s) per process (edge, cloud server; the baselines at each count of the throughput "
        f"table); load average at start {m['load_average_at_start']}. Python {m['python']}, torch {v.get('torch')}, "
        f"onnxruntime {ort}, transformers {v.get('transformers')}, grpcio {v.get('grpcio')}; commit {m['git_commit']}.",
        f"- Load during the timed sections (bench.machine.LoadMonitor): {r.get('load_note', 'not recorded')}.",
        f"- SLLM: `{mod['model_dir']}` ({mod['model_id']}): edge SentenceVAE d={mod['d_model']}, "
        f"{mod['edge_decoder_layers']} decoder block(s), vocab {mod['vocab']} (ONNX Runtime, CPU); cloud grafted OPT, "
        f"{mod['cloud_layers']} layers, {mod['cloud_params'] / 1e6:.2f} M parameters (torch, fp32).",
        f"- Baseline: {mod['baseline_source']}; {mod['baseline_params'] / 1e6:.2f} M parameters, fp32, run three ways "
        "(HF generate with eager attention, a torch loop with a preallocated KV cache, ONNX Runtime with its KV "
        "cache; see the throughput section).",
        f"- Text: {text['source']}; L = {text['mean_tokens_per_sentence']:.2f} tokens per sentence.",
    ]
    if r["mode"] == "quick":
        lines.append("- --quick: fewer lengths and repetitions, clients 1/4/16, recorded quality figures "
                     "(marked); ratios are rough.")
    return lines


def summary(r: dict) -> list[str]:
    t, kv, q = r["throughput"], r["kv"], r["quality"]
    mean = t["mean_tokens_per_s"]
    L = r["text"]["mean_tokens_per_sentence"]
    fastest = t["fastest_baseline"]
    hf = [k for k in t["baselines"] if t["baselines"][k]["flavour"] == "hf-generate"]
    vs_hf = (f"; against HF generate ({t['labels'][hf[0]]}, as the paper): "
             f"{t['ratios_vs'][hf[0]]['e2e']['median']:.2f}x" if hf and hf[0] != fastest else "")
    rows = [
        "## Ours beside the paper",
        "",
        "| figure | ours (this machine) | paper (GPU, PyTorch) |",
        "|---|---|---|",
        f"| output throughput SLLM / OPT, end to end (edge ORT + cloud over gRPC), against the fastest baseline "
        f"({t['labels'][fastest]}) | **{t['ratio_e2e']:.2f}x** ({_range(t['ratio_e2e_range'])} over "
        f"{t['rounds']} rounds; {_n(mean['sllm_e2e'])} vs {_n(mean['baseline'])} tok/s{vs_hf}) | "
        f"{_paper_throughput()} |",
        f"| output throughput SLLM / OPT, in one process (edge ORT + cloud engine), against the same | "
        f"**{t['ratio_inproc']:.2f}x** ({_range(t['ratio_inproc_range'])}; {_n(mean['sllm_inproc'])} vs "
        f"{_n(mean['baseline'])} tok/s) | (the paper runs one process) |",
        *_speculation_summary_row(t),
        f"| KV cache per context token, SLLM vs OPT | **{_delta(-kv['reduction'])}** "
        f"({kv['sllm_fit']['bytes_per_token'] / 1024:.2f} vs {kv['baseline_fit']['bytes_per_token'] / 1024:.2f} "
        f"KiB/token, {kv['dtype']}); limit 1 - 1/L = {_delta(-(1 - 1 / L))} | "
        f"{paper.MEMORY_125M_H1} for SLLM-125M-H1 ({paper.TABLE3['SLLM-125M-H1']['sllm_kb']} vs "
        f"{paper.TABLE3['SLLM-125M-H1']['opt_kb']} KB/token) to {paper.MEMORY_RANGE[1]} (SLLM-350M-H4) |",
    ]
    ppl = q.get("ppl")
    h1 = paper.TABLE3["SLLM-125M-H1"]
    if ppl:
        rows.append(f"| validation PPL, SLLM vs OPT (same tokens) | {ppl['sllm_ppl']:.2f} vs {ppl['baseline_ppl']:.2f} "
                    f"({_source_tag(ppl['source'])}) | {h1['sllm_ppl']} vs {h1['opt_ppl']} (SLLM-125M-H1; "
                    f"{paper.TABLE3['SLLM-1.3B-H2']['sllm_ppl']} vs {paper.TABLE3['SLLM-1.3B-H2']['opt_ppl']} at 1.3B-H2) |")
    else:
        rows.append(f"| validation PPL, SLLM vs OPT | not available | {h1['sllm_ppl']} vs {h1['opt_ppl']} (SLLM-125M-H1) |")
    svae = q.get("svae")
    paper_h = " / ".join(f"{paper.TABLE1[(768, k)][1]}" for k in (1, 2, 4))
    if svae and svae.get("rows"):
        ours = " / ".join(f"{row['name']} {row['ppl']:.3f}" for row in svae["rows"])
        rows.append(f"| SentenceVAE validation PPL by depth | {ours} (d={svae['rows'][0]['d_model']}, "
                    f"{_source_tag(svae['source'])}) | SVAE-768 H1 / H2 / H4: {paper_h} |")
    else:
        rows.append(f"| SentenceVAE validation PPL by depth | not available | SVAE-768 H1 / H2 / H4: {paper_h} |")
    bd = t["breakdown"]["e2e"]
    rows.append(f"| cloud steps per output token | {bd['cloud_steps_per_token']:.3f} (baseline: "
                f"{t['breakdown']['baseline']['forward_passes_per_token']:.2f}) | (not reported) |")
    rows.append(f"| wire bytes per output token ({t['wire_dtype']} vectors) | {bd['wire_bytes_per_token']:.1f} | "
                "(not reported) |")
    return rows


def _speculation_summary_row(t: dict) -> list[str]:
    sp = t.get("speculation")
    if not sp:
        return []
    mean = t["mean_tokens_per_s"]
    return [f"| output throughput {t['labels']['sllm_spec']} / OPT, against the same | **{t['ratio_spec']:.2f}x** "
            f"({_range(t['ratio_spec_range'])}; {_n(mean['sllm_spec'])} vs {_n(mean['baseline'])} tok/s; "
            f"{sp['ratio_vs_e2e']['median']:.2f}x the plain end to end; outputs identical to it "
            f"{sp['identical_outputs']}/{sp['runs']}) | (no speculation in the paper) |"]


def _source_tag(source: str) -> str:
    return "recorded, not re-measured" if source.startswith("recorded") else source.split(":")[0]


def _range(r: list[float]) -> str:
    return f"{r[0]:.2f}-{r[1]:.2f}x"


def throughput_section(t: dict) -> list[str]:
    paths, labels, spread = t["paths"], t["labels"], t["tokens_per_s"]
    fastest = t["fastest_baseline"]
    # the SLLM paths' ratio columns: (key in ratios_vs and points, column name)
    sllm = [(k, n) for k, n in (("e2e", "SLLM e2e"), ("inproc", "SLLM in-proc"), ("spec", "SLLM e2e + spec"))
            if f"ratio_{k}" in t]
    lines = ["## Output throughput after prefill", "",
             "Tokens per second after the prompt was processed, greedy, the same prompts on every path. The SLLM "
             "decodes sentences until its output holds at least the target length and ignores its stop flag; output "
             "tokens are the tokens of the sentences it produced. Each baseline flavour then generates exactly that "
             "many tokens (eos cannot end it); its first token comes with the prefill, so it is timed over the others. "
             "Baseline flavours (the same trained OPT): HF generate = Hugging Face `generate` with its KV cache; "
             "torch, preallocated KV = the same modules stepped by a tight torch loop over a cache allocated once "
             "and written in place; ONNX Runtime + KV = the baseline exported to ONNX with its cache as input/output, "
             "a greedy numpy loop (the edge decoder's runtime and loop). "
             f"{t['rounds']} rounds of the whole plan; a round's figure for a path is the mean over (prompt, output) "
             "points of its tokens/s (sum of tokens / sum of seconds per point); min / median / max over rounds. "
             "Ratios are paired round by round (the two ran under the same load); the headline compares against the "
             f"fastest baseline by median, **{labels[fastest]}**. Prefill: the prompt's encode + first cloud step "
             "(SLLM), the prompt's forward pass and first token (baselines); median per point, mean over points.", "",
             "| path | tok/s min / median / max | " + " | ".join(f"{n} / this" for _, n in sllm) + " | prefill ms |",
             "|---|---|" + "---|" * (len(sllm) + 1)]
    for p in paths:
        s = spread[p]
        prefill = sum(pt["prefill_ms"][p] for pt in t["points"]) / max(len(t["points"]), 1)
        if p in t["ratios_vs"]:
            v = t["ratios_vs"][p]
            ratio = " | ".join(f"{v[k]['median']:.2f}x ({_range([v[k]['min'], v[k]['max']])})" for k, _ in sllm)
        else:
            ratio = " | " * (len(sllm) - 1)
        name = f"**{labels[p]}** (fastest baseline)" if p == fastest else labels[p]
        lines.append(f"| {name} | {_n(s['min'], 0)} / **{_n(s['median'], 0)}** / {_n(s['max'], 0)} | {ratio} | "
                     f"{prefill:.1f} |")
    lines += ["", "Per (prompt, output) point, median tok/s over rounds:", "",
              "| prompt tok (sent.) | output tok (sent.) | " + " | ".join(labels[p] for p in paths) + " | " +
              " | ".join(f"{n.removeprefix('SLLM ')} / fastest" for _, n in sllm) + " |",
              "|---|---|" + "---|" * (len(paths) + len(sllm))]
    for pt in t["points"]:
        s = pt["tokens_per_s"]
        lines.append(f"| {pt['prompt_tokens']:.0f} ({pt['prompt_sentences']:.1f}) | {pt['output_tokens']:.0f} "
                     f"({pt['output_sentences']:.1f}) | " + " | ".join(_n(s[p], 0) for p in paths) + " | " +
                     " | ".join(f"{pt[f'ratio_{k}']:.2f}x" for k, _ in sllm) + " |")
    lines += speculation_paragraph(t)
    same = [f"{labels[k]} {v:.0%}" for k, v in t["same_tokens_as_hf"].items() if v is not None]
    if same:
        lines += ["", f"Generations whose greedy tokens are identical to {labels[t['hf_reference']]}'s: "
                      + ", ".join(same) + " (two flavours may part at a near-tie of two logits, where float "
                      "rounding order decides)."]
    ended = sorted({e for p in t["points"] for e in p["ended"]} - {"length"})
    if ended:
        lines += ["", f"Some SLLM generations ended before the target length ({', '.join(ended)}: "
                      "'empty' = the decoder gave eos at once, 'context' = the session was full); their tokens count "
                      "as produced."]
    for note in t["notes"]:
        lines += ["", f"Note: {note}."]
    return lines


def speculation_paragraph(t: dict) -> list[str]:
    """The speculation row against the plain end to end one: same outputs?, the guesses, the ratio."""
    sp = t.get("speculation")
    if not sp:
        return []
    per_run = sp["per_run"]
    runs = "; ".join(f"{k} {v['median']:g} ({v['min']:g}-{v['max']:g})" for k, v in per_run.items())
    same = (f"identical to the plain end to end row's in {sp['identical_outputs']}/{sp['runs']} runs"
            if sp["identical_outputs"] == sp["runs"] else
            f"**NOT identical** to the plain end to end row's in {sp['runs'] - sp['identical_outputs']} of "
            f"{sp['runs']} runs (identical in {sp['identical_outputs']}/{sp['runs']}): greedy decoding should not "
            "differ; a guessed step whose input vector differs from the edge's by float rounding can move a near-tie")
    r = sp["ratio_vs_e2e"]
    return ["", f"{t['labels']['sllm_spec']}: the end to end path through the edge's own stepper "
                "(edge.remote.RemoteStepper, speculate N) against a server of its own started with --speculate-max N "
                "and the edge's graphs (--edge-bundle), which decodes, re-encodes and steps each sentence it expects "
                "while the edge decodes and checks it; an accepted guess saves the round trip. Outputs (token ids "
                f"of every sentence, greedy): {same}. Guesses per run, median (min-max) over {sp['runs']} runs: "
                f"{runs}; acceptance {sp['acceptance']:.2f} (accepted / checked), {sp['accepted']} accepted, "
                f"{sp['corrected']} corrected, {sp['declined']} declined in all. These fixed-length runs ignore "
                "the stop head, the cloud does not: after a step whose stop flag is on it declines to guess and "
                f"that sentence waits its round trip. Against the plain end to end row, paired by round: "
                f"{r['median']:.2f}x ({_range([r['min'], r['max']])})."]


def kv_section(kv: dict, L: float) -> list[str]:
    a = kv["analytic"]
    lines = ["## KV cache per context token", "",
             "Real cache tensors after a forward pass over the first whole validation sentences holding at most "
             "the target number of tokens: the cloud engine's cache (one entry per sentence) and the baseline's "
             "DynamicCache over bos + the same tokens (one per token); keys and values of every layer, "
             f"{kv['dtype']}. Bytes per token = slope of a least-squares line.", "",
             "| context tokens | sentences | SLLM KiB | baseline KiB | SLLM / baseline |", "|---|---|---|---|---|"]
    for row in kv["rows"]:
        lines.append(f"| {row['context_tokens']} | {row['sentences']} | {row['sllm_bytes'] / 1024:,.1f} | "
                     f"{row['baseline_bytes'] / 1024:,.1f} | {row['sllm_bytes'] / row['baseline_bytes']:.3f} |")
    lines += ["",
              f"- Fit: SLLM {kv['sllm_fit']['bytes_per_token']:,.0f} bytes/token, baseline "
              f"{kv['baseline_fit']['bytes_per_token']:,.0f} bytes/token: **{_delta(-kv['reduction'])}**.",
              f"- Analytic: baseline 2 x layers x d x bytes = {a['baseline_bytes_per_token']:,} bytes/token; SLLM "
              f"{a['sllm_bytes_per_sentence']:,} bytes per sentence / {a['tokens_per_sentence_in_contexts']:.2f} "
              f"tokens per sentence in these contexts = "
              f"{a['sllm_bytes_per_sentence'] / a['tokens_per_sentence_in_contexts']:,.0f} bytes/token.",
              f"- Limit 1 - 1/L with L = {L:.2f} (all validation sentences): {_delta(-(1 - 1 / L))}; the paper's "
              f"savings ({paper.MEMORY_RANGE[0]} to {paper.MEMORY_RANGE[1]}) correspond to L of about 6 to 11."]
    return lines


def breakdown_section(t: dict, dec: dict | None) -> list[str]:
    b = t["breakdown"]
    spec = b.get("spec")  # the speculation row: its own timings; no wire bytes, no server count of its own

    def with_spec(cells: str, spec_cell) -> str:  # spec_cell(spec's row) -> its cell, when there is the row
        return cells if spec is None else f"{cells} {spec_cell(spec)} |"

    lines = ["## Where the time goes", "",
             with_spec("| | SLLM end to end | SLLM in-process |", lambda _: "SLLM e2e + speculation")
             + f" baseline ({t['labels'][b['baseline']['flavour']]}) |",
             "|---|---|---|---|" + ("" if spec is None else "---|"),
             with_spec(f"| output tokens per sentence | {b['e2e']['tokens_per_sentence']:.2f} | "
                       f"{b['inproc']['tokens_per_sentence']:.2f} |", lambda r: f"{r['tokens_per_sentence']:.2f}")
             + " |",
             with_spec(f"| cloud forward steps per output token | {b['e2e']['cloud_steps_per_token']:.3f} (server's "
                       f"count: {b['e2e']['server_forward_passes_per_token']:.3f}) | "
                       f"{b['inproc']['cloud_steps_per_token']:.3f} |",
                       lambda r: f"{r['cloud_steps_per_token']:.3f} appends (the cloud's guesses not counted)")
             + f" {b['baseline']['forward_passes_per_token']:.3f} |",
             with_spec(f"| wire bytes per output token | {b['e2e']['wire_bytes_per_token']:.1f} "
                       f"({b['e2e']['wire_bytes_per_step']:.0f} per step, {t['wire_dtype']}) | 0 |",
                       lambda _: "not measured") + " |"]
    for k, name in (("encode", "edge encode"), ("step", "cloud step"), ("decode", "edge decode")):
        lines.append(with_spec(f"| {name}: share of time / ms per sentence | {_pct(b['e2e']['time_split'][k])} / "
                               f"{b['e2e']['ms_per_sentence'][k]:.2f} | {_pct(b['inproc']['time_split'][k])} / "
                               f"{b['inproc']['ms_per_sentence'][k]:.2f} |",
                               lambda r: f"{_pct(r['time_split'][k])} / {r['ms_per_sentence'][k]:.2f}") + " |")
    lines.append(with_spec(f"| other (loop, bookkeeping) | {_pct(b['e2e']['time_split']['other'])} | "
                           f"{_pct(b['inproc']['time_split']['other'])} |",
                           lambda r: _pct(r["time_split"]["other"])) + " |")
    lines += ["", "Steps: one cloud step per generated sentence but the last (the loop's own count; the server's "
                  "GetStats count of forward passes, minus the prefill's, agrees). Wire bytes: the serialized size of "
                  "the protobuf messages of those steps, request (ClientMessage.append) and reply (ServerMessage.step); "
                  "gRPC/HTTP2 framing not included. Cloud step time end to end is the round trip (serialization, "
                  "loopback, server, batcher thread)."]
    if spec is not None:
        lines += ["", "SLLM e2e + speculation: its cloud step is the edge's append, which checks the guess the "
                      "cloud streamed ahead and waits only for a correction or a declined guess (the cloud's own "
                      "work runs beside the edge's, not in this column); its wire bytes (the guesses stream in "
                      "between appends) and the server's count of its work are not measured here (bench.rtt "
                      "reports both)."]
    if dec:
        lines += ["", f"Edge decoder step (`bench/decoder_step.py` at the bundle's shape: d={dec['shape']['d']}, "
                      f"{dec['shape']['layers']} block(s), ffn {dec['shape']['ffn']}, vocab {dec['shape']['vocab']}; "
                      f"random weights, batch 1, median of {dec['runs']} interleaved runs), ms per step at past length P:",
                  "", "| | " + " | ".join(f"P={p}" for p in dec["pasts"]) + " | x torch eager cached (first-last P) |",
                  "|---|" + "---|" * (len(dec["pasts"]) + 1)]
        for name, ms in dec["ms"].items():
            sp = dec["speedup_vs_torch"][name]
            lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in ms) + f" | {sp[0]:.1f}-{sp[-1]:.1f}x |")
    return lines


def quality_section(q: dict) -> list[str]:
    lines = ["## Quality", ""]
    ppl = q.get("ppl")
    h1 = paper.TABLE3["SLLM-125M-H1"]
    if ppl:
        prov = []
        for who, key in (("SLLM", "sllm_checkpoint_is_bundle"), ("baseline", "baseline_checkpoint_is_bundle")):
            if ppl[key] is True:
                prov.append(f"the {who} checkpoint is the one the benchmarked bundle was exported from")
            elif ppl[key] is False:
                prov.append(f"the {who} checkpoint is NOT the one the benchmarked bundle was exported from")
            else:
                prov.append(f"the {who} checkpoint is no longer on disk (or no {who} bundle), so it could not be "
                            "matched to the benchmarked bundle")
        lines += [f"Validation PPL, token-level over the same {int(ppl['tokens']):,} tokens of {ppl['passages']} "
                  f"passages (docs/sllm.md): {ppl['source']}; " + "; ".join(prov) + ".", "",
                  "| model | token NLL | PPL | checkpoint | paper SLLM-125M-H1 |", "|---|---|---|---|---|",
                  f"| SLLM | {ppl['sllm_loss']:.4f} | {ppl['sllm_ppl']:.2f} | {ppl['sllm_checkpoint']} | {h1['sllm_ppl']} |",
                  f"| baseline OPT | {ppl['baseline_loss']:.4f} | {ppl['baseline_ppl']:.2f} | "
                  f"{ppl['baseline_checkpoint']} | {h1['opt_ppl']} |"]
    else:
        lines.append("Validation PPL: not available (no recorded comparison and no runs given).")
    if q.get("baseline_note"):
        lines += ["", q["baseline_note"]]
    svae = q.get("svae")
    lines += ["", "SentenceVAE by depth (paper Table 1):", ""]
    if svae and svae.get("rows"):
        lines += [f"Ours: {svae['source']}.", "",
                  "| model | width | blocks | params | steps x batch | val loss | val PPL | exact match (<= 16 tok) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in svae["rows"]:
            lines.append(f"| ours {row['name']} | {row['d_model']} | {row['layers']} | {row['params'] / 1e6:.2f} M | "
                         f"{row.get('steps', svae['steps'])} x {row.get('batch', svae['batch'])} | {row['loss']:.3f} | "
                         f"{row['ppl']:.3f} | {_pct(row['exact_match'])} ({_pct(row.get('exact_match_le16'))}) |")
    else:
        lines += ["Ours: not available.", "", "| model | width | blocks | params | steps x batch | val loss | val PPL "
                  "| exact match (<= 16 tok) |", "|---|---|---|---|---|---|---|---|"]
    for (d, k), (loss, p) in paper.TABLE1.items():
        lines.append(f"| paper SVAE-{d}-H{k} | {d} | {k} | | 300 K x 128/card | {loss} | {p} | not reported |")
    return lines


def scale_section(s: dict | None) -> list[str]:
    if not s:
        return []
    lines = ["## Many edge clients, one cloud server", "",
             f"Client threads run conversations against one server (batching across sessions on), "
             f"{s['seconds_per_point']:g} s per point after {s['warmup_s']:g} s of warm-up; a step answers one "
             f"sentence, so tokens/s = steps/s x L (L = {s['tokens_per_sentence']:.2f}; each client's edge decodes its "
             "own sentences). The clients share this machine's cores with the server.", "",
             "| clients | steps/s | tokens/s | mean batch | p50 / p95 ms per step |", "|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['clients']} | {_n(r['steps_per_s'])} | {_n(r['tokens_per_s'], 0)} | {r['mean_batch']:.1f} | "
                     f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f} |")
    return lines


def render(r: dict) -> str:
    L = r["text"]["mean_tokens_per_sentence"]
    parts = [header(r), summary(r), throughput_section(r["throughput"]), kv_section(r["kv"], L),
             breakdown_section(r["throughput"], r.get("decoder_step")), quality_section(r["quality"]),
             scale_section(r.get("scale"))]
    plots = r.get("plots") or []
    if plots:
        parts.append(["## Plots", ""] + [f"![{p}]({p})" for p in plots])
    parts.append(["---", "", "All figures: `bench.json` beside this file. How each is counted: `docs/bench.md`."])
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"


# the benches that run as commands of their own (python -m bench.<name>), each writing <name>.md into the
# same folder: bench.md carries their latest results after its own, so one page holds every figure
COMPANIONS = (("engine-context", "bench.engine_context"), ("cloud-cost", "bench.cloud_cost"),
              ("rtt", "bench.rtt"), ("rtt-chat", "bench.rtt --chat"), ("edge-decoder", "bench.edge_decoder"))


def companions(out: Path) -> str:
    """The companion benches' markdown found in `out`, headings moved one level down."""
    parts = []
    for name, module in COMPANIONS:
        md = Path(out) / f"{name}.md"
        if md.is_file():
            text = "\n".join("#" + line if line.startswith("#") else line for line in md.read_text().splitlines())
            parts.append(f"\n\n---\n\n_From `python -m {module}` ({name}.md, run on its own):_\n\n{text}\n")
    return "".join(parts)
