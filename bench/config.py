"""What one benchmark run measures and how hard: a typed config with a full and a --quick preset."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# models/default against its fair baseline: `sllm-train compare models/default --report ...`
RECORDED_PPL = ROOT / "docs" / "results" / "default" / "compare-validation.json"
# its stage-1 SentenceVAE (`sllm-train eval runs/quality/svae-scratch`, scripts/train_quality.sh) and that run's config
RECORDED_SVAE = ROOT / "docs" / "results" / "quality" / "svae-scratch-validation.json"
RECORDED_SVAE_CONFIG = ROOT / "configs" / "quality" / "svae-scratch.json"
SVAE_BASE_CONFIG = ROOT / "configs" / "svae-small.json"  # the variants differ from it in depth and budget only


@dataclass
class BenchConfig:
    model: Path = Path("models/default")  # edge/, cloud/ and (optionally) baseline/
    out: Path = Path("docs/results")  # bench.md, bench.json, bench-*.png
    work: Path = Path("runs/bench")  # SentenceVAE variant runs and data caches
    quick: bool = False
    threads: int = 1  # torch / ORT intra-op threads of every process (edge, cloud server, baseline)
    corpus: list[str] = field(default_factory=list)  # validation text source; empty: the bundled corpus
    seed: int = 0
    # throughput (paper Table 3, output throughput)
    prompt_tokens: list[int] = field(default_factory=lambda: [16, 64, 256])
    output_tokens: list[int] = field(default_factory=lambda: [32, 128, 512])
    repeats: int = 3  # prompts per (prompt length, output length); each one runs on every path
    rounds: int = 3  # the whole throughput plan, repeated: min / median / max over rounds
    baseline_threads: list[int] = field(default_factory=lambda: [1, 2])  # each baseline flavour at each count
    wire_dtype: str = "float16"  # sentence vectors on the wire (as the edge would send them)
    speculate: int = 8  # the speculation row: sentences the cloud may guess ahead; 0 = no such row
    # memory (paper Table 3, KB per token)
    context_tokens: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1000])
    # where the time goes
    decoder_pasts: list[int] = field(default_factory=lambda: [1, 16, 63])
    decoder_runs: int = 500
    # scale: concurrent edge clients against one cloud server
    clients: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    scale_seconds: float = 4.0
    scale_warmup: float = 1.0
    # quality (paper Table 1 and Table 3 PPL)
    sllm_run: Path | None = None  # with baseline_run: recompute the comparable PPL (full mode)
    baseline_run: Path | None = None
    ppl_passages: int = 0  # validation passages for the recomputed PPL; 0 = all
    svae_layers: list[int] = field(default_factory=lambda: [1, 2, 4])  # H1, H2, H4
    svae_steps: int = 1000  # 1.4 M target tokens per variant: enough for depth to start to show
    svae_batch: int = 128
    svae_eval_sentences: int = 0  # loss / PPL over this many validation sentences; 0 = all (as recorded)
    svae_exact_sentences: int = 500  # greedy exact-match over this many
    train_svae: bool = True  # full mode trains the variants; --quick reports the recorded H1

    @classmethod
    def quick_preset(cls, **overrides) -> "BenchConfig":
        """A few minutes on the bundled model: fewer lengths, one prompt per point (in each of the 3
        rounds), clients 1, 4, 16, no variant training (recorded results instead)."""
        base = dict(quick=True, prompt_tokens=[16, 128], output_tokens=[32, 128], repeats=1, rounds=3,
                    context_tokens=[64, 256, 1000], decoder_runs=100, clients=[1, 4, 16], scale_seconds=2.0,
                    scale_warmup=0.5, train_svae=False)
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        if self.threads < 1:
            raise ValueError("--threads must be >= 1")
        for name in ("prompt_tokens", "output_tokens", "context_tokens", "clients", "decoder_pasts", "svae_layers",
                     "baseline_threads"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name.replace('_', '-')} needs positive integers, got {values}")
        if self.repeats < 1 or self.rounds < 1 or self.decoder_runs < 1 or self.svae_steps < 1 or self.svae_batch < 1:
            raise ValueError("repeats, rounds, decoder runs, svae steps and svae batch must be >= 1")
        if self.scale_seconds <= 0 or self.scale_warmup < 0:
            raise ValueError("scale seconds must be > 0 and the warm-up >= 0")
        if self.speculate < 0:
            raise ValueError(f"--speculate must be >= 0 (0 = no speculation row), got {self.speculate}")
        if self.wire_dtype not in ("float16", "float32"):
            raise ValueError(f"wire dtype must be float16 or float32, got {self.wire_dtype!r}")
        if (self.sllm_run is None) != (self.baseline_run is None):
            raise ValueError("--sllm-run and --baseline-run go together (the PPL compares the two)")
