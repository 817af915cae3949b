"""What one document becomes for training: its sentences as token ids, which of them end a
paragraph, and its passages. Torch-free: dataset preparation's workers run it.

A document is segmented losslessly (`sllm.sentences.limit`), blank pieces skipped. A sentence ends a
paragraph when the next one starts after a blank line, or the document ends: the stop target of
stage 2. Passages (stage 2's unit) are runs of consecutive sentences of one document, cut greedily
so none passes `max_sentences` sentences or `max_tokens` tokens (a single longer sentence stays one
passage).
"""
from __future__ import annotations

from collections.abc import Sequence

from sllm.sentences.limit import model_sentences_with_ids
from sllm.sentences.tokenizer import SentenceTokenizer


def ends_paragraph(next_sentence: str | None) -> bool:
    if next_sentence is None:
        return True
    lead = next_sentence[: len(next_sentence) - len(next_sentence.lstrip())]
    return lead.count("\n") >= 2


def paragraph_ends(pieces: Sequence[str]) -> list[bool]:
    return [ends_paragraph(pieces[i + 1] if i + 1 < len(pieces) else None) for i in range(len(pieces))]


def cut_passages(lengths: Sequence[int], max_sentences: int, max_tokens: int) -> list[int]:
    """Sentences per passage for one document whose sentences have `lengths` tokens."""
    sizes: list[int] = []
    start, n_tok = 0, 0
    for j, n in enumerate(lengths):
        if j > start and (j - start >= max_sentences or n_tok + n > max_tokens):
            sizes.append(j - start)
            start, n_tok = j, 0
        n_tok += int(n)
    if len(lengths) > start:
        sizes.append(len(lengths) - start)
    return sizes


def document_units(text: str, tok: SentenceTokenizer, max_sentence_tokens: int, split_on_comma: bool,
                   max_passage_sentences: int,
                   max_passage_tokens: int) -> tuple[list[list[int]], list[bool], list[int]]:
    """(token ids per sentence, ends-a-paragraph per sentence, sentences per passage) of one document."""
    pieces, ids = model_sentences_with_ids(text, tok, max_sentence_tokens, split_on_comma)
    return ids, paragraph_ends(pieces), cut_passages([len(x) for x in ids], max_passage_sentences, max_passage_tokens)
