"""Everything a Flower app needs to become unlearnable, from the installed package.

.. code-block:: python

    # server_app.py
    from fedforget.flower import Unlearnable
    strategy = Unlearnable(FedAvg(...), context)      # then strategy.start(...) as before

    # client_app.py
    from fedforget.flower import unlearning_mod
    app = ClientApp(mods=[unlearning_mod])

* :class:`Unlearnable` (:mod:`fedforget.strategies.unlearnable`): the server side — records
  the run, and in unlearning mode serves the ordered withdrawal with the app's strategy;
* :func:`unlearning_mod` (:mod:`fedforget.clients.mod`): the client side — identify, tag,
  seed, keep the tree head (the protocol of :mod:`fedforget.protocol`);
* :class:`HistoryRecording` (:mod:`fedforget.strategies.history`): the recording wrapper
  alone, for apps that drive their rounds themselves;
* :class:`EvaluateFnMeasure` / :class:`Measure` (:mod:`fedforget.measure`): how results are
  compared.
"""

from __future__ import annotations

from fedforget.clients.mod import client_id_of, state_dir_of, unlearning_mod
from fedforget.measure import EvaluateFnMeasure, Measure
from fedforget.strategies.history import HistoryRecording
from fedforget.strategies.unlearnable import Unlearnable

__all__ = [
    "EvaluateFnMeasure",
    "HistoryRecording",
    "Measure",
    "Unlearnable",
    "client_id_of",
    "state_dir_of",
    "unlearning_mod",
]
