"""The client half of the token-level split (as Petals splits a model): the same cloud server that
steps the SLLM once per sentence steps a token-level OPT once per TOKEN (`sllm.modeling.token_bundle`),
and this client holds the token embedding and the LM head. numpy + protos.client, no torch.

    prompt ids -> embedding rows [P, d] -> Append (prefill) -> hidden h -> argmax(head @ h) = token 1
    repeat: embedding row of the last token -> Append -> h -> the next token

One round trip per token. Greedy; exactly `max_new` tokens (eos is a token like any other here, as
the bench forces every model to one output length).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class TokenSplit:
    """Token-level generation through a cloud server of a token bundle. `open()` starts a session
    (one round trip, outside what `stream` times), `stream` generates in it, `close()` ends it;
    `stream` opens one itself when none is open."""

    def __init__(self, client, model_id: str, embed: np.ndarray, head: np.ndarray, dtype: str = "float32"):
        self.client, self.model_id, self.dtype = client, model_id, dtype
        self.embed = np.ascontiguousarray(embed, dtype=np.float32)  # [V, d]
        self.head = np.ascontiguousarray(head, dtype=np.float32)  # [V, d]: logits = head @ h (no bias in OPT)
        self.conv = None

    def open(self) -> None:
        self.close()
        self.conv = self.client.conversation(self.model_id, self.embed.shape[1], dtype=self.dtype,
                                             reply_dtype=self.dtype)

    def close(self) -> None:
        if self.conv is not None and not self.conv.finished:
            self.conv.close()
        self.conv = None

    def stream(self, prompt_ids: list[int], max_new: int) -> Iterator[int]:
        """Greedy tokens after `prompt_ids` (bos included when the model was trained so), one per
        round trip; the session is closed when the last one has been handed out (or the caller stops)."""
        if self.conv is None:
            self.open()
        try:
            step = self.conv.append(self.embed[np.asarray(prompt_ids)])
            for i in range(max_new):
                token = int(np.argmax(self.head @ step.hidden))
                yield token
                if i + 1 < max_new:
                    step = self.conv.append(self.embed[token])
        finally:
            self.close()
