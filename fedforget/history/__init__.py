"""Per-round training history: records, the embedded store, and offline verification.

See :mod:`fedforget.history.store` for the on-disk layout and its atomicity guarantees,
:mod:`fedforget.history.heads` for the signed tree heads the server keeps (and refuses to
contradict), and :mod:`fedforget.history.verify` for read-only verification of a run.
"""

from __future__ import annotations

from fedforget.history.heads import ForkedHistoryError, HeadLog, check_resume
from fedforget.history.records import ParticipantRecord, RefusedReply, RoundRecord
from fedforget.history.report import VerifyReport
from fedforget.history.store import HistoryStore, ParticipantUpdate
from fedforget.history.verify import verify_store

__all__ = [
    "ForkedHistoryError",
    "HeadLog",
    "HistoryStore",
    "ParticipantRecord",
    "ParticipantUpdate",
    "RefusedReply",
    "RoundRecord",
    "VerifyReport",
    "check_resume",
    "verify_store",
]
