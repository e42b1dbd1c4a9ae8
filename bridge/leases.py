"""Leases: which worker holds which queued deliveries.

Owns the lease table of the queue. Only :class:`bridge.store.Store` changes it: the store
hands leases out (a due-query, or an enqueue handing new rows straight to a caught-up
worker) and takes them back (delivered, retry, dead, released, the worker retired), so no
other code mutates a lease set. A lease hides a row from every other query. A row that is
*sending* (claimed for an attempt) is also immune to ``drop_oldest``; a row that is only
*held* (prefetched, waiting in a worker's ready queue) is not: the quota revokes it, and the
worker's claim of it fails, so the worker reads the queue again in order (SPEC §5: the
oldest queued deliveries go first, whatever is prefetched).

The writer thread grants and revokes, the event loop claims and releases: every method
takes one lock, held for a few dictionary operations.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Collection, Iterable
from typing import Any, Protocol


class Holder(Protocol):
    """A lease holder (a webhook's worker): it may be handed new rows directly."""

    def offer(self, rows: list[Any]) -> None: ...


class Leases:
    """The lease table (see the module docstring). Holders are compared by identity."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: dict[int, Holder] = {}
        self._sending: set[int] = set()
        # webhook -> the holder that takes that webhook's new rows straight from the enqueue
        self._handoff: dict[str, Holder] = {}
        self._retired: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- reading ---------------------------------------------------------------------------

    def __contains__(self, row_id: object) -> bool:
        return row_id in self._holder

    def __len__(self) -> int:
        return len(self._holder)

    def ids(self, holder: Holder | None = None) -> set[int]:
        """A snapshot of the leased ids (of ``holder`` only, when given)."""
        with self._lock:
            if holder is None:
                return set(self._holder)
            return {i for i, h in self._holder.items() if h is holder}

    def handoff_holder(self, webhook: str) -> Holder | None:
        return self._handoff.get(webhook)

    def hands_off_to(self, holder: Holder) -> bool:
        return any(h is holder for h in self._handoff.values())

    # -- granting and taking back (the store calls these) -------------------------------

    def grant(self, holder: Holder, ids: Iterable[int]) -> list[int]:
        """Lease ``ids`` to ``holder``; ids another holder has are left alone, and a
        retired holder gets nothing. Returns the ids now held by ``holder``."""
        with self._lock:
            if holder in self._retired:
                return []
            granted = []
            for row_id in ids:
                owner = self._holder.setdefault(row_id, holder)
                if owner is holder:
                    granted.append(row_id)
            return granted

    def claim(self, holder: Holder, ids: Collection[int]) -> bool:
        """Rows about to be sent: all or nothing. False when any of them is no longer
        ``holder``'s (the quota dropped it): then nothing is claimed."""
        with self._lock:
            if any(self._holder.get(i) is not holder for i in ids):
                return False
            self._sending.update(ids)
            return True

    def release(self, holder: Holder, ids: Iterable[int]) -> None:
        """Take back ``holder``'s leases on ``ids`` (ids it does not hold are ignored)."""
        with self._lock:
            for row_id in ids:
                if self._holder.get(row_id) is holder:
                    del self._holder[row_id]
                    self._sending.discard(row_id)

    def revoke_unless_sending(self, row_id: int) -> bool:
        """The quota wants to drop a row: revoke its lease unless it is being sent.
        True when the row may be dropped."""
        with self._lock:
            if row_id in self._sending:
                return False
            self._holder.pop(row_id, None)
            return True

    def start_handoff(self, webhook: str, holder: Holder) -> None:
        with self._lock:
            if holder not in self._retired:
                self._handoff[webhook] = holder

    def stop_handoff(self, holder: Holder) -> None:
        with self._lock:
            for webhook in [w for w, h in self._handoff.items() if h is holder]:
                del self._handoff[webhook]

    def retire(self, holder: Holder) -> None:
        """``holder`` stops: its rows that are not being sent go back to the queue, and
        nothing is granted to it any more (a read it started may still finish). Rows it is
        sending stay leased until their outcome is committed."""
        with self._lock:
            self._retired.add(holder)
            for webhook in [w for w, h in self._handoff.items() if h is holder]:
                del self._handoff[webhook]
            for row_id in [i for i, h in self._holder.items()
                           if h is holder and i not in self._sending]:
                del self._holder[row_id]
