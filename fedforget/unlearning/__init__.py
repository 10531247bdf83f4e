"""Unlearning methods, one module each, registered by name.

===========  ====================================================  =====  ==================
name         method                                                exact  client work
===========  ====================================================  =====  ==================
retrain      retrain from θ_0 without the forgotten clients        yes    all rounds
rollback     restore θ before their first contribution, replay     yes    T − t0 + 1 rounds
federaser    FedEraser (Liu et al., IWQoS 2021)                    no     r·E, kept rounds
subtract     remove stored weighted contributions (FedAccum-like)  no     none (or repair)
fedrecovery  FedRecovery (Zhang et al., TIFS 2023)                 no     none
fedrecover   FedRecover (Cao et al., S&P 2023)                     no     some rounds
pga          projected gradient ascent (Halimi et al., 2022)       no     the leaving client
===========  ====================================================  =====  ==================
"""

from __future__ import annotations

import importlib

from fedforget.unlearning.base import (
    REGISTRY,
    ClientUpdate,
    Cost,
    Federation,
    MethodParams,
    RetentionError,
    Unlearner,
    UnlearningError,
    UnlearningRequest,
    UnlearningResult,
    get_method,
    register,
)

METHOD_MODULES = (
    "retrain", "rollback", "federaser", "subtract", "fedrecovery", "fedrecover", "pga"
)


def load_methods() -> None:
    """Import every shipped method module (each registers itself)."""
    for name in METHOD_MODULES:
        try:
            importlib.import_module(f"fedforget.unlearning.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fedforget.unlearning.{name}":
                raise


__all__ = [
    "REGISTRY",
    "ClientUpdate",
    "Cost",
    "Federation",
    "MethodParams",
    "RetentionError",
    "Unlearner",
    "UnlearningError",
    "UnlearningRequest",
    "UnlearningResult",
    "get_method",
    "load_methods",
    "register",
]
