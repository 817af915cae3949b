"""The benchmark's PNG plots (matplotlib, Agg: no display needed). Each function writes one file
and returns its name, or None when its figures were not measured."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

PATHS = {"sllm_e2e": ("SLLM end to end (gRPC)", "tab:blue"), "sllm_inproc": ("SLLM in-process", "tab:green"),
         "sllm_spec": ("SLLM end to end + speculation", "tab:purple"),
         "baseline": ("baseline OPT, token by token", "tab:red")}
STYLES = ["-", "--", ":", "-."]


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def throughput_plot(throughput: dict, out: Path, name: str = "bench-throughput.png") -> str | None:
    points = throughput.get("points") or []
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    prompts = sorted({p["prompt_tokens_target"] for p in points})
    for i, P in enumerate(prompts):
        row = sorted((p for p in points if p["prompt_tokens_target"] == P), key=lambda p: p["output_tokens"])
        for key, (label, color) in PATHS.items():
            if key not in row[0]["tokens_per_s"]:  # a run without that path (bench --speculate 0)
                continue
            ax.plot([p["output_tokens"] for p in row], [p["tokens_per_s"][key] for p in row], STYLES[i % 4],
                    color=color, marker="o", label=f"{label}, prompt ~{P} tok")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 32, 128 rather than 2^5, 2^7
    ax.set_xlabel("output tokens per generation")
    ax.set_ylabel("output tokens / s after prefill")
    ax.set_title("Output throughput (greedy, same prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out, name)


def kv_plot(kv: dict, out: Path, name: str = "bench-kv.png") -> str | None:
    rows = kv.get("rows") or []
    if not rows:
        return None
    x = [r["context_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, fit, label, color in (("baseline_bytes", kv["baseline_fit"], "baseline OPT", "tab:red"),
                                   ("sllm_bytes", kv["sllm_fit"], "SLLM (cloud)", "tab:blue")):
        ax.plot(x, [r[key] / 1024 for r in rows], "o", color=color, label=f"{label}, measured")
        xs = [0, max(x)]
        ax.plot(xs, [(fit["intercept"] + fit["bytes_per_token"] * v) / 1024 for v in xs], "-", color=color,
                alpha=0.6, label=f"{label} fit: {fit['bytes_per_token'] / 1024:.2f} KiB/token")
    ax.set_xlabel("context tokens")
    ax.set_ylabel(f"KV cache, KiB ({kv.get('dtype', 'float32')})")
    ax.set_title(f"KV cache vs context: {kv['reduction']:.1%} less per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, name)


def svae_plot(svae: dict | None, out: Path, name: str = "bench-svae.png") -> str | None:
    """Validation loss vs parameters of the trained variants (paper Fig. 3a, scaled down)."""
    if not svae or svae.get("source", "").startswith("recorded") or not svae.get("rows"):
        return None
    rows = sorted(svae["rows"], key=lambda r: r["params"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["params"] / 1e6 for r in rows], [r["loss"] for r in rows], "o-", color="tab:purple")
    for r in rows:
        ax.annotate(f"{r['name']} (PPL {r['ppl']:.2f})", (r["params"] / 1e6, r["loss"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.margins(x=0.2, y=0.15)  # room for the labels
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation loss (CE per token)")
    ax.set_title(f"SentenceVAE d={rows[0]['d_model']}: loss vs size ({svae['steps']} steps x {svae['batch']})")
    ax.grid(alpha=0.3)
    return _save(fig, out, name)


def scale_plot(scale: dict | None, out: Path, name: str = "bench-scale.png") -> str | None:
    if not scale or not scale.get("rows"):
        return None
    rows = scale["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["clients"] for r in rows]
    ax.plot(n, [r["tokens_per_s"] for r in rows], "o-", color="tab:blue", label="tokens/s (steps/s x L)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("concurrent edge clients")
    ax.set_ylabel("aggregate output tokens / s")
    ax2 = ax.twinx()
    ax2.plot(n, [r["steps_per_s"] for r in rows], "s--", color="tab:gray", label="steps/s")
    ax2.set_ylabel("cloud steps / s")
    ax.set_title("One cloud server, many edge clients")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    return _save(fig, out, name)


def context_plot(before: dict | None, after: dict, out: Path, name: str = "engine-context.png") -> str:
    """Cloud step time (median ms) against context length, per batch size: before (dashed) and after."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {1: "tab:blue", 16: "tab:green", 64: "tab:red"}
    for result, style, label in ((before, "--", "before"), (after, "-", "after")):
        if not result:
            continue
        for b in sorted({r["batch"] for r in result["rows"]}):
            rows = sorted((r for r in result["rows"] if r["batch"] == b), key=lambda r: r["context"])
            ax.plot([r["context"] for r in rows], [r["ms_median"] for r in rows], style, marker="o",
                    color=colors.get(b, "tab:gray"), label=f"{label}, {b} session{'s' * (b > 1)}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("cached sentences per session (context)")
    ax.set_ylabel("one step, ms (median)")
    ax.set_title("Cloud step time vs context (CPU, fp32)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out, name)
