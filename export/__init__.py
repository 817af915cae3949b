"""`export`: turn a trained checkpoint into the edge bundle (ONNX) and the cloud bundle.

`export.manifest` is imported by the edge and must stay free of torch."""
