"""The termination head's decision: its features, a refit on frozen features, its threshold.

The head (GraftedOPT.stop_head, Eq. 8) is a Linear on the grafted OPT's final hidden state. Its
target, "this sentence ends its paragraph", is rare (about 3% of the bundled corpus's
sentences), so argmax (P(stop) > 0.5) almost never says stop. The edge decides with a threshold on
P(stop) instead, chosen here on the validation split and stored in the edge manifest.

    features, targets = stop_features(sllm, passages, index)    # frozen model, real sentences only
    fit_stop_head(sllm.opt.stop_head, features, targets, positive_weight=..., gamma=...)
    choice = choose_threshold(stop_probability(head, val_features), val_targets)   # max F1
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sllm.modeling.losses import token_loss
from sllm.modeling.opt_graft import STOP
from sllm.modeling.sllm import SLLM
from sllm.training.data.dataset import Passages
from sllm.training.data.passage_data import collate_passages
from sllm.training.tasks.sllm import stop_class_weight

THRESHOLD_DECIMALS = 4  # stored rounded; precision/recall are computed at the stored value


@torch.no_grad()
def stop_features(sllm: SLLM, passages: Passages, index: np.ndarray, batch_size: int = 16,
                  progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hidden float32 [N, d], ends-paragraph bool [N], position in its passage int64 [N]) over the
    real sentences of passages[index], in order: what the stop head reads at each sentence."""
    sllm.eval()
    device = next(sllm.parameters()).device
    feats, targets, positions = [], [], []
    for start in range(0, len(index), batch_size):
        b = collate_passages(passages, index[start : start + batch_size], sllm.svae.cfg.pad_id).to(device)
        hidden, _ = sllm(b.ids, b.token_mask, b.sentence_mask)  # [B, T, d]
        real = b.sentence_mask
        feats.append(hidden[real].float().cpu().numpy())
        targets.append(b.para_end[real].cpu().numpy())
        positions.append(torch.arange(real.shape[1], device=device).expand_as(real)[real].cpu().numpy())
        if progress is not None:
            progress(min(start + batch_size, len(index)), len(index))
    d = sllm.opt.hidden_size
    if not feats:
        return np.zeros((0, d), np.float32), np.zeros(0, bool), np.zeros(0, np.int64)
    return np.concatenate(feats), np.concatenate(targets), np.concatenate(positions)


def stop_loss(head: nn.Linear, features: torch.Tensor, targets: torch.Tensor, positive_weight: float,
              gamma: float) -> torch.Tensor:
    """The stage-2 stop loss (focal, class-weighted: training.tasks.sllm.sllm_losses) on fixed features."""
    return token_loss(head(features), targets.long(), "focal", gamma, class_weight=stop_class_weight(positive_weight))


def fit_stop_head(head: nn.Linear, features: np.ndarray, targets: np.ndarray, positive_weight: float,
                  gamma: float = 2.0, max_iter: int = 200) -> dict[str, float]:
    """Refit the head in place on frozen features (full-batch L-BFGS from its current weights:
    a convex-enough problem of 2 x (d + 1) numbers). -> the loss before and after."""
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.bool)
    head = head.float().train()
    before = float(stop_loss(head, x, y, positive_weight, gamma).detach())
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = stop_loss(head, x, y, positive_weight, gamma)
        loss.backward()
        return loss

    optimizer.step(closure)
    head.eval()
    after = float(stop_loss(head, x, y, positive_weight, gamma).detach())
    return {"loss_before": before, "loss_after": after}


@torch.no_grad()
def stop_probability(head: nn.Linear, features: np.ndarray) -> np.ndarray:
    """P(stop) float64 [N] as the cloud reports it (softmax of the two logits)."""
    logits = head(torch.as_tensor(features, dtype=torch.float32)).double()
    return logits.softmax(-1)[:, STOP].numpy()


def precision_recall(p_stop: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, float]:
    """Of "this sentence ends its paragraph", deciding stop when P(stop) >= threshold."""
    said = p_stop >= threshold
    tp = int((said & targets).sum())
    precision = tp / max(int(said.sum()), 1)
    recall = tp / max(int(targets.sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "said_stop": int(said.sum()), "positives": int(targets.sum()), "sentences": len(targets)}


def choose_threshold(p_stop: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The threshold on P(stop) with the highest F1 of "ends its paragraph" on these sentences
    (rounded to THRESHOLD_DECIMALS; its precision and recall are those of the rounded value)."""
    if not targets.any():
        raise ValueError("no sentence here ends a paragraph: no threshold can be chosen")
    order = np.argsort(-p_stop, kind="stable")
    tp = np.cumsum(targets[order])  # deciding stop for the k+1 most likely sentences
    k = np.arange(1, len(order) + 1)
    f1 = 2 * tp / (k + targets.sum())
    best = int(np.argmax(f1))
    # between this candidate and the next lower one, so rounding does not cross a sentence
    lower = p_stop[order[best + 1]] if best + 1 < len(order) else 0.0
    threshold = round(float((p_stop[order[best]] + lower) / 2), THRESHOLD_DECIMALS)
    return precision_recall(p_stop, targets, threshold)


def average_precision(p_stop: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision-recall curve (ranking quality, whatever the threshold)."""
    hits = targets[np.argsort(-p_stop, kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / max(int(hits.sum()), 1))


def refit_model(model_dir: Path, positive_weight: float, gamma: float = 2.0, train_passages: int = 4000,
                seed: int = 0, cache_dir: str | None = None, sweep: tuple[float, ...] = (), log=print) -> dict:
    """Refit MODEL/cloud's stop head on frozen features of training passages (the edge's exact
    SentenceVAE, recovered from its graphs, then the cloud blocks), choose its threshold on the
    validation split (max F1), and rewrite MODEL/cloud and MODEL/edge/manifest.json (the new
    weights' sha256, stop_threshold) with the bundles' own writers. -> the report."""
    import copy

    from sllm.modeling.cloud_bundle import load_cloud_bundle, write_cloud_bundle
    from sllm.runtime.edge_bundle import (
        CLOUD_WEIGHTS_FIELD,
        STOP_CALIBRATION_FIELD,
        STOP_THRESHOLD_FIELD,
        write_edge_manifest,
    )
    from sllm.runtime.files import replace_dir
    from sllm.runtime.manifest import cloud_weights_sha256, read_manifest
    from sllm.training.data.passage_data import prepare_passages
    from sllm.training.load import load_sllm
    from sllm.training.svae_from_onnx import RecoveryError, recover_sentence_vae

    model_dir = Path(model_dir)
    trained = load_sllm(model_dir)  # the run config (data split), svae/ and the cloud blocks
    try:
        trained.model.svae = recover_sentence_vae(model_dir / "edge")[0]  # exactly what the edge encodes with
    except RecoveryError:  # fused graphs do not map back; svae/ holds the weights they were written from
        pass
    data = trained.run.data
    data.tokenizer = str(trained.tokenizer_dir)
    if cache_dir:
        data.cache_dir = cache_dir
    passages = prepare_passages(data, trained.model.svae.cfg.max_sentence_tokens, log=log)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(passages.train), min(train_passages, len(passages.train)), replace=False))
    log(f"features: {len(index)} training passages, all {len(passages.val)} validation passages")
    x_train, y_train, _ = stop_features(trained.model, passages.train, index)
    x_val, y_val, pos_val = stop_features(trained.model, passages.val, np.arange(len(passages.val)))
    head = trained.model.opt.stop_head
    p_before = stop_probability(head, x_val)
    report = {"positive_weight": positive_weight, "focal_gamma": gamma, "train_passages": len(index),
              "train_sentences": len(y_train), "train_positive_share": float(y_train.mean()),
              "val_sentences": len(y_val), "val_positives": int(y_val.sum()),
              "before": {"argmax": precision_recall(p_before, y_val, 0.5), "best": choose_threshold(p_before, y_val),
                         "average_precision": average_precision(p_before, y_val)}, "sweep": []}
    for w in sweep:  # other weights, for the record (the head is refit from the same start each time)
        h = copy.deepcopy(head)
        fit_stop_head(h, x_train, y_train, w, gamma)
        p = stop_probability(h, x_val)
        report["sweep"].append({"positive_weight": w, **choose_threshold(p, y_val),
                                "average_precision": average_precision(p, y_val)})
    report["fit"] = fit_stop_head(head, x_train, y_train, positive_weight, gamma)
    p_after = stop_probability(head, x_val)
    choice = choose_threshold(p_after, y_val)
    report["after"] = {"chosen": choice, "argmax": precision_recall(p_after, y_val, 0.5),
                       "average_precision": average_precision(p_after, y_val)}
    log(f"validation: precision {choice['precision']:.3f}, recall {choice['recall']:.3f} at P(stop) >= "
        f"{choice['threshold']} (before: argmax recall {report['before']['argmax']['recall']:.3f})")

    cloud_dir, edge_dir = model_dir / "cloud", model_dir / "edge"
    _, cloud_manifest = load_cloud_bundle(cloud_dir)
    model_id = cloud_manifest["model_id"]
    tmp = cloud_dir.parent / f".cloud.refit-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = write_cloud_bundle(trained.model.opt.float().cpu(), tmp, model_id)
        replace_dir(tmp, cloud_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    edge = read_manifest(edge_dir, kind="edge")
    fields = {k: v for k, v in edge.items() if k not in ("format_version", "files", "kind")}
    fields[CLOUD_WEIGHTS_FIELD] = cloud_weights_sha256(written)
    fields[STOP_THRESHOLD_FIELD] = choice["threshold"]
    try:  # the calibration belongs to the head: refit it too
        with torch.no_grad():
            logits = head(torch.as_tensor(x_val, dtype=torch.float32)).double().numpy()
        max_tokens = trained.model.svae.cfg.max_sentence_tokens
        hazard = length_hazard(training_paragraph_lengths(data, trained.tokenizer, max_tokens))
        fields[STOP_CALIBRATION_FIELD] = report["calibration"] = fit_stop_calibration(logits, y_val, pos_val, hazard)
    except ValueError as e:
        fields.pop(STOP_CALIBRATION_FIELD, None)
        log(f"no stop calibration: {e}")
    fields["stop_head"] = {"threshold_rule": "max F1 of 'ends its paragraph' on the validation split",
                           "precision": round(choice["precision"], 4), "recall": round(choice["recall"], 4),
                           "positive_weight": positive_weight, "refit": "sllm-train refit-stop"}
    write_edge_manifest(edge_dir, fields, list(edge["files"]))
    report["cloud_weights_sha256"] = fields[CLOUD_WEIGHTS_FIELD]
    return report


def render_report(r: dict) -> str:
    c, b = r["after"]["chosen"], r["before"]

    def row(name: str, m: dict, ap: float | str = "") -> str:
        ap = f"{ap:.3f}" if isinstance(ap, float) else ap
        return (f"| {name} | {m['threshold']:g} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                f"{m['said_stop']} | {ap} |")

    intro = (f"{r['val_sentences']} validation sentences, {r['val_positives']} of them end a paragraph. Refit on "
             f"{r['train_sentences']} sentences of {r['train_passages']} training passages "
             f"({r['train_positive_share']:.1%} positive), focal gamma {r['focal_gamma']}, positive weight "
             f"{r['positive_weight']:g}; threshold = max F1 on validation.")
    lines = ["## Termination head: 'this sentence ends its paragraph' on the validation split", "", intro, "",
             "| head | threshold | precision | recall | F1 | said stop | average precision |",
             "|---|---|---|---|---|---|---|",
             row("shipped, argmax", b["argmax"], b["average_precision"]), row("shipped, best threshold", b["best"]),
             row(f"refit (weight {r['positive_weight']:g}), chosen", c, r["after"]["average_precision"])]
    lines += [row(f"refit with weight {s['positive_weight']:g} (not written)", s, s["average_precision"])
              for s in r["sweep"]]
    return "\n".join(lines) + "\n"


def validation_stop_threshold(sllm: SLLM, data, tokenizer_dir: Path, log=lambda *a: None) -> dict | None:
    """The head's max-F1 threshold on the validation passages of `data` (a DataConfig; the model's
    tokenizer in `tokenizer_dir`), with its precision and recall; None when no validation sentence
    ends a paragraph."""
    from dataclasses import replace

    from sllm.training.data.passage_data import prepare_validation_passages

    val = prepare_validation_passages(replace(data, tokenizer=str(tokenizer_dir)), sllm.svae.cfg.max_sentence_tokens,
                                      log=log)
    x, y, _ = stop_features(sllm, val, np.arange(len(val)))
    if not y.any():
        return None
    p = stop_probability(sllm.opt.stop_head, x)
    return {**choose_threshold(p, y), "average_precision": average_precision(p, y)}


# ---------------------------------------------------------------- the stop calibration (edge manifest)
#
# The head's max-F1 threshold is chosen on in-domain sentences; on a register training never read the
# head's P(stop) sits lower and an answer may never stop. The calibration (sllm.sentences.sampling.
# StopCalibration) decides on logit(P') = scale * logit(P(stop)) + offsets[n - 1] at the answer's
# sentence n: a logistic regression on the validation split of "this sentence ends its paragraph" on
# the head's log-odds and the log-odds of the training corpus's paragraph-length hazard at the
# sentence's position in its paragraph (a Platt scale and a length prior, three numbers); its
# threshold matches answer lengths, not single sentences: the one whose stopping positions on the
# validation paragraphs (the first sentence with P' >= it) are distributed most like the paragraphs'
# real lengths (least Kolmogorov-Smirnov distance).

CALIBRATION_POSITIONS = 32  # offsets for answer sentences 1..32; later ones use the last
CALIBRATION_DOCUMENTS = 3000  # training documents the paragraph-length prior is counted on (seeded sample)
CALIBRATION_MIN_ENDS = 50  # validation paragraph ends needed to fit three numbers (fewer: no calibration)
CALIBRATION_RULE = ("logistic regression on the validation split of 'ends its paragraph' on the head's log-odds "
                    "and the log-odds of the training paragraphs' length hazard at the sentence's position; "
                    "threshold: least KS distance between the rule's stopping positions and the real paragraph "
                    "lengths of the validation passages")


def length_hazard(lengths: np.ndarray, positions: int = CALIBRATION_POSITIONS) -> np.ndarray:
    """Paragraph lengths (sentences) -> float64 [positions]: P(a paragraph ends at its sentence n | it
    reached n), n = 1..positions, smoothed (+0.5 / +1) so no position is 0 or 1."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = np.arange(1, positions + 1)
    reached = (lengths[None, :] >= n[:, None]).sum(1)
    ended = (lengths[None, :] == n[:, None]).sum(1)
    return (ended + 0.5) / (reached + 1.0)


def paragraph_positions(targets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """int64 [N]: each sentence's position (1-based) in its paragraph as the model reads it, counted from
    its passage's start or the previous paragraph end (stop_features' targets and positions, in order)."""
    out = np.zeros(len(targets), dtype=np.int64)
    run = 0
    for i in range(len(targets)):
        run = 1 if positions[i] == 0 else run + 1
        out[i] = run
        if targets[i]:
            run = 0
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, iters: int = 50) -> np.ndarray:
    """Weights [f] of P(y) = sigmoid(x @ w) by Newton's method (x float64 [N, f], y bool [N])."""
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(x @ w)))
        step = np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]) + 1e-6 * np.eye(x.shape[1]), x.T @ (y - p))
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return w


def stopping_positions(score: np.ndarray, targets: np.ndarray, positions: np.ndarray,
                       threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Over the paragraphs that end inside their passage: (where the rule first says stop, 1-based, 0 for
    never; the paragraph's real length)."""
    stops, lengths = [], []
    start = 0
    for i in range(len(targets)):
        if positions[i] == 0:
            start = i
        if targets[i]:
            said = np.flatnonzero(score[start : i + 1] >= threshold)
            stops.append(int(said[0]) + 1 if len(said) else 0)
            lengths.append(i - start + 1)
            start = i + 1
    return np.array(stops, dtype=np.int64), np.array(lengths, dtype=np.int64)


def length_matching_threshold(score: np.ndarray, targets: np.ndarray, positions: np.ndarray) -> dict:
    """The threshold on `score` (probabilities) whose stopping positions on these paragraphs are distributed
    most like their real lengths (least KS distance; a grid of 0.005), with that distance."""
    best = None
    for t in np.round(np.arange(0.005, 1.0, 0.005), 3):
        stops, lengths = stopping_positions(score, targets, positions, t)
        top = int(max(lengths.max(), 1))
        grid = np.arange(1, top + 1)
        said = np.where(stops > 0, stops, top + 1)
        ks = float(np.abs((said[None, :] <= grid[:, None]).mean(1) - (lengths[None, :] <= grid[:, None]).mean(1)).max())
        if best is None or ks < best["ks_distance"]:
            best = {"threshold": float(t), "ks_distance": ks, "paragraphs": len(lengths),
                    "stopped_within_8": float(((stops > 0) & (stops <= 8)).mean()),
                    "real_within_8": float((lengths <= 8).mean())}
    return best


def fit_stop_calibration(logits: np.ndarray, targets: np.ndarray, positions: np.ndarray, hazard: np.ndarray) -> dict:
    """The stop calibration's manifest entry (scale, offsets, threshold, and how they were fitted) from the
    head's logits [N, 2] on validation sentences, their targets and passage positions, and the training
    paragraphs' length hazard."""
    from sllm.sentences.sampling import StopCalibration

    if int(targets.sum()) < CALIBRATION_MIN_ENDS:
        raise ValueError(f"{int(targets.sum())} validation sentences end a paragraph: too few to fit a stop "
                         f"calibration on (at least {CALIBRATION_MIN_ENDS})")
    z = logits[:, STOP] - logits[:, 1 - STOP]  # the head's log-odds of stop
    k = np.minimum(paragraph_positions(targets, positions), len(hazard))
    prior = np.log(hazard / (1 - hazard))
    scale, weight, intercept = fit_logistic(np.stack([z, prior[k - 1], np.ones_like(z)], 1), targets.astype(float))
    if not scale > 0:
        raise ValueError(f"the head's log-odds do not predict paragraph ends on validation (Platt scale {scale:.3g})")
    offsets = weight * prior + intercept
    score = 1 / (1 + np.exp(-(scale * z + offsets[k - 1])))
    chosen = length_matching_threshold(score, targets, positions)
    calibration = StopCalibration(round(float(scale), 6), tuple(round(float(o), 6) for o in offsets),
                                  chosen["threshold"])
    return {"scale": calibration.scale, "offsets": list(calibration.offsets), "threshold": calibration.threshold,
            "prior_weight": round(float(weight), 6), "intercept": round(float(intercept), 6),
            "hazard": [round(float(h), 6) for h in hazard], "rule": CALIBRATION_RULE,
            "validation": {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in chosen.items()},
                           **{k: round(v, 4) for k, v in precision_recall(score, targets, chosen["threshold"]).items()
                              if k in ("precision", "recall")},
                           "average_precision": round(average_precision(score, targets), 4),
                           "average_precision_raw": round(average_precision(1 / (1 + np.exp(-z)), targets), 4)}}


def training_paragraph_lengths(data, tokenizer, max_tokens: int, documents: int = CALIBRATION_DOCUMENTS,
                               seed: int = 0) -> np.ndarray:
    """Paragraph lengths in model sentences over a seeded sample of the training split's documents (the
    run's corpus and split; the validation documents are left out)."""
    import random

    from sllm.sentences.limit import model_sentences
    from sllm.training.data.corpus import load_documents, split_documents
    from sllm.training.data.units import paragraph_ends

    train, _ = split_documents(load_documents(data.corpus or None), data.val_fraction, data.split_seed)
    sample = random.Random(seed).sample(train, min(documents, len(train)))
    lengths, run = [], 0
    for doc in sample:
        for end in paragraph_ends(model_sentences(doc.text, tokenizer, max_tokens, data.split_on_comma)):
            run += 1
            if end:
                lengths.append(run)
                run = 0
    return np.array(lengths, dtype=np.int64)


def validation_stop_calibration(sllm: SLLM, data, tokenizer, tokenizer_dir: Path, log=lambda *a: None) -> dict | None:
    """The stop calibration of `sllm` on the validation passages of `data` (a DataConfig) with the length
    prior of its training documents (`tokenizer`: the model's, in `tokenizer_dir`); None when no
    validation sentence ends a paragraph."""
    from dataclasses import replace

    from sllm.training.data.passage_data import prepare_validation_passages

    max_tokens = sllm.svae.cfg.max_sentence_tokens
    val = prepare_validation_passages(replace(data, tokenizer=str(tokenizer_dir)), max_tokens, log=log)
    x, y, positions = stop_features(sllm, val, np.arange(len(val)))
    if not y.any():
        return None
    with torch.no_grad():
        logits = sllm.opt.stop_head(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    hazard = length_hazard(training_paragraph_lengths(data, tokenizer, max_tokens))
    return fit_stop_calibration(logits, y, positions, hazard)


def calibrate_model(model_dir: Path, log=print) -> dict:
    """Fit the stop calibration of an export folder (svae/, cloud/, edge/; weights unchanged) and write it
    into MODEL/edge/manifest.json with the bundle's own writer. -> the calibration."""
    from sllm.runtime.edge_bundle import STOP_CALIBRATION_FIELD, write_edge_manifest
    from sllm.runtime.manifest import read_manifest
    from sllm.training.load import load_sllm
    from sllm.training.svae_from_onnx import RecoveryError, recover_sentence_vae

    model_dir = Path(model_dir)
    trained = load_sllm(model_dir)
    try:
        trained.model.svae = recover_sentence_vae(model_dir / "edge")[0]  # exactly what the edge encodes with
    except RecoveryError:
        pass
    calibration = validation_stop_calibration(trained.model, trained.run.data, trained.tokenizer,
                                              trained.tokenizer_dir or trained.path, log=log)
    if calibration is None:
        raise ValueError("no validation sentence ends a paragraph: nothing to calibrate the stop rule on")
    edge_dir = model_dir / "edge"
    edge = read_manifest(edge_dir, kind="edge")
    fields = {k: v for k, v in edge.items() if k not in ("format_version", "files", "kind")}
    fields[STOP_CALIBRATION_FIELD] = calibration
    write_edge_manifest(edge_dir, fields, list(edge["files"]))
    return calibration
