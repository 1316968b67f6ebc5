"""Bans kept in force: loaded at start, enforced on whoever they cover, lifted when
they expire (and the state file saved)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatd.core.bans import Ban, Bans, StateError
from chatd.core.states import HANDSHAKE, JOINED
from chatd.wire import notices

if TYPE_CHECKING:
    from chatd.core.chat import Chat

BAN_CHECK_MAX = 86400.0  # seconds: a ban's expiry (wall-clock time) is looked at daily


class Moderation:
    __slots__ = ("chat",)

    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def load_bans(self, bans: Bans) -> None:
        """The bans kept from the last run, at start."""
        self.chat.bans = bans
        for ban in bans.active(self.chat.host.wall()):
            self.watch_expiry(ban)

    def enforce(self, ban: Ban) -> list[str]:
        """Disconnect whoever ``ban`` covers; return the names of the users among them."""
        now = self.chat.host.wall()
        gone = []
        for m in list(self.chat.host.members()):
            if m.state is JOINED:
                if ban.kind == "name":
                    hit = self.chat.bans.match_name(m.name, now) is ban
                else:
                    hit = self.chat.bans.match_address(m.peer_host, now) is ban
                if hit:
                    gone.append(m.name)
                    self.chat.drop(
                        m,
                        "banned",
                        notice=notices.BANNED(terms=ban.terms()),
                        announce=notices.USER_BANNED(
                            name=m.name, reason=notices.parenthesized(ban.reason)
                        ),
                    )
            elif (
                m.state is HANDSHAKE
                and ban.kind == "address"
                and self.chat.bans.match_address(m.peer_host, now) is ban
            ):
                self.chat.reject(m, "banned", notices.ADDRESS_BANNED(terms=ban.terms()))
        return gone

    def prune_bans(self) -> bool:
        """Forget the bans that expired (logged); True if there were any."""
        gone = self.chat.bans.prune(self.chat.host.wall())
        for ban in gone:
            self.chat.log.info("ban_expired", kind=ban.kind, target=ban.target)
        return bool(gone)

    def watch_expiry(self, ban: Ban) -> None:
        """Lift ``ban`` from the state file and the log when it expires."""
        if ban.expires is not None:
            wait = min(ban.expires - self.chat.host.wall() + 0.01, BAN_CHECK_MAX)
            self.chat.host.call_at(self.chat.host.now() + wait, self._expire, ban)

    def _expire(self, ban: Ban) -> None:
        if not ban.expired(self.chat.host.wall()):
            # The wall clock was set back, or the ban is long: look again later.
            self.watch_expiry(ban)
            return
        if self.prune_bans():
            try:
                self.chat.host.save_bans(self.chat.bans)
            except StateError as e:
                self.chat.log.error("state_not_saved", error=str(e))
