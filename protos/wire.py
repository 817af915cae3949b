"""Sentence vectors <-> the `sllm.v1.Vectors` message. numpy only: the edge imports this
without torch, the cloud uses the same checks on what it receives."""
from __future__ import annotations

import numpy as np

from sllm.protos.v1 import sllm_pb2 as pb

# wire dtype enum -> little-endian numpy dtype
NUMPY_DTYPES: dict[int, np.dtype] = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT16: np.dtype("<f2")}
DTYPE_NAMES = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_FLOAT16: "float16"}
WIRE_DTYPES = {name: code for code, name in DTYPE_NAMES.items()}


class WireError(ValueError):
    """A Vectors message that does not hold what it says (the server answers INVALID_ARGUMENT)."""


def wire_dtype(dtype: str | int | np.dtype) -> int:
    """'float32' / 'float16' / np.float16 / a DType enum value -> the DType enum value."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype not in NUMPY_DTYPES:
            raise WireError(f"unsupported vector dtype enum {dtype}; use DTYPE_FLOAT32 or DTYPE_FLOAT16")
        return dtype
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in WIRE_DTYPES:
        raise WireError(f"unsupported vector dtype {name!r}; use float32 or float16")
    return WIRE_DTYPES[name]


def pack(vectors, dtype: str | int | np.dtype = "float32", check: bool = True) -> pb.Vectors:
    """[d] or [n, d] array -> Vectors (count n, dim d) in `dtype`. With `check`, NaN/Inf (also
    from float16 overflow, |x| > 65504) raise WireError here instead of at the server."""
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise WireError(f"expected vectors shaped [d] or [n, d] with n, d >= 1, got {arr.shape}")
    code = wire_dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.ascontiguousarray(arr, dtype=NUMPY_DTYPES[code])
    if check and not np.isfinite(cast).all():
        raise WireError(f"vectors hold NaN or Inf as {DTYPE_NAMES[code]} (overflow beyond that dtype's range?)")
    data = cast.tobytes()
    return pb.Vectors(data=data, dtype=code, dim=arr.shape[1], count=arr.shape[0])


def unpack(msg: pb.Vectors, dim: int | None = None, max_abs: float | None = None, what: str = "vectors") -> np.ndarray:
    """Vectors -> float32 array [count, dim], after checking every field.

    Raises WireError with a message naming the field: unknown dtype, zero or wrong dim,
    zero count, a byte length that disagrees with count * dim * itemsize, NaN/Inf, or a
    value beyond `max_abs`."""
    if msg.dtype not in NUMPY_DTYPES:
        raise WireError(f"{what}.dtype is {pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype}"
                        "; use DTYPE_FLOAT32 or DTYPE_FLOAT16")
    if msg.dim == 0:
        raise WireError(f"{what}.dim is 0")
    if dim is not None and msg.dim != dim:
        raise WireError(f"{what}.dim is {msg.dim}, this model's sentence vectors have d={dim}")
    if msg.count == 0:
        raise WireError(f"{what}.count is 0: send at least one vector")
    np_dtype = NUMPY_DTYPES[msg.dtype]
    expected = msg.count * msg.dim * np_dtype.itemsize
    if len(msg.data) != expected:
        raise WireError(f"{what}.data holds {len(msg.data)} bytes; count={msg.count} x dim={msg.dim} x "
                        f"{np_dtype.itemsize} ({DTYPE_NAMES[msg.dtype]}) = {expected}")
    arr = np.frombuffer(msg.data, dtype=np_dtype).reshape(msg.count, msg.dim).astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise WireError(f"{what} hold NaN or Inf (first in vector {row})")
    if max_abs is not None and arr.size and float(np.abs(arr).max()) > max_abs:
        raise WireError(f"{what} hold a value of magnitude {float(np.abs(arr).max()):.3g}, over the limit {max_abs:g}")
    return arr
