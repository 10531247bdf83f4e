"""Post-training: ordinary FedAvg rounds after an unlearning step, without the forgotten.

Several methods end with a few plain rounds of federated training from the unlearned model
(PGA's post-training, FUKD's optional continuation). :func:`post_train` runs them: for
:math:`i = 1, \\dots, k`, the clients :math:`S_{T+i}` chosen by the run's client sampling
among the federation's roster minus the excluded set :math:`X` train from :math:`\\theta`
and

.. math::

    \\theta \\leftarrow \\sum_{c \\in S_{T+i}} \\frac{n_c}{\\sum_{j \\in S_{T+i}} n_j}\\,
        \\theta_c,

where :math:`X` = the request's forget set, its ``exclude`` (every client withdrawn so far)
and the run's withdrawal ledger: a withdrawn client is never asked to train again. The
rounds are plain :meth:`~fedforget.unlearning.base.Federation.train` requests (the same
client-task path and cost accounting as training: each client asked counts its local
epochs), reported to the request's observer as rounds :math:`T+1, \\dots, T+k` and not
recorded in the history.
"""

from __future__ import annotations

from fedforget.config import RunConfig
from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.sampling import ClientSampler
from fedforget.unlearning.base import Federation, TensorDict, UnlearningRequest, weighted_sum


def withdrawn_clients(store: HistoryStore) -> frozenset[str]:
    """Every client that asked to leave this run (the ledger shares the store's index)."""
    from fedforget.withdrawal import WithdrawalLedger

    with WithdrawalLedger(store.directory) as ledger:
        return ledger.withdrawn()


def post_sampler(store: HistoryStore, federation: Federation) -> ClientSampler | None:
    """The run's client sampler: the federation's, else one from a fedforget RunConfig,
    else None (every remaining client trains)."""
    sampler = getattr(federation, "sampler", None)
    if callable(sampler):
        made = sampler(len(federation.roster))
        if isinstance(made, ClientSampler):
            return made
    try:
        cfg = RunConfig.from_mapping(store.run_config)
    except ConfigError:
        return None
    return ClientSampler(seed=cfg.seed, count=cfg.clients_per_round())


def post_train(request: UnlearningRequest, model: TensorDict, *, rounds: int,
               local_epochs: int | None, notes: list[str]) -> TensorDict:
    """``rounds`` FedAvg rounds :math:`T+1, \\dots, T+k` from ``model`` of the clients not
    excluded (see the module docstring); return the last round's model (``model`` itself
    when ``rounds`` is 0, with nothing asked). ``local_epochs`` None: the run's. A round
    without a reply leaves the model unchanged (noted)."""
    if not rounds:
        return model
    store, federation = request.store, request.federation
    last = store.last_round
    exclude = request.forget | request.exclude | withdrawn_clients(store)
    sampler = post_sampler(store, federation)
    for t in range(last + 1, last + 1 + rounds):
        if sampler is not None:
            chosen = sampler.sample(t, federation.roster, exclude=exclude)
        else:
            chosen = [c for c in federation.roster if c not in exclude]
        updates = federation.train(server_round=t, global_model=model, clients=chosen,
                                   local_epochs=local_epochs, task="train")
        replied = [updates[c] for c in chosen if c in updates]
        if not replied:
            notes.append(f"post round {t}: no client replied; the model is unchanged")
            continue
        total = sum(u.num_examples for u in replied)
        model = weighted_sum(((u.num_examples / total, u.local_model) for u in replied), model)
        request.report(t, model)
    left_out = sorted(exclude - request.forget)
    notes.append(f"post-training rounds {last + 1}..{last + rounds}"
                 + (f" without the withdrawn clients {left_out}" if left_out else ""))
    return model
