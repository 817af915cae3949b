"""Reading the token-level baseline bundle (`OUT/baseline`, written by `sllm.export.baseline_bundle`):
a Hugging Face `save_pretrained` OPTForCausalLM in fp16, its tokenizer and a manifest."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import OPTForCausalLM
from transformers.utils import logging as hf_logging

from sllm.runtime.manifest import BundleError, read_manifest
from sllm.sentences.tokenizer import SentenceTokenizer, TokenizerError

KIND = "baseline"
FOLDER = "baseline"


@dataclass
class LoadedBaseline:
    model: object  # OPTForCausalLM, eval, fp32 on the CPU
    tokenizer: object  # sentences.tokenizer.SentenceTokenizer
    manifest: dict
    path: Path


def load_hf_opt(folder: Path):
    """An OPTForCausalLM saved with save_pretrained, in fp32, eager attention (as the SLLM's
    grafted blocks run: the speed comparison uses the same attention kernels on both sides)."""
    hf_logging.disable_progress_bar()  # its per-tensor bars would bury the caller's own progress lines
    model = OPTForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float16,
                                           attn_implementation="eager")
    return model.float().eval()


def load_baseline_bundle(folder: Path) -> LoadedBaseline:
    """Check every file against the manifest, then load the model (fp32) and the tokenizer."""
    folder = Path(folder)
    manifest = read_manifest(folder, kind=KIND)
    try:
        tok = SentenceTokenizer.load(folder)
    except TokenizerError as e:
        raise BundleError(f"{folder}: {e}") from None
    try:
        model = load_hf_opt(folder)
    except (OSError, ValueError) as e:
        raise BundleError(f"{folder}: cannot load the model ({e})") from None
    return LoadedBaseline(model, tok, manifest, folder)
