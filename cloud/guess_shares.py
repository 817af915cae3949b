"""Whose guesses the model thread runs next: fair shares of guessing time between callers.

Speculation is work the cloud does on its own initiative, so one caller must not take it all: a
client that accepts every guess (or rewinds and asks again) would otherwise keep the model thread
guessing for it while another caller's guess waits behind whole batches. The shares are kept per
owner (the caller's credential: `cloud.auth.owner_of`; every session of a server without
authentication is one owner).

Start-time fair queueing over model-thread seconds: each owner has a clock, the guessing time
charged to it; a guess batch is charged when it ends, split over its owners by the tokens each
decoded. `floor` is the clock at which the batch in progress started, and an owner that was idle
starts there, so idle time banks no credit. The batcher runs first the owners whose clocks are
lowest (with those within one QUANTUM of them, so that equally served callers share one batch),
and a batch in progress yields to an owner that has fallen more than a QUANTUM behind it.
"""
from __future__ import annotations

from typing import Iterable

QUANTUM_S = 0.002  # about one guessed sentence on a CPU: how far one owner may run ahead of a waiting one


class GuessShares:
    def __init__(self, quantum_s: float = QUANTUM_S):
        self.quantum_s = quantum_s
        self.clock: dict[str, float] = {}  # owner -> guessing seconds charged (only owners ahead of floor)
        self.floor = 0.0

    def rank(self, owner: str) -> float:
        """Where `owner` stands: its clock, or the floor when it has been idle."""
        return max(self.clock.get(owner, 0.0), self.floor)

    def leaders(self, owners: Iterable[str]) -> set[str]:
        """Of `owners` (those with guesses waiting), the ones to run now: the least served and any
        within one quantum of it."""
        ranks = {o: self.rank(o) for o in owners}
        if not ranks:
            return set()
        least = min(ranks.values())
        return {o for o, r in ranks.items() if r <= least + self.quantum_s}

    def begin(self, owners: Iterable[str]) -> float:
        """A batch of `owners` starts: the floor moves to its start (the least of their ranks)."""
        start = min(self.rank(o) for o in owners)
        self.floor = max(self.floor, start)
        return start

    def behind(self, owner: str, start: float, elapsed_s: float) -> bool:
        """Has `owner` fallen more than a quantum behind a batch that started at `start` and has run
        `elapsed_s` (its own time, not the work it yielded to)?"""
        return self.rank(owner) + self.quantum_s < start + elapsed_s

    def charge(self, tokens_by_owner: dict[str, int], seconds: float) -> dict[str, float]:
        """A batch ended: `seconds` of guessing split over its owners by the tokens each decoded; the
        seconds charged to each."""
        total = sum(tokens_by_owner.values())
        shares = {owner: seconds * (tokens / total if total else 1 / len(tokens_by_owner))
                  for owner, tokens in tokens_by_owner.items()}
        for owner, share in shares.items():
            self.clock[owner] = self.rank(owner) + share
        # owners at or below the floor would restart there anyway: forget them (bounded memory)
        self.clock = {o: c for o, c in self.clock.items() if c > self.floor}
        return shares
