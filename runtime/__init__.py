"""Torch-free bundle layer, shared by the exporter and the edge: file hashes and atomic writes,
bundle manifests, ONNX Runtime sessions (deliberate provider choice), the SentenceVAE graph
contract with its cached decode loop, the edge bundle reader; child processes and the one launcher
of `sllm-cloud serve` (procs, server_process).

Imports numpy, onnxruntime, tokenizers (via `sentences`), grpc (the launcher's health check, when it
makes one) and the standard library only: an edge install (`pip install '.[edge]'`) has no torch,
transformers or onnx, and this package must run there."""
