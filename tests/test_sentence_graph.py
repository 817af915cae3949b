"""The fused graphs (modeling.fused_onnx) and sentence.onnx, one whole sentence per run(), against the
per-token loop they replace: real ONNX files in ONNX Runtime, the shipped model and tiny random ones."""
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from helpers import ROOT

from sllm.edge.runtime import EdgeRuntime
from sllm.modeling import fused_onnx
from sllm.modeling.config import SentenceVAEConfig
from sllm.modeling.generate import decode_sentences
from sllm.modeling.sentence_vae import SentenceVAE
from sllm.runtime.edge_bundle import SENTENCE_FIELD, load_edge_bundle, write_edge_manifest
from sllm.runtime.providers import cpu_session
from sllm.runtime.svae_onnx import DecoderSpec, decode_vectors
from sllm.sentences.sampling import AnswerOptions, SamplingConfig

MODEL = ROOT / "models" / "default"
CHAT = AnswerOptions()
CONTROLS = {"off": SamplingConfig(), "on": SamplingConfig(repetition_penalty=CHAT.repetition_penalty,
                                                          no_repeat_ngram_size=CHAT.no_repeat_ngram_size,
                                                          no_repeat_sentence=CHAT.no_repeat_sentence)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random SentenceVAE (2 blocks each side, a small vocabulary so repeats happen) and its graphs on disk."""
    torch.manual_seed(0)
    cfg = SentenceVAEConfig(vocab_size=40, d_model=32, n_heads=4, ffn_dim=64, encoder_layers=2, decoder_layers=2,
                            max_sentence_tokens=12)
    model = SentenceVAE(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    d = tmp_path_factory.mktemp("fused")
    paths = {"encoder": fused_onnx.save(fused_onnx.encoder_graph(model.encoder), d / "encoder.onnx"),
             "decoder": fused_onnx.save(fused_onnx.decoder_graph(model.decoder), d / "decoder.onnx"),
             "sentence": fused_onnx.save(fused_onnx.sentence_graph(model.decoder, cfg.bos_id, cfg.eos_id),
                                         d / "sentence.onnx")}
    for p in paths.values():
        onnx.checker.check_model(str(p), full_check=True)
    sessions = {k: cpu_session(p, 1) for k, p in paths.items()}
    spec = DecoderSpec(cfg.bos_id, cfg.eos_id, cfg.max_sentence_tokens, 2, 4, 8)
    return model, sessions, spec, paths


def test_fused_graphs_equal_torch(tiny):
    model, s, _, paths = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    with torch.no_grad():
        ref = model.encoder(ids, mask).numpy()
    assert np.abs(s["encoder"].run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0] - ref).max() < 1e-5
    memory = torch.randn(3, 32, generator=g)
    past = torch.randn(2, 2, 3, 4, 5, 8, generator=g)
    for P, T in ((0, 1), (0, 5), (3, 1), (5, 3)):  # the first step, a prompt, cached steps
        with torch.no_grad():
            logits, kv = model.decoder(ids[:, :T], memory, past[..., :P, :])
        got_logits, got_kv = s["decoder"].run(None, {"ids": ids[:, :T].numpy(), "memory": memory.numpy(),
                                                     "past_kv": past[..., :P, :].numpy()})
        assert np.abs(got_logits - logits.numpy()).max() < 1e-4 and np.abs(got_kv - kv.numpy()).max() < 1e-5
    # fused Q/K/V and attention, no mask arithmetic: one Attention per block, no mask built in the graph
    dec = onnx.load(str(paths["decoder"]))
    ops = [n.op_type for n in dec.graph.node]
    assert ops.count("Attention") == 2 and not {"LessOrEqual", "Less", "Range", "Softmax"} & set(ops)
    assert len(ops) <= 35


def test_sentence_graph_equals_the_per_token_loop_sampled_and_controlled(tiny):
    """Every option of the sampling, every repetition control, token limits: the same tokens as the
    per-token loop with the edge's picker, the same seeded draws."""
    _, s, spec, _ = tiny
    rng = np.random.default_rng(1)
    samplings = [SamplingConfig(), CONTROLS["on"], SamplingConfig(repetition_penalty=0.7, no_repeat_ngram_size=1),
                 SamplingConfig(no_repeat_ngram_size=4), SamplingConfig(temperature=0.8, seed=5),
                 SamplingConfig(temperature=1.2, top_k=5, top_p=0.9, seed=7, repetition_penalty=1.2,
                                no_repeat_ngram_size=3, no_repeat_sentence=True),
                 SamplingConfig(temperature=1.0, top_p=0.5, seed=3), SamplingConfig(temperature=1.0, top_k=100, seed=2)]
    for sampling in samplings:
        for k in range(25):
            memory = (rng.standard_normal(32) * 2)[None]
            answer = [rng.integers(3, 40, size=rng.integers(0, 8)).tolist() for _ in range(rng.integers(0, 4))]
            limit = [None, 0, 1, 5, 30][k % 5]
            ref = decode_vectors(s["decoder"], memory, spec, sampling, limit, answer)
            got = decode_vectors(s["decoder"], memory, spec, sampling, limit, answer, s["sentence"])
            assert got == ref, (sampling, answer, limit)
    seeded = SamplingConfig(temperature=1.0, seed=11)
    draws = [decode_vectors(s["decoder"], memory, spec, seeded, None, (), s["sentence"]) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]  # reproducible from the seed


def test_sentence_graph_equals_torch_greedy(tiny):
    model, s, spec, _ = tiny
    memory = torch.randn(40, 32, generator=torch.Generator().manual_seed(3)) * 2
    for sampling in CONTROLS.values():
        answer: list[list[int]] = []
        for v in memory:
            with torch.no_grad():
                ref = decode_sentences(model.decoder, v[None], None, sampling, answer[-3:])[0]
            assert decode_vectors(s["decoder"], v[None].numpy(), spec, sampling, None, answer[-3:],
                                  s["sentence"])[0] == ref
            answer.append(ref)


@pytest.fixture(scope="module")
def shipped():
    rt = EdgeRuntime.load(MODEL / "edge", threads=1)
    assert rt.sentence is not None  # the shipped bundle has sentence.onnx
    return rt


def test_200_shipped_sentences_one_call_equals_the_per_token_loop(shipped):
    """models/default, 200 validation sentences, greedy, edge-chat's repetition controls off and on: each
    sentence continues the ones before it (so the controls see an answer)."""
    from sllm.training.data.corpus import load_documents, split_documents
    from sllm.training.data.sentence_data import segment_documents

    rt = shipped
    _, val = split_documents(load_documents(None), 0.02, 0)
    sentences = [t for t in rt.tokenizer.encode_batch(segment_documents(val, rt.tokenizer, rt.max_sentence_tokens,
                                                                        rt.split_on_comma)) if t][:200]
    assert len(sentences) == 200
    vectors = rt.encode(sentences)
    for name, sampling in CONTROLS.items():
        answer: list[list[int]] = []
        for v in vectors:
            ref = decode_vectors(rt.decoder, v[None], rt.spec, sampling, None, answer[-4:])[0]
            got = rt.decode(v, sampling, answer=answer[-4:]).ids  # the edge's own path: sentence.onnx
            assert got == ref, name
            answer.append(ref)


def test_a_bundle_without_the_sentence_graph_decodes_with_the_per_token_loop(shipped, tmp_path):
    edge = tmp_path / "edge"
    shutil.copytree(MODEL / "edge", edge)
    m = json.loads((edge / "manifest.json").read_text())
    (edge / "sentence.onnx").unlink()
    fields = {k: v for k, v in m.items() if k not in ("files", "format_version", "kind", SENTENCE_FIELD,
                                                          "sentence_io")}
    write_edge_manifest(edge, fields, [f for f in m["files"] if f != "sentence.onnx"])
    assert load_edge_bundle(edge).sentence is None
    old = EdgeRuntime.load(edge, threads=1)
    assert old.sentence is None
    v = shipped.encode([[5, 6, 7, 8]])[0]
    for sampling in CONTROLS.values():
        assert old.decode(v, sampling, answer=[[5, 6]]).ids == shipped.decode(v, sampling, answer=[[5, 6]]).ids


def test_load_monitor_flags_and_refuses_a_busy_machine():
    from bench.machine import LoadedMachine, LoadMonitor

    with LoadMonitor(interval=0.05) as m:
        pass
    s = m.summary()
    assert set(s) >= {"before", "during", "busy", "other_cores_mean"} and "load1" in s["before"]
    with pytest.raises(LoadedMachine):
        with LoadMonitor(interval=0.05, max_other_cores=-1.0, refuse=True):  # any load is too much
            pass
