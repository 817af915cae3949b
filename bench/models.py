"""The models under test, loaded from one model folder:

    MODEL/edge      the SLLM's edge bundle (ONNX Runtime, as edge-chat loads it)
    MODEL/cloud     the SLLM's cloud bundle (served over gRPC, or run in-process by the engine)
    MODEL/baseline  the token-level OPT (`sllm-export <baseline run> --out MODEL`); when absent, an
                    untrained OPT of the grafted OPT's architecture and the edge's vocabulary stands
                    in: speed and KV size do not depend on the weights, quality is then not available
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class BenchError(Exception):
    """A benchmark that cannot run as asked (missing bundle, mismatched halves); one message, exit 2."""


@dataclass
class BenchModels:
    root: Path
    runtime: object  # edge.runtime.EdgeRuntime
    cloud_dir: Path
    cloud_manifest: dict
    engine: object  # cloud.engine.Engine, in this process
    baseline: object  # OPTForCausalLM, fp32, eval
    baseline_trained: bool
    baseline_source: str  # in words, for the report
    baseline_manifest: dict | None

    @property
    def model_id(self) -> str:
        return self.runtime.model_id


def untrained_baseline(cloud_dir: Path, edge_manifest: dict, seed: int = 0):
    """An OPTForCausalLM with the grafted OPT's sizes (cloud opt_config.json) and the edge's vocabulary."""
    import torch
    from transformers import OPTForCausalLM

    from sllm.modeling.cloud_bundle import OPT_CONFIG
    from sllm.modeling.opt_graft import read_opt_config

    config = read_opt_config(cloud_dir / OPT_CONFIG)  # eager attention, as the cloud runs the grafted blocks
    config.vocab_size = int(edge_manifest["vocab_size"])
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        int(edge_manifest["pad_id"]), int(edge_manifest["bos_id"]), int(edge_manifest["eos_id"]))
    torch.manual_seed(seed)
    return OPTForCausalLM(config).eval()


def load_models(model_dir: Path, threads: int, seed: int = 0) -> BenchModels:
    import torch

    from sllm.cloud.engine import Engine
    from sllm.edge.runtime import EdgeRuntime
    from sllm.modeling.baseline_bundle import FOLDER, load_baseline_bundle
    from sllm.modeling.cloud_bundle import load_cloud_bundle
    from sllm.runtime.manifest import BundleError

    model_dir = Path(model_dir)
    torch.set_num_threads(threads)
    try:
        runtime = EdgeRuntime.load(model_dir / "edge", device="cpu", threads=threads)
        grafted, cloud_manifest = load_cloud_bundle(model_dir / "cloud", "cpu")
    except BundleError as e:
        raise BenchError(f"{model_dir} is not an SLLM model folder with edge/ and cloud/ ({e})") from None
    if cloud_manifest["model_id"] != runtime.model_id:
        raise BenchError(f"{model_dir}: edge ({runtime.model_id}) and cloud ({cloud_manifest['model_id']}) bundles "
                         "are halves of different models")
    engine = Engine(grafted, "cpu", "float32")

    folder = model_dir / FOLDER
    if (folder / "manifest.json").is_file():
        try:
            loaded = load_baseline_bundle(folder)
        except BundleError as e:
            raise BenchError(str(e)) from None
        if loaded.tokenizer.to_json_str() != runtime.tokenizer.to_json_str():
            raise BenchError(f"{folder} uses another tokenizer than the SLLM in {model_dir / 'edge'}: the two models "
                             "would not read the same tokens; export the baseline trained with match_sllm=<the SLLM run>")
        m = loaded.manifest
        return BenchModels(model_dir, runtime, model_dir / "cloud", cloud_manifest, engine, loaded.model, True,
                           f"trained baseline {folder} ({m['model_id']}, from {m['source_checkpoint']})", m)
    model = untrained_baseline(model_dir / "cloud", runtime.bundle.manifest, seed)
    return BenchModels(model_dir, runtime, model_dir / "cloud", cloud_manifest, engine, model, False,
                       f"no {folder}: an untrained OPT of the grafted OPT's architecture and the same vocabulary "
                       "(speed and KV size do not depend on weights; its quality is not measured)", None)
