"""Tests of fedforget.data: loaders, partitioning, client splits, backdoor poisoning."""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedforget.data import (
    DATASETS,
    PARTITIONERS,
    ArrayDataset,
    add_trigger,
    backdoor_test_set,
    client_data,
    client_split,
    dataset_options,
    load_dataset,
    partition_indices,
    poison,
    stratified_split,
)
from fedforget.errors import ConfigError, DataError

# Class sizes of scikit-learn's digits (1,797 images), from its documentation.
DIGITS_CLASS_SIZES = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


# ----------------------------------------------------------------------------- helpers
def write_idx_images(path: Path, images: np.ndarray, *, magic: int = 2051) -> None:
    n, rows, cols = images.shape
    header = np.array([magic, n, rows, cols], dtype=">u4").tobytes()
    _write(path, header + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray, *, magic: int = 2049) -> None:
    header = np.array([magic, labels.shape[0]], dtype=">u4").tobytes()
    _write(path, header + labels.astype(np.uint8).tobytes())


def _write(path: Path, raw: bytes) -> None:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """Tiny Fashion-MNIST files: 3 train images (gzip'd) and 2 test images (plain)."""
    # Prepare: image k of the train split has every pixel at 51 * k (0, 51, 102 -> 0, .2, .4)
    train_images = np.stack([np.full((4, 5), 51 * k) for k in range(3)])
    write_idx_images(tmp_path / "train-images-idx3-ubyte.gz", train_images)
    write_idx_labels(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 0, 9]))
    test_images = np.arange(2 * 4 * 5).reshape(2, 4, 5)
    write_idx_images(tmp_path / "t10k-images-idx3-ubyte", test_images)
    write_idx_labels(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2]))
    return tmp_path


def tiny_dataset(n: int = 20, *, image: bool = True) -> ArrayDataset:
    x = np.zeros((n, 1, 8, 8) if image else (n, 5), dtype=np.float32)
    return ArrayDataset(x=x, y=np.arange(n) % 4, num_classes=4, name="tiny")


# ----------------------------------------------------------------------------- ArrayDataset
def test_array_dataset_freezes_a_copy_and_subsets() -> None:
    # Prepare
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = ArrayDataset(x=x, y=np.array([0, 1, 1]), num_classes=2, name="d")

    # Execute
    sub = data.subset([2, 0])

    # Assert
    assert data.input_shape == (4,)
    assert len(data) == 3 and data.y.dtype == np.int64
    assert x.flags.writeable  # the caller's array is untouched
    with pytest.raises(ValueError):
        data.x[0, 0] = 1.0
    np.testing.assert_array_equal(sub.x, x[[2, 0]])
    np.testing.assert_array_equal(sub.y, [1, 0])
    np.testing.assert_array_equal(data.class_counts(), [1, 2])


def test_array_dataset_refuses_labels_out_of_range() -> None:
    with pytest.raises(DataError) as err:
        ArrayDataset(x=np.zeros((2, 3)), y=np.array([0, 5]), num_classes=3, name="d")
    assert str(err.value) == (
        "data set 'd': labels range over [0, 5]; expected values in [0, 3)"
    )


# ----------------------------------------------------------------------------- digits
def test_digits_shapes_range_and_stratified_split() -> None:
    # Prepare: round-half-up of 20 % of each class size, e.g. 178 * .2 = 35.6 -> 36
    expected_test = [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    expected_train = [s - t for s, t in zip(DIGITS_CLASS_SIZES, expected_test, strict=True)]

    # Execute
    train, test = load_dataset("digits", seed=0)

    # Assert
    assert train.input_shape == (1, 8, 8) and test.input_shape == (1, 8, 8)
    assert train.num_classes == 10
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert len(train) == 1438 and len(test) == 359
    assert test.class_counts().tolist() == expected_test
    assert train.class_counts().tolist() == expected_train


def test_digits_split_is_seeded_and_cached() -> None:
    first, _ = load_dataset("digits", seed=0)
    again, _ = load_dataset("digits", seed=0)
    other, _ = load_dataset("digits", seed=1)

    assert again is first  # lru cache
    assert not np.array_equal(first.x, other.x)


def test_stratified_split_counts() -> None:
    # Prepare: class 0 has 5 examples (-> round(1.25) = 1 test), class 1 has 2 (-> 1 test,
    # since a class of two keeps one on each side), class 2 has 1 (-> round(.25) = 0 test)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2])

    # Execute
    train, test = stratified_split(labels, test_fraction=0.25, seed=3)

    # Assert
    assert sorted(labels[test].tolist()) == [0, 1]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(8))


# ----------------------------------------------------------------------------- registry
def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar10", seed=0)
    assert str(err.value) == (
        "unknown data set 'cifar10'; expected one of 'digits', 'fashion-mnist', 'synthetic'"
    )
    assert set(DATASETS) == {"digits", "fashion-mnist", "synthetic"}


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_dataset("synthetic", seed=0, num_sample=10)
    assert str(err.value) == (
        "data set 'synthetic' has no option 'num_sample'; allowed options: num_samples, "
        "num_features, num_classes, cluster_std"
    )
    assert dataset_options("digits") == ()


def test_test_fraction_out_of_range_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^test-fraction = 1\.0 is out of range; expected 0 <"):
        load_dataset("digits", seed=0, test_fraction=1.0)


def test_negative_seed_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^seed = -1 is out of range; expected an integer >= 0$"):
        load_dataset("digits", seed=-1)


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_and_determinism() -> None:
    # Prepare: 100 samples, labels i mod 3 -> class sizes 34, 33, 33; 20 % of each
    # rounds to 7 (6.8, 6.6, 6.6), so 21 test and 79 train examples.
    options: dict[str, Any] = {"num_samples": 100, "num_features": 5, "num_classes": 3}

    # Execute
    train, test = load_dataset("synthetic", seed=7, **options)
    train_again, _ = load_synthetic_uncached(seed=7, **options)
    train_other, _ = load_synthetic_uncached(seed=8, **options)

    # Assert
    assert train.x.shape == (79, 5) and test.x.shape == (21, 5)
    assert train.num_classes == 3
    np.testing.assert_array_equal(train.x, train_again.x)
    np.testing.assert_array_equal(train.y, train_again.y)
    assert not np.array_equal(train.x, train_other.x)


def load_synthetic_uncached(**kwargs: Any) -> tuple[ArrayDataset, ArrayDataset]:
    return DATASETS["synthetic"](data_path=None, test_fraction=0.2, **kwargs)


def test_synthetic_refuses_too_few_samples() -> None:
    with pytest.raises(ConfigError, match=r"^num_samples = 5 is out of range; expected >= 2"):
        load_dataset("synthetic", seed=0, num_samples=5, num_classes=4)


# ----------------------------------------------------------------------------- fashion-mnist
def test_fashion_mnist_reads_gzip_and_plain_idx(fashion_dir: Path) -> None:
    train, test = load_dataset("fashion-mnist", seed=0, data_path=str(fashion_dir))

    assert train.x.shape == (3, 1, 4, 5) and test.x.shape == (2, 1, 4, 5)
    np.testing.assert_allclose(train.x[:, 0, 0, 0], [0.0, 0.2, 0.4], rtol=1e-6)
    np.testing.assert_array_equal(train.y, [3, 0, 9])
    np.testing.assert_array_equal(test.y, [1, 2])
    # row-major pixel order: test image 1, row 2, column 3 holds 20 + 2 * 5 + 3 = 33
    assert test.x[1, 0, 2, 3] == pytest.approx(33 / 255)
    assert train.num_classes == 10


def test_fashion_mnist_bad_magic_names_the_file(fashion_dir: Path) -> None:
    # Prepare: a label file carrying the image magic number
    bad = fashion_dir / "train-labels-idx1-ubyte.gz"
    write_idx_labels(bad, np.array([3, 0, 9]), magic=2051)

    # Execute
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", seed=1, data_path=str(fashion_dir))

    # Assert
    assert str(err.value) == f"IDX file '{bad}' has magic number 2051; expected 2049"


def test_fashion_mnist_truncated_file_names_the_file(fashion_dir: Path) -> None:
    # Prepare: 2 test images of 4x5 need 16 + 40 bytes; drop the last one
    path = fashion_dir / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])

    # Execute
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", seed=2, data_path=str(fashion_dir))

    # Assert
    assert str(err.value) == (
        f"IDX file '{path}' has 55 bytes; its header announces 2 images of 4x5, "
        "expected 16 + 2*4*5 = 56 bytes"
    )


def test_fashion_mnist_truncated_gzip_names_the_file(fashion_dir: Path) -> None:
    path = fashion_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(DataError, match=rf"^cannot read IDX file '{path}'"):
        load_dataset("fashion-mnist", seed=3, data_path=str(fashion_dir))


def test_fashion_mnist_count_mismatch(fashion_dir: Path) -> None:
    write_idx_labels(fashion_dir / "t10k-labels-idx1-ubyte", np.array([1, 2, 3]))

    with pytest.raises(DataError, match="holds 2 images but t10k-labels-idx1-ubyte holds 3"):
        load_dataset("fashion-mnist", seed=4, data_path=str(fashion_dir))


def test_fashion_mnist_missing_directory_says_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", seed=0, data_path=str(missing))

    message = str(err.value)
    assert message.startswith(f"Fashion-MNIST: directory '{missing}' does not exist;")
    assert "apt-get install dataset-fashion-mnist" in message


# ----------------------------------------------------------------------------- partitions
@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_dataset("digits", seed=0)[0].y


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_the_pool(
    digits_labels: np.ndarray, partitioner: str
) -> None:
    parts = partition_indices(
        digits_labels, num_partitions=10, partitioner=partitioner, seed=0, alpha=0.5
    )

    joined = np.concatenate(parts)
    assert len(parts) == 10
    assert joined.size == np.unique(joined).size  # disjoint
    assert sorted(joined.tolist()) == list(range(1438))  # covering
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_iid_partition_sizes_differ_by_at_most_one(digits_labels: np.ndarray) -> None:
    parts = partition_indices(digits_labels, num_partitions=10, partitioner="iid", seed=0)

    # 1438 = 8 * 144 + 2 * 143
    assert sorted(len(p) for p in parts) == [143] * 2 + [144] * 8


def test_shard_partition_sizes(digits_labels: np.ndarray) -> None:
    # Prepare: 10 clients x 2 shards; shard size floor(1438 / 20) = 71; 1420 used, 18 left
    parts = partition_indices(
        digits_labels, num_partitions=10, partitioner="shard", seed=0, shards_per_partition=2
    )

    joined = np.concatenate(parts)
    assert [len(p) for p in parts] == [142] * 10
    assert np.unique(joined).size == 1420
    # a shard of 71 consecutive sorted labels spans at most 2 classes (classes have >= 139)
    assert all(np.unique(digits_labels[p]).size <= 4 for p in parts)


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_partitions_are_seeded(digits_labels: np.ndarray, partitioner: str) -> None:
    def run(seed: int) -> list[np.ndarray]:
        return partition_indices(
            digits_labels, num_partitions=5, partitioner=partitioner, seed=seed
        )

    first, again, other = run(11), run(11), run(12)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_small_alpha_on_digits_with_ten_clients(digits_labels: np.ndarray) -> None:
    # Prepare: default min size min(10, max(1, 1438 // (10 * 10))) = 10
    parts = partition_indices(
        digits_labels, num_partitions=10, partitioner="dirichlet", seed=0, alpha=0.1
    )

    assert min(len(p) for p in parts) >= 10
    assert sum(len(p) for p in parts) == 1438
    # alpha = 0.1 is strongly skewed: some client's majority class exceeds half its data
    assert max(np.bincount(digits_labels[p]).max() / len(p) for p in parts) > 0.5


def test_dirichlet_infeasible_min_size_is_a_data_error(digits_labels: np.ndarray) -> None:
    with pytest.raises(DataError, match="raise dirichlet-alpha, lower min-partition-size"):
        partition_indices(
            digits_labels,
            num_partitions=10,
            partitioner="dirichlet",
            seed=0,
            alpha=0.05,
            min_partition_size=140,
        )


@settings(max_examples=15, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=20, max_size=120),
    num_partitions=st.integers(1, 6),
    seed=st.integers(0, 2**32),
    partitioner=st.sampled_from(["iid", "dirichlet"]),
)
def test_partition_invariant(
    labels: list[int], num_partitions: int, seed: int, partitioner: str
) -> None:
    parts = partition_indices(
        np.array(labels),
        num_partitions=num_partitions,
        partitioner=partitioner,
        seed=seed,
        alpha=1.0,
        min_partition_size=0,
    )

    assert len(parts) == num_partitions
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"partitioner": "pathological"},
            "partitioner = 'pathological' is not allowed; expected one of 'iid', "
            "'dirichlet', 'shard'",
        ),
        (
            {"alpha": 0.0},
            "dirichlet-alpha = 0.0 is out of range; expected a number > 0",
        ),
        (
            {"num_partitions": 0},
            "num-partitions = 0 is out of range; expected an integer in 1..12 "
            "(the size of the train pool)",
        ),
        (
            {"num_partitions": 13},
            "num-partitions = 13 is out of range; expected an integer in 1..12 "
            "(the size of the train pool)",
        ),
        (
            {"partitioner": "shard", "num_partitions": 5, "shards_per_partition": 3},
            "shards-per-client = 3 with num-partitions = 5 asks for 15 shards of 12 "
            "examples; expected num-partitions * shards-per-client <= 12",
        ),
    ],
)
def test_partition_config_errors_name_the_key(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"num_partitions": 2, "partitioner": "dirichlet", "seed": 0}
    args.update(kwargs)

    with pytest.raises(ConfigError) as err:
        partition_indices(np.arange(12) % 3, **args)  # type: ignore[arg-type]

    assert str(err.value) == message


# ----------------------------------------------------------------------------- client split
def test_client_split_rounds_half_up() -> None:
    # Prepare: 10 indices, 25 % -> round(2.5) = 3 held out
    indices = np.arange(100, 110)

    # Execute
    train, holdout = client_split(indices, holdout_fraction=0.25, seed=0)
    train2, holdout2 = client_split(indices, holdout_fraction=0.25, seed=0)

    # Assert
    assert len(train) == 7 and len(holdout) == 3
    assert sorted(np.concatenate([train, holdout]).tolist()) == list(range(100, 110))
    np.testing.assert_array_equal(holdout, holdout2)
    np.testing.assert_array_equal(train, train2)


def test_client_split_edges() -> None:
    _, empty = client_split(np.arange(5), holdout_fraction=0.0, seed=0)
    one_train, none_held = client_split(np.array([4]), holdout_fraction=0.5, seed=0)

    assert empty.size == 0
    assert one_train.tolist() == [4] and none_held.size == 0  # at most n - 1 held out


@pytest.mark.parametrize("fraction", [1.0, -0.1, math.nan])
def test_client_split_refuses_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"^holdout-fraction = .* expected 0 <= value < 1$"):
        client_split(np.arange(5), holdout_fraction=fraction, seed=0)


def test_client_data_splits_each_partition() -> None:
    # Prepare
    pool, _ = load_dataset("digits", seed=0)
    parts = partition_indices(pool.y, num_partitions=4, partitioner="iid", seed=0)
    kwargs: dict[str, Any] = {
        "num_partitions": 4, "partitioner": "iid", "seed": 0, "holdout_fraction": 0.2
    }

    # Execute
    clients = [client_data("digits", partition_id=i, **kwargs) for i in range(4)]

    # Assert: client i's train + holdout is partition i (1438 / 4 -> sizes 360, 360, 359, 359)
    for i, (train, holdout) in enumerate(clients):
        assert len(train) + len(holdout) == len(parts[i])
        assert len(holdout) == int(len(parts[i]) * 0.2 + 0.5)  # 72
        assert train.name == f"digits/client-{i}"
        together = np.concatenate([train.x, holdout.x])
        assert sorted(map(bytes, together)) == sorted(map(bytes, pool.x[parts[i]]))
    assert client_data("digits", partition_id=0, **kwargs)[0] is clients[0][0]  # cached


def test_client_data_refuses_bad_partition_id() -> None:
    with pytest.raises(ConfigError) as err:
        client_data("digits", partition_id=4, num_partitions=4, partitioner="iid", seed=0)
    assert str(err.value) == (
        "partition-id = 4 is out of range; expected an integer in 0..3 (num-partitions = 4)"
    )


# ----------------------------------------------------------------------------- backdoor
def test_trigger_on_small_images_is_a_2x2_square() -> None:
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)

    out = add_trigger(x)

    assert out[:, 0, 6:, 6:].tolist() == [[[1.0, 1.0], [1.0, 1.0]]] * 2
    assert out.sum() == 2 * 4  # nothing else set
    assert x.sum() == 0  # input untouched


def test_trigger_on_fashion_sized_images_is_a_3x3_square() -> None:
    out = add_trigger(np.zeros((1, 1, 28, 28), dtype=np.float32))

    assert out.sum() == 9 and out[0, 0, 25:, 25:].min() == 1.0


def test_trigger_on_vectors_sets_last_three_features() -> None:
    x = np.ones((2, 5), dtype=np.float32)

    out = add_trigger(x)

    assert out.tolist() == [[1.0, 1.0, 8.0, 8.0, 8.0]] * 2


def test_trigger_refuses_other_shapes() -> None:
    with pytest.raises(DataError, match=r"shape \(3,\); expected a batch"):
        add_trigger(np.zeros(3))


def test_poison_marks_a_seeded_fraction() -> None:
    # Prepare: 20 examples, 25 % -> 5 poisoned
    data = tiny_dataset(20)

    # Execute
    poisoned = poison(data, target_label=2, fraction=0.25, seed=0)
    again = poison(data, target_label=2, fraction=0.25, seed=0)

    # Assert
    triggered = poisoned.x.reshape(20, -1).sum(axis=1) == 4  # a 2x2 trigger on zeros
    assert triggered.sum() == 5
    assert np.all(poisoned.y[triggered] == 2)
    np.testing.assert_array_equal(poisoned.y[~triggered], data.y[~triggered])
    np.testing.assert_array_equal(poisoned.x, again.x)
    assert data.x.sum() == 0  # original untouched
    assert poisoned.name == "tiny+backdoor"


def test_backdoor_test_set_drops_the_target_class() -> None:
    data = tiny_dataset(20, image=False)  # 5 examples of each of 4 classes

    attack = backdoor_test_set(data, target_label=1)

    assert len(attack) == 15
    assert np.all(attack.y == 1)
    assert np.all(attack.x[:, -3:] == 8.0)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"target_label": 4, "fraction": 0.1}, "target label"), ({"target_label": 0,
                                                              "fraction": 1.5}, "fraction")],
)
def test_poison_refuses_bad_values(kwargs: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError, match=f"backdoor {key} = "):
        poison(tiny_dataset(), seed=0, **kwargs)  # type: ignore[arg-type]
