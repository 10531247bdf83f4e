"""The one exception hierarchy of fedforget.

Every error raised on purpose by fedforget derives from :class:`FedForgetError`.
Messages name the offending value and what was expected.
"""

from __future__ import annotations


class FedForgetError(Exception):
    """Base class of every error raised by fedforget."""


class ConfigError(FedForgetError, ValueError):
    """A configuration key or value is invalid (the message names the key)."""


class DataError(FedForgetError):
    """A data set could not be loaded or partitioned."""


class HistoryError(FedForgetError):
    """The history store cannot be used as asked (missing, locked, incompatible)."""


class IntegrityError(HistoryError):
    """A stored record or blob does not match its digest, or is missing."""


class ClientReplyError(FedForgetError):
    """A client's reply was refused (NaN/Inf values, wrong keys or shapes)."""


class RoundFailedError(FedForgetError):
    """A round could not be completed under the configured reply policy."""
