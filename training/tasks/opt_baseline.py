"""The token-level baseline: the same OPT architecture, trained token by token on the
very same passages (bos + the passage's sentence tokens) with the same trainer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from sentences.segment import SEGMENTATION_VERSION
from sentences.tokenizer import SentenceTokenizer, TokenizerError
from training import checkpoint as ckpt
from training.config import BaselineRunConfig, ConfigError, load_run_config
from training.data.passage_data import PreparedPassages, collate_token_sequences, prepare_passages
from training.data.sentence_data import epoch_batches
from training.losses import IGNORE_INDEX, token_loss
from training.models.opt_graft import load_opt
from training.tasks.sentence_vae import _unwrap
from training.tasks.sllm import OPT_CONFIG_FILE


class OPTBaselineTask:
    def __init__(self, run: BaselineRunConfig, log=print):
        self.run = run
        if run.match_sllm:
            _copy_sllm_data_config(run)
        self.data: PreparedPassages = prepare_passages(run.data, run.max_sentence_tokens, log=log)
        tok = self.data.tokenizer
        run.data.segmentation_version = SEGMENTATION_VERSION
        self.initial = load_opt(run.opt, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
        self.config: OPTConfig = self.initial.config
        if self.config.vocab_size < tok.vocab_size:
            raise ConfigError(f"the OPT vocabulary ({self.config.vocab_size}) is smaller than the tokenizer's "
                              f"({tok.vocab_size}); use the OPT checkpoint's own tokenizer (data.tokenizer)")
        longest = int(self.data.train.token_counts.max()) + 1
        if longest > self.config.max_position_embeddings:
            raise ConfigError(f"passages of up to {longest} tokens need more than OPT's "
                              f"{self.config.max_position_embeddings} positions; lower data.max_passage_tokens")
        self.initial_state = {k: v.clone() for k, v in self.initial.state_dict().items()}
        run.validate()
        self._epoch_cache: tuple[int, list[np.ndarray]] | None = None

    def build_model(self) -> nn.Module:
        model = OPTForCausalLM(self.config)
        model.load_state_dict(self.initial_state)
        return model

    def _batches(self, epoch: int) -> list[np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            t = self.run.train
            self._epoch_cache = (epoch, epoch_batches(self.data.train.token_counts, t.batch_size, t.seed, epoch,
                                                      t.bucket_by_length))
        return self._epoch_cache[1]

    def num_batches(self, epoch: int) -> int:
        return len(self._batches(epoch))

    def batch(self, epoch: int, index: int):
        tok = self.data.tokenizer
        return collate_token_sequences(self.data.train, self._batches(epoch)[index], tok.pad_id, tok.bos_id)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        device = next(model.parameters()).device
        ids, mask, _ = (t.to(device) for t in batch)
        logits, targets = next_token_logits(model, ids, mask)
        return token_loss(logits, targets, self.run.train.loss, self.run.train.focal_gamma), int((targets != IGNORE_INDEX).sum())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from training.evaluate_lm import baseline_token_nll

        n = min(len(self.data.val), self.run.train.eval_batches * self.run.train.batch_size)
        tok = self.data.tokenizer
        return baseline_token_nll(_unwrap(model), self.data.val, np.arange(n), self.run.train.batch_size,
                                  tok.pad_id, tok.bos_id)

    def save_files(self, directory: Path) -> None:
        self.data.tokenizer.save(directory)
        (directory / OPT_CONFIG_FILE).write_text(self.config.to_json_string())


def _copy_sllm_data_config(run: BaselineRunConfig) -> None:
    d = ckpt.resolve_checkpoint(run.match_sllm)
    sllm_run = load_run_config(d / "config.json")
    if sllm_run.kind != "sllm":
        raise ConfigError(f"match_sllm={run.match_sllm!r} holds a {sllm_run.kind!r} checkpoint, not an SLLM")
    cache_dir = run.data.cache_dir
    run.data = sllm_run.data
    run.data.cache_dir = cache_dir
    run.data.tokenizer = str(d)
    run.max_sentence_tokens = sllm_run.svae.max_sentence_tokens


def next_token_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    """ids, mask [B, N] -> logits [B, N-1, V] predicting ids[:, 1:], targets [B, N-1] (-100 on padding)."""
    logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
    return logits, targets


@dataclass
class TrainedBaseline:
    model: OPTForCausalLM
    tokenizer: SentenceTokenizer
    run: BaselineRunConfig
    path: Path


def load_baseline(path: str | Path, weights: str = "ema", device: str = "cpu") -> TrainedBaseline:
    d = ckpt.resolve_checkpoint(path)
    ckpt.verify_checkpoint_dir(d)
    try:
        run = load_run_config(d / "config.json")
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{d}/config.json: {e}") from None
    if run.kind != "opt_baseline":
        raise ckpt.CheckpointError(f"{d} holds a {run.kind!r} checkpoint, not a token-level OPT baseline")
    try:
        tok = SentenceTokenizer.load(d)
        config = OPTConfig.from_json_file(str(d / OPT_CONFIG_FILE))
    except TokenizerError as e:
        raise ckpt.CheckpointError(f"{d}: {e}") from None
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{d}/{OPT_CONFIG_FILE} is missing or corrupt ({e})") from None
    config._attn_implementation = "eager"
    model = OPTForCausalLM(config)
    ckpt.load_state_into(model, ckpt.load_tensors(d / f"{weights}.safetensors"), str(d))
    return TrainedBaseline(model.to(device).eval(), tok, run, d)
