"""torch -> ONNX for the SentenceVAE encoder and the cached decoder step (torch's dynamo exporter).

The legacy TorchScript exporter freezes sequence lengths; `dynamo=True` keeps batch,
length, step and past dynamic. Example inputs use sizes >= 2 (sizes 0 and 1 get
specialised into the graph). The decoder is ONE graph for every step, the first
included: it takes a past of length 0 (checked in ORT by `sllm.export.verify`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from sllm.modeling.sentence_vae import SentenceDecoder, SentenceEncoder
from sllm.runtime.svae_onnx import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS

OPSET = 18


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines, warnings and log records; a CLI wants none of them."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "onnxscript", "torch._dynamo",
             "torch.utils._sympy", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes) -> Path:
    path = Path(path)
    was_training = module.training
    module.eval()
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, verbose=False,
                                        input_names=list(input_names), output_names=list(output_names),
                                        dynamic_shapes=dynamic_shapes, external_data=False, optimize=True)
            program.save(str(path), external_data=False)
    finally:
        module.train(was_training)
    return path


def export_encoder(encoder: SentenceEncoder, path: Path) -> Path:
    """encoder.onnx: ids int64 [batch, length], mask bool [batch, length] -> vectors [batch, d]."""
    cfg = encoder.cfg
    w = encoder.tok_emb.weight
    L = max(2, min(5, cfg.max_sentence_tokens))
    g = torch.Generator().manual_seed(0)  # example values do not matter; keep the caller's RNG untouched
    ids = torch.randint(0, cfg.vocab_size, (3, L), generator=g).to(w.device)
    mask = torch.ones(3, L, dtype=torch.bool, device=w.device)
    mask[1, L - 1:] = False
    batch = torch.export.Dim("batch")
    length = torch.export.Dim("length", max=max(2, cfg.max_sentence_tokens))
    dyn = {"ids": {0: batch, 1: length}, "mask": {0: batch, 1: length}}
    return _export(encoder, (ids, mask), path, ENCODER_INPUTS, ENCODER_OUTPUTS, dyn)


def export_decoder(decoder: SentenceDecoder, path: Path) -> Path:
    """decoder.onnx, one cached step of any length:
    ids int64 [batch, step], memory [batch, d], past_kv [n_layers, 2, batch, n_heads, past, head_dim]
    -> logits [batch, step, vocab], present_kv [n_layers, 2, batch, n_heads, past + step, head_dim]."""
    cfg = decoder.cfg
    w = decoder.tok_emb.weight
    B, T, P = 3, 2, 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(w.device)
    memory = torch.randn(B, cfg.d_model, generator=g).to(w.device, w.dtype)
    past = torch.randn(decoder.n_layers, 2, B, decoder.n_heads, P, decoder.head_dim, generator=g).to(w.device, w.dtype)
    batch = torch.export.Dim("batch")
    step = torch.export.Dim("step", max=cfg.max_sentence_tokens + 1)
    past_len = torch.export.Dim("past", max=cfg.max_sentence_tokens)
    dyn = {"ids": {0: batch, 1: step}, "memory": {0: batch}, "past_kv": {2: batch, 4: past_len}}
    return _export(decoder, (ids, memory, past), path, DECODER_INPUTS, DECODER_OUTPUTS, dyn)
