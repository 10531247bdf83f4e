"""fedforget's own Flower ServerApp: a thin adapter over the library.

It builds fedforget's task (data, model, strategy, train config from the flat run config of
:class:`fedforget.config.RunConfig`) and hands it to the same one call a user's app makes,
:class:`fedforget.strategies.unlearnable.Unlearnable`: train or resume the run into
``fedforget.out-dir``, or (``fedforget.mode = "unlearn"``) serve the withdrawal request
``fedforget unlearn`` ordered. The same app runs on every engine: fedforget's in-process
Grid, ``flwr run .`` with the simulation engine, and a SuperLink with SuperNodes.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedforget.arrays import from_array_record, load_tensors, model_tensors, to_array_record
from fedforget.config import EXTENDABLE_KEYS, RunConfig
from fedforget.measure import TaskMeasure
from fedforget.settings import RunSettings, app_run_config
from fedforget.strategies.unlearnable import Unlearnable
from fedforget.task import build_strategy, load_test_set, new_model, train_config
from fedforget.training import evaluate

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train (or resume), or serve the ordered withdrawal, as ``fedforget.mode`` says."""
    cfg = RunConfig.from_mapping(app_run_config(context.run_config))
    settings = RunSettings.from_run_config(context.run_config)
    training = settings.mode == "train"
    test_set = load_test_set(cfg)
    scratch = new_model(cfg)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        result = evaluate(load_tensors(scratch, from_array_record(arrays)), test_set)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    strategy = Unlearnable(
        build_strategy(cfg), context,
        # the two attacks that train a model (the shadow attack, FedEraser's attack on the
        # original model) follow one setting: off in the cheap mode with no reference
        measure=TaskMeasure(cfg, shadow_attack=settings.wants_shadow_attack(),
                            original_model_attack=settings.wants_shadow_attack(),
                            cache=Path(settings.out_dir) if settings.out_dir else None),
        local_epochs_key="local-epochs",
        # federated evaluation on the clients' held-out splits after the last round
        evaluate_rounds=[cfg.num_rounds] if cfg.holdout_fraction > 0 else [],
        min_nodes=cfg.num_clients if training else None,
        extendable_keys=EXTENDABLE_KEYS,
        **cfg.recording_settings(),
    )
    strategy.start(
        grid=grid,
        initial_arrays=to_array_record(model_tensors(new_model(cfg))),
        num_rounds=cfg.num_rounds,
        train_config=ConfigRecord(dict(train_config(cfg))),
        evaluate_fn=central_evaluate,
    )
