"""int8 dynamic quantization of an exported graph (onnxruntime.quantization).

Weights become int8 with per-tensor scales; activations are quantized on the fly at run
time (MatMulInteger). No calibration data is needed.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

QUANT_MODES = ("int8",)


def quantize_int8(src: Path, dst: Path, op_types: tuple[str, ...] = ("MatMul",)) -> Path:
    """Dynamic int8 (signed, per tensor) of the weights of `op_types` nodes.

    Measured on the d=256 model (batch 1, one thread): quantizing "Gather" in the decoder
    makes a step slower (its embedding is tied to the output layer, so the whole table gets
    dequantized at every step); MatMul-only is ~1.4x faster there. In the encoder, Gather
    quantization is cheap and cuts the file ~4x."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "please consider pre-processing" goes to the root logger
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False,
                             op_types_to_quantize=list(op_types),
                             # ONNX's shape inference does not type com.microsoft outputs (fused graphs)
                             extra_options={"DefaultTensorType": 1})  # TensorProto.FLOAT
    finally:
        root.setLevel(level)
    return Path(dst)
