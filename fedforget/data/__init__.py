"""Data sets, their partitioning among clients, and backdoor poisoning.

>>> from fedforget.data import client_data
>>> train, holdout = client_data("digits", partition_id=0, num_partitions=10,
...                              partitioner="dirichlet", seed=0, alpha=0.5)
"""

from __future__ import annotations

from fedforget.data.array_dataset import ArrayDataset, stratified_split
from fedforget.data.backdoor import add_trigger, backdoor_test_set, poison, poison_indices
from fedforget.data.datasets import DATASETS, DatasetLoader, dataset_options, load_dataset
from fedforget.data.partition import PARTITIONERS, client_data, client_split, partition_indices

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "ArrayDataset",
    "DatasetLoader",
    "add_trigger",
    "backdoor_test_set",
    "client_data",
    "client_split",
    "dataset_options",
    "load_dataset",
    "partition_indices",
    "poison",
    "poison_indices",
    "stratified_split",
]
