"""The token bucket both ends use: the daemon's flood control, and the client's pacing
that keeps a pipe under it.

A bucket holds up to ``burst`` tokens and gains ``rate`` a second; taking one is
allowed while one is there.  The clock is the caller's: every method takes ``now``.
"""

from __future__ import annotations

import math


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = self.burst  # full at the start
        self.stamp = now  # when ``tokens`` was last brought up to date

    def _refill(self, now: float) -> float:
        tokens = self.tokens + (now - self.stamp) * self.rate
        # equivalent: at exactly the burst, capping to it changes nothing
        if tokens > self.burst:  # pragma: no mutate
            tokens = self.burst
        self.tokens = tokens
        self.stamp = now
        return tokens

    def take(self, now: float) -> bool:
        """Take a token if there is one: True, or False (and nothing changes but the time)."""
        tokens = self._refill(now)
        if tokens < 1.0:
            return False
        self.tokens = tokens - 1.0
        return True

    def full(self, now: float) -> bool:
        """Whether the bucket is full at ``now`` (a flood is over)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst

    def delay(self, now: float) -> float:
        """Seconds from ``now`` until a token is there (0 if one is)."""
        tokens = self._refill(now)
        if tokens >= 1.0:
            return 0.0
        return (1.0 - tokens) / self.rate if self.rate > 0 else math.inf

    def __repr__(self) -> str:
        return f"<TokenBucket {self.tokens:.2f}/{self.burst:g} +{self.rate:g}/s>"
