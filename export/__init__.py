"""`sllm-export`: turn a trained checkpoint into the edge bundle (ONNX) and the cloud bundle.

`export.manifest`, `export.edge_bundle` and `export.ort_decode` are imported by the edge
and must stay free of torch and transformers."""
