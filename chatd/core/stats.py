"""The daemon's counters, as `chatctl stats` and the metrics show them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    connections: int = 0
    joins: int = 0
    peak_users: int = 0
    messages: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)  # users who left, by reason
    evictions: int = 0
    flood_dropped: int = 0
    kicks: int = 0
    bytes_in: int = 0  # of closed connections; live ones keep their own counts
    bytes_out: int = 0

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def leave(self, reason: str) -> None:
        self.left[reason] = self.left.get(reason, 0) + 1
