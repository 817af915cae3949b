"""`python -m bench` and the baseline export, on tiny models built here (a tiny SentenceVAE, SLLM
and token-level baseline trained for a few steps, exported to edge/ + cloud/ + baseline/)."""
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import OPT_TINY, data_overrides, sllm_overrides, train_run
from typer.testing import CliRunner

from bench import cli as bench_cli
from bench import kv_memory, plots, svae_variants
from bench.models import load_models, untrained_baseline
from bench.texts import ValidationText
from sllm.export import baseline_bundle
from sllm.export.cli import app as export_app
from sllm.export.exporter import export_checkpoint
from sllm.modeling.baseline_bundle import load_baseline_bundle
from sllm.runtime.manifest import BundleError
from sllm.training.config import BaselineRunConfig, SLLMRunConfig
from sllm.training.load import load_baseline
from sllm.training.tasks.opt_baseline import OPTBaselineTask
from sllm.training.tasks.sllm import SLLMTask


@pytest.fixture(scope="module")
def runs(tiny_corpus, tiny_svae_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_runs")
    sllm = sllm_overrides(tiny_corpus, out / "cache") + [f"sllm.svae_checkpoint={tiny_svae_run}", "train.max_steps=3"]
    train_run(SLLMRunConfig, SLLMTask, sllm, out / "sllm")
    base = data_overrides(tiny_corpus, out / "cache") + OPT_TINY + [f"match_sllm={out / 'sllm'}", "train.max_steps=3"]
    train_run(BaselineRunConfig, OPTBaselineTask, base, out / "baseline")
    return {"sllm": out / "sllm", "baseline": out / "baseline"}


@pytest.fixture(scope="module")
def model_dir(runs, tmp_path_factory) -> Path:
    """edge/ + cloud/ (sllm-export of the SLLM) + baseline/ (sllm-export of the baseline)."""
    d = tmp_path_factory.mktemp("bench_model") / "model"
    export_checkpoint(runs["sllm"], d, n_verify=4)
    r = CliRunner().invoke(export_app, [str(runs["baseline"]), "--out", str(d)])
    assert r.exit_code == 0, r.output
    return d


# ---------------------------------------------------------------- the baseline export

def _safetensors_dtypes(path: Path) -> set[str]:
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_baseline_export_round_trips_in_float16(model_dir, runs, tmp_path, monkeypatch):
    folder = model_dir / "baseline"
    m = json.loads((folder / "manifest.json").read_text())
    trained = load_baseline(runs["baseline"])
    assert m["kind"] == "baseline" and m["model_id"] == baseline_bundle.baseline_model_id(trained.path)
    assert m["source_checkpoint"] == str(trained.path) and m["verification"]["ok"]
    assert set(m["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_meta.json"}
    assert _safetensors_dtypes(folder / "model.safetensors") == {"F16"}  # half the size of the checkpoint
    assert (model_dir / "edge").is_dir() and (model_dir / "cloud").is_dir()  # the SLLM halves are untouched

    loaded = load_baseline_bundle(folder)
    assert loaded.tokenizer.to_json_str() == trained.tokenizer.to_json_str()
    ids = torch.tensor([[trained.tokenizer.bos_id] + list(range(5, 40))])
    with torch.no_grad():
        ref, got = trained.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits
    assert got.dtype == torch.float32
    diff = float((ref - got).abs().max())
    assert 0 < diff <= baseline_bundle.RELATIVE_TOLERANCE * max(1.0, float(ref.abs().max()))  # fp16, not a copy

    # a checkpoint whose fp16 copy does not reproduce it: refused, nothing installed
    monkeypatch.setattr(baseline_bundle, "RELATIVE_TOLERANCE", 0.0)
    r = CliRunner().invoke(export_app, [str(runs["baseline"]), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "does not reproduce" in r.output
    assert not (tmp_path / "o" / "baseline").exists() and not list((tmp_path / "o").glob(".baseline.*"))
    monkeypatch.undo()
    # another baseline in the folder is not overwritten without --force; a modified file is caught
    (tmp_path / "m").mkdir()
    other = tmp_path / "m" / "baseline"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**m, "model_id": "opt-baseline-other"}))
    r = CliRunner().invoke(export_app, [str(runs["baseline"]), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "different baseline" in r.output and "--force" in r.output
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    with pytest.raises(BundleError, match="does not match its manifest"):
        load_baseline_bundle(copy)


# ---------------------------------------------------------------- KV bytes per context token

def test_kv_slopes_are_the_analytic_bytes_per_token(model_dir):
    models = load_models(model_dir, threads=1)
    engine, base = models.engine, models.baseline
    rng = np.random.default_rng(0)
    lengths = [3, 5, 4] * 40  # L = 4 tokens per sentence
    text = ValidationText([rng.integers(3, 200, size=n).tolist() for n in lengths], "synthetic")
    kv = kv_memory.measure_kv(models.runtime, engine, base, text, [24, 60, 120, 200], 1)
    layers, d = base.config.num_hidden_layers, base.config.hidden_size
    per_token = 2 * layers * d * 4  # keys + values, every layer, float32
    assert [r["sentences"] for r in kv["rows"]] == [6, 15, 30, 50]
    assert kv["baseline_fit"]["bytes_per_token"] == pytest.approx(per_token, rel=1e-9)
    assert kv["sllm_fit"]["bytes_per_token"] == pytest.approx(per_token / 4, rel=0.02)
    assert kv["reduction"] == pytest.approx(1 - 1 / 4, abs=0.01)
    assert kv["analytic"]["baseline_bytes_per_token"] == per_token == engine.kv_bytes_per_sentence
    # the untrained stand-in has the grafted OPT's sizes and the edge's vocabulary
    stand_in = untrained_baseline(model_dir / "cloud", models.runtime.bundle.manifest)
    assert (stand_in.config.num_hidden_layers, stand_in.config.hidden_size) == (layers, d)
    assert stand_in.config.vocab_size == models.runtime.bundle.manifest["vocab_size"]


# ---------------------------------------------------------------- the command

def test_bench_quick_writes_markdown_json_and_plots(model_dir, runs, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = bench_cli.main([
        "--quick", "--model", str(model_dir), "--out", str(out), "--corpus", str(tiny_corpus),
        "--prompt-tokens", "8", "--output-tokens", "6,20", "--repeats", "1", "--rounds", "2",
        "--baseline-threads", "1,2", "--work", str(tmp_path / "work"), "--context-tokens", "16,48,96",
        "--clients", "1,2", "--scale-seconds", "0.3", "--decoder-runs", "3",
        "--sllm-run", str(runs["sllm"]), "--baseline-run", str(runs["baseline"]), "--no-progress"])
    assert code == 0
    md = (out / "bench.md").read_text()
    for section in ("## Ours beside the paper", "## Output throughput after prefill", "## KV cache per context token",
                    "## Where the time goes", "## Quality", "## Many edge clients, one cloud server", "## Plots"):
        assert section in md
    for paper_figure in ("3.04x", "4.65x", "-83.6%", "-91.0%", "3.605", "2.588", "1.649", "31.68 vs 26.75"):
        assert paper_figure in md
    assert "recorded, not re-measured" in md  # the --quick SentenceVAE figure is marked as recorded
    r = json.loads((out / "bench.json").read_text())
    for png in ("bench-throughput.png", "bench-kv.png", "bench-scale.png"):
        assert png in r["plots"] and (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["machine"]["cores"] >= 1 and r["machine"]["versions"]["torch"]

    # counting: every baseline flavour makes as many tokens as the SLLM did end to end, HF generate's
    # greedy tokens; every step is seen by the server; wire bytes are two float16 vectors of d per
    # step plus message overhead; 2 rounds of the plan, min <= median <= max
    t = r["throughput"]
    assert [(p["prompt_tokens_target"], p["output_tokens_target"]) for p in t["points"]] == [(8, 6), (8, 20)]
    flavours = [f"{f}_t{n}" for f in ("hf_generate", "torch_kv", "onnxruntime") for n in (1, 2)]
    assert t["paths"] == ["sllm_e2e", "sllm_inproc", "sllm_spec", *flavours] and t["fastest_baseline"] in flavours
    assert list((tmp_path / "work" / "baseline-onnx").glob("baseline-*/baseline.onnx"))  # cached outside the model
    d = r["models"]["d_model"]
    for p in t["points"]:
        assert [run["round"] for run in p["runs"]] == [0, 1]
        for run in p["runs"]:
            e2e = run["e2e"]
            assert sorted(run["baselines"]) == sorted(flavours)
            for base in run["baselines"].values():
                assert base["tokens"] + 1 == max(2, e2e["tokens"]) and base["forward_passes"] == base["tokens"]
                assert base["same_tokens_as_hf"] is True
            assert e2e["tokens"] >= p["output_tokens_target"] or e2e["ended"] != "length"
            assert e2e["server_forward_passes"] == e2e["cloud_steps"] + 1  # + the prefill
            if e2e["cloud_steps"]:
                per_step = (e2e["request_bytes"] + e2e["reply_bytes"]) / e2e["cloud_steps"]
                assert 2 * 2 * d < per_step < 2 * 2 * d + 64
            # speculation (default --speculate 8) changes no greedy output; every append after the prompt had
            # a guess to accept or correct, or one the cloud declined
            spec = run["spec"]
            assert spec["same_output_as_e2e"] is True and spec["output"] == e2e["output"]
            assert (spec["tokens"], spec["sentences"], spec["cloud_steps"]) == (e2e["tokens"], e2e["sentences"],
                                                                                 e2e["cloud_steps"])
            assert spec["accepted"] + spec["corrected"] + spec["declined"] == spec["cloud_steps"]
            assert spec["request_bytes"] is None  # not measured, not made up
    assert t["breakdown"]["baseline"]["forward_passes_per_token"] == 1.0
    for path in t["paths"]:
        s = t["tokens_per_s"][path]
        assert len(t["tokens_per_s_by_round"][path]) == 2 and 0 < s["min"] <= s["median"] <= s["max"]
    fastest = t["tokens_per_s"][t["fastest_baseline"]]["median"]
    assert fastest == max(t["tokens_per_s"][k]["median"] for k in flavours) == t["mean_tokens_per_s"]["baseline"]
    lo, hi = t["ratio_e2e_range"]
    assert lo <= t["ratio_e2e"] <= hi and t["hf_reference"] == "hf_generate_t1"
    lo, hi = t["ratio_spec_range"]
    sp = t["speculation"]
    assert lo <= t["ratio_spec"] <= hi and sp["runs"] == sp["identical_outputs"] == 4  # 2 points x 2 rounds
    assert sp["accepted"] + sp["corrected"] + sp["declined"] == sum(
        r["spec"]["cloud_steps"] for p in t["points"] for r in p["runs"])
    assert "SLLM end to end + speculation (N = 8)" in md and "in 4/4 runs" in md
    assert t["same_tokens_as_hf"] == dict.fromkeys(flavours[1:], 1.0)
    for label in ("HF generate, 2 threads", "torch, preallocated KV, 1 thread", "ONNX Runtime + KV, 2 threads",
                  "(fastest baseline)"):
        assert label in md
    assert sum(t["breakdown"]["e2e"]["time_split"].values()) == pytest.approx(1.0)
    assert len(r["scale"]["rows"]) == 2 and all(x["steps_per_s"] > 0 for x in r["scale"]["rows"])
    assert r["kv"]["reduction"] > 0
    # the PPL was recomputed from the runs the bundles were exported from
    ppl = r["quality"]["ppl"]
    assert ppl["source"].startswith("recomputed") and ppl["tokens"] > 0
    assert ppl["sllm_checkpoint_is_bundle"] is True and ppl["baseline_checkpoint_is_bundle"] is True
    assert "wrote" in capsys.readouterr().out


def test_fastest_generator_streams_the_baseline_bundles_greedy_tokens(model_dir, tmp_path):
    from bench.baselines import HFGenerate, fastest_generator

    gen = fastest_generator(model_dir / "baseline", threads=1, cache=tmp_path)
    assert gen.name == "onnxruntime" and "ONNX" in gen.description
    model = load_baseline_bundle(model_dir / "baseline").model
    prompt = [model.config.bos_token_id, 5, 9, 14, 30]
    assert list(gen.stream(prompt, 11)) == HFGenerate(model, 1).timed(prompt, 11)[1]


def test_edge_decoder_bench_times_every_option_on_the_same_tokens(model_dir, tiny_corpus, tmp_path, capsys):
    from bench import edge_decoder
    from sllm.runtime.edge_bundle import load_edge_bundle
    from sllm.runtime.svae_onnx import decode_loop, greedy_decode

    out = tmp_path / "ed"
    assert edge_decoder.main(["--edge", str(model_dir / "edge"), "--out", str(out), "--corpus", str(tiny_corpus),
                              "--sentences", "4", "--rounds", "2", "--exact-sentences", "16"]) == 0
    r = json.loads((out / "edge-decoder.json").read_text())
    assert [o["name"] for o in r["options"]] == [o.name for o in edge_decoder.OPTIONS]
    for o in r["options"]:
        t = o["tokens_per_s"]
        assert len(o["rounds"]["tokens_per_s"]) == 2 and 0 < t["min"] <= t["median"] <= t["max"]
        if o["graph"] == "fp32":  # every fp32 option decodes exactly what the edge's own loop decodes
            assert o["same_tokens_as_reference"] == 1.0
    assert r["int8"]["sentences"] == 16 and 0 <= r["int8"]["exact_match_int8"] <= 1
    assert "| 2 threads, no spinning |" in (out / "edge-decoder.md").read_text() in capsys.readouterr().out

    # the I/O-binding session decodes like the session, also a batch whose rows leave at different steps
    bundle = load_edge_bundle(model_dir / "edge", 1)
    vectors = bundle.encode_ids([[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]])
    bound = edge_decoder.BoundSession(bundle.decoder)
    assert greedy_decode(bound, vectors, bundle.spec) == greedy_decode(bundle.decoder, vectors, bundle.spec)

    def first_live_row_ends_at_steps_2_and_4():
        step = [0]

        def pick(logits):
            step[0] += 1
            ids = logits.argmax(-1)
            if step[0] in (2, 4):
                ids[0] = bundle.spec.eos_id
            return ids
        return pick

    got = [decode_loop(session, vectors, bundle.spec, first_live_row_ends_at_steps_2_and_4())
           for session in (bound, bundle.decoder)]
    assert got[0] == got[1] and len(got[0][0]) <= 1 < max(map(len, got[0]))  # row 0 left early, others went on


class _StopSayer:
    """A cloud whose termination head says stop at every step (P(stop) 0.9); counts what is appended."""

    def open(self):
        self.appended, self.wire = [], []

    def append(self, vectors):
        self.appended.append(len(vectors))
        self.wire.append((1, 1))
        return SimpleNamespace(hidden=np.zeros(2, np.float32), stop=True, stop_probability=0.9)

    def close(self):
        pass


class _TwoTokenSentences:
    def encode(self, ids):
        return np.zeros((len(ids), 2), np.float32)

    def decode(self, hidden, sampling, max_tokens=None, **kw):
        return SimpleNamespace(ids=[7, 7], text="<2>", ms=1.0)


def test_fixed_length_runs_go_past_the_stop_head_and_leave_the_last_sentence_out():
    """bench.sllm_loop: the edge's sentence loop over PastStop(stepper) generates past a head that
    says stop at every step, P(stop) still reported; a run ends at min_tokens or a full context
    without appending its last sentence (nothing reads its step)."""
    from bench.sllm_loop import PastStop, generate
    from sllm.edge.loop import SentenceEvent, sentence_loop
    from sllm.runtime.sampling import Sampling

    stepper = _StopSayer()
    stepper.open()
    events = list(sentence_loop(_TwoTokenSentences(), PastStop(stepper), [[3]], Sampling(), room=3))
    assert [e.stop_probability for e in events if isinstance(e, SentenceEvent)] == [0.9] * 3
    assert events[-1].reason == "context_full" and stepper.appended == [1, 1, 1, 1]
    full = generate(_TwoTokenSentences(), stepper, [[3], [4]], min_tokens=100, max_sentences=5)
    assert (full.sentences, full.tokens, full.ended, stepper.appended) == (3, 6, "context", [2, 1, 1])
    short = generate(_TwoTokenSentences(), stepper, [[3], [4]], min_tokens=3, max_sentences=5)
    assert (short.sentences, short.tokens, short.ended, stepper.appended) == (2, 4, "length", [2, 1])


def test_bench_refuses_a_folder_without_bundles(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_cli.main(["--quick", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_cli.main(["--sllm-run", str(tmp_path)])  # the PPL needs both runs
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench_cli.main(["--speculate", "-1"])
    assert e.value.code == 2 and "--speculate" in capsys.readouterr().err
    assert bench_cli.config_from_args(bench_cli.parser().parse_args(["--quick", "--speculate", "0"])).speculate == 0


# ---------------------------------------------------------------- SentenceVAE variants

def test_svae_variants_train_evaluate_and_plot(model_dir, tiny_corpus, tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"kind": "sentence_vae", "model": {"d_model": 32, "n_heads": 2, "ffn_dim": 64,
                                                                  "max_sentence_tokens": 16}}))
    logs = []
    res = svae_variants.run_variants([1, 2], 3, 8, 1, tmp_path / "work", base, model_dir / "edge",
                                     [str(tiny_corpus)], 0, 8, logs.append)
    h1, h2 = res["rows"]
    assert (h1["name"], h1["layers"], h2["name"], h2["layers"]) == ("H1", 1, "H2", 2)
    assert h2["params"] > h1["params"] and h1["steps"] == h2["steps"] == 3
    assert all(np.isfinite(r["loss"]) and r["ppl"] == pytest.approx(np.exp(r["loss"])) for r in res["rows"])
    assert h1["vocab"] == json.loads((model_dir / "edge" / "manifest.json").read_text())["vocab_size"]
    assert plots.svae_plot(res, tmp_path) == "bench-svae.png" and (tmp_path / "bench-svae.png").is_file()
    # a run already at its step count is evaluated again, not retrained
    again = svae_variants.run_variants([1], 3, 8, 1, tmp_path / "work", base, model_dir / "edge",
                                       [str(tiny_corpus)], 0, 8, logs.append)
    assert again["rows"][0]["train_s"] == 0.0 and again["rows"][0]["loss"] == pytest.approx(h1["loss"])
    # another budget is another run: trained from scratch in its own folder, the first kept
    other = svae_variants.run_variants([1], 4, 8, 1, tmp_path / "work", base, model_dir / "edge",
                                       [str(tiny_corpus)], 0, 8, logs.append)
    assert other["rows"][0]["train_s"] > 0 and other["rows"][0]["steps"] == 4
    assert sorted(p.name for p in (tmp_path / "work").glob("svae-H1-*")) == ["svae-H1-3x8", "svae-H1-4x8"]


def test_stop_rate_counts_how_each_answer_ended(tmp_path, capsys):
    from bench import stop_rate

    text = "The river rose in the spring. The town moved uphill.\n\nThe mill stayed. Nobody missed the old road."
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "Too short."}) + "\n")
    cases = stop_rate.prompts_from(corpus, 5)  # the short document is skipped
    assert [c.prompt for c in cases] == ["The river rose in the spring."]
    assert stop_rate.paragraph_rest(cases[0].rest) == " The town moved uphill."  # up to the blank line
    model = Path(__file__).resolve().parents[1] / "models" / "default"
    stop_rate.main([str(corpus), "--prompts", "1", "--model", str(model), "--json", str(tmp_path / "r.json")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{corpus}: ") and "/1 answers ended by the stop rule" in lines[0]
    assert any("teacher forced" in line for line in lines) and any(line.strip().startswith("n=1:") for line in lines)
    result = json.loads((tmp_path / "r.json").read_text())[0]
    assert result["answers"] == 1 and result["teacher_forced"]["positions"] == 1  # "The town moved uphill."
    assert result["teacher_forced"]["positives"] == 1
