"""The SentenceVAE's torch weights on the cloud (sentence-level speculation, issue 17).

An export folder holds them in svae/ (written by `sllm-export`, or recovered from the edge graphs by
`sllm-train recover-svae`; `sllm.training.svae_folder` writes it): a stage-1 checkpoint in form, so
training reads it as one, and the cloud reads it here without the training code:

    svae/
      ema.safetensors    SentenceVAE state dict (a tied output layer stored once)
      config.json        the run config; its "model" section is the SentenceVAEConfig
      source.json        the model id it belongs to, and how it was made/checked
      manifest.json      {"sha256": {file: hash}}, written last

The model id ties it to the cloud half: a SentenceVAE of another model would speculate garbage
(every guess rolled back), so a mismatch is refused. torch only.

`fast_greedy_decode` is the cloud's speculation decoder: `sllm.modeling.generate.decode_sentences` with
greedy picks, but the keys/values of the self-attention preallocated once per batch and written in
place (the reference concatenates them every token), and every row with its own repetition controls
and token limit, so the guesses of all sessions decode in one batch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from sllm.modeling.config import ConfigError, SentenceVAEConfig, from_dict
from sllm.modeling.generate import control_repetition
from sllm.modeling.sentence_vae import SentenceVAE, pad_token_lists
from sllm.modeling.weights import load_state_into, load_tensors, with_tied
from sllm.runtime.artifacts import MANIFEST, CheckpointError, verify_checkpoint_dir
from sllm.runtime.manifest import BundleError
from sllm.sentences.sampling import AnswerOptions, RepetitionGuard

FOLDER = "svae"  # beside edge/ and cloud/ in an export folder
WEIGHTS = "ema.safetensors"
CONFIG = "config.json"
SOURCE = "source.json"


def svae_folder_of(cloud_bundle_dir: Path) -> Path | None:
    """The svae/ of the export folder a cloud bundle sits in, when there is one."""
    folder = Path(cloud_bundle_dir).resolve().parent / FOLDER
    return folder if (folder / WEIGHTS).is_file() else None


def load_svae_folder(directory: Path, model_id: str | None = None) -> SentenceVAE:
    """The SentenceVAE in `directory` (eval, CPU, float32). BundleError when it is missing, corrupt (every
    file is checked against its manifest), or belongs to another model than `model_id`."""
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG, MANIFEST):
        if not (directory / name).is_file():
            raise BundleError(f"{directory} is not a SentenceVAE folder (no {name}); write one with sllm-export, "
                              "or `sllm-train recover-svae` for an older export")
    try:
        verify_checkpoint_dir(directory)  # a stage-1 checkpoint in form: every file against its manifest
        source = json.loads((directory / SOURCE).read_text()) if (directory / SOURCE).is_file() else {}
        cfg = from_dict(SentenceVAEConfig, json.loads((directory / CONFIG).read_text())["model"])
        cfg.validate()
    except CheckpointError as e:
        raise BundleError(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise BundleError(f"{directory}: source or config is missing or corrupt ({e})") from None
    if model_id is not None and source.get("model_id") != model_id:
        raise BundleError(f"{directory}: the SentenceVAE belongs to model {source.get('model_id')!r}, the cloud serves "
                          f"{model_id!r}; use the folders of one export")
    svae = SentenceVAE(cfg)
    try:
        load_state_into(svae, with_tied(svae, load_tensors(directory / WEIGHTS)), str(directory / WEIGHTS))
    except CheckpointError as e:
        raise BundleError(str(e)) from None
    return svae.float().eval()


# ---------------------------------------------------------------- speculation: decode + re-encode

@torch.inference_mode()
def fast_greedy_decode(decoder, memory: torch.Tensor, max_tokens: int | None = None,
                       lm_head_t: torch.Tensor | None = None, guards: list[RepetitionGuard | None] | None = None,
                       limits: list[int | None] | None = None) -> list[list[int]]:
    """Greedy decode of memory [B, d] (rows stop at eos or their token limit): the tokens
    `decode_sentences` gives row by row with the same controls (up to float rounding on near-ties),
    with a preallocated self-attention cache. The cross-attention reads a memory of one vector, so its
    softmax is 1 and its output is a constant per row, computed once. Finished rows stay in the
    batch (their picks are ignored): nothing is copied when one ends.
    guards[i]: row i's repetition controls over its answer (None: plain greedy); limits[i]: its token
    limit (None: max_tokens, or the model's). lm_head_t: the output layer's weight transposed and
    contiguous [d, V] (a vector-matrix product that way is ~3x faster on a CPU)."""
    cfg = decoder.cfg
    B, d = memory.shape
    model_limit = cfg.max_sentence_tokens
    limits = [min(model_limit if m is None else m, model_limit) for m in (limits or [max_tokens] * B)]
    limit = max(limits, default=0)
    if B == 0 or limit <= 0:
        return [[] for _ in range(B)]
    dev, dt = memory.device, memory.dtype
    H, hd = decoder.n_heads, decoder.head_dim
    guarded = [i for i, g in enumerate(guards or []) if g is not None]
    room = torch.tensor(limits, device=dev)  # [B] tokens each row may still take
    cache = torch.empty(decoder.n_layers, 2, B, H, limit + 1, hd, dtype=dt, device=dev)  # bos + tokens
    cross = []  # [B, 1, d] per block: proj(v(memory)), what attending to one memory vector gives
    for blk in decoder.blocks:
        v = blk.cross.kv(memory[:, None]).split(d, dim=-1)[1]  # [B, 1, d]
        cross.append(blk.cross.proj(v))
    tok = torch.full((B,), cfg.bos_id, dtype=torch.long, device=dev)
    live = room > 0
    picks = []
    for t in range(limit):
        x = (decoder.tok_emb(tok) + decoder.pos_emb.weight[t])[:, None]  # [B, 1, d]
        for i, blk in enumerate(decoder.blocks):
            q, k, v = blk.attn.qkv(blk.ln1(x)).split(d, dim=-1)  # [B, 1, d] each
            cache[i, 0, :, :, t] = k.view(B, H, hd)
            cache[i, 1, :, :, t] = v.view(B, H, hd)
            y = F.scaled_dot_product_attention(q.view(B, 1, H, hd).transpose(1, 2), cache[i, 0, :, :, :t + 1],
                                               cache[i, 1, :, :, :t + 1])  # [B, H, 1, hd]
            x = x + blk.attn.proj(y.transpose(1, 2).reshape(B, 1, d))
            x = x + cross[i]
            x = x + blk.mlp(blk.ln3(x))
        h = decoder.ln_f(x[:, 0])  # [B, d]
        logits = h @ lm_head_t if lm_head_t is not None else decoder.lm_head(h)  # [B, V]
        if guarded:
            logits[guarded] = control_repetition(logits[guarded], [guards[i] for i in guarded])
        nxt = logits.argmax(-1)  # [B]
        live = live & (nxt != cfg.eos_id)
        picks.append(torch.where(live, nxt, -1))
        for i, token in zip(guarded, nxt[guarded].tolist()):
            if live[i]:
                guards[i].push(token)
        live = live & (room > t + 1)
        if not bool(live.any()):
            break
        tok = nxt
    rows = torch.stack(picks, 1).tolist()  # [B, T]; -1 from a row's eos (or limit) on
    return [row[:row.index(-1)] if -1 in row else row for row in rows]


class SpeculationCodec:
    """The cloud's SentenceVAE as speculation uses it: h_t [B, d] -> greedy sentences -> their vectors."""

    def __init__(self, svae: SentenceVAE, device: torch.device | str = "cpu"):
        self.svae = svae.float().to(device).eval()
        self.device = torch.device(device)
        self.cfg = svae.cfg
        self.lm_head_t = self.svae.decoder.lm_head.weight.detach().t().contiguous()  # [d, V]

    @torch.inference_mode()
    def decode(self, hidden: torch.Tensor, controls: list[AnswerOptions | None] | None = None,
               histories: list[list[list[int]]] | None = None) -> list[list[int]]:
        """h_t [B, d] -> one greedy token list per row (empty: eos straight away). controls[i]: how the edge
        decodes row i's answer (its repetition controls and token limit; None: plain greedy at the model's
        limit), applied over histories[i] (the answer's earlier sentences) exactly as the edge applies them."""
        hidden = hidden.to(self.device, torch.float32)
        controls = controls or [None] * len(hidden)
        eos = self.cfg.eos_id
        guards = [None if c is None or not c.controls_repetition else RepetitionGuard(c, h, eos)
                  for c, h in zip(controls, histories or [()] * len(hidden))]
        limits = [None if c is None else c.max_tokens or None for c in controls]
        return fast_greedy_decode(self.svae.decoder, hidden, lm_head_t=self.lm_head_t, guards=guards, limits=limits)

    @torch.inference_mode()
    def encode(self, token_lists: list[list[int]]) -> torch.Tensor:
        """Non-empty token lists -> sentence vectors [B, d] float32 (what encoder.onnx computes on the edge)."""
        ids, mask = pad_token_lists(token_lists, self.cfg.pad_id)
        return self.svae.encoder(ids.to(self.device), mask.to(self.device))
