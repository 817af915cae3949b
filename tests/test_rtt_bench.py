"""The pieces of bench/rtt.py and bench/cloud_cost.py that do not need the bundled model: the
cloud-only streaming service (its engines on a tiny OPT, real gRPC, through the real relay), its replies
carrying every token made since the previous one, the per-run, bound and speculation
arithmetic, the SLLM runner with and without speculation against a real server of a tiny exported
model, and cloud_throughput's measured window with its CPU probe (a real in-process server).
The whole benches run as commands (`python -m bench.rtt --quick`, `python -m bench.cloud_cost
--quick`): each starts server processes, longer than a test should take."""
import os
import random
import threading

import grpc
import pytest
import torch
from cloud_helpers import MODEL_ID, D, running_server
from helpers import _make_sentence
from transformers import OPTConfig, OPTForCausalLM

from bench import baselines, cloud_cost, cloud_throughput
from bench.cloud_only import CloudOnlyClient, HFGreedy, made_since_last_send, serve
from bench.relay import Relay
from bench.rtt import (
    Ctx,
    Run,
    SLLMRunner,
    Variant,
    headline,
    render_speculation,
    server_counters,
    summarize,
)
from sllm.edge.api import AnswerOptions
from sllm.edge.runtime import EdgeRuntime
from sllm.runtime.manifest import read_manifest


def _tiny_opt() -> OPTForCausalLM:
    cfg = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                    max_position_embeddings=64, init_std=0.3, dropout=0.0, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    return OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize("engine", ["onnxruntime", "hf"])
def test_cloud_only_streams_the_engines_greedy_tokens_through_the_relay(engine, tmp_path):
    """The server's engine (the fused ONNX graph with its KV cache, exported here, as `--generator auto`
    serves it; or the HF forward), streamed over real gRPC through the real relay: exactly the tokens the
    same engine decodes locally, which are Hugging Face generate's greedy tokens."""
    model = _tiny_opt()
    prompt, n = [1, 9, 4, 33, 2, 17], 24
    model.generation_config.eos_token_id = None  # exactly n tokens, eos included
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    generator = (baselines.make_flavours(model, [1], tmp_path, ("onnxruntime",))[0] if engine == "onnxruntime"
                 else HFGreedy(model))
    assert list(generator.stream(prompt, n)) == want and len(set(want)) > 1
    assert list((tmp_path).glob("baseline-fused-*/baseline.onnx")) or engine == "hf"  # the fused export, saved
    server, port = serve(generator)
    try:
        with Relay(f"127.0.0.1:{port}", 0.002) as relay, CloudOnlyClient(relay.address) as client:
            replies = list(client.chunks(prompt, n))
            assert all(replies) and [t for r in replies for t in r] == want  # each reply: >= 1 token, in order
            assert list(client.stream(prompt, 3)) == want[:3]
            with pytest.raises(grpc.RpcError) as e:
                list(client.stream(prompt, 0))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0).wait()


def test_a_reply_carries_every_token_made_since_the_previous_one():
    taken, made_all, closed = threading.Event(), threading.Event(), threading.Event()

    def engine():  # the first token, then (once it was taken) seven more, made before the next take
        yield 1
        taken.wait(10)
        yield from range(2, 9)
        made_all.set()

    replies = made_since_last_send(engine())
    assert next(replies) == [1]
    taken.set()
    assert made_all.wait(10)
    assert list(replies) == [list(range(2, 9))]  # one reply, not seven: the engine never waited for a send

    def failing():
        yield 5
        raise ValueError("the engine failed")

    with pytest.raises(ValueError, match="the engine failed"):
        list(made_since_last_send(failing()))

    def endless():
        try:
            while True:
                yield 7
        finally:
            closed.set()

    replies = made_since_last_send(endless())
    assert set(next(replies)) == {7}
    replies.close()  # the client went away: the engine stops and its generator is closed
    assert closed.wait(10)


def _variant(name: str, unit: str, speculate: int = 0, stats: bool = False) -> Variant:
    return Variant(name, name, unit, server=None, connect=None, speculate=speculate, stats=stats)


def test_tokens_per_second_after_the_first_unit_and_the_sllm_bound():
    variants = [_variant("sllm", "sentence"), _variant("cloud_only", "token")]
    runs = [Run("sllm", 0.0, 0, tokens=25, units=3, first_tokens=5, first_s=0.01, rest_s=0.02),
            Run("sllm", 50.0, 0, tokens=25, units=3, first_tokens=5, first_s=0.06, rest_s=0.12),
            Run("cloud_only", 0.0, 0, tokens=9, units=9, first_tokens=1, first_s=0.01, rest_s=0.04),
            Run("cloud_only", 50.0, 0, tokens=9, units=9, first_tokens=1, first_s=0.06, rest_s=0.04)]
    assert runs[0].tokens_per_s == pytest.approx(20 / 0.02) and runs[2].tokens_per_s == pytest.approx(8 / 0.04)
    relays = {(v.name, rtt): {"rtt_applied_ms": rtt} for v in variants for rtt in (0.0, 50.0)}
    s = summarize(variants, [0.0, 50.0], {"runs": runs, "relays": relays, "wire": dict.fromkeys(relays, 100.0)})
    b = s["bounds"]["sllm"]
    assert b["L"] == pytest.approx(10) and b["t_sentence_ms"] == pytest.approx(10)  # 20 tokens in 2 sentences, 20 ms
    assert b["tokens_per_s"]["50.0"] == pytest.approx(10 / 0.060)
    assert "cloud_only" not in s["bounds"]
    row = next(r for r in s["rows"] if r["variant"] == "sllm" and r["rtt_ms"] == 50.0)
    assert row["tokens_per_s"]["median"] == pytest.approx(20 / 0.12) and row["first_ms"]["max"] == pytest.approx(60)


def _counters(passes: int, spec_steps: int = 0, accepted: int = 0, decode_tokens: int = 0) -> dict:
    return {"steps_total": 0, "forward_passes_total": passes, "speculative_steps_total": spec_steps,
            "speculation_accepted_total": accepted, "speculation_dropped_total": 0,
            "speculation_decode_tokens_total": decode_tokens}


def test_a_speculation_row_counts_guesses_round_trips_and_the_extra_cloud_work():
    variants = [_variant("sllm", "sentence", stats=True), _variant("spec4", "sentence", 4, stats=True)]
    runs = [Run("sllm", 50.0, 0, tokens=40, units=5, first_tokens=8, first_s=0.06, rest_s=0.2, output="a", waited=4,
                appends=4),
            Run("sllm", 50.0, 1, tokens=40, units=5, first_tokens=8, first_s=0.06, rest_s=0.2, output="b", waited=4,
                appends=4),
            Run("spec4", 50.0, 0, tokens=40, units=5, first_tokens=8, first_s=0.06, rest_s=0.05, output="a",
                accepted=3, corrected=1, declined=0, waited=1, appends=4),
            Run("spec4", 50.0, 1, tokens=40, units=5, first_tokens=8, first_s=0.06, rest_s=0.1, output="x",
                accepted=2, corrected=0, declined=2, waited=2, appends=4)]
    keys = [("sllm", 50.0), ("spec4", 50.0)]
    counters = {("sllm", 50.0): _counters(passes=10),  # a prefill + 4 appends, per run
                ("spec4", 50.0): _counters(passes=16, spec_steps=12, accepted=5, decode_tokens=120)}
    s = summarize(variants, [50.0], {"runs": runs, "relays": {k: {"rtt_applied_ms": 50.0} for k in keys},
                                      "wire": dict.fromkeys(keys, 250.0), "counters": counters})
    assert s["reference"] == "sllm" and list(s["bounds"]) == ["sllm"]  # a speculating row has no such bound
    plain, spec = s["rows"]
    assert plain["round_trips_per_sentence"] == 1.0 and spec["round_trips_per_sentence"] == pytest.approx(3 / 8)
    assert plain["cloud_per_token"]["forward_passes"] == pytest.approx(10 / 80)
    sp = spec["speculation"]
    assert sp["acceptance"] == pytest.approx(5 / 6) and sp["declined_per_run"] == 1.0
    assert sp["extra_per_token"]["forward_passes"] == pytest.approx(6 / 80)
    assert sp["extra_per_token"]["speculation_decode_tokens"] == pytest.approx(120 / 80)
    assert sp["identical_outputs"] == 1  # prompt 1 differs
    results = {"summary": s, "config": {"rtts": [50.0]},
               "variants": [{"name": v.name, "speculate": v.speculate} for v in variants]}
    table = [line for line in render_speculation(results) if line.startswith("| 50 | spec4 |")]
    # acceptance, declined / run, round trips / sentence, wire, passes (extra), decode, wasted / run, same output
    assert table == ["| 50 | spec4 | 0.83 | 1.0 | 0.38 | 250 | 0.200 (+0.075) | 1.50 | 3.5 | 1/2 |"]


def test_the_headline_sets_each_speculation_row_against_cloud_only_at_50_and_100_ms():
    variants = [_variant("sllm", "sentence", stats=True), _variant("spec4", "sentence", 4, stats=True),
                _variant("cloud_only", "message")]
    rtts, runs = [0.0, 50.0, 100.0], []
    for rtt in rtts:
        for i, (spec_s, cloud_s) in enumerate(((0.2, 0.1), (0.3, 0.2), (0.4, 0.5))):  # whole answers: 40 tokens
            runs += [Run("sllm", rtt, i, 40, 5, 8, 0.06, 0.5, answer_s=0.6, output=str(i), waited=4, appends=4),
                     Run("spec4", rtt, i, 40, 5, 8, 0.06, spec_s - 0.06, answer_s=spec_s, output=str(i % 2),
                         accepted=4, appends=4),
                     Run("cloud_only", rtt, i, 40, 10, 1, 0.06, cloud_s - 0.06, answer_s=cloud_s)]
    keys = [(v.name, rtt) for v in variants for rtt in rtts]
    counters = {k: _counters(passes=15) for k in keys if k[0] != "cloud_only"}
    s = summarize(variants, rtts, {"runs": runs, "relays": {k: {"rtt_applied_ms": k[1]} for k in keys},
                                   "wire": dict.fromkeys(keys, 25.0), "counters": counters})
    results = {"summary": s, "config": {"rtts": rtts}, "runs": [r.as_dict() for r in runs],
               "variants": [{"name": v.name, "speculate": v.speculate, "info": {} if v.name != "cloud_only" else
                             {"generator": "the fused ONNX graph", "streaming": "replies of every token made"}}
                            for v in variants]}
    lines = headline(results)
    assert lines[0].startswith("## Headline")
    assert "cloud_only runs the fused ONNX graph, streaming by replies of every token made." in lines[2]
    rows = [line for line in lines if line.startswith("| 50 ") or line.startswith("| 100 ")]
    # whole answers 40 / (0.2, 0.3, 0.4) s against 40 / (0.1, 0.2, 0.5) s on the same prompts: ratios 0.5, 0.67,
    # 1.25; after the first unit 32 / (0.14, 0.24, 0.34) s against 39 / (0.04, 0.14, 0.44) s
    assert rows[0] == "| 50 | spec4 | 133 (100-200) | 0.67 (0.50-1.25) | 133 (94-229) | 0.48 (0.23-1.06) | 2/3 |"
    assert rows[1] == "| 50 | cloud_only | 200 (80-400) | - | 279 (89-975) | - | - |"
    assert len(rows) == 4 and rows[2].startswith("| 100 | spec4 |")  # nothing at RTT 0


@pytest.fixture(scope="module")
def export(sllm_export):
    return sllm_export


@pytest.fixture(scope="module")
def always_stops(export, tmp_path_factory):
    """`export` with a stop head whose flag is on at every step (its bias says stop), the edge manifest
    paired with the new cloud weights: a model whose fixed-length runs decode past the stop head at
    every sentence."""
    import shutil

    from sllm.modeling.cloud_bundle import load_cloud_bundle, write_cloud_bundle
    from sllm.runtime.edge_bundle import write_edge_manifest
    from sllm.runtime.manifest import cloud_weights_sha256

    model = tmp_path_factory.mktemp("always_stops") / "model"
    shutil.copytree(export, model)
    opt, manifest = load_cloud_bundle(model / "cloud")
    with torch.no_grad():
        opt.stop_head.weight.zero_()
        opt.stop_head.bias.copy_(torch.tensor([-4.0, 4.0]))  # P(stop) = 0.9997 whatever the context
    shutil.rmtree(model / "cloud")
    written = write_cloud_bundle(opt, model / "cloud", manifest["model_id"])
    edge = read_manifest(model / "edge", kind="edge")
    fields = {k: v for k, v in edge.items() if k not in ("format_version", "files", "kind")}
    write_edge_manifest(model / "edge", {**fields, "cloud_weights_sha256": cloud_weights_sha256(written)},
                        list(edge["files"]))
    return model


@pytest.mark.parametrize("model", ["export", "always_stops"])
def test_the_sllm_runner_speculates_with_the_same_output_and_counts_its_guesses(model, request):
    """Fixed-length runs, plain and speculating: the same output; the speculating runs tell the cloud
    they decode past the stop head, so it guesses past its stop flag (never declines for it), also
    with a head that says stop at every step."""
    export = request.getfixturevalue(model)
    rt = EdgeRuntime.load(export / "edge", device="cpu", threads=1)
    ctx = Ctx(export, rt, None, read_manifest(export / "cloud", kind="cloud"), None, 1, "float16", "auto", 0)
    prompts = [rt.prompt_sentences(_make_sentence(random.Random(i))) for i in range(6)]
    with running_server(export / "cloud", speculate_max=4, batch_wait_ms=0.0) as srv:
        address = f"127.0.0.1:{srv.port}"
        plain, spec = SLLMRunner(ctx, address), SLLMRunner(ctx, address, speculate=4)
        before, pairs = server_counters(address), []
        try:
            for i, prompt in enumerate(prompts):
                try:
                    pairs.append((plain.run(prompt, 60, "sllm", 0.0, i), spec.run(prompt, 60, "spec", 0.0, i)))
                except RuntimeError:  # the tiny model answers some prompts with nothing at all
                    continue
        finally:
            plain.close()
            spec.close()
        after = server_counters(address)
    assert len(pairs) >= 3
    for p, q in pairs:
        assert q.output == p.output and q.tokens == p.tokens  # greedy: speculation changes nothing the edge shows
        assert p.waited == p.units - 1 and p.accepted == p.corrected == p.declined == 0
        assert q.waited == q.corrected + q.declined and q.accepted + q.waited == q.units - 1
    assert sum(q.declined for _, q in pairs) == 0
    accepted = sum(q.accepted for _, q in pairs)
    assert accepted > 0
    assert after["speculation_accepted_total"] - before["speculation_accepted_total"] == accepted
    assert after["speculation_decode_tokens_total"] > before["speculation_decode_tokens_total"]


@pytest.mark.parametrize("stop_threshold", [0.0, 1.0])
def test_chat_runs_answer_as_edge_chat_does_and_speculation_guesses_exactly_those_sentences(export, stop_threshold):
    """--chat: edge-chat's controls and stop rule; the answer ends by itself (the token budget is
    ignored; threshold 0: after its first sentence, 1: at the cap), every sentence is appended (the
    last one's step says stop), and with the stop rule sent the cloud guesses exactly the answer:
    the same output, no guess declined, none wasted past the answer's end."""
    rt = EdgeRuntime.load(export / "edge", device="cpu", threads=1)
    chat = AnswerOptions(max_sentences=3, stop_threshold=stop_threshold)
    ctx = Ctx(export, rt, None, read_manifest(export / "cloud", kind="cloud"), None, 1, "float16", "auto", 0,
              chat=chat)
    prompts = [rt.prompt_sentences(_make_sentence(random.Random(i))) for i in range(5)]
    with running_server(export / "cloud", speculate_max=4, batch_wait_ms=0.0) as srv:
        address = f"127.0.0.1:{srv.port}"
        plain, spec = SLLMRunner(ctx, address), SLLMRunner(ctx, address, speculate=4)
        assert plain.sampling.controls_repetition  # edge-chat's defaults, not plain greedy
        before, pairs = server_counters(address), []
        try:
            for i, prompt in enumerate(prompts):
                try:
                    p, q = plain.run(prompt, 1, "chat", 0.0, i), spec.run(prompt, 1, "chat_spec4", 0.0, i)
                except RuntimeError:  # the tiny model answers some prompts with nothing at all
                    continue
                assert plain.run(prompt, 10_000, "chat", 0.0, i).output == p.output  # the budget plays no part
                pairs.append((p, q))
        finally:
            plain.close()
            spec.close()
        after = server_counters(address)
    assert len(pairs) >= 3
    units = [p.units for p, _ in pairs]
    assert set(units) == {1} if stop_threshold == 0.0 else (max(units) == chat.max_sentences and min(units) >= 1)
    for p, q in pairs:
        assert q.output == p.output and q.tokens == p.tokens
        assert p.appends == p.waited == p.units  # without speculation every sentence waits for its step
        assert q.declined == 0 and q.appends == q.units and q.accepted + q.corrected == q.units
        assert p.answer_s >= p.first_s + p.rest_s
    assert sum(q.accepted for _, q in pairs) > 0
    guesses = after["speculative_steps_total"] - before["speculative_steps_total"]
    assert guesses == sum(q.accepted + q.corrected for _, q in pairs)  # none past the answer's end


def test_cloud_cost_ratio_is_taken_per_round():
    points = [{"clients": 4, "model": m, "round": k, "tokens_per_cpu_s": v, "passes_per_token": 0.1, "mean_batch": 2.0,
               "tokens_per_s": 1.0, "cpu_busy": 0.5, "p50_ms": 1.0, "errors": []}
              for k, (s, t) in enumerate([(800.0, 100.0), (900.0, 150.0), (1000.0, 100.0)])
              for m, v in (("sllm", s), ("token", t))]
    row = cloud_cost.summarize(points, [4], L=10.0)[0]
    assert row["ratio"] == {"min": 6.0, "median": 8.0, "max": 10.0}
    assert row["ratio_over_L"]["median"] == pytest.approx(0.8)


def test_run_point_counts_the_window_and_the_probe(cloud_bundle):
    with running_server(cloud_bundle) as srv:
        r = cloud_throughput.run_point(f"127.0.0.1:{srv.port}", MODEL_ID, D, clients=2, duration=0.4, warmup=0.1,
                                       steps_per_conv=5, prompt_vectors=3,
                                       probe=lambda: cloud_throughput.cpu_seconds(os.getpid()))
    assert r["errors"] == []
    assert r["server_steps"] > 0 and 0 < r["forward_passes"] <= r["server_steps"]
    assert r["mean_batch"] == pytest.approx(r["server_steps"] / r["forward_passes"])
    assert r["probe_delta"] > 0  # the in-process server and clients spent CPU time in the window
