"""Typed model configs (dataclasses) and their JSON (de)serialisation.

The shapes a model is built from: the SentenceVAE's, and where the grafted OPT comes from.
Run configs (data, training) build on these in `sllm.training.config`."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


@dataclass
class SentenceVAEConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_heads: int = 4
    ffn_dim: int = 1024
    encoder_layers: int = 1
    decoder_layers: int = 1
    max_sentence_tokens: int = 64  # content tokens; the decoder sees one more (bos / eos)
    dropout: float = 0.0
    fusion: str = "sum"  # "sum" (paper Eq. 3) or "weighted" (learned softmax weights)
    tie_embeddings: bool = True  # decoder output layer shares the decoder token embedding
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.fusion not in ("sum", "weighted"):
            raise ConfigError(f"fusion must be 'sum' or 'weighted', got {self.fusion!r}")
        if min(self.vocab_size, self.d_model, self.n_heads, self.ffn_dim, self.max_sentence_tokens) <= 0:
            raise ConfigError("sizes must be positive")
        if self.encoder_layers < 1 or self.decoder_layers < 1:
            raise ConfigError("the encoder and the decoder need at least one block each")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary (size {self.vocab_size})")


@dataclass
class OPTSpec:
    """Where the OPT comes from: a local Hugging Face checkpoint directory, or a fresh model of these sizes."""

    pretrained: str = ""  # local dir for from_pretrained (no download); empty: a fresh OPTConfig below
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    ffn_dim: int = 1024
    max_position_embeddings: int = 1024
    word_embed_proj_dim: int = 0  # 0: same as hidden_size
    do_layer_norm_before: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        if not self.pretrained:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"opt.hidden_size={self.hidden_size} is not divisible by "
                                  f"opt.num_attention_heads={self.num_attention_heads}")
            if min(self.hidden_size, self.num_hidden_layers, self.ffn_dim, self.max_position_embeddings) <= 0:
                raise ConfigError("opt sizes must be positive")


# ---------------------------------------------------------------- (de)serialisation

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict, *, strict: bool = True):
    """Build dataclass `cls` from a dict; unknown keys are an error when strict."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown and strict:
        raise ConfigError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for name in names & set(data):
        kwargs[name] = _coerce(hints[name], data[name], f"{cls.__name__}.{name}")
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, where) for v in value]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
