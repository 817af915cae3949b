"""Typed configs for models and training runs.

Every checkpoint carries its config as JSON (`config.json`) so a model can be
rebuilt without the command line that trained it. Overrides from the command
line use dotted keys: `model.d_model=512 train.lr=3e-4`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sllm.modeling.config import ConfigError, OPTSpec, SentenceVAEConfig, from_dict, to_dict
from sllm.runtime.files import atomic_write_text
from sllm.training.bundled import bundled_dir


@dataclass
class DataConfig:
    # a prepared dataset (`sllm-train prepare`); empty: `corpus` is prepared into cache_dir on first use
    dataset: str = ""
    corpus: list[str] = field(default_factory=list)  # empty: the bundled corpus in data/corpus
    val_fraction: float = 0.02  # share of documents held out, per source
    split_seed: int = 0
    split_on_comma: bool = True  # segmentation option, stored with the model
    segmentation_version: str = ""  # filled in by the trainer from sentences.segment
    tokenizer: str = ""  # tokenizer.json or a Hugging Face checkpoint dir; empty: train a BPE
    vocab_size: int = 8192  # for a tokenizer trained here
    cache_dir: str = "runs/cache"
    # stage 2 / baseline: passages of consecutive sentences from one document
    max_passage_sentences: int = 64
    max_passage_tokens: int = 1000  # the baseline reads bos + these tokens: fits 1024 positions


@dataclass
class TrainConfig:
    out_dir: str = "runs/svae"
    seed: int = 0
    batch_size: int = 128  # sentences per optimizer step, per process
    max_steps: int = 1000
    stop_at_step: int = 0  # end the run early (the schedule still follows max_steps); 0 = off
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine floor as a share of lr
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    loss: str = "ce"  # "ce" or "focal"
    focal_gamma: float = 2.0
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16"
    bucket_by_length: bool = True
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 20
    save_every: int = 500
    keep_checkpoints: int = 2
    threads: int = 0  # torch intra-op threads per process; 0 = leave the default
    compile: bool = False

    def validate(self) -> None:
        if self.loss not in ("ce", "focal"):
            raise ConfigError(f"loss must be 'ce' or 'focal', got {self.loss!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.batch_size < 1 or self.max_steps < 1:
            raise ConfigError("batch_size and max_steps must be positive")
        if self.log_every < 1 or self.save_every < 1:
            raise ConfigError("log_every and save_every must be positive")
        if self.save_every % self.log_every:
            # the token count saved with a checkpoint is updated at log steps
            raise ConfigError(f"save_every={self.save_every} must be a multiple of log_every={self.log_every}")


@dataclass
class SLLMOptions:
    # stage-1 checkpoint or run dir, an SLLM checkpoint (its SentenceVAE) or an export folder holding
    # svae/ (models/default); empty: a fresh SentenceVAE (config `svae`)
    svae_checkpoint: str = ""
    freeze_svae: bool = False  # keep the SentenceVAE fixed; train only OPT blocks + termination head
    finetune_layers: int = 0  # > 0: train only this many OPT blocks (see finetune_from); 0: all
    finetune_from: str = "last"  # "first" or "last"
    init_embeddings_from_opt: bool = False  # copy OPT's token embedding into the SentenceVAE (same tokenizer)
    stop_loss_weight: float = 1.0
    stop_focal_gamma: float = 2.0  # paper: focal loss for the stop flags
    # the weight of the rare positive stop flag (the sentence ends its paragraph: about 3% of the
    # bundled corpus's sentences) against 1 for "more follows"; 1 = unweighted, which learns a head
    # that almost never says stop
    stop_positive_weight: float = 1.0
    # > 0: also train the decoder to reconstruct each sentence from its own encoder vector, so the
    # fine-tuned SentenceVAE stays an autoencoder (stage 2 alone turns it into a next-sentence decoder)
    reconstruction_loss_weight: float = 0.0

    def validate(self) -> None:
        if self.finetune_from not in ("first", "last"):
            raise ConfigError(f"finetune_from must be 'first' or 'last', got {self.finetune_from!r}")
        if min(self.finetune_layers, self.stop_loss_weight, self.stop_focal_gamma,
               self.reconstruction_loss_weight) < 0:
            raise ConfigError("finetune_layers, stop_loss_weight, stop_focal_gamma and "
                              "reconstruction_loss_weight must be >= 0")
        if not self.stop_positive_weight > 0:
            raise ConfigError(f"stop_positive_weight must be > 0, got {self.stop_positive_weight}")


@dataclass
class SVAEInit:
    """Where a fresh SentenceVAE's weights start from (a resume always continues from its checkpoint)."""

    # the token embeddings of a pretrained token-level OPT (the paper's recipe): a Hugging Face OPT
    # folder (`sllm-export BASELINE_RUN --out DIR` writes DIR/baseline), a baseline run, checkpoint or
    # bundle; the same tokenizer and width as this run (checked). Empty: random.
    embeddings_from: str = ""


@dataclass
class RunConfig:
    """Everything a SentenceVAE training run needs; saved beside every checkpoint."""

    model: SentenceVAEConfig = field(default_factory=SentenceVAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: SVAEInit = field(default_factory=SVAEInit)
    kind: str = "sentence_vae"

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()


@dataclass
class SLLMRunConfig:
    """Stage 2: a SentenceVAE grafted onto OPT blocks (paper Eq. 6-9)."""

    svae: SentenceVAEConfig = field(default_factory=SentenceVAEConfig)
    opt: OPTSpec = field(default_factory=OPTSpec)
    sllm: SLLMOptions = field(default_factory=SLLMOptions)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/sllm", batch_size=8))
    kind: str = "sllm"

    def validate(self) -> None:
        self.svae.validate()
        self.opt.validate()
        self.sllm.validate()
        self.train.validate()
        if self.data.max_passage_sentences < 2:
            raise ConfigError("data.max_passage_sentences must be >= 2 (a sentence and the next one)")


@dataclass
class BaselineRunConfig:
    """The token-level OPT trained on the same passages and token budget as an SLLM."""

    opt: OPTSpec = field(default_factory=OPTSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/baseline", batch_size=8))
    max_sentence_tokens: int = 64  # segmentation limit, the same as the SLLM's
    # an SLLM checkpoint or run dir: copy its data config, tokenizer and sentence limit, so that
    # both models train and are scored on exactly the same passages and tokens
    match_sllm: str = ""
    kind: str = "opt_baseline"

    def validate(self) -> None:
        self.opt.validate()
        self.train.validate()


RUN_CONFIGS = {"sentence_vae": RunConfig, "sllm": SLLMRunConfig, "opt_baseline": BaselineRunConfig}


def load_run_config(path: str | Path):
    """Any run config; its `kind` field picks the class. A path that does not exist may name a
    shipped config ("configs/svae-small.json" or "svae-small"), found in a checkout or an install."""
    path = Path(path)
    if not path.exists():
        shipped = bundled_dir("configs", "*.json") / (path.name if path.suffix == ".json" else f"{path.name}.json")
        if not shipped.is_file():
            names = ", ".join(sorted(p.stem for p in shipped.parent.glob("*.json")))
            raise ConfigError(f"config file not found: {path} (shipped configs, by name: {names})")
        path = shipped
    data = _read_json(path)
    kind = data.get("kind", "sentence_vae") if isinstance(data, dict) else None
    if kind not in RUN_CONFIGS:
        raise ConfigError(f"{path}: unknown run kind {kind!r} (expected one of {sorted(RUN_CONFIGS)})")
    return from_dict(RUN_CONFIGS[kind], data)


# ---------------------------------------------------------------- files

def save_json(cfg, path: str | Path) -> None:
    atomic_write_text(Path(path), json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None


def apply_overrides(cfg, overrides: list[str]):
    """Apply `section.key=value` strings; values are parsed as JSON when they can be."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {key!r}: no section {part!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {key!r}: no such key")
        if isinstance(node[parts[-1]], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(node[parts[-1]], list) and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        node[parts[-1]] = value
    return from_dict(type(cfg), data)
