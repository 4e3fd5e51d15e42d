"""Building blocks for differentially private averaging (DP-FedAvg).

H. Brendan McMahan, Daniel Ramage, Kunal Talwar, Li Zhang (2018), "Learning
Differentially Private Recurrent Language Models", ICLR 2018.

The recipe, with C = privacy.clip_norm, z = privacy.noise_multiplier and n devices in
the round:
1. each device's delta (its weights minus the round's global weights) is clipped to
   L2 norm at most C (`clip_update`);
2. the clipped deltas are averaged without sample weights, since a weight per device
   would let one device's share of the mean exceed C / n;
3. Gaussian noise N(0, (z * C / n)^2) is added to each coordinate of the mean
   (`gaussian_noise`), and the noisy mean delta is added to the global weights.

What that gives: no single device moves the mean by more than C / n, and the released
model carries noise scaled to that bound, which is the Gaussian mechanism that
DP-FedAvg's analysis starts from.

What it does not give: fedrun does no privacy accounting, so no (epsilon, delta) is
claimed for a run. The paper's guarantee also assumes that devices are sampled at
random each round and that n (or its expected value) is fixed in advance; a round
that uses whichever devices answered meets neither. The server sees every
device's unclipped update in the clear (there is no secure aggregation), so this
protects against those who see the global model, not against the server. Noise is
added once on the server; nothing here is local differential privacy.
"""

from __future__ import annotations

import math

import torch


def clip_update(delta: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """`delta` scaled down to L2 norm `clip_norm` when it is longer; never scaled up.

    Returns a new tensor in every case. After scaling, the norm is `clip_norm` up to
    float rounding of the tensor's dtype (a relative 1e-6 in float32).
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm = {clip_norm} must be positive to bound an update")
    # The norm in float64: squares of a float32 update near 1e19 would overflow.
    norm = torch.linalg.vector_norm(delta, dtype=torch.float64).item()
    if not math.isfinite(norm):
        raise ValueError("cannot clip a delta that holds inf or nan values")
    if norm <= clip_norm:
        return delta.clone()
    return delta * (clip_norm / norm)


def gaussian_noise(
    shape: torch.Size | tuple[int, ...], std: float, generator: torch.Generator
) -> torch.Tensor:
    """float32 noise N(0, std^2), drawn from `generator` on that generator's device.

    For DP-FedAvg, std = privacy.noise_multiplier * privacy.clip_norm / n. Noise
    from a seeded generator is reproducible, so whoever knows the seed can subtract it
    again: seed this generator from a secret, not from run.seed.
    """
    # TODO(privacy): no secret seed source yet; noise seeded from run.seed is removable
    if std < 0:
        raise ValueError(f"std = {std} is negative; a standard deviation is >= 0")
    noise = torch.randn(
        shape, generator=generator, dtype=torch.float32, device=generator.device
    )
    return noise * std
