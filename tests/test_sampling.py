"""Seeded client sampling by stable id."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fedforget.sampling import ClientSampler, client_train_seed, derive_seed

ROSTER = [f"client-{i:03d}" for i in range(10)]


def test_same_seed_and_round_give_the_same_selection_whatever_the_roster_order() -> None:
    a = ClientSampler(seed=3, count=4).sample(7, ROSTER)
    b = ClientSampler(seed=3, count=4).sample(7, list(reversed(ROSTER)))
    assert a == b
    assert len(a) == 4 and a == sorted(a)


def test_rounds_and_seeds_change_the_selection() -> None:
    sampler = ClientSampler(seed=3, count=4)
    per_round = {tuple(sampler.sample(t, ROSTER)) for t in range(1, 21)}
    assert len(per_round) > 1
    other = {tuple(ClientSampler(seed=4, count=4).sample(t, ROSTER)) for t in range(1, 21)}
    assert per_round != other


@given(st.integers(0, 2**31), st.integers(1, 500), st.sets(st.sampled_from(ROSTER)))
def test_excluding_clients_removes_exactly_them_from_the_same_draw(
    seed: int, server_round: int, withdrawn: set[str]
) -> None:
    sampler = ClientSampler(seed=seed, count=5)
    full = sampler.sample(server_round, ROSTER)
    without = sampler.sample(server_round, ROSTER, exclude=withdrawn)
    assert without == [c for c in full if c not in withdrawn]


def test_asking_for_more_than_the_roster_takes_everyone() -> None:
    assert ClientSampler(seed=0, count=50).sample(1, ROSTER) == ROSTER


def test_derived_seeds_are_stable_and_distinct() -> None:
    # A fixed function of its inputs: the same parts give the same seed in any process.
    assert derive_seed(1, "x") == derive_seed(1, "x")
    assert derive_seed(1, "x") != derive_seed(2, "x")
    assert 0 <= derive_seed(1, "x") < 2**63
    assert client_train_seed(0, 1, "client-000") != client_train_seed(0, 1, "client-001")
    assert client_train_seed(0, 1, "client-000") != client_train_seed(0, 2, "client-000")
