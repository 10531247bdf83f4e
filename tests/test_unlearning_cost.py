"""What an unlearning costs to measure: the reference policy, the per-client impact sample,
the shadow attack, a cached reference that no longer matches its history, and the
experiment keys that set them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import train_small

from fedforget.cache import FederationCache
from fedforget.cli import main
from fedforget.engine import run_training
from fedforget.errors import ConfigError
from fedforget.experiments.runner import cell_fingerprint
from fedforget.experiments.spec import parse_experiment
from fedforget.history import HistoryStore
from fedforget.measure import MeasureContext, common_figures
from fedforget.results import ReferenceRecord
from fedforget.rundir import RESULT_FILE, RunDirectory
from fedforget.unlearning.base import Cost


def _unlearn(run: Path, client: str, method: str, *extra: str,
             capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["unlearn", str(run), "--client", client, "--method", method, "--json",
                 "--quiet", *extra]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- impact sample
class AskedFederation:
    """Records which clients were asked to evaluate; each answers 0.5 (before), 0.25."""

    def __init__(self, roster: list[str]) -> None:
        self.roster = tuple(roster)
        self.asked: list[list[str]] = []

    def evaluate_local(self, model: dict[str, np.ndarray], clients: list[str]
                       ) -> dict[str, float]:
        self.asked.append(list(clients))
        value = 0.5 if model["w"][0] == 0 else 0.25
        return {c: value for c in clients}


def _context(store: Any, federation: Any, *, impact_clients: int, seed: int = 3
             ) -> MeasureContext:
    return MeasureContext(
        store=store, federation=federation, forget=frozenset({"c00"}),
        not_remaining=frozenset({"c00"}), original={"w": np.zeros(2, np.float32)},
        unlearned={"w": np.ones(2, np.float32)}, retrained=None, method_cost=Cost(),
        retrain_cost=None, impact_clients=impact_clients, seed=seed)


class _Store:
    def bytes_stored(self) -> int:
        return 7


def test_the_impact_is_asked_of_a_seeded_sample_of_the_remaining_clients() -> None:
    # Prepare: 40 clients, c00 forgotten; a sample of 5
    roster = [f"c{i:02d}" for i in range(40)]
    federation = AskedFederation(roster)
    ctx = _context(_Store(), federation, impact_clients=5)
    # Execute
    figures = common_figures(ctx)
    again = _context(_Store(), AskedFederation(roster), impact_clients=5).impact_sample()
    other_seed = _context(_Store(), AskedFederation(roster), impact_clients=5,
                          seed=4).impact_sample()
    # Assert: both models asked of the same 5 remaining clients; the same 5 for the same
    # seed, others for another seed; the sample is stated in the figures
    assert len(federation.asked) == 2 and federation.asked[0] == federation.asked[1]
    asked = federation.asked[0]
    assert len(asked) == 5 and len(set(asked)) == 5 and "c00" not in asked
    assert asked == sorted(asked) == again
    assert other_seed != asked
    assert figures["client_impact_sample"] == {"asked": 5, "remaining": 39, "seed": 3}
    assert sorted(figures["client_accuracy"]["original"]) == asked


@pytest.mark.parametrize("impact_clients", [0, 39, 100])
def test_every_remaining_client_is_asked_when_the_sample_would_hold_them_all(
        impact_clients: int) -> None:
    roster = [f"c{i:02d}" for i in range(40)]
    federation = AskedFederation(roster)
    figures = common_figures(_context(_Store(), federation, impact_clients=impact_clients))
    assert federation.asked[0] == roster[1:]
    assert figures["client_impact_sample"] is None


# ------------------------------------------------------------ the CLI's settings
def test_unlearn_without_reference_shadow_attack_or_every_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: 6 clients
    run = tmp_path / "run"
    train_small(run, **{"num-clients": 6})
    # Execute
    result = _unlearn(run, "client-001", "subtract", "--reference", "none",
                      "--impact-clients", "2", capsys=capsys)
    # Assert: no reference, no shadow attack (auto: none without a reference), 2 of the 5
    # remaining clients asked
    assert result["reference"]["status"] == "none"
    assert result["metrics"]["shadow_attack"] is None
    assert result["metrics"]["client_impact_sample"] == {"asked": 2, "remaining": 5, "seed": 7}
    assert len(result["metrics"]["client_accuracy"]["original"]) == 2
    assert not RunDirectory(run).reference_dir(["client-001"]).exists()


def test_a_negative_impact_sample_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["unlearn", "x", "--client", "c", "--method", "subtract", "--impact-clients",
              "-1"])
    assert "-1 is negative; expected an integer >= 0" in capsys.readouterr().err


# ------------------------------------------------------------ reference validity
def test_a_reference_of_another_history_is_not_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a reference for client-001 after 3 rounds, then the run extended to 4
    run = tmp_path / "run"
    train_small(run)
    first = _unlearn(run, "client-001", "subtract", "--shadow-attack", "off", capsys=capsys)
    assert first["reference"]["status"] == "computed"
    from conftest import small_config

    run_training(small_config(**{"num-rounds": 4}), out=run, progress=False)
    # Execute
    cached = _unlearn(run, "client-001", "subtract", "--reference", "cached",
                      "--shadow-attack", "off", capsys=capsys)
    computed = _unlearn(run, "client-001", "subtract", "--shadow-attack", "on",
                        capsys=capsys)
    # Assert: the stale reference is not offered as cached; compute retrains it (4 rounds)
    assert cached["reference"]["status"] == "none"
    assert computed["reference"]["status"] == "computed"
    assert computed["reference"]["model_digest"] != first["reference"]["model_digest"]
    assert first["metrics"]["shadow_attack"] is None
    assert set(computed["metrics"]["shadow_attack"]) == {"original", "unlearned", "retrained"}
    record = ReferenceRecord.read(RunDirectory(run).reference_dir(["client-001"]) / RESULT_FILE)
    with HistoryStore.open(run) as store:
        assert record.trained_rounds == store.last_round == 4
        assert record.original_model_digest == store.model_digest(4)


def test_reference_validity_by_hand() -> None:
    record = ReferenceRecord(forgotten=["a"], model_path="m", model_digest="d", cost=Cost(),
                             rounds_affected=[1, 2, 3], history_dir=None, trained_rounds=3,
                             original_model_digest="sha256:x")
    assert record.valid_for(rounds=3, original_model_digest="sha256:x")
    assert not record.valid_for(rounds=3, original_model_digest="sha256:y")
    assert not record.valid_for(rounds=4, original_model_digest="sha256:x")
    older = ReferenceRecord(forgotten=["a"], model_path="m", model_digest="d", cost=Cost(),
                            rounds_affected=[1, 2, 3], history_dir=None)
    assert older.valid_for(rounds=3, original_model_digest="anything")
    assert not older.valid_for(rounds=5, original_model_digest="anything")


# ------------------------------------------------------------ experiment keys
def _doc(**experiment: Any) -> dict[str, Any]:
    return {"experiment": {"name": "x", "forget": ["client-001"], **experiment},
            "run": {"num-clients": 3, "num-rounds": 2, "dataset": "synthetic"},
            "methods": {"subtract": {}}}


def test_experiment_measurement_keys() -> None:
    spec = parse_experiment(_doc(reference="cached", **{"impact-clients": 7,
                                                       "shadow-attack": False}))
    assert (spec.reference, spec.impact_clients, spec.shadow_attack) == ("cached", 7, "off")
    default = parse_experiment(_doc())
    assert (default.reference, default.impact_clients, default.shadow_attack) == (
        "compute", 100, "auto")
    cell, other = default.cells()[0], spec.cells()[0]
    assert cell_fingerprint(default, cell) != cell_fingerprint(spec, other)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("reference", "sometimes", "[experiment] reference = 'sometimes'; expected one of "
                               "'compute', 'cached', 'none'"),
    ("impact-clients", -2, "[experiment] impact-clients = -2; expected an integer >= 0"),
    ("shadow-attack", "no", "[experiment] shadow-attack = 'no'; expected true, false or "
                            "'auto'"),
])
def test_bad_experiment_measurement_keys_are_refused(key: str, value: Any, message: str
                                                     ) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_experiment(_doc(**{key: value}))


# ------------------------------------------------------------ the federation cache
def test_the_cache_keeps_as_many_entries_as_asked() -> None:
    cache: FederationCache[int] = FederationCache(minimum=2)
    computed: list[int] = []

    def value(k: int) -> int:
        computed.append(k)
        return k * 10

    for k in range(6):
        assert cache.get(k, lambda k=k: value(k), capacity=4) == k * 10
    assert len(cache) == 4  # 0 and 1 dropped, least recently used first
    assert cache.get(5, lambda: value(99), capacity=4) == 50  # a hit
    cache.get(0, lambda: value(0), capacity=4)  # computed again
    assert computed == [0, 1, 2, 3, 4, 5, 0]
    cache.get(9, lambda: value(9), capacity=1)  # never below the minimum
    assert len(cache) == 2


@pytest.mark.parametrize(("shadow", "reference", "runs"), [
    ("auto", "compute", True), ("auto", "cached", True), ("auto", "none", False),
    ("on", "none", True), ("off", "compute", False)])
def test_when_the_shadow_attack_runs(shadow: str, reference: str, runs: bool) -> None:
    from fedforget.settings import RunSettings

    assert RunSettings(shadow_attack=shadow, reference=reference).wants_shadow_attack() is runs


def test_a_bad_shadow_setting_is_refused() -> None:
    from fedforget.settings import RunSettings

    with pytest.raises(ConfigError, match=re.escape(
            "fedforget.shadow-attack = 'yes' is not allowed; expected one of 'auto', 'on', "
            "'off'")):
        RunSettings.from_run_config({"fedforget.shadow-attack": "yes"})


# ------------------------------------------------------------ the shadow model, kept
def test_the_kept_shadow_model_gives_run_shadow_attack_s_attack(tmp_path: Path) -> None:
    from conftest import small_config

    from fedforget.evaluation import run_shadow_attack
    from fedforget.measure import cached_shadow_attack
    from fedforget.task import load_client_data, load_test_set, new_model

    # Prepare
    cfg = small_config()
    test = load_test_set(cfg)
    members, non_members = load_client_data(cfg, 0)
    target = new_model(cfg)
    run = RunDirectory(tmp_path / "run")
    # Execute: the recipe itself, then trained and kept, then loaded from what was kept
    expected = run_shadow_attack(cfg, test).attack(target, members, non_members)
    first = cached_shadow_attack(cfg, test, run).attack(target, members, non_members)
    kept = sorted(p.relative_to(run.path).as_posix() for p in run.path.rglob("*")
                  if p.is_file())
    model_file = next(run.path.rglob("model.fft"))
    stamp = model_file.stat().st_mtime_ns
    second = cached_shadow_attack(cfg, test, run).attack(target, members, non_members)
    # Assert
    assert first == expected and second == expected
    assert [Path(k).name for k in kept] == ["attack.json", "attack.npz", "model.fft",
                                            "shadow.json"]
    assert all(k.startswith("unlearned/shadow-") for k in kept)
    assert model_file.stat().st_mtime_ns == stamp  # loaded, not trained and written again
    # A kept model that does not match its digest is trained again (and replaced).
    data = model_file.read_bytes()
    model_file.write_bytes(data[:-1] + bytes([data[-1] ^ 0x40]))
    third = cached_shadow_attack(cfg, test, run).attack(target, members, non_members)
    assert third == expected
    assert model_file.read_bytes() == data  # trained again: the same model
    # A kept attack model that does not match its digest is fitted again (and replaced).
    attack_file = model_file.parent / "attack.npz"
    kept_attack = attack_file.read_bytes()
    attack_file.write_bytes(kept_attack[:-1] + bytes([kept_attack[-1] ^ 0x40]))
    assert cached_shadow_attack(cfg, test, run).attack(target, members, non_members) == expected
    assert attack_file.read_bytes() == kept_attack


def test_a_kept_shadow_attack_is_applied_without_scikit_learn(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import small_config

    from fedforget.measure import cached_shadow_attack
    from fedforget.task import load_client_data, load_test_set, new_model

    # Prepare: the attack trained and kept by this process
    cfg = small_config()
    run = RunDirectory(tmp_path / "run")
    members, non_members = load_client_data(cfg, 0)
    expected = cached_shadow_attack(cfg, load_test_set(cfg), run).attack(
        new_model(cfg), members, non_members)
    # Execute: a fresh process measures again
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from conftest import small_config\n"
        "from fedforget.measure import cached_shadow_attack\n"
        "from fedforget.rundir import RunDirectory\n"
        "from fedforget.task import load_client_data, load_test_set, new_model\n"
        "cfg = small_config()\n"
        "m, n = load_client_data(cfg, 0)\n"
        "r = cached_shadow_attack(cfg, load_test_set(cfg), RunDirectory(sys.argv[2]))"
        ".attack(new_model(cfg), m, n)\n"
        "print(r.precision, r.recall, r.auc, 'sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent),
                          str(run.path)], capture_output=True, text=True, check=True).stdout
    # Assert: the same attack, and scikit-learn never imported
    assert out.split() == [repr(expected.precision), repr(expected.recall),
                           repr(expected.auc), "False"]


def test_federasers_attack_is_fitted_once_per_request_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    # Prepare
    run = tmp_path / "run"
    train_small(run)
    unlearned = RunDirectory(run).unlearned

    def kept() -> list[Path]:
        return sorted(unlearned.glob("original-attack-*/attack.npz"))

    # Execute: a method with the reference computed, the same request with it cached, the
    # same again with the kept attack deleted, then another client
    first = _unlearn(run, "client-001", "subtract", "--shadow-attack", "on", capsys=capsys)
    after_first = kept()
    stamp = after_first[0].stat().st_mtime_ns
    second = _unlearn(run, "client-001", "subtract", "--reference", "cached",
                      "--shadow-attack", "on", capsys=capsys)
    loaded_stamp = after_first[0].stat().st_mtime_ns
    shutil.rmtree(after_first[0].parent)
    again = _unlearn(run, "client-001", "subtract", "--reference", "cached",
                     "--shadow-attack", "on", capsys=capsys)
    after_again = kept()
    other = _unlearn(run, "client-002", "subtract", "--shadow-attack", "on", capsys=capsys)
    # Assert: one kept attack per request, loaded (not fitted again) for the same request
    # with the same figures; fitted again from nothing, the same figures again (what is
    # kept is what fitting gives); another request, another attack
    attack = first["metrics"]["original_model_attack"]
    assert set(attack) == {"original", "unlearned", "retrained"}
    assert len(after_first) == 1 and loaded_stamp == stamp
    assert second["metrics"]["original_model_attack"] == attack
    assert again["metrics"]["original_model_attack"] == attack
    assert after_again == after_first
    assert other["metrics"]["original_model_attack"] is not None
    assert len(kept()) == 2


@pytest.mark.parametrize("change", ["recipe", "scikit-learn"])
def test_a_kept_attack_of_another_recipe_is_fitted_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    import importlib.metadata
    import json

    from conftest import small_config

    from fedforget.evaluation import membership
    from fedforget.measure import cached_shadow_attack
    from fedforget.task import load_client_data, load_test_set, new_model

    # Prepare: an attack kept under this recipe and this scikit-learn
    cfg = small_config()
    test = load_test_set(cfg)
    members, non_members = load_client_data(cfg, 0)
    run = RunDirectory(tmp_path / "run")
    expected = cached_shadow_attack(cfg, test, run).attack(new_model(cfg), members, non_members)
    record_file = next(run.path.rglob("attack.json"))
    before = json.loads(record_file.read_text())["fitted_on"]["recipe"]
    # Execute: the same run measured under another recipe, or another scikit-learn
    if change == "recipe":
        monkeypatch.setattr(membership, "ATTACK_RECIPE_VERSION", before["version"] + 1)
    else:
        real = importlib.metadata.version
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.test"
                            if name == "scikit-learn" else real(name))
    found = cached_shadow_attack(cfg, test, run).attack(new_model(cfg), members, non_members)
    # Assert: fitted again (the record names the new recipe; under a new recipe the shadow
    # model is trained again too, in a directory of its own), the same figures (the same
    # data, seed and classifier)
    records = sorted(run.path.rglob("attack.json"))
    assert len(records) == (2 if change == "recipe" else 1)
    newest = max(records, key=lambda path: path.stat().st_mtime_ns)
    assert (newest != record_file) == (change == "recipe")
    after = json.loads(newest.read_text())["fitted_on"]["recipe"]
    assert found == expected
    assert after != before
    assert after["version" if change == "recipe" else "scikit-learn"] == (
        before["version"] + 1 if change == "recipe" else "0.0.test")


def test_another_pytorch_trains_its_own_shadow_model(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from conftest import small_config

    from fedforget.measure import cached_shadow_attack
    from fedforget.task import load_client_data, load_test_set, new_model

    cfg = small_config()
    test = load_test_set(cfg)
    members, non_members = load_client_data(cfg, 0)
    run = RunDirectory(tmp_path / "run")
    expected = cached_shadow_attack(cfg, test, run).attack(new_model(cfg), members, non_members)
    monkeypatch.setattr(torch, "__version__", "0.0.test")
    found = cached_shadow_attack(cfg, test, run).attack(new_model(cfg), members, non_members)
    # a shadow model of its own (this PyTorch is the same one: the same figures)
    assert len(sorted(run.path.rglob("model.fft"))) == 2
    assert found == expected
