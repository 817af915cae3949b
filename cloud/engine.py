"""The model side: one forward pass over the pending steps of many sessions.

Each session owns a KVSlot (modeling.opt_block): its keys/values, in pages written in place. A
batch concatenates every session's new sentence vectors into one [N, d] matrix (no padding): the
projections and MLPs run once over all of them. Attention: a step of one new sentence per session
over short contexts copies every session's cache into one padded batch (one call) and attends
once per layer for all of them; otherwise each session's attention reads a view of its own slot up
to its valid length. A slot takes a new page every KVSlot.PAGE sentences (a copy) and nothing
else is re-allocated per step. The caller keeps a step by advancing `slot.length`; a step it
drops (cancelled, not finite) leaves the session as it was.

On a CPU in float32 (backend "auto") the steps of few matrix-vector products go through ONNX Runtime
instead (cloud.onnx_step: one session, or one new sentence each over short contexts), where eager
torch spends most of the time dispatching operators; the keys/values stay in the same slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sllm.modeling.opt_block import KVSlot
from sllm.modeling.opt_graft import STOP, GraftedOPT

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StepOutput:
    hidden: np.ndarray  # [d] float32: h of the last new sentence
    stop_logits: np.ndarray  # [2] float32
    finite: bool  # False: the outputs or the new keys/values overflowed; do not keep this step

    @property
    def stop(self) -> bool:
        return stop_flag(self.stop_logits)

    @property
    def stop_probability(self) -> float:
        return stop_probability(self.stop_logits)


def stop_flag(stop_logits: np.ndarray) -> bool:
    """The termination head's argmax: [2] logits -> stop?"""
    return int(np.argmax(stop_logits)) == STOP


def stop_probability(stop_logits: np.ndarray) -> float:
    """[2] logits -> P(stop)."""
    z = stop_logits - stop_logits.max()
    p = np.exp(z) / np.exp(z).sum()
    return float(p[STOP])


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


BACKENDS = ("auto", "torch")


class Engine:
    def __init__(self, model: GraftedOPT, device: torch.device | str = "cpu", dtype: str = "float32",
                 backend: str = "auto"):
        """backend: "auto" runs the steps cloud.onnx_step handles in ONNX Runtime on a CPU in float32
        (with as many threads as torch has), the others in torch; "torch": every step in torch."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.config = model.config
        self.d = model.hidden_size
        self.num_layers = len(model.layers)
        self.heads = model.heads
        self.head_dim = self.d // self.heads
        self.max_positions = model.max_sentences
        elem = torch.tensor([], dtype=self.dtype).element_size()
        self.kv_bytes_per_sentence = 2 * self.num_layers * self.d * elem
        self.onnx = None
        if backend == "auto" and self.device.type == "cpu" and self.dtype == torch.float32:
            from sllm.cloud.onnx_step import OnnxSteps  # onnx + onnxruntime: the CPU path only

            self.onnx = OnnxSteps(self.model, threads=torch.get_num_threads())

    def kv_bytes(self, length: int) -> int:
        return length * self.kv_bytes_per_sentence

    def new_slot(self) -> KVSlot:
        return self.model.new_slot()

    @torch.inference_mode()
    def forward(self, slots: list[KVSlot], news: list[np.ndarray]) -> list[StepOutput]:
        """news[i] [T_i, d] float32 after slots[i]'s cached sentences -> the outputs of each last new sentence.
        Writes the new keys/values into the slots; the caller advances `slot.length` by T_i to keep them."""
        sizes = [len(n) for n in news]
        last = np.cumsum(sizes) - 1  # each session's last new sentence
        if self.onnx is not None and self.onnx.handles(slots, sizes):
            hidden, stop_logits = self.onnx.step(news, slots)  # [N, d], [N, 2]: every new sentence
            h_last, s_last = hidden[last], stop_logits[last]  # [B, d], [B, 2]
        else:
            x = torch.from_numpy(np.concatenate(news).astype(np.float32, copy=False))  # [N, d]: one copy for all
            x = x.to(device=self.device, dtype=self.dtype)
            hidden, stop_logits = self.model.step(list(x.split(sizes)), slots)  # [N, d], [N, 2]
            at = torch.from_numpy(last).to(self.device)
            h_last = hidden[at].float().cpu().numpy()  # [B, d]
            s_last = stop_logits[at].float().cpu().numpy()  # [B, 2]
        # a non-finite key or value of a new sentence reaches its own output through attention (it attends to
        # itself), so finite outputs mean a step that is safe to keep
        finite = np.isfinite(h_last).all(axis=1) & np.isfinite(s_last).all(axis=1)
        return [StepOutput(h_last[i].copy(), s_last[i].copy(), bool(finite[i])) for i in range(len(news))]
