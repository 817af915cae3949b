"""The token embedding of a pretrained token-level OPT, for a SentenceVAE to start from (the paper's
code initialises the SentenceVAE's embeddings from the OPT it grafts onto). The source is a Hugging
Face OPT folder (what `sllm-export` writes for a baseline, or a real OPT), a baseline run or
checkpoint, a baseline bundle, or an export folder holding one. Refused, never adapted, when the
vocabulary, the width or the tokenizer differ: rows of another tokenizer mean other tokens."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sllm.modeling.config import ConfigError, OPTSpec
from sllm.runtime.artifacts import CheckpointError
from sllm.runtime.manifest import BundleError
from sllm.sentences.tokenizer import SentenceTokenizer, TokenizerError
from sllm.training.data.prepare import tokenizer_sha256


def pretrained_token_embedding(source: str | Path, tokenizer: SentenceTokenizer, d_model: int,
                               what: str = "init.embeddings_from") -> torch.Tensor:
    """OPT's input embedding [vocab, d] (fp32, a copy), checked to fit `tokenizer` and `d_model`."""
    emb, theirs = _load(Path(source), what)
    if theirs is None or tokenizer_sha256(theirs) != tokenizer_sha256(tokenizer):
        found = "no tokenizer" if theirs is None else f"another tokenizer (vocab {theirs.vocab_size})"
        raise ConfigError(f"{what}={source} holds {found}, not this run's (vocab {tokenizer.vocab_size}): its embedding "
                          "rows would mean other tokens; train on its tokenizer (data.tokenizer, or a dataset "
                          "prepared with it)")
    if emb.shape[0] != tokenizer.vocab_size:
        raise ConfigError(f"{what}={source}: its embedding has {emb.shape[0]} rows, the tokenizer {tokenizer.vocab_size} "
                          "tokens")
    if emb.shape[1] != d_model:
        raise ConfigError(f"{what}={source}: its embedding is {emb.shape[1]} wide, the SentenceVAE's d_model is "
                          f"{d_model}")
    return emb


def check_tokenizer(folder: str | Path, tokenizer: SentenceTokenizer, what: str = "opt.pretrained") -> None:
    """A Hugging Face OPT folder that carries a tokenizer must carry this run's (one that carries none
    in a form read here, such as a real OPT's vocab.json, is left to the vocabulary-size check)."""
    try:
        theirs = SentenceTokenizer.load(Path(folder))
    except TokenizerError:
        return
    if tokenizer_sha256(theirs) != tokenizer_sha256(tokenizer):
        raise ConfigError(f"{what}={folder} was trained with another tokenizer (vocab {theirs.vocab_size}) than this "
                          f"run's (vocab {tokenizer.vocab_size}): train on its tokenizer (data.tokenizer={folder}, or "
                          "a dataset prepared with it)")


def copy_into(svae, emb: torch.Tensor) -> None:
    """Into the encoder's and decoder's token embeddings (and so a tied output layer)."""
    with torch.no_grad():
        svae.encoder.tok_emb.weight.copy_(emb)
        svae.decoder.tok_emb.weight.copy_(emb)


def _load(path: Path, what: str) -> tuple[torch.Tensor, SentenceTokenizer | None]:
    if not path.exists():
        raise ConfigError(f"{what}={path}: no such folder")
    ours = (path / "manifest.json").is_file() or (path / "latest").is_file() or (path / "edge").is_dir()
    if ours:
        from sllm.training.load import load_baseline

        try:
            trained = load_baseline(path)
        except (CheckpointError, BundleError) as e:
            raise ConfigError(f"{what}={path}: {e}") from None
        return trained.model.get_input_embeddings().weight.detach().float().clone(), trained.tokenizer
    if _model_type(path) != "opt":
        raise ConfigError(f"{what}={path} is neither a Hugging Face OPT folder (config.json, model_type 'opt') nor a "
                          "baseline run, checkpoint or bundle")
    from sllm.modeling.opt_graft import load_opt

    model = load_opt(OPTSpec(pretrained=str(path)), 0)
    try:
        tok = SentenceTokenizer.load(path)
    except TokenizerError:
        tok = None
    return model.get_input_embeddings().weight.detach().float().clone(), tok


def _model_type(path: Path):
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
