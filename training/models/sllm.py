"""SLLM (paper Eq. 7-9): SentenceVAE encoder -> grafted OPT blocks -> termination head,
and the SentenceVAE decoder turning each predicted vector into the next sentence.

Training view of a batch of passages (ids [B, T, L]):
  vectors  Omega_t = encoder(sentence t)                     [B, T, d]
  hidden   h_t, stop logits b_t = GraftedOPT(Omega_1..t)    [B, T, d], [B, T, 2]
  h_t decodes sentence t+1 (teacher forcing);  b_t says whether sentence t ends the paragraph.
"""
from __future__ import annotations

import torch
from torch import nn

from training.config import ConfigError
from training.models.opt_graft import GraftedOPT
from training.models.sentence_vae import IGNORE_INDEX, SentenceVAE


class SLLM(nn.Module):
    def __init__(self, svae: SentenceVAE, opt: GraftedOPT):
        super().__init__()
        if svae.cfg.d_model != opt.hidden_size:
            raise ConfigError(f"the SentenceVAE width d={svae.cfg.d_model} must equal OPT's hidden size "
                              f"{opt.hidden_size}")
        self.svae = svae
        self.opt = opt

    def encode_passages(self, ids: torch.Tensor, token_mask: torch.Tensor,
                        sentence_mask: torch.Tensor) -> torch.Tensor:
        """ids, token_mask [B, T, L], sentence_mask [B, T] -> sentence vectors [B, T, d] (0 for padding)."""
        B, T, L = ids.shape
        real = sentence_mask.reshape(-1)  # [B*T]
        vectors = self.svae.encoder(ids.reshape(B * T, L)[real], token_mask.reshape(B * T, L)[real])  # [N, d]
        out = vectors.new_zeros(B * T, vectors.shape[-1])
        out[real] = vectors
        return out.view(B, T, -1)

    def forward(self, ids: torch.Tensor, token_mask: torch.Tensor, sentence_mask: torch.Tensor):
        """-> hidden [B, T, d], stop logits [B, T, 2]."""
        vectors = self.encode_passages(ids, token_mask, sentence_mask)
        return self.opt(vectors, attention_mask=sentence_mask)

    def next_sentence_logits(self, hidden: torch.Tensor, ids: torch.Tensor, token_mask: torch.Tensor,
                             sentence_mask: torch.Tensor):
        """The vector predicted at t decodes sentence t+1 (teacher forcing).

        -> logits [N, L+1, V], targets [N, L+1] (tokens + eos, -100 elsewhere), N = pairs (t, t+1)."""
        has_next = sentence_mask[:, 1:]  # [B, T-1]
        memory = hidden[:, :-1][has_next]  # [N, d]
        nxt_ids, nxt_mask = ids[:, 1:][has_next], token_mask[:, 1:][has_next]  # [N, L]
        dec_in, targets = self.svae.teacher_forcing_targets(nxt_ids, nxt_mask)
        logits, _ = self.svae.decoder(dec_in, memory)
        return logits, targets

    @staticmethod
    def stop_targets(sentence_mask: torch.Tensor, para_end: torch.Tensor) -> torch.Tensor:
        """[B, T]: 1 where the sentence ends a paragraph (stop), 0 where more follows, -100 for padding."""
        t = para_end.long()
        return t.masked_fill(~sentence_mask, IGNORE_INDEX)

    def set_trainable(self, freeze_svae: bool, finetune_layers: int, finetune_from: str) -> None:
        """Freeze the SentenceVAE and/or all OPT blocks but the first/last `finetune_layers`."""
        for p in self.svae.parameters():
            p.requires_grad_(not freeze_svae)
        n = len(self.opt.layers)
        if finetune_layers and finetune_layers < n:
            keep = range(finetune_layers) if finetune_from == "first" else range(n - finetune_layers, n)
            for i, layer in enumerate(self.opt.layers):
                for p in layer.parameters():
                    p.requires_grad_(i in keep)
