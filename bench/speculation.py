"""The facts behind edge.speculate's tolerance, for the speculation rows of bench/rtt.py (issue 17).

`tolerance_facts` measures, on real sentences, what the tolerance must separate: the same sentence encoded by ONNX
Runtime (edge) and by that torch copy (cloud), float16 rounding on the wire, and the closest pair
of distinct sentences; and how often the torch greedy decode gives the edge's tokens. They also
check the recovery: a wrong weight would show as a large ORT-vs-torch difference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_SENTENCES = 60  # the pairwise distances are quadratic; 60 sentences are plenty to show the gap


def tolerance_facts(rt, svae_dir: Path, sentences: list[list[int]]) -> dict:
    """ORT (edge runtime `rt`) vs the torch SentenceVAE in `svae_dir` on `sentences` (token id lists)."""
    import torch

    from sllm.modeling.svae_bundle import SpeculationCodec, load_svae_folder
    from sllm.runtime.svae_onnx import greedy_decode

    codec = SpeculationCodec(load_svae_folder(svae_dir, rt.model_id))
    ids = sentences[:MAX_SENTENCES]
    v_ort, v_torch = rt.encode(ids), codec.encode(ids).numpy()
    scale = np.maximum(1, np.abs(v_ort).max(1))  # edge.speculate.same_sentence scales by max(1, max|v|)
    dist = np.abs(v_ort[:, None] - v_ort[None]).max(-1) / scale[:, None]
    distinct = np.array([[a != b for b in ids] for a in ids])
    decoded = codec.decode(torch.from_numpy(v_ort))
    return {"sentences": len(ids), "encoder_max_abs_ort_vs_torch": float(np.abs(v_ort - v_torch).max()),
            "float16_rounding_max_scaled": float((np.abs(v_ort - v_ort.astype(np.float16)).max(1) / scale).max()),
            "closest_distinct_pair_scaled": float(dist[distinct].min()) if distinct.any() else None,
            "greedy_tokens_identical": sum(a == b for a, b in zip(greedy_decode(rt.decoder, v_ort, rt.spec), decoded))}


def tolerance_line(f: dict) -> str:
    """The facts in one markdown sentence."""
    from sllm.edge.speculate import TOLERANCE

    closest = "n/a" if f["closest_distinct_pair_scaled"] is None else f"{f['closest_distinct_pair_scaled']:.3f}"
    return (f"Tolerance (edge.speculate, {TOLERANCE:g} x max(1, max|v|)) against {f['sentences']} prompt sentences: "
            f"max|ORT - torch| of encoder vectors {f['encoder_max_abs_ort_vs_torch']:.1e}, float16 rounding "
            f"{f['float16_rounding_max_scaled']:.1e}, closest pair of distinct sentences {closest} (both scaled); "
            f"the cloud's torch greedy decode gives the edge's tokens on {f['greedy_tokens_identical']}/"
            f"{f['sentences']} of their vectors.")
