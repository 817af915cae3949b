"""Stage 2: train an SLLM (SentenceVAE grafted onto OPT blocks, paper Eq. 6-9).

loss = next-sentence decode loss (the vector predicted at sentence t decodes sentence
t+1; CE or focal, per token) + stop_loss_weight * focal loss of the stop flags (the rare
"paragraph ends here" flag weighted by stop_positive_weight).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import OPTConfig

from sllm.modeling.config import ConfigError
from sllm.modeling.losses import token_loss
from sllm.modeling.opt_graft import STOP, GraftedOPT, load_opt
from sllm.modeling.sentence_vae import SentenceVAE
from sllm.modeling.sllm import SLLM
from sllm.sentences.segment import SEGMENTATION_VERSION
from sllm.training.config import SLLMRunConfig
from sllm.training.data.passage_data import PassageBatch, PreparedPassages, collate_passages, prepare_passages
from sllm.training.evaluate_lm import sllm_token_nll
from sllm.training.load import OPT_CONFIG_FILE, load_sentence_vae
from sllm.training.pretrained_embeddings import check_tokenizer
from sllm.training.tasks.common import epoch_batches, unwrap


class SLLMTask:
    def __init__(self, run: SLLMRunConfig, log=print):
        self.run = run
        self.svae_state: dict[str, torch.Tensor] | None = None
        if run.sllm.svae_checkpoint:
            # a stage-1 checkpoint, an SLLM checkpoint's SentenceVAE, or an export's svae/ (models/default)
            stage1 = load_sentence_vae(run.sllm.svae_checkpoint)
            # the SentenceVAE's own tokenizer, width and segmentation come with it
            run.svae = stage1.model.cfg
            run.data.tokenizer = str(stage1.path)
            run.data.split_on_comma = stage1.run.data.split_on_comma
            self.svae_state = {k: v.clone() for k, v in stage1.model.state_dict().items()}
        self.data: PreparedPassages = prepare_passages(run.data, run.svae.max_sentence_tokens, log=log)
        tok = self.data.tokenizer
        m = run.svae
        if self.svae_state is None:
            m.vocab_size, m.pad_id, m.bos_id, m.eos_id = tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id
        run.data.segmentation_version = SEGMENTATION_VERSION
        if run.sllm.init_embeddings_from_opt and run.opt.pretrained:  # its rows must mean our tokens
            check_tokenizer(run.opt.pretrained, tok, "opt.pretrained (sllm.init_embeddings_from_opt)")
        opt = load_opt(run.opt, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
        self.opt_config: OPTConfig = opt.config
        self.opt_state = {k: v.clone() for k, v in GraftedOPT.from_causal_lm(opt).state_dict().items()
                          if not k.startswith("stop_head.")}
        self.opt_embedding = opt.get_input_embeddings().weight.detach().clone()
        if self.opt_config.hidden_size != m.d_model:
            raise ConfigError(f"the SentenceVAE width d={m.d_model} must equal OPT's hidden size "
                              f"{self.opt_config.hidden_size} (set svae.d_model or opt.hidden_size)")
        max_pos = self.opt_config.max_position_embeddings
        if run.data.max_passage_sentences > max_pos:
            raise ConfigError(f"data.max_passage_sentences={run.data.max_passage_sentences} exceeds OPT's "
                              f"{max_pos} positions")
        run.validate()
        train = self.data.train
        self._batches = epoch_batches(len(train), train.token_counts, run.train)
        self.dataset_id = self.data.dataset.dataset_id  # recorded with checkpoints: a resume must read the same data

    # ------------------------------------------------------------ Task protocol

    def build_model(self) -> nn.Module:
        svae = SentenceVAE(self.run.svae)
        if self.svae_state is not None:
            svae.load_state_dict(self.svae_state)
        graft = GraftedOPT(self.opt_config)
        graft.load_state_dict(self.opt_state, strict=False)  # stop head: fresh
        o = self.run.sllm
        if o.init_embeddings_from_opt:
            emb = self.opt_embedding
            if emb.shape != svae.encoder.tok_emb.weight.shape:
                raise ConfigError(f"OPT's token embedding {tuple(emb.shape)} does not fit the SentenceVAE's "
                                  f"{tuple(svae.encoder.tok_emb.weight.shape)} (same tokenizer and width needed)")
            with torch.no_grad():
                svae.encoder.tok_emb.weight.copy_(emb)
                svae.decoder.tok_emb.weight.copy_(emb)
        model = SLLM(svae, graft)
        model.set_trainable(o.freeze_svae, o.finetune_layers, o.finetune_from)
        return model

    def num_batches(self, epoch: int) -> int:
        return len(self._batches)

    def batch(self, epoch: int, index: int) -> PassageBatch:
        return collate_passages(self.data.train, self._batches.batch(epoch, index), self.run.svae.pad_id)

    def loss(self, model: nn.Module, batch: PassageBatch) -> tuple[torch.Tensor, int]:
        decode_loss, stop_loss, n_tokens = sllm_losses(model, batch.to(next(model.parameters()).device), self.run)
        return decode_loss + self.run.sllm.stop_loss_weight * stop_loss, n_tokens

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        n = min(len(self.data.val), self.run.train.eval_batches * self.run.train.batch_size)
        return sllm_token_nll(unwrap(model), self.data.val, np.arange(n), self.run.train.batch_size)

    def save_files(self, directory: Path) -> None:
        self.data.tokenizer.save(directory)
        (directory / OPT_CONFIG_FILE).write_text(self.opt_config.to_json_string())


def stop_class_weight(positive_weight: float) -> torch.Tensor:
    """The stop loss's class weights [2]: 1 for "decode another sentence", positive_weight for "stop"."""
    w = torch.ones(2)
    w[STOP] = positive_weight
    return w


def sllm_losses(model: nn.Module, batch: PassageBatch, run: SLLMRunConfig):
    """(decode loss per target token, stop-flag loss per sentence, target tokens).

    The decode loss adds reconstruction_loss_weight * the per-token reconstruction loss."""
    hidden, stop_logits, vectors = model(batch.ids, batch.token_mask, batch.sentence_mask, with_vectors=True)
    inner: SLLM = unwrap(model)
    kind, gamma = run.train.loss, run.train.focal_gamma
    total, count, _ = inner.next_sentence_loss(hidden, batch.ids, batch.token_mask, batch.sentence_mask, kind, gamma)
    decode = total / max(count, 1)
    if run.sllm.reconstruction_loss_weight > 0:
        r_total, r_count, _ = inner.reconstruction_loss(vectors, batch.ids, batch.token_mask, batch.sentence_mask,
                                                        kind, gamma)
        decode = decode + run.sllm.reconstruction_loss_weight * r_total / max(r_count, 1)
    stop = token_loss(stop_logits, SLLM.stop_targets(batch.sentence_mask, batch.para_end), "focal",
                      run.sllm.stop_focal_gamma, class_weight=stop_class_weight(run.sllm.stop_positive_weight))
    return decode, stop, count
