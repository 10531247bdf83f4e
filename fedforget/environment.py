"""What decides the floating-point results of this process, recorded beside them.

The same code, seeds and data give bit-identical models only on the same kernels. PyTorch
picks its CPU kernels when it starts, by what the processor offers (AVX2, AVX-512, ...):
a 20-round run of the demo configuration ended with another model digest on an AVX-512
machine than on an AVX2 one, and the same digest again on the AVX-512 machine once
``ATEN_CPU_CAPABILITY=avx2`` made PyTorch use its AVX2 kernels (seen 2026-12-04, PyTorch
2.13.0). Results therefore carry the environment that computed them
(:func:`compute_environment`): a cached retrained reference computed under other kernels is
still used, but the result says that bit identity with it was not to be expected
(:func:`environment_differences`), and an experiment's ``results.csv`` has one ``env_*``
column per entry, per cell. The environment is the recording process's: in a deployment
that is the server's, while the clients train on machines it does not know (a deployment's
models are bit-identical only where the clients' kernels are unchanged as well).

Set ``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``; PyTorch reads it once, at its
first use) to reproduce digests recorded under other kernels.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["FLOAT_KEYS", "compute_environment", "environment_differences"]

# The entries that decide floating-point results (a difference in any of them can change
# the last bits of a model); the others are recorded for the reader only.
FLOAT_KEYS = ("torch", "cpu_capability", "numpy", "machine")


def compute_environment() -> dict[str, str]:
    """PyTorch's version and the CPU kernels it dispatches to (``AVX2``, ``AVX512``, ...),
    NumPy's version, the processor architecture and Python's version of this process."""
    return {
        "torch": torch.__version__,
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def environment_differences(recorded: Mapping[str, str] | None,
                            current: Mapping[str, str]) -> list[str]:
    """The :data:`FLOAT_KEYS` entries in which ``recorded`` differs from ``current``, each
    as ``"key: recorded -> current"``; empty when ``recorded`` is None (not recorded: not
    known to differ) or equal on all of them."""
    if recorded is None:
        return []
    return [f"{key}: {recorded.get(key, '?')} -> {current.get(key, '?')}"
            for key in FLOAT_KEYS if recorded.get(key) != current.get(key)]
