"""The chat page of `edge-chat serve`, in a real browser: Debian's Chromium, headless (tests/browser.py), in
front of the real gateway, a real cloud server and the shipped model. A prompt typed into the page is answered
sentence by sentence (each sentence appears on its own, as it streams) with what `edge-chat --prompt` answers;
Stop leaves the page ready for the next prompt; New conversation clears it. Skips, saying why, where Chromium is not installed
(scripts/ensure_deb.sh installs it where it can)."""
from __future__ import annotations

import json

import pytest
from browser import Browser, chromium
from cloud_helpers import running_server
from gateway_helpers import running_gateway
from helpers import ROOT
from typer.testing import CliRunner

from sllm import edge
from sllm.edge.cli import app

MODEL = ROOT / "models" / "default"
# the streaming test needs an answer of two sentences or more: the first of these that gets one from the
# shipped model (its stop rule ends some answers after one sentence)
PROMPTS = ("It is a truth universally acknowledged,", "The rain fell on the old town, and", "Chapter 1",
           "We the people, in order to form a more perfect union,")

pytestmark = pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: apt-get install "
                                                           "chromium; scripts/ensure_deb.sh does it as root)")

# records when each sentence element appears (a MutationObserver: the DOM as the user sees it)
RECORD = """
window.seen = [];
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes)
    if (n.classList && n.classList.contains("sentence")) window.seen.push([performance.now(), n.textContent]);
}).observe(document.getElementById("log"), {childList: true, subtree: true});
true
"""


@pytest.fixture(scope="module")
def served():
    with running_server(MODEL / "cloud", threads=1) as srv:
        runtime = edge.load_runtime(MODEL / "edge", threads=1)
        with running_gateway(f"127.0.0.1:{srv.port}", runtime) as (url, _):
            yield srv, url


def _edge_chat_sentences(server, prompt: str, *args) -> list[str]:
    r = CliRunner().invoke(app, ["--server", f"127.0.0.1:{server.port}", "--bundle", str(MODEL / "edge"),
                                 "--threads", "1", "--json", "--prompt", prompt, *map(str, args)])
    assert r.exit_code == 0, r.output
    return [e["text"] for e in map(json.loads, r.stdout.splitlines()) if e["event"] == "sentence"]


def test_a_typed_prompt_streams_sentence_by_sentence(served, tmp_path):
    server, url = served
    answers = ((p, _edge_chat_sentences(server, p, "--max-sentences", 5)) for p in PROMPTS)
    prompt, expected = next(((p, a) for p, a in answers if len(a) >= 2), (None, None))
    assert prompt, "no prompt of PROMPTS gets an answer of two sentences or more: add one"
    with Browser.start(tmp_path / "profile") as page:
        page.navigate(url + "/")
        page.wait_for("document.getElementById('model').textContent.startsWith('model ')")
        page.evaluate(RECORD)
        page.evaluate("document.getElementById('max-sentences').value = 5; true")
        page.evaluate("document.getElementById('prompt').focus(); true")
        page.type(prompt)
        page.press_enter()
        page.wait_for("document.querySelector('.assistant .meta') !== null", timeout=120)
        seen = page.evaluate("window.seen")
        assert [text for _, text in seen] == expected  # one element per sentence, in order, as edge-chat says
        assert len({t for t, _ in seen}) == len(seen)  # each came on its own
        assert page.evaluate("document.querySelector('.user').textContent") == prompt
        page.screenshot(tmp_path / "chat-page.png")
        assert (tmp_path / "chat-page.png").stat().st_size > 5000

        # Stop: an answer asked for many sentences ends early; the page is ready for the next prompt
        page.evaluate("document.getElementById('max-sentences').value = 60;"
                      "document.getElementById('prompt').focus(); true")
        page.type("The rain fell on the old town.")
        page.press_enter()
        page.wait_for("document.querySelectorAll('.assistant')[1].querySelectorAll('.sentence').length >= 1",
                      timeout=120)
        page.evaluate("document.getElementById('stop').click(); true")
        meta = page.wait_for("(document.querySelectorAll('.assistant')[1].querySelector('.meta') || {}).textContent",
                             timeout=60)
        # "stopped" when the click came first; an answer of this model may also have ended by itself by then
        assert "stopped" in meta or "sentence" in meta
        assert page.evaluate("document.getElementById('send').disabled") is False

        page.evaluate("document.getElementById('new').click(); true")
        assert page.evaluate("document.querySelectorAll('.msg').length") == 0
