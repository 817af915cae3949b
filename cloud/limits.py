"""Process limits the server sets at start: file descriptors (connections) and how freed memory goes
back to the system. Must never lower a limit the operator raised."""
from __future__ import annotations

import ctypes
import ctypes.util

FD_RESERVE = 256  # descriptors kept for files, the metrics endpoint, torch and the logs
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 128 << 10  # allocations from here up are mapped, and unmapped when freed


def connection_limit(asked: int = 0) -> int:
    """Connections grpc may hold: `asked`, or when 0 the descriptor limit less FD_RESERVE, the soft
    limit first raised to the hard one (a default of 1,024 would let 1,000 idle sockets take the server).
    An `asked` above what the descriptors allow is capped to them."""
    try:
        import resource
    except ImportError:  # not POSIX
        return asked or 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            soft = hard if soft == resource.RLIM_INFINITY else soft
    room = max(16, soft - FD_RESERVE)
    return min(asked, room) if asked else room


def return_freed_memory() -> bool:
    """glibc: a fixed mmap threshold, so freed KV caches (large tensors) go back to the system at once;
    by default the threshold grows with every large free and later caches come from a heap that
    never shrinks (a rollback attack grew RSS far past the KV budget). False where it does not apply."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
