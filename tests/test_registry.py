"""The one registry shape (fedforget.registry): register / get, errors for unknown names,
duplicates and built-in modules that fail to import."""

from __future__ import annotations

import pytest

from fedforget.errors import ConfigError
from fedforget.registry import Registry


def test_register_and_get_as_call_and_as_decorator() -> None:
    # Prepare
    things: Registry[object] = Registry("thing")

    # Execute
    things.register("a", 1)

    @things.register("b")
    def b() -> int:
        return 2

    # Assert
    assert things.get("a") == 1 and things["b"] is b
    assert things.names() == ("a", "b") and "a" in things and "z" not in things
    assert len(things) == 2 and list(things) == ["a", "b"]


def test_an_unknown_name_is_an_error_naming_the_known_ones() -> None:
    things: Registry[int] = Registry("thing")
    things.register("b", 2)
    things.register("a", 1)
    with pytest.raises(ConfigError, match=r"^unknown thing 'c'; expected one of 'a', 'b'$"):
        things.get("c")


def test_another_entry_under_a_taken_name_is_an_error() -> None:
    things: Registry[object] = Registry("thing")
    things.register("a", 1)
    with pytest.raises(ConfigError, match="thing 'a' is registered twice"):
        things.register("a", 2)


def test_a_builtin_module_that_does_not_import_is_an_error_not_a_skip() -> None:
    # A typo in the module list of an area
    things: Registry[object] = Registry("thing", builtins=("fedforget.no_such_modul",))
    with pytest.raises(ConfigError, match="built-in thing module 'fedforget.no_such_modul' "
                                          "cannot be imported"):
        things.names()


def test_every_area_uses_the_one_registry_shape() -> None:
    from fedforget.data.datasets import DATASETS
    from fedforget.experiments.metrics import METRICS
    from fedforget.models import MODELS
    from fedforget.unlearning import METHODS
    from fedforget.unlearning.client_tasks import CLIENT_TASKS

    for registry in (DATASETS, METRICS, MODELS, METHODS, CLIENT_TASKS):
        assert isinstance(registry, Registry)
    assert {"retrain", "rollback", "federaser", "subtract", "pga"} <= set(METHODS.names())
    assert "pga" in CLIENT_TASKS and {"digits", "synthetic"} <= set(DATASETS.names())
