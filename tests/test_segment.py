import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sllm.sentences.segment import SEGMENTATION_VERSION, split_sentences

# Text made mostly of the characters the rules look at, plus any character at all.
_TRICKY = list("ab AZ.?!;:,…。！？；：，、．\"')]」』“”’(\n\r\t 0123") + ["...", "Mr.", "U.S.", "e.g.", " . . . ", "\r\n", "😀"]
tricky_text = st.lists(st.one_of(st.sampled_from(_TRICKY), st.characters(codec="utf-8")), max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(tricky_text, st.text()), comma=st.booleans())
def test_lossless_and_whitespace_starts_sentences(text, comma):
    pieces = split_sentences(text, comma)
    assert "".join(pieces) == text
    assert all(pieces)  # no empty piece
    if text.strip():
        # whitespace between sentences starts the next one; only the last may end with it
        assert all(not p.isspace() for p in pieces)
        assert all(not p[-1].isspace() for p in pieces[:-1])
    elif text:
        assert pieces == [text]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("   \n\t ", ["   \n\t "]),
        ("Hello world. How are you?  Fine!", ["Hello world.", " How are you?", "  Fine!"]),
        ("Done.  \n ", ["Done.  \n "]),  # trailing whitespace joins the last sentence
        ("  Leading space. Next", ["  Leading space.", " Next"]),
        # abbreviations, titles, initials
        ("Mr. Smith and Mrs. Jones met Dr. Who. They left.", ["Mr. Smith and Mrs. Jones met Dr. Who.", " They left."]),
        ("J. Smith and J. R. R. Tolkien wrote. Yes.", ["J. Smith and J. R. R. Tolkien wrote.", " Yes."]),
        ("The U.S. Senate voted. Then", ["The U.S. Senate voted.", " Then"]),
        ("Fruit, e.g. apples, i.e. food.", ["Fruit,", " e.g. apples,", " i.e. food."]),
        ("Cats vs. dogs. St. Paul and Gen. Grant.", ["Cats vs. dogs.", " St. Paul and Gen. Grant."]),
        ("See No. 5 and Vol. 2. He said No. Then", ["See No. 5 and Vol. 2.", " He said No.", " Then"]),
        ("At 5 p.m. on Monday. At 5 p.m. We", ["At 5 p.m. on Monday.", " At 5 p.m.", " We"]),
        ("Pens etc. and ink etc. The end", ["Pens etc. and ink etc.", " The end"]),
        # numbers
        ("Pi is 3.14 today. It was 4:00 then.", ["Pi is 3.14 today.", " It was 4:00 then."]),
        ("A ratio of 3:2 and 1,000,000 people, ok.", ["A ratio of 3:2 and 1,000,000 people,", " ok."]),
        ("In 1990. The year", ["In 1990.", " The year"]),
        ("Visit http://x.org/a?b=1 now. Ok", ["Visit http://x.org/a?b=1 now.", " Ok"]),
        # ellipses: a boundary only before whitespace + capital
        ("Wait... what? Wait... What now?", ["Wait... what?", " Wait...", " What now?"]),
        ("So… maybe. So… Maybe.", ["So… maybe.", " So…", " Maybe."]),
        ("He paused . . . and went on . . . Then", ["He paused . . . and went on . . .", " Then"]),
        # runs, quotes, brackets
        ("What?! Really?!? Yes.", ["What?!", " Really?!?", " Yes."]),
        ('He said "Stop." Then "Go!" ok', ['He said "Stop."', ' Then "Go!"', " ok"]),
        ("He said ‘no.’ She said “yes.” End", ["He said ‘no.’", " She said “yes.”", " End"]),
        ("(See above.) [Or not!] Fine", ["(See above.)", " [Or not!]", " Fine"]),
        ("Note: this; that", ["Note:", " this;", " that"]),
        ("Ripe.--These are fine!—Yes. Mr.--no", ["Ripe.", "--These are fine!", "—Yes.", " Mr.--no"]),
        # line breaks: the newline and the whitespace around it start the next sentence
        ("line one\nline two\r\nthree", ["line one", "\nline two", "\r\nthree"]),
        ("Para one.\n\nPara two", ["Para one.", "\n\nPara two"]),
        ("Trailing  \n  spaces", ["Trailing", "  \n  spaces"]),
        ("\n\nStarts with blank lines. X", ["\n\nStarts with blank lines.", " X"]),
        # CJK
        ("你好。我很好！「真的吗？」他说，好的、行。", ["你好。", "我很好！", "「真的吗？」", "他说，", "好的、", "行。"]),
        ("３．５と12：30。次", ["３．５と12：30。", "次"]),
        ("『終わり。』次へ", ["『終わり。』", "次へ"]),
        # non-Latin scripts with Latin punctuation
        ("Привет, мир. Как дела?", ["Привет,", " мир.", " Как дела?"]),
    ],
)
def test_cases(text, expected):
    assert split_sentences(text) == expected


def test_comma_off_and_on():
    text = "First, second, and 1,000 more, ok. 他说，好的、行。"
    assert split_sentences(text, split_on_comma=False) == ["First, second, and 1,000 more, ok.", " 他说，好的、行。"]
    assert split_sentences(text, split_on_comma=True) == [
        "First,", " second,", " and 1,000 more,", " ok.", " 他说，", "好的、", "行。"]
    assert split_sentences("e.g., this", split_on_comma=False) == ["e.g., this"]


def test_control_characters_and_emoji_pass_through():
    text = "a\x00b\x07. 😀 ok! \x1b[0m done"
    pieces = split_sentences(text)
    assert pieces == ["a\x00b\x07.", " 😀 ok!", " \x1b[0m done"]


def test_long_inputs_are_fast():
    unit = "Mr. Smith paid 3.50 at 4:00 p.m., then left... Wait! “Really?” she asked.\n\n"
    text = unit * 3000 + "x" * 10_000 + " " * 10_000 + "." * 10_000 + "\n" * 10_000 + "end"
    t = time.perf_counter()
    pieces = split_sentences(text)
    assert time.perf_counter() - t < 2.0
    assert "".join(pieces) == text


def test_version_is_set():
    assert SEGMENTATION_VERSION.startswith("seg-v")
