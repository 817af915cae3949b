"""Torch-free bundle layer, shared by the exporter and the edge: file hashes and atomic writes,
bundle manifests, ONNX Runtime sessions (deliberate provider choice), the SentenceVAE graph
contract with its cached decode loop, and the edge bundle reader.

Imports numpy, onnxruntime, tokenizers (via `sentences`) and the standard library only: an edge
install (`pip install sllm[edge]`) has no torch, transformers or onnx, and this package must run there."""
