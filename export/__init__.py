"""`sllm-export`: turn a trained checkpoint into the edge bundle (ONNX) and the cloud bundle.

`sllm.runtime.manifest`, `sllm.runtime.edge_bundle` and `sllm.runtime.svae_onnx` are imported by the edge
and must stay free of torch and transformers."""
