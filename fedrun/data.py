"""Datasets and partitioners: how the training set is split into one shard per device.

Every rank loads the same dataset and computes the same partition from the run seed, so
no data ever travels between processes; only the rank decides which shard it trains on.
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, DataConfig

log = logging.getLogger("fedrun")

DEBIAN_ROOTS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Per-channel mean and std of each training set, used to normalise inputs.
STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
DOWNLOAD_ROOT = "data"


@dataclass
class Dataset:
    """Inputs as uint8 (N, C, H, W) tensors and labels as int64, for train and test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int = 10

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = STATS[self.name]
        mean = torch.tensor(mean).view(1, -1, 1, 1)
        std = torch.tensor(std).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load the configured dataset, then take the seeded subsets the config asks for."""
    if cfg.dataset == "cifar10":
        data = _load_cifar10(cfg)
    else:
        data = _load_idx_dataset(cfg)
    rng = np.random.default_rng([seed, 1])
    if cfg.train_samples:
        keep = _subset(rng, len(data.train_y), cfg.train_samples, "data.train_samples")
        data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    if cfg.test_samples:
        keep = _subset(rng, len(data.test_y), cfg.test_samples, "data.test_samples")
        data.test_x, data.test_y = data.test_x[keep], data.test_y[keep]
    return data


def _subset(rng: np.random.Generator, total: int, count: int, key: str) -> torch.Tensor:
    if count > total:
        raise ConfigError(f"{key} = {count} is more than the {total} samples available; "
                          f"set {key}=0 for all of them")
    return torch.from_numpy(np.sort(rng.choice(total, size=count, replace=False)))


def _missing(cfg: DataConfig, detail: str) -> ConfigError:
    return ConfigError(
        f"{cfg.dataset} not found ({detail}); get it one of three ways: "
        "`make data` (installs Debian's dataset-fashion-mnist as root), "
        "data.root=/path/to/folder-with-idx-files, or data.download=true while online")


def _load_idx_dataset(cfg: DataConfig) -> Dataset:
    folder = _find_idx_folder(cfg)
    parts = {}
    for split, (images, labels) in IDX_FILES.items():
        x = read_idx(_idx_path(folder, images))
        y = read_idx(_idx_path(folder, labels))
        parts[split] = (torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long())
    return Dataset(cfg.dataset, *parts["train"], *parts["test"])


def _idx_path(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(folder / stem)


def _has_idx(folder: Path) -> bool:
    try:
        for images, labels in IDX_FILES.values():
            _idx_path(folder, images), _idx_path(folder, labels)
    except FileNotFoundError:
        return False
    return True


def _find_idx_folder(cfg: DataConfig) -> Path:
    """data.root when given, else Debian's package, else torchvision's download."""
    if cfg.root:
        root = Path(cfg.root)
        for folder in (root, root / cfg.dataset, _torchvision_raw(root, cfg.dataset)):
            if _has_idx(folder):
                return folder
        raise _missing(cfg, f"data.root = {cfg.root!r} holds no IDX files")
    debian = DEBIAN_ROOTS.get(cfg.dataset)
    if debian and _has_idx(Path(debian)):
        return Path(debian)
    cached = _torchvision_raw(Path(DOWNLOAD_ROOT), cfg.dataset)
    if _has_idx(cached):
        return cached
    if not cfg.download:
        raise _missing(cfg, "no Debian package and data.download = false")
    return _download_idx(cfg)


def _torchvision_raw(root: Path, dataset: str) -> Path:
    folder = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[dataset]
    return root / folder / "raw"


def _download_idx(cfg: DataConfig) -> Path:
    import torchvision

    cls = {"fashion-mnist": torchvision.datasets.FashionMNIST,
           "mnist": torchvision.datasets.MNIST}[cfg.dataset]
    try:
        for train in (True, False):
            cls(DOWNLOAD_ROOT, train=train, download=True)
    except Exception as exc:  # torchvision raises several types for a failed download
        raise _missing(cfg, f"download failed: {type(exc).__name__}: {exc}") from None
    return _torchvision_raw(Path(DOWNLOAD_ROOT), cfg.dataset)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, as an array of uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes; replace it")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated ({body.size} of {int(np.prod(shape))} "
                          "values); download it again")
    return body.reshape(shape).copy()  # writable, as torch.from_numpy wants


def _load_cifar10(cfg: DataConfig) -> Dataset:
    import torchvision

    root = cfg.root or DOWNLOAD_ROOT
    try:
        parts = [torchvision.datasets.CIFAR10(root, train=t, download=cfg.download)
                 for t in (True, False)]
    except Exception as exc:  # a missing archive is a RuntimeError, a failed fetch others
        raise ConfigError(f"cifar10 not found under {root!r} ({exc}); set data.root to a "
                          "folder holding cifar-10-batches-py, or data.download=true "
                          "while online") from None
    tensors = []
    for part in parts:
        x = torch.from_numpy(part.data).permute(0, 3, 1, 2).contiguous()
        tensors += [x, torch.tensor(part.targets, dtype=torch.long)]
    return Dataset("cifar10", *tensors)


# ---- partitioners -----------------------------------------------------------------------


def partition(labels: np.ndarray, parts: int, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """Split sample indices into `parts` disjoint, complete, sorted shards."""
    rng = np.random.default_rng([seed, 2])
    if cfg.partition == "iid":
        shards = np.array_split(rng.permutation(len(labels)), parts)
    elif cfg.partition == "dirichlet":
        shards = _dirichlet(labels, parts, cfg.alpha, cfg.min_samples, rng)
    else:
        shards = _label_shards(labels, parts, cfg.shards_per_device, rng)
    shards = [np.sort(s) for s in shards]
    smallest = min(len(s) for s in shards)
    if smallest < cfg.min_samples:
        raise ConfigError(
            f"the {cfg.partition} partition leaves a shard with {smallest} samples, below "
            f"data.min_samples = {cfg.min_samples}; use more data or fewer devices")
    return shards


def _dirichlet(labels: np.ndarray, parts: int, alpha: float, min_samples: int,
               rng: np.random.Generator, tries: int = 1000) -> list[np.ndarray]:
    """Each class is spread over the shards by proportions drawn from Dir(alpha).

    Draws are repeated until every shard holds `min_samples`; a low alpha with many
    shards may never get there, which is a config error rather than an endless loop.
    """
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(tries):
        shards: list[list[int]] = [[] for _ in range(parts)]
        for idx in by_class:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(rng.dirichlet([alpha] * parts))[:-1] * len(idx)).astype(int)
            for shard, piece in zip(shards, np.split(idx, cuts)):
                shard.extend(piece.tolist())
        if min(len(s) for s in shards) >= min_samples:
            return [np.array(s, dtype=np.int64) for s in shards]
    raise ConfigError(
        f"data.alpha = {alpha} could not give every one of {parts} shards "
        f"data.min_samples = {min_samples} samples in {tries} draws; raise data.alpha "
        "or lower data.min_samples")


def _label_shards(labels: np.ndarray, parts: int, per_part: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into parts*per_part shards, deal them out at random (FedAvg)."""
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, parts * per_part)
    deal = rng.permutation(len(pieces)).reshape(parts, per_part)
    return [np.concatenate([pieces[i] for i in row]) for row in deal]


def describe(shard: np.ndarray, labels: np.ndarray, num_classes: int) -> str:
    """Shard size and label histogram, for the log at start."""
    counts = np.bincount(labels[shard], minlength=num_classes)
    return f"{len(shard)} samples, per label " + " ".join(
        f"{label}:{count}" for label, count in enumerate(counts))
