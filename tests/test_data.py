"""Datasets and partitioners."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from conftest import needs_fashion_mnist
from fedrun.config import ConfigError, DataConfig
from fedrun.data import load_dataset, partition, read_idx


def _labels(n: int = 3000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partition_is_disjoint_complete_and_deterministic(kind):
    """Every partitioner splits all indices into disjoint shards, the same for a seed."""
    labels = _labels()
    cfg = DataConfig(partition=kind, alpha=0.5, min_samples=20)
    shards = partition(labels, 5, cfg, seed=7)
    joined = np.concatenate(shards)
    assert len(shards) == 5
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert min(len(s) for s in shards) >= 20
    again = partition(labels, 5, cfg, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    other = partition(labels, 5, cfg, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


def test_dirichlet_skews_labels_and_respects_minimum():
    """A low alpha gives skewed label histograms, yet no shard under min_samples."""
    labels = _labels(6000)
    shards = partition(labels, 5, DataConfig(partition="dirichlet", alpha=0.1,
                                             min_samples=50), seed=0)
    assert min(len(s) for s in shards) >= 50
    top_share = [np.bincount(labels[s], minlength=10).max() / len(s) for s in shards]
    assert max(top_share) > 0.3  # an iid shard would hold about 0.1 of each label


def test_dirichlet_impossible_minimum_is_a_config_error():
    """A minimum that cannot be met is a clear error, not an endless loop."""
    with pytest.raises(ConfigError, match="data.min_samples"):
        partition(_labels(100), 10, DataConfig(partition="dirichlet", alpha=0.01,
                                               min_samples=40), seed=0)


def test_shards_hold_few_labels():
    """Label-sorted shards: each device sees about shards_per_device labels."""
    labels = np.repeat(np.arange(10), 300)
    shards = partition(labels, 5, DataConfig(partition="shards", shards_per_device=2),
                       seed=0)
    assert all(len(np.unique(labels[s])) <= 3 for s in shards)


def _write_idx(path, array: np.ndarray, gz: bool = True):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                  *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_data_root(tmp_path):
    """IDX files under data.root are read, gzipped or not; a truncated one is named."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), gz=False)
    data = load_dataset(DataConfig(root=str(tmp_path)), seed=0)
    assert tuple(data.train_x.shape) == (60, 1, 28, 28) and len(data.test_y) == 20
    (tmp_path / "bad").write_bytes(struct.pack(">HBBI", 0, 8, 1, 50) + b"\0" * 10)
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(tmp_path / "bad")


def test_missing_dataset_names_three_ways(tmp_path):
    """No dataset anywhere: one error that lists make data, data.root and download."""
    with pytest.raises(ConfigError) as info:
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path / "empty")), seed=0)
    text = str(info.value)
    assert "make data" in text and "data.root" in text and "data.download" in text


@needs_fashion_mnist
def test_fashion_mnist_from_debian_package():
    """The Debian package gives the real 60,000/10,000 split, and subsets are seeded."""
    full = load_dataset(DataConfig(), seed=0)
    assert (len(full.train_y), len(full.test_y)) == (60000, 10000)
    part = load_dataset(DataConfig(train_samples=500, test_samples=100), seed=3)
    again = load_dataset(DataConfig(train_samples=500, test_samples=100), seed=3)
    assert len(part.train_y) == 500 and bool((part.train_x == again.train_x).all())
