"""Per-round training history: records, the embedded store, and offline verification.

See :mod:`fedforget.history.store` for the on-disk layout and its atomicity guarantees.
"""

from __future__ import annotations

from fedforget.history.records import ParticipantRecord, RefusedReply, RoundRecord
from fedforget.history.report import VerifyReport
from fedforget.history.store import HistoryStore, ParticipantUpdate
from fedforget.history.verify import verify_store

__all__ = [
    "HistoryStore",
    "ParticipantRecord",
    "ParticipantUpdate",
    "RefusedReply",
    "RoundRecord",
    "VerifyReport",
    "verify_store",
]
