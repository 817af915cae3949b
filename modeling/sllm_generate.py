"""Reference SLLM generation in torch (paper Eq. 9), sentence by sentence.

prefill: the prompt's sentence vectors through the OPT blocks (KV cache kept);
step:    termination head says stop -> done; else decode h_t into a sentence,
         re-encode that sentence, and run one cached OPT step on its vector.
The edge/cloud split runs the same loop with ONNX Runtime and gRPC in between.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from sllm.modeling.generate import SamplingConfig, decode_sentences
from sllm.modeling.opt_block import KVSlot
from sllm.modeling.opt_graft import STOP
from sllm.modeling.sentence_vae import pad_token_lists
from sllm.modeling.sllm import SLLM
from sllm.sentences.limit import sentence_token_ids
from sllm.sentences.sampling import StopCalibration, stop_decision
from sllm.sentences.tokenizer import SentenceTokenizer


@dataclass
class GeneratedSentence:
    text: str
    ids: list[int]
    stop_probability: float  # the termination head's P(stop) before this sentence was decoded


class SLLMGenerator:
    def __init__(self, sllm: SLLM, tokenizer: SentenceTokenizer, split_on_comma: bool = True):
        self.sllm = sllm.eval()
        self.tok = tokenizer
        self.split_on_comma = split_on_comma
        self.max_tokens = sllm.svae.cfg.max_sentence_tokens

    def prompt_sentences(self, prompt: str) -> list[list[int]]:
        ids = sentence_token_ids(prompt, self.tok, self.max_tokens, self.split_on_comma)
        if not ids:
            raise ValueError("the prompt is empty or only whitespace")
        return ids

    def encode(self, sentences: list[list[int]]) -> torch.Tensor:
        """Token id lists -> sentence vectors [S, d]."""
        device = next(self.sllm.parameters()).device
        ids, mask = pad_token_lists(sentences, self.sllm.svae.cfg.pad_id)
        return self.sllm.svae.encode(ids.to(device), mask.to(device))

    def step(self, slot: KVSlot, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vectors [S, d] after the slot's cached sentences -> hidden [1, S, d], stop logits [1, S, 2] (kept)."""
        hidden, stop = self.sllm.opt.step([vectors], [slot])
        slot.length += len(vectors)
        return hidden[None], stop[None]

    @torch.inference_mode()
    def generate(self, prompt: str, max_sentences: int = 16, sampling: SamplingConfig | None = None,
                 stop_threshold: float | None = None, min_sentences: int = 1,
                 stop_calibration: StopCalibration | None = None) -> Iterator[GeneratedSentence]:
        """Yield sentences as they are made, until the stop decision (P(stop), calibrated at the answer's
        position by `stop_calibration` when given, >= stop_threshold; None: the head's argmax flag; not
        before `min_sentences` sentences), an empty sentence, a sentence that repeats an earlier one
        although sampling.no_repeat_sentence (only at the token limit), or `max_sentences` (edge.loop's
        rules)."""
        if max_sentences < 0:
            raise ValueError(f"max_sentences must be >= 0, got {max_sentences}")
        prompt_ids = self.prompt_sentences(prompt)
        room = self.sllm.opt.max_sentences
        if len(prompt_ids) >= room:
            raise ValueError(f"the prompt has {len(prompt_ids)} sentences; this model's context holds {room} "
                             "(prompt + answer)")
        max_sentences = min(max_sentences, room - len(prompt_ids))
        sampling = sampling or SamplingConfig()
        slot = self.sllm.opt.new_slot()
        hidden, stop = self.step(slot, self.encode(prompt_ids))  # [1, S, d], [1, S, 2]
        said: list[list[int]] = []  # this answer's sentences (the repetition controls read them)
        for i in range(max_sentences):
            p_stop = float(stop[0, -1].float().softmax(-1)[STOP])
            if i >= min_sentences and stop_decision(int(stop[0, -1].argmax()) == STOP, p_stop, stop_threshold,
                                                    stop_calibration, i):
                return
            ids = decode_sentences(self.sllm.svae.decoder, hidden[:, -1], self.max_tokens,
                                   sampling.for_sentence(i), said)[0]
            if not ids or (sampling.no_repeat_sentence and ids in said):  # nothing (new) left to say
                return
            said.append(ids)
            yield GeneratedSentence(self.tok.decode(ids), ids, p_stop)
            hidden, stop = self.step(slot, self.encode([ids]))
