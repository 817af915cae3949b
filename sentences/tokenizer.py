"""A byte-level BPE tokenizer with the three special ids the models need.

Wraps `tokenizers.Tokenizer` (no torch, no transformers) so that training and
the edge read the same `tokenizer.json`. Byte-level BPE with the full 256-byte
alphabet encodes any text and decodes it back exactly, so sentences never hit
an unknown token.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

META_FILE = "tokenizer_meta.json"
META_FORMAT = 1
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 in a tokenizer trained here


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used: missing, corrupt, or without special tokens."""


class SentenceTokenizer:
    def __init__(self, tokenizer: Tokenizer, pad_id: int, bos_id: int, eos_id: int):
        self.tokenizer = tokenizer  # the underlying tokenizers.Tokenizer
        # "<eos>" typed in a text is plain text, not the eos id: keeps encoding
        # lossless and stops text from ending a sentence early (not stored in the JSON).
        tokenizer.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, i in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{name}={i} is outside the vocabulary (size {self.vocab_size})")
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self._special = {pad_id, bos_id, eos_id}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and their (start, end) character spans; the tokens of one multi-byte character share its span."""
        try:
            enc = self.tokenizer.encode(text, add_special_tokens=False)
        except TypeError as e:  # e.g. a lone surrogate, which has no UTF-8 bytes
            raise TokenizerError(f"cannot encode {text[:40]!r}: {e}") from e
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (in parallel inside `tokenizers`)."""
        try:
            return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        except TypeError as e:
            raise TokenizerError(f"cannot encode a text of the batch: {e}") from e

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping pad/bos/eos (and any other special token)."""
        return self.tokenizer.decode([i for i in ids if i not in self._special], skip_special_tokens=True)

    def to_json_str(self) -> str:
        """The whole tokenizer as tokenizer.json text (stable: fingerprints use it)."""
        return self.tokenizer.to_str()

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_meta.json (the special ids) into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": META_FORMAT,
            "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
            "pad_token": self.tokenizer.id_to_token(self.pad_id),
            "bos_token": self.tokenizer.id_to_token(self.bos_id),
            "eos_token": self.tokenizer.id_to_token(self.eos_id),
            "vocab_size": self.vocab_size,
        }
        _atomic_write(d / "tokenizer.json", self.to_json_str())
        _atomic_write(d / META_FILE, json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, path: str | Path) -> "SentenceTokenizer":
        """Load from a tokenizer.json file, a directory saved by `save`, or a Hugging Face
        checkpoint directory (tokenizer.json, or vocab.json + merges.txt)."""
        p = Path(path)
        if not p.exists():
            raise TokenizerError(f"tokenizer not found: {p}")
        d = p.parent if p.is_file() else p
        if p.is_file():
            tok = _read_tokenizer_json(p)
        elif (p / "tokenizer.json").is_file():
            tok = _read_tokenizer_json(p / "tokenizer.json")
        elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            tok = _read_vocab_merges(p / "vocab.json", p / "merges.txt")
        else:
            raise TokenizerError(f"{p} holds neither tokenizer.json nor vocab.json + merges.txt")
        return cls(tok, **_special_ids(d, tok))

    def __repr__(self) -> str:
        return f"SentenceTokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, bos={self.bos_id}, eos={self.eos_id})"


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> SentenceTokenizer:
    """Train a byte-level BPE on `texts`; <pad>, <bos>, <eos> get ids 0, 1, 2."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} (256 bytes + 3 specials)")
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,  # every byte, seen or not: any text stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    pad, bos, eos = (tok.token_to_id(t) for t in SPECIAL_TOKENS)
    return SentenceTokenizer(tok, pad, bos, eos)


def _byte_level(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    # No prefix space: a sentence's own leading whitespace (kept by the segmenter) is its prefix.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON or schema
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from e


def _read_vocab_merges(vocab: Path, merges: Path) -> Tokenizer:
    """A GPT-2/OPT style tokenizer from its vocab.json + merges.txt."""
    try:
        return _byte_level(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise TokenizerError(f"cannot read {vocab} + {merges}: {e}") from e


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


def _special_ids(d: Path, tok: Tokenizer) -> dict[str, int]:
    """pad/bos/eos ids from the files next to the tokenizer, first source wins:
    our tokenizer_meta.json, then Hugging Face's special_tokens_map.json,
    tokenizer_config.json and config.json, then well-known token names."""
    found: dict[str, int] = {}

    def take(name: str, value: object) -> None:
        if name in found or value is None:
            return
        if isinstance(value, dict):  # {"content": "</s>", ...} in newer HF files
            value = value.get("content")
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            found[name] = value
        elif isinstance(value, str) and tok.token_to_id(value) is not None:
            found[name] = tok.token_to_id(value)
            # mark it special so decode() skips it and BPE never splits it
            tok.add_special_tokens([AddedToken(value, special=True, normalized=False)])

    if (d / META_FILE).is_file():
        meta = _read_json(d / META_FILE)
        for k in ("pad", "bos", "eos"):
            take(k, meta.get(f"{k}_id"))
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        if (d / fname).is_file():
            data = _read_json(d / fname)
            for k in ("pad", "bos", "eos"):
                take(k, data.get(f"{k}_token"))
    if (d / "config.json").is_file():
        cfg = _read_json(d / "config.json")
        for k in ("pad", "bos", "eos"):
            take(k, cfg.get(f"{k}_token_id"))
    for k, names in (("pad", ("<pad>", "[PAD]")), ("bos", ("<bos>", "<s>")), ("eos", ("<eos>", "</s>", "<|endoftext|>"))):
        for n in names:
            take(k, n)
    # GPT-2 style vocabularies have one marker for both ends and no pad: reuse eos.
    if "eos" in found:
        found.setdefault("bos", found["eos"])
        found.setdefault("pad", found["eos"])
    missing = [k for k in ("pad", "bos", "eos") if k not in found]
    if missing:
        raise TokenizerError(f"cannot find the {'/'.join(missing)} token id(s) for the tokenizer in {d}")
    return {f"{k}_id": v for k, v in found.items()}


def _atomic_write(path: Path, text: str) -> None:
    """Temp file + rename, so a kill never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
