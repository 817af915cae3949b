"""Split text into sentences, losslessly: "".join(split_sentences(t)) == t.

The paper splits on punctuation (",", ".", "?", "!") with a regular expression
before tokenizing. We do the same, plus ";", ":", line breaks and CJK marks,
with the usual exceptions: abbreviations, initials, numbers, ellipses.
The rules and their known limits are in docs/segmentation.md.

Whitespace between two sentences starts the next one: byte-level BPE tokens
carry their leading space (" word"), so a sentence tokenizes the same way
alone as inside its text. Trailing whitespace stays with the last sentence.
"""
from __future__ import annotations

import re

# Bump whenever a rule changes: cached datasets and checkpoints record it.
SEGMENTATION_VERSION = "seg-v1"

_ASCII_FINAL = ".?!;:"
_ELLIPSES = "…‥"
# CJK text has no spaces, so these marks end a sentence without one after them.
_CJK_FINAL = "。！？；：．｡﹒﹔﹕﹖﹗"
_CJK_COMMAS = "，、､﹐﹑"
_CLOSERS = "\"')]}»”’›」』〉》】〕）］｝"
_OPENERS = "\"'“‘([{«‹「『〈《【〔（［｛"
_DASHES = ("--", "—")  # a dash after a mark starts the next sentence (Austen's ".--")
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on

_STRONG = frozenset("?!;:" + _CJK_FINAL)
_COMMAS = frozenset("," + _CJK_COMMAS)
_DOTS = frozenset("." + _ELLIPSES)
_NO_SPACE_NEEDED = frozenset(_CJK_FINAL + _CJK_COMMAS)

# One pass finds every candidate: a run of marks with its closing quotes and
# brackets ("?!", '."', "。」"), or the start of a whitespace run that holds a
# line break (lazy \s*? stops at the first break; the lookbehind anchors the
# match at the start of the run, which keeps long blank runs linear).
_CANDIDATE = re.compile(
    "(?P<run>[{}]+)[{}]*|(?<!\\s)\\s*?[{}]".format(
        re.escape(_ASCII_FINAL + "," + _ELLIPSES + _CJK_FINAL + _CJK_COMMAS),
        re.escape(_CLOSERS),
        _LINE_BREAKS,
    )
)
_WORD_BEFORE = re.compile(r"(?:[^\W\d_]+\.)*[^\W\d_]+$")  # "Mr", "e.g", "U.S" before a period
_NEXT_CHAR = re.compile("\\s*[{}]*(.?)".format(re.escape(_OPENERS)), re.S)

# Abbreviations, lowercased, by what may follow them.
# Titles and Latin forms come before more text: never the end of a sentence.
_NEVER_END = frozenset(
    "mr mrs ms messrs mme mlle dr prof rev hon st mt gen col capt lt sgt maj adm cmdr gov sen rep pres supt fr "
    "vs viz cf e.g i.e ibid".split()
)
# Before a number ("No. 5", "p. 12", "Jan. 5"); elsewhere they are words ("He said No.").
_BEFORE_NUMBER = frozenset(
    "no nos vol vols p pp fig figs art sec ch op para ca jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
# Often the last word of a sentence too: they end one only before a capital ("etc. The" vs "etc. and").
_UNLESS_CAPITAL = frozenset("etc a.m p.m inc ltd co corp jr sr esq bros al ft approx cent c".split())


def split_sentences(text: str, split_on_comma: bool = True) -> list[str]:
    """Sentences of `text`, concatenating back to `text` exactly; "" gives []."""
    if not text:
        return []
    end = len(text.rstrip())  # cuts at or after this would leave whitespace alone
    pieces, start = [], 0
    for m in _CANDIDATE.finditer(text, 0, end):
        if m.group("run") is None:
            cut = m.start()  # line break: the whitespace before it starts the next sentence
        elif _ends_sentence(text, m, split_on_comma):
            cut = m.end()
        else:
            continue
        if start < cut < end:
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces


def _ends_sentence(text: str, m: re.Match, split_on_comma: bool) -> bool:
    """Whether the marks matched by `m` (with their closers) end a sentence."""
    run = m.group("run")
    begin, run_end = m.start(), m.start() + len(run)
    if not text[m.end() : m.end() + 1].isspace() and not text.startswith(_DASHES, m.end()):
        # ASCII marks need a space (or a dash: "wholesome.--These") after them:
        # "3.5", "4:00", "1,000", "e.g.x", "http://" and "?x=1" are no boundaries.
        # CJK marks need none, except between digits ("３．５", "12：30").
        if _NO_SPACE_NEEDED.isdisjoint(run):
            return False
        if text[begin - 1 : begin].isdigit() and text[run_end : run_end + 1].isdigit():
            return False
    if not _STRONG.isdisjoint(run):
        return True  # ? ! ; : and "?!" runs
    if split_on_comma and not _COMMAS.isdisjoint(run):
        return True
    dots = sum(c in _DOTS for c in run)
    if dots == 0:
        return False  # commas only, with split_on_comma off
    if dots == 1 and "." in run:
        if text.startswith(" .", run_end):
            return False  # inside a spaced ellipsis ". . ."
        if text[begin - 2 : begin] == ". ":
            return _next_char(text, m.end()).isupper()  # last dot of ". . ."
        return not _is_abbreviation(text, begin, m.end())
    # An ellipsis ("...", "…") ends a sentence only before a capital: "Wait... What?" but "and so... on".
    return _next_char(text, m.end()).isupper()


def _next_char(text: str, pos: int) -> str:
    """First character after `pos`, past whitespace and opening quotes/brackets ("" at the end)."""
    return _NEXT_CHAR.match(text, pos).group(1)


def _is_abbreviation(text: str, dot: int, after: int) -> bool:
    """Whether the period at `dot` closes an abbreviation or an initial rather than a sentence."""
    m = _WORD_BEFORE.search(text, max(0, dot - 32), dot)
    if m is None:
        return False  # a number or a symbol before the period: "in 1990."
    word = m.group(0)
    low = word.lower()
    if low in _NEVER_END:
        return True
    if len(word) == 1 and word.isupper():
        return True  # an initial: "J. Smith"
    if "." in word and all(len(p) == 1 and p.isupper() for p in word.split(".")):
        return True  # "U.S.", "D.C.", "J.R.R."
    if low in _BEFORE_NUMBER:
        return _next_char(text, after).isdigit()
    if low in _UNLESS_CAPITAL or "." in word:  # also unknown dotted forms: "Ph.D", "x.y"
        return not _next_char(text, after).isupper()
    return False
