"""sllm: sentence-level language models (SentenceVAE + OPT) split between an edge client and a cloud
service. Each layer is a subpackage: sllm.sentences, sllm.runtime, sllm.protos, sllm.edge (torch-free),
sllm.modeling, sllm.cloud, sllm.training, sllm.export (torch). The repository keeps one top-level
folder per layer; the packaging maps them under this name (pyproject.toml)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sllm")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
