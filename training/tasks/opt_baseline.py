"""The token-level baseline: the same OPT architecture, trained token by token on the
very same passages (bos + the passage's sentence tokens) with the same trainer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from sllm.modeling.config import ConfigError
from sllm.modeling.losses import IGNORE_INDEX, next_token_logits, token_loss
from sllm.modeling.opt_graft import load_opt
from sllm.runtime.artifacts import CheckpointError, expect
from sllm.sentences.segment import SEGMENTATION_VERSION
from sllm.training.config import BaselineRunConfig, load_run_config
from sllm.training.data.passage_data import PreparedPassages, collate_token_sequences, prepare_passages
from sllm.training.evaluate_lm import baseline_token_nll
from sllm.training.load import OPT_CONFIG_FILE
from sllm.training.pretrained_embeddings import check_tokenizer
from sllm.training.tasks.common import epoch_batches, unwrap


class OPTBaselineTask:
    def __init__(self, run: BaselineRunConfig, log=print):
        self.run = run
        if run.match_sllm:
            _copy_sllm_data_config(run)
        self.data: PreparedPassages = prepare_passages(run.data, run.max_sentence_tokens, log=log)
        tok = self.data.tokenizer
        run.data.segmentation_version = SEGMENTATION_VERSION
        if run.opt.pretrained:  # continued pretraining: its weights only; optimizer and schedule start fresh
            check_tokenizer(run.opt.pretrained, tok)
        self.initial = load_opt(run.opt, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
        self.config: OPTConfig = self.initial.config
        if self.config.vocab_size < tok.vocab_size:
            raise ConfigError(f"the OPT vocabulary ({self.config.vocab_size}) is smaller than the tokenizer's "
                              f"({tok.vocab_size}); use the OPT checkpoint's own tokenizer (data.tokenizer)")
        longest = self.data.dataset.longest_passage_tokens("train") + 1
        if longest > self.config.max_position_embeddings:
            raise ConfigError(f"passages of up to {longest} tokens need more than OPT's "
                              f"{self.config.max_position_embeddings} positions; lower data.max_passage_tokens")
        self.initial_state = {k: v.clone() for k, v in self.initial.state_dict().items()}
        run.validate()
        train = self.data.train
        self._batches = epoch_batches(len(train), train.token_counts, run.train)
        self.dataset_id = self.data.dataset.dataset_id  # recorded with checkpoints: a resume must read the same data

    def build_model(self) -> nn.Module:
        model = OPTForCausalLM(self.config)
        model.load_state_dict(self.initial_state)
        return model

    def num_batches(self, epoch: int) -> int:
        return len(self._batches)

    def batch(self, epoch: int, index: int):
        tok = self.data.tokenizer
        return collate_token_sequences(self.data.train, self._batches.batch(epoch, index), tok.pad_id, tok.bos_id)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        device = next(model.parameters()).device
        ids, mask, _ = (t.to(device) for t in batch)
        logits, targets = next_token_logits(model, ids, mask)
        return token_loss(logits, targets, self.run.train.loss, self.run.train.focal_gamma), int((targets != IGNORE_INDEX).sum())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        n = min(len(self.data.val), self.run.train.eval_batches * self.run.train.batch_size)
        tok = self.data.tokenizer
        return baseline_token_nll(unwrap(model), self.data.val, np.arange(n), self.run.train.batch_size,
                                  tok.pad_id, tok.bos_id)

    def save_files(self, directory: Path) -> None:
        self.data.tokenizer.save(directory)
        (directory / OPT_CONFIG_FILE).write_text(self.config.to_json_string())


def _copy_sllm_data_config(run: BaselineRunConfig) -> None:
    try:
        d = expect(run.match_sllm, "sllm").path
    except CheckpointError as e:
        raise ConfigError(f"match_sllm={run.match_sllm!r}: {e}") from None
    sllm_run = load_run_config(d / "config.json")
    cache_dir = run.data.cache_dir
    run.data = sllm_run.data
    run.data.cache_dir = cache_dir
    run.data.tokenizer = str(d)
    run.max_sentence_tokens = sllm_run.svae.max_sentence_tokens
