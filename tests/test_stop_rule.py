"""The one stop rule (sllm.sentences.sampling.stop_decision) with a stop calibration: its math, how the
edge resolves it against a bundle, the bundle field (and bundles without it), and the export-time fit
(training.stop_head) on made-up validation numbers."""
import json
import math
import shutil
import struct

import numpy as np
import pytest

from sllm.runtime.edge_bundle import STOP_CALIBRATION_FIELD, load_edge_bundle, write_edge_manifest
from sllm.runtime.manifest import BundleError, read_manifest
from sllm.sentences.sampling import AnswerOptions, StopCalibration, stop_decision, with_bundle_stop


def _logit(p):
    return math.log(p / (1 - p))


def test_the_calibrated_rule_thresholds_scaled_log_odds_plus_the_offset_of_the_answer_position():
    cal = StopCalibration(scale=0.5, offsets=(-1.0, 0.0, 2.0), threshold=0.5)
    for answered, offset in ((1, -1.0), (2, 0.0), (3, 2.0), (9, 2.0), (0, -1.0)):  # past the table: its last
        for p in (0.05, 0.2, 0.5, 0.7, 0.95):
            z = 0.5 * _logit(p) + offset
            assert cal.log_odds(p, answered) == pytest.approx(z)
            assert cal.probability(p, answered) == pytest.approx(1 / (1 + math.exp(-z)))
            for t in (0.1, 0.3, 0.5, 0.8):
                if abs(z - _logit(t)) > 1e-6:  # away from the float32 rounding of the threshold
                    assert stop_decision(False, p, t, cal, answered) == (z >= _logit(t))
    # the same P(stop) stops later in the answer, not earlier, when the offsets grow
    assert [stop_decision(False, 0.3, 0.5, cal, n) for n in (1, 2, 3)] == [False, False, True]


def test_the_rule_without_calibration_is_the_threshold_or_the_argmax_flag():
    assert stop_decision(True, 0.1, None) and not stop_decision(False, 0.9, None)  # no threshold: the flag
    assert stop_decision(False, 0.6, 0.5) and not stop_decision(True, 0.4, 0.5)
    # the threshold is compared as the wire carries it (float32), on the edge and in the cloud alike
    t = 0.5738
    t32 = struct.unpack("f", struct.pack("f", t))[0]
    assert t32 != t and stop_decision(False, t32, t) and stop_decision(False, t32, t32)


def test_the_ends_of_the_probability_and_of_the_threshold():
    cal = StopCalibration(scale=2.0, offsets=(-30.0,), threshold=0.5)
    assert stop_decision(False, 1.0, 1.0, cal, 1)  # P(stop) 1 is certain whatever the prior
    assert not stop_decision(False, 0.999999, 1.0, cal, 1)  # threshold 1: never short of certainty
    assert stop_decision(False, 0.0, 0.0, cal, 1)  # threshold 0: always
    assert not stop_decision(False, 0.0, 1e-9, cal, 1)


@pytest.mark.parametrize("kwargs", [{"scale": 0.0}, {"scale": -1.0}, {"scale": float("nan")}, {"offsets": ()},
                                    {"offsets": [0.0]}, {"offsets": (float("inf"),)}, {"threshold": 1.5},
                                    {"threshold": None}, {"scale": True}])
def test_a_bad_calibration_is_refused(kwargs):
    with pytest.raises(ValueError):
        StopCalibration(**{"scale": 1.0, "offsets": (0.0,), "threshold": 0.5, **kwargs})


def test_the_answer_options_resolve_against_the_bundle():
    bundle_cal = StopCalibration(0.7, (0.1, 0.2), 0.25)
    own = StopCalibration(1.0, (0.0,), 0.4)
    r = with_bundle_stop(AnswerOptions(), 0.57, bundle_cal)
    assert (r.stop_threshold, r.stop_calibration) == (0.25, bundle_cal)  # the calibration's own threshold
    r = with_bundle_stop(AnswerOptions(stop_threshold=0.6), 0.57, bundle_cal)
    assert (r.stop_threshold, r.stop_calibration) == (0.6, bundle_cal)  # the user's threshold, calibrated P
    r = with_bundle_stop(AnswerOptions(calibrate_stop=False), 0.57, bundle_cal)
    assert (r.stop_threshold, r.stop_calibration) == (0.57, None)  # --raw-stop: the raw threshold
    r = with_bundle_stop(AnswerOptions(), 0.57, None)
    assert (r.stop_threshold, r.stop_calibration) == (0.57, None)  # a bundle exported before calibrations
    r = with_bundle_stop(AnswerOptions(), None, None)
    assert (r.stop_threshold, r.stop_calibration) == (None, None)  # ... and before thresholds: the flag
    r = with_bundle_stop(AnswerOptions(stop_calibration=own), 0.57, bundle_cal)
    assert (r.stop_threshold, r.stop_calibration) == (0.4, own)
    # min/max sentences still bound it
    o = with_bundle_stop(AnswerOptions(max_sentences=3, min_sentences=2), 0.57, StopCalibration(1.0, (50.0,), 0.5))
    assert [o.ends(n, False, 0.01) for n in (0, 1, 2, 3)] == [False, False, True, True]


def test_edge_chat_has_the_option():
    from typer.testing import CliRunner

    from sllm.edge.cli import app

    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "--calibrate-stop" in out and "--raw-stop" in out


def _edge_copy(export, tmp_path):
    edge = tmp_path / "edge"
    shutil.copytree(export / "edge", edge)
    return edge


def _rewrite(edge, **changes):
    m = read_manifest(edge, kind="edge")
    fields = {k: v for k, v in m.items() if k not in ("format_version", "files", "kind")}
    for k, v in changes.items():
        if v is None:
            fields.pop(k, None)
        else:
            fields[k] = v
    write_edge_manifest(edge, fields, list(m["files"]))


def test_a_bundle_without_the_calibration_still_loads(sllm_export, tmp_path):
    edge = _edge_copy(sllm_export, tmp_path)
    _rewrite(edge, **{STOP_CALIBRATION_FIELD: None})
    assert STOP_CALIBRATION_FIELD not in json.loads((edge / "manifest.json").read_text())
    bundle = load_edge_bundle(edge)
    assert bundle.stop_calibration is None
    options = with_bundle_stop(AnswerOptions(), bundle.stop_threshold, bundle.stop_calibration)
    assert options.stop_threshold == bundle.stop_threshold and options.stop_calibration is None


def test_the_bundle_field_is_read_typed_and_checked(sllm_export, tmp_path):
    edge = _edge_copy(sllm_export, tmp_path)
    _rewrite(edge, **{STOP_CALIBRATION_FIELD: {"scale": 0.5, "offsets": [-1.0, 0.5], "threshold": 0.3,
                                               "rule": "anything descriptive"}})
    assert load_edge_bundle(edge).stop_calibration == StopCalibration(0.5, (-1.0, 0.5), 0.3)
    with pytest.raises(BundleError, match=STOP_CALIBRATION_FIELD):
        _rewrite(edge, **{STOP_CALIBRATION_FIELD: {"scale": 0.5, "offsets": [], "threshold": 0.3}})
    m = json.loads((edge / "manifest.json").read_text())
    m[STOP_CALIBRATION_FIELD] = {"scale": "big", "offsets": [0.0], "threshold": 0.3}
    (edge / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=STOP_CALIBRATION_FIELD):
        load_edge_bundle(edge)


def test_an_export_without_enough_validation_data_has_no_calibration_and_loads(sllm_export):
    # the tiny test corpus has a handful of validation paragraphs: too few to fit on, so none is written
    assert json.loads((sllm_export / "edge" / "manifest.json").read_text()).get(STOP_CALIBRATION_FIELD) is None
    assert load_edge_bundle(sllm_export / "edge").stop_calibration is None


# ---------------------------------------------------------------- the fit (training.stop_head)

def test_the_length_prior_is_the_hazard_of_paragraph_lengths():
    from sllm.training.stop_head import length_hazard, paragraph_positions

    h = length_hazard(np.array([1, 1, 2, 3, 3, 3]), positions=4)
    assert h == pytest.approx([(2 + 0.5) / 7, (1 + 0.5) / 5, (3 + 0.5) / 4, 0.5 / 1])
    # positions in the paragraph as the model reads them: from the passage start or the last end
    targets = np.array([0, 1, 0, 0, 1, 0, 0], bool)
    positions = np.array([0, 1, 2, 3, 4, 0, 1])
    assert paragraph_positions(targets, positions).tolist() == [1, 2, 1, 2, 3, 1, 2]


def test_the_fit_refuses_too_few_paragraph_ends():
    from sllm.training.stop_head import fit_stop_calibration, length_hazard

    targets = np.array([0, 1] * 10, bool)
    with pytest.raises(ValueError, match="too few"):
        fit_stop_calibration(np.zeros((20, 2)), targets, np.arange(20), length_hazard(np.array([2] * 10), 4))


def test_the_fit_recovers_a_known_calibration_and_matches_lengths():
    from sllm.training.stop_head import fit_logistic, fit_stop_calibration, length_hazard, stopping_positions

    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(size=20000), rng.normal(size=20000), np.ones(20000)], 1)
    y = rng.random(20000) < 1 / (1 + np.exp(-(x @ np.array([0.8, -0.5, 0.3]))))
    assert fit_logistic(x, y) == pytest.approx([0.8, -0.5, 0.3], abs=0.06)

    # passages of paragraphs of 1..6 sentences; a head that says "end" a little more at real ends
    lengths = rng.integers(1, 7, size=3000)
    targets = np.concatenate([[False] * (n - 1) + [True] for n in lengths])
    positions = np.concatenate([np.arange(n) for n in lengths])  # one paragraph a passage
    z = rng.normal(size=len(targets)) + 1.5 * targets - 1.0
    logits = np.stack([np.zeros_like(z), z], 1)  # [N, 2]: (continue, stop)
    fit = fit_stop_calibration(logits, targets, positions, length_hazard(lengths, positions=8))
    cal = StopCalibration(fit["scale"], tuple(fit["offsets"]), fit["threshold"])
    assert cal.scale > 0 and len(cal.offsets) == 8
    assert fit["validation"]["ks_distance"] < 0.2
    score = 1 / (1 + np.exp(-(cal.scale * z + np.array(cal.offsets)[positions])))
    stops, real = stopping_positions(score, targets, positions, cal.threshold)
    assert (real == lengths).all()
    assert abs(np.median(np.where(stops > 0, stops, 99)) - np.median(lengths)) <= 1


def test_calibrate_stop_refuses_clearly_and_leaves_the_bundle_as_it_was(sllm_export, tmp_path):
    from typer.testing import CliRunner

    from sllm.training.cli import app

    model = tmp_path / "model"
    shutil.copytree(sllm_export, model)
    before = (model / "edge" / "manifest.json").read_bytes()
    res = CliRunner().invoke(app, ["calibrate-stop", str(model)])
    # the tiny corpus's validation split has a handful of paragraph ends: a clear error, nothing written
    assert res.exit_code == 2 and "too few" in res.output and "Traceback" not in res.output, res.output
    assert (model / "edge" / "manifest.json").read_bytes() == before


def test_the_cloud_reads_the_edges_rule_off_the_wire_and_decides_the_same_everywhere():
    """The Decoding the edge sends (edge.speculate.decoding) parsed as the cloud parses it: the same
    decision at every answer position for every float32 P(stop), thresholds between float32 values
    included."""
    from sllm.cloud.service import parse_decoding
    from sllm.edge.speculate import decoding
    from sllm.protos.v1 import sllm_pb2 as pb

    cal = StopCalibration(0.663641, (-0.514321, -0.013145, -0.04193, 0.7), 0.24)
    for threshold in (None, 0.24, 0.5738, 0.1 + 1e-12):
        edge = with_bundle_stop(AnswerOptions(stop_threshold=threshold, max_sentences=6), 0.5738, cal)
        wire = pb.Decoding.FromString(decoding(edge).SerializeToString())
        _, cloud = parse_decoding(wire)
        c, e = cloud.stop_calibration, edge.stop_calibration  # (its own threshold is not read: stop_threshold is)
        assert (c.scale, c.offsets) == (e.scale, e.offsets)
        rng = np.random.default_rng(1)
        ps = np.concatenate([rng.random(2000), [0.0, 1.0, edge.stop_threshold]]).astype(np.float32)
        for n in range(0, 8):
            for p in ps.tolist():
                edge_stops = n >= edge.min_sentences and (n >= 6 or stop_decision(
                    False, p, edge.stop_threshold, edge.stop_calibration, n))
                assert cloud.ends(n, False, p) == edge.ends(n, False, p) == edge_stops, (threshold, n, p)
    # without a calibration (--raw-stop, older bundles) nothing about it goes on the wire
    raw = with_bundle_stop(AnswerOptions(calibrate_stop=False), 0.5738, cal)
    assert not decoding(raw).stop_offsets and parse_decoding(decoding(raw))[1].stop_calibration is None
