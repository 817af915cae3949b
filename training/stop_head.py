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
    x_val, y_val, _ = stop_features(trained.model, passages.val, np.arange(len(passages.val)))
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
