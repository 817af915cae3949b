"""The token-level split: a baseline OPT's own blocks served by the real cloud server, one step per
token, the client holding the embedding and the LM head, gives exactly the greedy tokens of
Hugging Face `generate` on the same model, also when sessions are batched together."""
import threading

import pytest
import torch
from cloud_helpers import running_server
from transformers import OPTConfig, OPTForCausalLM

from bench.token_split import TokenSplit
from sllm.modeling.token_bundle import token_tables, write_token_bundle
from sllm.protos.client import CloudClient
from sllm.runtime.manifest import BundleError

NEW = 12
PROMPTS = [[1, 5, 9, 33], [1, 60, 2, 7, 7, 41, 12, 3, 8], [1, 17]]


def _tiny_opt(embed_dim: int = 32) -> OPTForCausalLM:
    # init_std 0.3: widely spread logits, so float rounding (batched vs alone) cannot flip an argmax
    cfg = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                    max_position_embeddings=64, word_embed_proj_dim=embed_dim, init_std=0.3, dropout=0.0,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).eval()


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None  # exactly NEW tokens, eos included, as the split makes them
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             do_sample=False, num_beams=1, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = _tiny_opt()
    bundle = tmp_path_factory.mktemp("token-bundle")
    write_token_bundle(model, bundle, "token-test")
    with running_server(bundle, batch_wait_ms=5.0) as srv:
        yield model, f"127.0.0.1:{srv.port}"


def test_greedy_through_the_server_equals_hf_generate(served):
    model, target = served
    embed, head = token_tables(model)
    with CloudClient(target) as client:
        split = TokenSplit(client, "token-test", embed, head)
        for prompt in PROMPTS:
            want = _hf_greedy(model, prompt)
            assert len(want) == NEW
            assert list(split.stream(prompt, NEW)) == want
        assert client.stats().sessions == 0  # every session closed


def test_concurrent_sessions_batched_together_equal_hf_generate(served):
    model, target = served
    embed, head = token_tables(model)
    want = [_hf_greedy(model, p) for p in PROMPTS]
    got: list = [None] * len(PROMPTS)
    with CloudClient(target) as client:
        before = client.stats()

        def run(i: int) -> None:
            got[i] = list(TokenSplit(client, "token-test", embed, head).stream(PROMPTS[i], NEW))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        after = client.stats()
    assert got == want
    assert after.steps_total - before.steps_total == len(PROMPTS) * NEW  # one step per token (the prefill's
    # gives the first)


def test_an_opt_with_projected_embeddings_is_refused(tmp_path):
    projected = _tiny_opt(embed_dim=16)  # project_in / project_out: neither side of the split runs them
    with pytest.raises(BundleError, match="word_embed_proj_dim"):
        write_token_bundle(projected, tmp_path / "b", "token-x")
    with pytest.raises(BundleError, match="word_embed_proj_dim"):
        token_tables(projected)
