"""The token-level baseline flavours of `bench.baselines` on a tiny OPT built here: the torch loop
with a preallocated cache and the ONNX Runtime export (real onnxruntime) generate Hugging Face
generate's greedy tokens; the export is cached, checked, and refused when it does not match."""
import copy

import numpy as np
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from bench import baselines
from bench.edge_decoder import BoundSession
from sllm.export.baseline_onnx import check_parity
from sllm.runtime.providers import cpu_session
from sllm.runtime.svae_onnx import KVSteps

VOCAB, MAX_POS = 300, 96


@pytest.fixture(scope="module")
def tiny_opt():
    """A random 2-layer OPT (d=32); init_std 0.1 makes its greedy choices varied and clear-cut
    (no near-ties that float rounding order could flip)."""
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                    max_position_embeddings=MAX_POS, pad_token_id=0, bos_token_id=1, eos_token_id=2, init_std=0.1,
                    dropout=0.0)
    cfg._attn_implementation = "eager"  # as the bench loads the baseline
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("baseline-onnx")


@pytest.fixture(scope="module")
def flavours(tiny_opt, cache):
    return baselines.make_flavours(tiny_opt, [1, 2], cache)


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[1], [1] + rng.integers(3, VOCAB, 4).tolist(), [1] + rng.integers(3, VOCAB, 30).tolist()]


def test_every_flavour_generates_hf_generates_greedy_tokens(flavours):
    assert [(f.name, f.threads) for f in flavours] == [(n, t) for n in baselines.FLAVOURS for t in (1, 2)]
    assert len({baselines.key(f.name, f.threads) for f in flavours}) == 6
    hf, threads = flavours[0], torch.get_num_threads()
    for prompt in _prompts():
        for n in (2, 17):
            ref = hf.timed(prompt, n)[1]
            assert len(ref) == n and (n == 2 or len(set(ref)) > 1)
            for f in flavours:
                run, ids = f.timed(prompt, n)
                assert ids == ref, (f.name, f.threads, prompt, n)
                assert (run.prompt_tokens, run.tokens, run.forward_passes) == (len(prompt), n - 1, n - 1)
                assert run.prefill_s > 0 and run.gen_s > 0 and run.as_dict()["tokens_per_s"] > 0
    assert torch.get_num_threads() == threads  # every torch flavour put the process's thread count back


def test_streams_yield_one_token_at_a_time_and_do_not_share_buffers(flavours):
    ort = next(f for f in flavours if f.name == "onnxruntime" and f.threads == 1)
    torch_kv = next(f for f in flavours if f.name == "torch-kv" and f.threads == 1)
    a, b = _prompts()[1:]
    ref_a, ref_b = flavours[0].timed(a, 12)[1], flavours[0].timed(b, 9)[1]
    for f in (ort, torch_kv):
        sa, sb = f.stream(a, 12), f.stream(b, 9)
        got_a, got_b = [], []
        for _ in range(12):  # two generations in turn, as a server's threads would run them
            got_a.append(next(sa))
            if len(got_b) < 9:
                got_b.append(next(sb))
        assert (got_a, got_b) == (ref_a, ref_b) and next(sa, None) is None and next(sb, None) is None
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # no state left behind


def test_the_export_is_cached_checked_and_refused_when_it_does_not_match(tiny_opt, cache, flavours):
    path = baselines.onnx_baseline(tiny_opt, cache)
    assert path.is_file() and path.parent.name == f"baseline-fused-{baselines.weights_key(tiny_opt)[:16]}"
    mtime = path.stat().st_mtime_ns
    assert baselines.onnx_baseline(tiny_opt, cache) == path and path.stat().st_mtime_ns == mtime  # not re-exported
    assert [p.name for p in path.parent.iterdir()] == ["baseline.onnx"]  # no temporary file left behind
    session = cpu_session(path, 1)
    assert check_parity(tiny_opt, session) < 1e-4
    other = copy.deepcopy(tiny_opt)
    with torch.no_grad():
        fc2 = other.model.decoder.layers[1].fc2.weight
        fc2.add_(0.1 * torch.randn(fc2.shape, generator=torch.Generator().manual_seed(0)))
    assert baselines.weights_key(other) != baselines.weights_key(tiny_opt)  # another model, another file
    with pytest.raises(ValueError, match="differs from the torch baseline"):
        check_parity(other, session)

    # the baseline graph steps the same through the I/O binding as through session.run
    prompt = _prompts()[2]
    bound, plain = (KVSteps(s, (2, 4, 8), 1, len(prompt) + 3) for s in (BoundSession(session), session))
    for ids in (np.array([prompt]), np.array([[7]]), np.array([[9]])):
        got, ref = bound.run(ids), plain.run(ids)
        assert got.shape == ref.shape == (1, 1, VOCAB) and np.array_equal(got, ref)
        assert np.array_equal(bound.kv(), plain.kv())
    with pytest.raises(ValueError, match="exceed"):
        bound.run(np.array([[1, 2, 3, 4]]))


def test_lengths_outside_what_the_model_takes_are_refused(flavours):
    for f in flavours[::2]:
        with pytest.raises(ValueError, match=">= 2"):
            f.timed([1, 5], 1)
        with pytest.raises(ValueError, match="exceed"):
            f.timed([1] * 90, 8)  # 90 + 7 positions > 96
