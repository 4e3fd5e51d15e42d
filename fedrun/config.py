"""Configuration: TOML sections mapped one to one onto small dataclasses.

A config is read from a TOML file, then `section.key=value` overrides are applied, then
every value is validated. Every problem is a `ConfigError` whose message names the key,
the value it had and how to fix it, so that a bad config fails before any process group
is formed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config key or value that fedrun cannot run with."""


@dataclass
class RunConfig:
    name: str = "default"
    seed: int = 0
    rounds: int = 20
    checkpoint_every: int = 5
    keep_checkpoints: int = 3
    resume: bool = True
    round_deadline_s: float = 1800.0
    output_dir: str = "runs"
    checkpoint_dir: str = "checkpoints"
    dashboard: bool = True


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    root: str = ""
    download: bool = True
    partition: str = "dirichlet"
    alpha: float = 0.5
    min_samples: int = 10
    shards_per_device: int = 2
    train_samples: int = 0
    test_samples: int = 0
    clients: int = 0


@dataclass
class ModelConfig:
    name: str = "cnn"


@dataclass
class TrainConfig:
    batch_size: int = 8
    local_epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    cleanup_every: int = 10
    max_retries: int = 3
    num_workers: int = 0


@dataclass
class ServerConfig:
    strategy: str = "fedavg"
    fraction: float = 1.0
    min_devices: int = 1
    max_skipped_rounds: int = 3
    max_update_norm: float = 1e4
    server_lr: float = 0.0
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    proximal_mu: float = 0.01
    trim_fraction: float = 0.2
    byzantine: int = 1
    multi_krum_keep: int = 0


@dataclass
class DevicesConfig:
    count: int = 5
    names: list[str] = field(
        default_factory=lambda: ["Hospital", "University", "Company", "Lab", "Institute"]
    )


@dataclass
class CommConfig:
    backend: str = "auto"
    timeout_s: float = 60.0
    heartbeat_s: float = 0.5


@dataclass
class PrivacyConfig:
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0


DEVICE_FAULTS = (
    "raise", "oom", "nan", "inf", "huge", "zero_samples", "slow", "hang", "exit", "sigkill",
)
# Server faults (device = 0): a pause inside the checkpoint write, for crash-while-saving tests.
SERVER_FAULTS = ("stall_checkpoint",)
FAULT_KINDS = DEVICE_FAULTS + SERVER_FAULTS


@dataclass
class FaultConfig:
    device: int = 0
    round: int = 0
    kind: str = ""
    attempts: int = 0  # 0: every attempt of that round


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: list[FaultConfig] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.devices.count + 1

    def device_name(self, rank: int) -> str:
        return self.devices.names[rank - 1]

    def device_label(self, rank: int) -> str:
        return f"Device {rank} [{self.device_name(rank)}]"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def checkpoint_path(self) -> Path:
        return Path(self.run.checkpoint_dir) / self.run.name


SECTIONS = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "server": ServerConfig,
    "devices": DevicesConfig,
    "comm": CommConfig,
    "privacy": PrivacyConfig,
}

CHOICES = {
    "data.dataset": ("fashion-mnist", "mnist", "cifar10"),
    "data.partition": ("iid", "dirichlet", "shards"),
    "model.name": ("cnn", "fedavg_cnn", "resnet18"),
    "comm.backend": ("auto", "gloo", "nccl"),
    "server.strategy": (
        "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
        "median", "trimmed_mean", "krum", "multi_krum",
    ),
    "faults.kind": FAULT_KINDS,
}

# Values that must not change across a resume: the run would no longer be the same run.
RESUME_KEYS = (
    "run.seed", "data.dataset", "data.partition", "data.alpha", "data.min_samples",
    "data.shards_per_device", "data.train_samples", "data.clients", "model.name",
    "devices.count", "server.strategy",
)


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config with a "
                              "TOML file such as configs/default.toml")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML ({exc}); fix the syntax") from None
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(raw)
    validate(cfg)
    return cfg


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {item!r} is not of the form section.key=value "
                          "(for example run.rounds=30)")
    value = _Override(text.strip())
    if parts[0] == "faults":
        if len(parts) != 3 or not parts[1].isdigit():
            raise ConfigError(f"override {item!r}: faults are set as faults.N.key=value "
                              "(for example faults.0.kind=raise)")
        faults = raw.setdefault("faults", [])
        index = int(parts[1])
        while len(faults) <= index:
            faults.append({})
        faults[index][parts[2]] = value
        return
    if len(parts) != 2:
        raise ConfigError(f"override {item!r}: keys have two parts, section.key")
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"override {item!r}: {parts[0]} is not a section")
    section[parts[1]] = value


@dataclass
class _Override:
    """A command-line value, read by the type of the field it lands in: a string field
    takes the text itself (so `faults.0.kind=nan` is "nan", not a float)."""

    text: str

    def as_type(self, kind: type) -> Any:
        try:
            value = tomllib.loads(f"v = {self.text}")["v"]
        except tomllib.TOMLDecodeError:
            return self.text
        return self.text if kind is str and not isinstance(value, str) else value


def _build(raw: dict[str, Any]) -> Config:
    cfg = Config()
    for section, value in raw.items():
        if section == "faults":
            if not isinstance(value, list):
                raise ConfigError("faults must be a list of [[faults]] tables")
            cfg.faults = [_fill(FaultConfig(), f"faults.{i}", v) for i, v in enumerate(value)]
            continue
        if section not in SECTIONS:
            known = ", ".join(list(SECTIONS) + ["faults"])
            raise ConfigError(f"unknown config section [{section}]; known sections: {known}")
        if not isinstance(value, dict):
            raise ConfigError(f"{section} must be a [{section}] table, got {value!r}")
        _fill(getattr(cfg, section), section, value)
    return cfg


def _fill(obj: Any, prefix: str, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"unknown key {prefix}.{key}; known keys of "
                              f"[{prefix.split('.')[0]}]: {known}")
        setattr(obj, key, _coerce(f"{prefix}.{key}", value, getattr(obj, key)))
    return obj


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a value against the type of the field's default."""
    kind = type(default)
    if isinstance(value, _Override):
        value = value.as_type(kind)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number",
                list: "a list of strings", str: "a string"}[kind]
        raise ConfigError(f"{key} = {value!r} is not {want}; set it to {want}, "
                          f"for example {key}={_toml(default)}")
    return value


def _toml(value: Any) -> str:
    """A value as it would be typed in an override; lists in single quotes, which
    survive a shell's double-quoted ARGS="..."."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(f"'{v}'" for v in value) + "]"
    return json.dumps(value)


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {_toml(value)} is invalid: {rule}")


def validate(cfg: Config) -> None:
    """Reject values fedrun cannot run with; each message states the rule that was broken."""
    for key, allowed in CHOICES.items():
        if key == "faults.kind":
            continue
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value in allowed, key, value, "choose one of " + ", ".join(allowed))

    run, data, train, server = cfg.run, cfg.data, cfg.train, cfg.server
    _require(bool(run.name) and "/" not in run.name and run.name not in (".", ".."),
             "run.name", run.name, "a non-empty folder name without '/'")
    _require(run.rounds >= 1, "run.rounds", run.rounds, "at least 1")
    _require(run.checkpoint_every >= 1, "run.checkpoint_every", run.checkpoint_every,
             "at least 1 (a checkpoint every N rounds)")
    _require(run.keep_checkpoints >= 1, "run.keep_checkpoints", run.keep_checkpoints,
             "at least 1")
    _require(run.round_deadline_s > 0, "run.round_deadline_s", run.round_deadline_s,
             "a positive number of seconds")
    _require(data.alpha > 0, "data.alpha", data.alpha, "a positive Dirichlet concentration")
    _require(data.min_samples >= 1, "data.min_samples", data.min_samples, "at least 1")
    _require(data.shards_per_device >= 1, "data.shards_per_device",
             data.shards_per_device, "at least 1")
    _require(data.train_samples >= 0, "data.train_samples", data.train_samples,
             "0 (all) or a positive count")
    _require(data.test_samples >= 0, "data.test_samples", data.test_samples,
             "0 (all) or a positive count")
    _require(data.clients == 0 or data.clients >= cfg.devices.count, "data.clients",
             data.clients, f"0 (one client per device) or at least devices.count "
             f"({cfg.devices.count})")
    _require(train.batch_size >= 1, "train.batch_size", train.batch_size, "at least 1")
    _require(train.local_epochs >= 1, "train.local_epochs", train.local_epochs, "at least 1")
    _require(train.lr > 0, "train.lr", train.lr, "a positive learning rate")
    _require(0 <= train.momentum < 1, "train.momentum", train.momentum, "in [0, 1)")
    _require(train.max_grad_norm >= 0, "train.max_grad_norm", train.max_grad_norm,
             "0 (no clipping) or a positive norm")
    _require(train.cleanup_every >= 0, "train.cleanup_every", train.cleanup_every,
             "0 (never) or a number of batches")
    _require(train.max_retries >= 0, "train.max_retries", train.max_retries, "0 or more")
    _require(train.num_workers >= 0, "train.num_workers", train.num_workers, "0 or more")
    _require(0 < server.fraction <= 1, "server.fraction", server.fraction, "in (0, 1]")
    _require(1 <= server.min_devices <= cfg.devices.count, "server.min_devices",
             server.min_devices, f"between 1 and devices.count ({cfg.devices.count})")
    _require(server.max_skipped_rounds >= 1, "server.max_skipped_rounds",
             server.max_skipped_rounds, "at least 1")
    _require(server.max_update_norm >= 0, "server.max_update_norm", server.max_update_norm,
             "0 (no bound) or a positive norm")
    _require(server.server_lr >= 0, "server.server_lr", server.server_lr,
             "0 (the strategy's default) or a positive rate")
    _require(0 <= server.trim_fraction < 0.5, "server.trim_fraction",
             server.trim_fraction, "in [0, 0.5)")
    _require(server.byzantine >= 0, "server.byzantine", server.byzantine, "0 or more")
    _require(cfg.privacy.clip_norm >= 0, "privacy.clip_norm", cfg.privacy.clip_norm,
             "0 (off) or a positive norm")
    _require(cfg.privacy.noise_multiplier >= 0, "privacy.noise_multiplier",
             cfg.privacy.noise_multiplier, "0 (off) or a positive multiplier")
    _require(cfg.privacy.noise_multiplier == 0 or cfg.privacy.clip_norm > 0,
             "privacy.noise_multiplier", cfg.privacy.noise_multiplier,
             "noise needs privacy.clip_norm > 0 to bound each update first")
    _require(cfg.comm.timeout_s > 0, "comm.timeout_s", cfg.comm.timeout_s,
             "a positive number of seconds")
    _require(0 < cfg.comm.heartbeat_s < cfg.comm.timeout_s, "comm.heartbeat_s",
             cfg.comm.heartbeat_s, "positive and below comm.timeout_s")

    devices = cfg.devices
    _require(devices.count >= 1, "devices.count", devices.count, "at least 1 device")
    _require(len(devices.names) == devices.count, "devices.names", devices.names,
             f"give exactly devices.count ({devices.count}) names")
    _require(len(set(devices.names)) == len(devices.names) and all(devices.names),
             "devices.names", devices.names, "names must be distinct and non-empty")

    for i, fault in enumerate(cfg.faults):
        key = f"faults.{i}"
        _require(fault.kind in FAULT_KINDS, f"{key}.kind", fault.kind,
                 "choose one of " + ", ".join(FAULT_KINDS))
        if fault.kind in SERVER_FAULTS:
            _require(fault.device == 0, f"{key}.device", fault.device,
                     f"{fault.kind} is a server fault: set device = 0")
        else:
            _require(1 <= fault.device <= devices.count, f"{key}.device", fault.device,
                     f"a device rank between 1 and {devices.count}")
        _require(fault.round >= 1, f"{key}.round", fault.round, "a round number from 1")
        _require(fault.attempts >= 0, f"{key}.attempts", fault.attempts,
                 "0 (every attempt) or a count")


def check_world_size(cfg: Config, world_size: int) -> None:
    """The launcher's process count must be one server plus one process per device."""
    if world_size < 2:
        raise ConfigError(
            f"fedrun needs {cfg.world_size} processes (1 server + {cfg.devices.count} "
            f"devices); start it with launch/local.sh CONFIG, or torchrun "
            f"--nproc_per_node={cfg.world_size} -m fedrun --config CONFIG")
    if world_size != cfg.world_size:
        raise ConfigError(
            f"WORLD_SIZE is {world_size} but devices.count = {cfg.devices.count} needs "
            f"{cfg.world_size} processes (1 server + {cfg.devices.count} devices); run "
            f"torchrun --nproc_per_node={cfg.world_size}, or set devices.count="
            f"{world_size - 1} with {world_size - 1} names in devices.names")


def resume_values(cfg: Config) -> dict[str, Any]:
    """The values a checkpoint must agree with to be resumed."""
    out = {}
    for key in RESUME_KEYS:
        section, name = key.split(".")
        out[key] = getattr(getattr(cfg, section), name)
    return out


def digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
