"""Keep every sentence within the model's token limit without dropping text.

The paper caps a sentence at 64 tokens. A longer segment (a run-on sentence,
a table row, a URL, 10,000 characters without punctuation) is cut into pieces
that concatenate back to it exactly. Cuts go before a word (a token that starts
with whitespace) when one is near the limit, else at any character boundary.
"""
from __future__ import annotations

from sllm.sentences.segment import split_sentences
from sllm.sentences.tokenizer import SentenceTokenizer


def split_to_token_limit(segment: str, tok: SentenceTokenizer, max_tokens: int) -> list[str]:
    """Pieces of `segment`, each encoding to at most `max_tokens` tokens; "".join(pieces) == segment."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    ids, offsets = tok.encode_with_offsets(segment)
    if len(ids) <= max_tokens:
        return [segment] if segment else []
    # Token j starts a clean cut if it begins a new character: the byte tokens of
    # one multi-byte character (an emoji, a CJK ideograph) share its span.
    starts = [0] + [s if s >= prev_end else -1 for (s, _), (_, prev_end) in zip(offsets[1:], offsets)]
    pieces: list[str] = []
    i = 0  # token index where the current piece starts
    while len(ids) - i > max_tokens:
        j = _best_cut(segment, starts, i, max_tokens)
        piece = segment[starts[i] : starts[j]]
        # Alone, a piece can tokenize differently from inside the segment (BPE
        # sees other neighbours); step back until it fits. Rarely runs.
        while len(tok.encode(piece)) > max_tokens:
            j = _best_cut(segment, starts, i, j - i - 1)
            piece = segment[starts[i] : starts[j]]
        pieces.append(piece)
        i = j
    tail = segment[starts[i] :]
    # The tail too may tokenize longer alone; split it again from its own encoding.
    pieces.extend([tail] if len(tok.encode(tail)) <= max_tokens else split_to_token_limit(tail, tok, max_tokens))
    return pieces


def _best_cut(text: str, starts: list[int], i: int, budget: int) -> int:
    """Token index j in (i, i + budget] to cut before: a word start in the last
    half of the budget if any, else the latest character boundary."""
    hi = min(i + budget, len(starts) - 1)
    for j in range(hi, i + budget // 2, -1):
        if starts[j] > starts[i] and text[starts[j]].isspace():
            return j
    for j in range(hi, i, -1):
        if starts[j] > starts[i]:
            return j
    raise ValueError("max_tokens is too small: a single character needs more tokens than that")


def text_to_sentences(text: str, tok: SentenceTokenizer, max_tokens: int, split_on_comma: bool = True) -> list[str]:
    """Sentences of `text`, each at most `max_tokens` tokens; "".join(result) == text.

    Whitespace-only pieces are kept (the text stays whole); use `is_blank` to skip them."""
    sentences = split_sentences(text, split_on_comma)
    out: list[str] = []
    for s, ids in zip(sentences, tok.encode_batch(sentences)):
        out.extend([s] if len(ids) <= max_tokens else split_to_token_limit(s, tok, max_tokens))
    return out


def is_blank(piece: str) -> bool:
    """True for a piece that is only whitespace (nothing for the model to encode)."""
    return not piece or piece.isspace()


def model_sentences(text: str, tok: SentenceTokenizer, max_tokens: int, split_on_comma: bool = True) -> list[str]:
    """The sentences of `text` a model reads: segmented, each within `max_tokens`, blank pieces skipped.
    Training, evaluation, export, the torch reference and the edge all cut text this way."""
    return [p for p in text_to_sentences(text, tok, max_tokens, split_on_comma) if not is_blank(p)]


def model_sentences_with_ids(text: str, tok: SentenceTokenizer, max_tokens: int,
                             split_on_comma: bool = True) -> tuple[list[str], list[list[int]]]:
    """`model_sentences(text, ...)` and each piece's token ids, as `tok.encode_batch(pieces)` gives
    them: a sentence within the limit keeps the ids it was measured with (encoded once, not twice),
    only the pieces of a cut sentence are encoded again. Dataset preparation's hot path."""
    sentences = split_sentences(text, split_on_comma)
    pieces: list[str] = []
    ids: list[list[int]] = []
    for s, s_ids in zip(sentences, tok.encode_batch(sentences)):
        if len(s_ids) <= max_tokens:
            if not is_blank(s):
                pieces.append(s)
                ids.append(s_ids)
            continue
        cut = [p for p in split_to_token_limit(s, tok, max_tokens) if not is_blank(p)]
        pieces.extend(cut)
        ids.extend(tok.encode_batch(cut) if cut else [])
    return pieces, ids


def sentence_token_ids(text: str, tok: SentenceTokenizer, max_tokens: int,
                       split_on_comma: bool = True) -> list[list[int]]:
    """Token ids of each of `model_sentences(text, ...)`; [] for empty or blank text."""
    pieces = model_sentences(text, tok, max_tokens, split_on_comma)
    return tok.encode_batch(pieces) if pieces else []
