"""Which ONNX Runtime execution provider the edge runs on, chosen deliberately and quietly.

onnxruntime-gpu lists CUDAExecutionProvider even on a machine without a GPU or without the
CUDA libraries; asking for it there prints a red error and silently falls back to the CPU.
So: CUDA is tried only when the build has it and an NVIDIA device is present, the attempt
runs with ORT's logger at "fatal only", and a session counts as CUDA only when
`session.get_providers()` really starts with CUDAExecutionProvider. Everything else runs on
CPUExecutionProvider. (TensorRT is never picked: it builds engines at load time.)
"""
from __future__ import annotations

import glob
import sys

import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
ERRORS_ONLY, FATAL_ONLY = 3, 4


class ProviderError(RuntimeError):
    """--device cuda asked for, but CUDA cannot run here (the message says why)."""


LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session_options(threads: int = 0, severity: int = ERRORS_ONLY, level: str = "all",
                    spinning: bool = True) -> ort.SessionOptions:
    """threads: intra-op threads (0 = ORT chooses: one per physical core). level: graph
    optimisation (`LEVELS`; "all" is ORT's default; on our decoder "extended" gives the same
    graph, bench/edge_decoder.py). spinning=False: pool threads sleep between runs instead of
    spinning (matters only with more than one thread, on a CPU shared with other processes)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = severity
    opts.graph_optimization_level = LEVELS[level]
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def cpu_session(path: str, threads: int = 0, **options) -> ort.InferenceSession:
    """A session on the CPU provider only (the exporter's checks, the edge's default);
    `options`: level / spinning of `session_options`."""
    return ort.InferenceSession(str(path), session_options(threads, **options), providers=[CPU])


def cuda_unavailable_reason() -> str | None:
    """Why CUDA is not worth trying here, or None when it may load."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    if sys.platform.startswith("linux") and not glob.glob("/dev/nvidia[0-9]*"):
        return "no NVIDIA GPU device (/dev/nvidia*) on this machine"
    return None


def cuda_session(path: str, threads: int = 0) -> tuple[ort.InferenceSession | None, str]:
    """(a session whose first provider really is CUDA, "") or (None, why not); prints nothing."""
    reason = cuda_unavailable_reason()
    if reason:
        return None, reason
    ort.set_default_logger_severity(FATAL_ONLY)  # the provider bridge logs its load failure here
    try:
        session = ort.InferenceSession(str(path), session_options(threads, FATAL_ONLY), providers=[CUDA, CPU])
    except Exception as e:  # noqa: BLE001 - any failure to load CUDA means: not CUDA
        return None, f"the CUDA provider failed to load ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    finally:
        ort.set_default_logger_severity(ERRORS_ONLY)
    if session.get_providers()[0] != CUDA:
        return None, "the CUDA provider did not load (missing CUDA/cuDNN libraries or no usable GPU)"
    return session, ""


def open_sessions(paths: list[str], device: str = "auto", threads: int = 0,
                  cpu_sessions: list | None = None) -> tuple[list, str, str]:
    """Sessions for `paths` on the chosen device -> (sessions, provider name, note).

    device: "cpu", "cuda" (ProviderError when CUDA does not really load) or "auto" (CUDA when
    it really loads, else CPU). `cpu_sessions`, when given, are reused for the CPU case.
    The note says why CUDA was tried and not used (a GPU machine whose CUDA libraries are
    missing); it is empty when CUDA was used, not asked for, or not worth trying (no GPU)."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    note = ""
    if device in ("auto", "cuda"):
        not_here = cuda_unavailable_reason()
        first, why = (None, not_here) if not_here else cuda_session(paths[0], threads)
        if first is not None:
            rest = [ort.InferenceSession(str(p), session_options(threads), providers=[CUDA, CPU]) for p in paths[1:]]
            if all(s.get_providers()[0] == CUDA for s in rest):
                return [first, *rest], CUDA, ""
            why = "the CUDA provider loaded for one graph but not for another"
        if device == "cuda":
            raise ProviderError(f"--device cuda: {why}")
        note = "" if not_here else f"running on the CPU: {why}"
    if cpu_sessions is None:
        cpu_sessions = [cpu_session(p, threads) for p in paths]
    return cpu_sessions, CPU, note
