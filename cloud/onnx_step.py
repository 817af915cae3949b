"""The cloud step in ONNX Runtime, for the steps where torch's per-operator overhead dominates.

At a few sessions per step the grafted blocks are matrix-vector products, and eager torch spends most
of a step dispatching them (models/default: 2.1 ms for one session's step against 0.32 ms for the same
blocks as `modeling.fused_onnx.cloud_graph`, fused Q/K/V and attention, 1 thread). The engine sends
these steps here and keeps torch for the rest (a GPU, long contexts of many sessions, several new
sentences each for more than one session); the keys and values stay in the engine's KVSlots either way:

    one session, T new sentences:  its valid past, copied out once -> the graph -> the T new
                                   positions written back into its slot
    B sessions, one new sentence each, short contexts: every past copied into one padded batch
                                   (the mask marks the padding) -> the graph -> the last column back

The graph is built from the model's own weights when the engine starts (nothing on disk to keep in
step with the bundle); tests/test_onnx_step.py checks it against the torch step.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from sllm.modeling.fused_onnx import cloud_graph
from sllm.modeling.opt_block import SHORT_CONTEXT, KVSlot

# Where ONNX Runtime wins. Each step copies the pasts out of the slots (the graph's past is one
# contiguous input) and attends over the padded batch, so its cost grows with sessions x context while
# torch's dispatch does not. Measured on this project's 2-vCPU EPYC, 1 thread, models/default (ms per
# step, ORT / torch): one session at 1 / 64 / 384 / 512 / 1,000 sentences 0.40/1.58, 0.51/1.78,
# 1.45/2.40, 3.07/3.41, 4.00/3.18; batches of one new sentence each, B x context: 4x16 0.94/2.80,
# 8x64 2.53/3.89, 16x16 2.83/4.25, 32x8 5.00/6.17, 16x64 7.25/5.82, 64x1 8.49/8.27.
SINGLE_MAX_CONTEXT = 384  # past + new sentences of a one-session step
BATCH_MAX_SESSIONS = 32
BATCH_MAX_POSITIONS = 768  # sessions x (longest past + 1)


class OnnxSteps:
    """GraftedOPT steps through ONNX Runtime's CPU provider; `handles` says which steps it takes."""

    def __init__(self, model, threads: int = 1):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if threads > 1:  # the engine's torch threads run the other steps: no pool spinning after a run
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(cloud_graph(model).SerializeToString(), so,
                                            providers=["CPUExecutionProvider"])
        self.padded: np.ndarray | None = None  # the batch's padded past, kept between steps (see PaddedPast)

    @staticmethod
    def handles(slots: list[KVSlot], sizes: list[int]) -> bool:
        if len(slots) == 1:
            return slots[0].length + sizes[0] <= SINGLE_MAX_CONTEXT
        longest = max(s.length for s in slots)
        return (all(T == 1 for T in sizes) and longest < SHORT_CONTEXT and len(slots) <= BATCH_MAX_SESSIONS
                and len(slots) * (longest + 1) <= BATCH_MAX_POSITIONS)

    def step(self, news: list[np.ndarray], slots: list[KVSlot]) -> tuple[np.ndarray, np.ndarray]:
        """news[i] [T_i, d] float32 after slots[i]'s cached sentences (`handles` is true) -> (hidden [N, d],
        stop logits [N, 2]) of every new sentence in turn; their keys/values are written into the slots
        (the caller advances `slot.length` to keep them)."""
        for slot, new in zip(slots, news):
            slot.reserve(len(new))
        if len(slots) == 1:
            return self._one(news[0], slots[0])
        return self._batch(np.concatenate(news), slots)

    def _run(self, vectors: np.ndarray, positions: np.ndarray, past: np.ndarray, mask: np.ndarray):
        return self.session.run(None, {"vectors": vectors, "positions": positions, "past_kv": past, "mask": mask})

    def _one(self, new: np.ndarray, slot: KVSlot) -> tuple[np.ndarray, np.ndarray]:
        P, T = slot.length, len(new)
        past = np.ascontiguousarray(slot.valid().numpy()[:, :, None])  # [L, 2, 1, H, P, hd]
        positions = np.arange(P, P + T, dtype=np.int64)[None]
        hidden, stop, present = self._run(np.ascontiguousarray(new, np.float32)[None], positions, past,
                                          np.ones((1, P + T), np.int32))
        slot.buf[:, :, :, P:P + T] = torch.from_numpy(present[:, :, 0, :, P:])  # [L, 2, H, T, hd]
        return hidden[0], stop[0]

    def _batch(self, new: np.ndarray, slots: list[KVSlot]) -> tuple[np.ndarray, np.ndarray]:
        """One new sentence per slot: pasts padded to the longest, the new one in the last column."""
        B = len(slots)
        L, two, H, hd = slots[0].shape
        lengths = np.array([s.length for s in slots])
        P = int(lengths.max())
        n = L * two * B * H * P * hd
        if self.padded is None or self.padded.size < n:
            self.padded = np.empty(n, np.float32)
        past = self.padded[:n].reshape(L, two, B, H, P, hd)
        for i, s in enumerate(slots):
            past[:, :, i, :, :s.length] = s.valid().numpy()
            past[:, :, i, :, s.length:] = 0.0  # finite padding: a masked key gets weight 0, and 0 x NaN is NaN
        mask = np.concatenate([np.arange(P)[None] < lengths[:, None], np.ones((B, 1), bool)], axis=1).astype(np.int32)
        hidden, stop, present = self._run(new.astype(np.float32, copy=False)[:, None], lengths[:, None].astype(np.int64),
                                          past, mask)
        last = torch.from_numpy(present[:, :, :, :, P])  # [L, 2, B, H, hd]
        for i, s in enumerate(slots):
            s.buf[:, :, :, s.length] = last[:, :, i]
        return hidden[:, 0], stop[:, 0]
