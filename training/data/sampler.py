"""The batches of an epoch without holding the epoch: (seed, epoch, batch number) -> item ids.

The epoch's order is a pseudo-random permutation of the items, evaluated where it is needed (a
Feistel network over the next power of four, cycle-walked into [0, n)), not stored: memory does not
grow with the dataset. Its batches come in windows of WINDOW_BATCHES: a window's items are sorted
by length when bucketing (little padding), cut into batches, and the window's batches are taken in
a seeded order. A batch is a pure function of (seed, epoch, number), so a resumed run, and each DDP
rank (taking batches rank, rank + world, ...), reads exactly the batches it would have read.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

WINDOW_BATCHES = 64
_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed bijection of uint64 that scrambles every bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> int:
    x = np.zeros(1, dtype=np.uint64)
    for p in parts:
        x = _mix(x ^ np.uint64(p & 0xFFFFFFFFFFFFFFFF))
    return int(x[0])


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """Position `index` (int64 array, each in [0, n)) of a pseudo-random permutation of [0, n) chosen by `key`."""
    index = np.asarray(index, dtype=np.int64)
    if n <= 1:
        return index.copy()
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # the network permutes [0, 4**half) >= n
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(_key(key, r)) for r in range(_ROUNDS)]

    def network(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = network(index.astype(np.uint64))
    outside = out >= np.uint64(n)
    while outside.any():  # cycle-walk: stays a bijection of [0, n); on average < 4 steps
        out[outside] = network(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


class EpochBatches:
    """Batches of item ids: `batch(epoch, b)` for b < len(self) (the last partial batch is dropped)."""

    def __init__(self, n_items: int, lengths: Callable[[np.ndarray], np.ndarray], batch_size: int, seed: int,
                 bucket: bool):
        self.n, self.lengths, self.batch_size, self.seed, self.bucket = n_items, lengths, batch_size, seed, bucket
        self._window: tuple[int, int, list[np.ndarray]] | None = None  # (epoch, window, its batches)

    def __len__(self) -> int:
        return self.n // self.batch_size

    def batch(self, epoch: int, b: int) -> np.ndarray:
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} of {len(self)}")
        w, j = divmod(b, WINDOW_BATCHES)
        if self._window is None or self._window[:2] != (epoch, w):
            self._window = (epoch, w, self._window_batches(epoch, w))
        return self._window[2][j]

    def _window_batches(self, epoch: int, w: int) -> list[np.ndarray]:
        bs = self.batch_size
        first = w * WINDOW_BATCHES
        n_batches = min(WINDOW_BATCHES, len(self) - first)
        items = permute(np.arange(first * bs, (first + n_batches) * bs), self.n, _key(self.seed, epoch))
        if not self.bucket:
            return [items[i * bs : (i + 1) * bs] for i in range(n_batches)]
        items = items[np.argsort(self.lengths(items), kind="stable")]
        order = permute(np.arange(n_batches), n_batches, _key(self.seed, epoch, w))
        return [items[i * bs : (i + 1) * bs] for i in order]
