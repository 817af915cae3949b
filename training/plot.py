"""Learning curves from a run's metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows); for a step logged twice (a resumed run), the last row wins."""
    train, val = {}, {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        (val if any(k.startswith("val_") for k in row) else train)[row["step"]] = row
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def plot_metrics(run_dir: Path, out: Path | None = None, exact: list[dict] | None = None) -> Path:
    """Loss and throughput curves; with `exact` (rows of exact_curve.exact_match_curve) a third
    panel: exact-match reconstruction per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(run_dir)
    fig, axes = plt.subplots(1, 3 if exact else 2, figsize=(16 if exact else 11, 4))
    ax_loss, ax_speed = axes[0], axes[1]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.7)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss (EMA)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss per token")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_speed.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax_speed.set_xlabel("step")
    ax_speed.set_ylabel("target tokens / s (all processes)")
    ax_speed.grid(alpha=0.3)
    if exact:
        ax = axes[2]
        steps = [r["step"] for r in exact]
        ax.plot(steps, [100 * r["exact_match_le16"] for r in exact], "o-", label="sentences of <= 16 tokens")
        ax.plot(steps, [100 * r["exact_match"] for r in exact], "s-", label="all lengths")
        ax.axhline(50, color="grey", ls=":", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(f"exact-match reconstruction, % ({int(exact[-1]['sentences'])} val. sentences)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "learning_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
