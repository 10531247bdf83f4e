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
fastfedul    Fast-FedUL skew recursion (Huynh et al., 2024)        no     none
fukd         subtraction + server distillation (Wu et al., 2022)   no     none (proxy data)
sifu         certified rollback + noise (Fraboni et al., 2024)     no     T - T~ rounds
crab         selected-round recovery (Jiang et al., 2024)          no     selected rounds
===========  ====================================================  =====  ==================
"""

from __future__ import annotations

from fedforget.unlearning.base import (
    METHOD_MODULES,
    METHODS,
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

__all__ = [
    "METHODS",
    "METHOD_MODULES",
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
    "register",
]
