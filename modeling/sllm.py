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

from sllm.modeling.config import ConfigError
from sllm.modeling.losses import token_loss_sum
from sllm.modeling.opt_graft import GraftedOPT
from sllm.modeling.sentence_vae import IGNORE_INDEX, SentenceVAE


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
        flat_ids, flat_mask = ids.reshape(B * T, L)[real], token_mask.reshape(B * T, L)[real]  # [N, L]
        parts, order = [], []
        for idx, Lc in _length_chunks(flat_mask.sum(dim=1)):
            parts.append(self.svae.encoder(flat_ids[idx, :Lc], flat_mask[idx, :Lc]))  # [n, d]
            order.append(idx)
        vectors = torch.cat(parts)[torch.cat(order).argsort()]  # [N, d] in the original order
        out = vectors.new_zeros(B * T, vectors.shape[-1])
        out[real] = vectors
        return out.view(B, T, -1)

    def forward(self, ids: torch.Tensor, token_mask: torch.Tensor, sentence_mask: torch.Tensor,
                with_vectors: bool = False):
        """-> hidden [B, T, d], stop logits [B, T, 2] (+ the input sentence vectors [B, T, d])."""
        vectors = self.encode_passages(ids, token_mask, sentence_mask)
        hidden, stop_logits = self.opt(vectors, attention_mask=sentence_mask)
        return (hidden, stop_logits, vectors) if with_vectors else (hidden, stop_logits)

    def next_sentence_loss(self, hidden: torch.Tensor, ids: torch.Tensor, token_mask: torch.Tensor,
                           sentence_mask: torch.Tensor, kind: str = "ce", gamma: float = 0.0):
        """The vector predicted at t decodes sentence t+1 (teacher forcing; targets = tokens + eos).

        -> (summed token loss, target count, number of decoded sentences)."""
        has_next = sentence_mask[:, 1:]  # [B, T-1]
        return self.decode_loss(hidden[:, :-1][has_next], ids[:, 1:][has_next], token_mask[:, 1:][has_next],
                                kind, gamma)

    def reconstruction_loss(self, vectors: torch.Tensor, ids: torch.Tensor, token_mask: torch.Tensor,
                            sentence_mask: torch.Tensor, kind: str = "ce", gamma: float = 0.0):
        """Each sentence decoded from its own encoder vector (stage 1's objective), which keeps the
        fine-tuned SentenceVAE an autoencoder. -> (summed token loss, target count, sentences)."""
        return self.decode_loss(vectors[sentence_mask], ids[sentence_mask], token_mask[sentence_mask], kind, gamma)

    def decode_loss(self, memory: torch.Tensor, ids: torch.Tensor, token_mask: torch.Tensor,
                    kind: str = "ce", gamma: float = 0.0):
        """memory [N, d] decodes ids [N, L] -> (summed token loss, target count, N)."""
        total, count = memory.new_zeros((), dtype=torch.float32), 0
        for idx, Lc in _length_chunks(token_mask.sum(dim=1)):
            dec_in, targets = self.svae.teacher_forcing_targets(ids[idx, :Lc], token_mask[idx, :Lc])
            logits, _ = self.svae.decoder(dec_in, memory[idx])  # [n, Lc+1, V]
            s, c = token_loss_sum(logits, targets, kind, gamma)
            total, count = total + s, count + int(c)
        return total, count, int(memory.shape[0])

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


def _length_chunks(lengths: torch.Tensor, rows: int = 128):
    """Yield (row indices, their max length) in groups of similar length: padding stays small
    when a batch mixes 3-token and 60-token sentences."""
    order = lengths.argsort()
    if len(order) == 0:  # still run the modules once: DDP needs every rank to produce the same gradients
        yield order, 1
    for i in range(0, len(order), rows):
        idx = order[i : i + rows]
        yield idx, max(1, int(lengths[idx].max()))
