"""Aggregation strategies: hand-worked results, poisoned rounds, errors, saved state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedrun.config import CHOICES, ConfigError, ServerConfig
from fedrun.strategies import Strategy, StrategyError, Update, build_strategy
from fedrun.strategies.fedprox import proximal_term
from fedrun.strategies.privacy import clip_update, gaussian_noise
from fedrun.strategies.trimmed_mean import TrimmedMean

torch.set_num_threads(1)

ALL = CHOICES["server.strategy"]
STATEFUL = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def updates(*rows: tuple[float, ...], samples: list[int] | None = None) -> list[Update]:
    """Updates from ranks 1..n with the given weights (and 1 sample each by default)."""
    samples = samples or [1] * len(rows)
    return [Update(rank=i + 1, weights=t(*row), samples=s)
            for i, (row, s) in enumerate(zip(rows, samples))]


def strategy(name: str, **fields) -> Strategy:
    return build_strategy(ServerConfig(strategy=name, **fields))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> bool:
    return torch.allclose(a, b, rtol=0, atol=atol)


# Building


def test_every_configured_strategy_builds_under_its_name():
    """build_strategy knows every value that server.strategy accepts."""
    for name in ALL:
        assert strategy(name).name == name


def test_unknown_strategy_is_a_config_error():
    """An unknown server.strategy is a ConfigError that lists the known ones."""
    with pytest.raises(ConfigError, match="fedavg"):
        strategy("fedsgd")


# FedAvg and FedProx


def test_fedavg_weights_by_samples():
    """FedAvg is the sample-weighted mean: 1 and 3 samples give (w1 + 3 w2) / 4."""
    rows = ((1.0, 2.0, 3.0), (3.0, 4.0, 5.0))
    s = strategy("fedavg")
    weighted = s.aggregate(t(0, 0, 0), updates(*rows, samples=[1, 3]), 1)
    equal = s.aggregate(t(0, 0, 0), updates(*rows, samples=[2, 2]), 1)
    assert torch.equal(weighted, t(2.5, 3.5, 4.5))
    assert torch.equal(equal, t(2.0, 3.0, 4.0))


def test_fedavg_ignores_the_previous_global_model():
    """The FedAvg result depends on the updates only, not on the old global weights."""
    ups = updates((1.0, 2.0), (3.0, 6.0))
    a = strategy("fedavg").aggregate(t(0, 0), ups, 1)
    b = strategy("fedavg").aggregate(t(100, -100), ups, 1)
    assert torch.equal(a, t(2.0, 4.0)) and torch.equal(a, b)


def test_fedprox_aggregates_like_fedavg():
    """On the server FedProx is FedAvg: same updates, same result."""
    ups = updates((1.0, 0.0, 4.0), (2.0, 2.0, 0.0), (0.0, 1.0, 1.0), samples=[1, 2, 1])
    prox = strategy("fedprox").aggregate(t(0, 0, 0), ups, 1)
    assert torch.equal(prox, strategy("fedavg").aggregate(t(0, 0, 0), ups, 1))
    assert torch.equal(prox, t(1.25, 1.25, 1.25))


def test_proximal_term_value_and_gradient():
    """mu/2 ||w - w_g||^2 = 0.05 * (1 + 4) = 0.25, with gradient mu (w - w_g)."""
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    global_params = [torch.zeros(1, 2), torch.tensor([0.5])]
    term = proximal_term(model, global_params, mu=0.1)
    term.backward()
    assert math.isclose(term.item(), 0.25, rel_tol=1e-6)
    assert close(model.weight.grad, torch.tensor([[0.1, 0.2]]))
    assert torch.equal(model.bias.grad, torch.zeros(1))
    assert global_params[0].grad is None


def test_proximal_term_rejects_mismatched_parameters():
    """Global parameters not lined up with model.parameters() are a ValueError."""
    with pytest.raises(ValueError, match="order of model.parameters"):
        proximal_term(nn.Linear(2, 1), [torch.zeros(1, 2)], mu=0.1)


# Server optimisers


def test_default_server_rates():
    """server.server_lr = 0 means 1.0 for FedAvgM and 0.01 for the adaptive ones."""
    assert strategy("fedavgm").lr == 1.0
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        assert strategy(name).lr == 0.01
    assert strategy("fedadam", server_lr=0.5).lr == 0.5


def test_fedavgm_carries_momentum_into_the_next_round():
    """FedAvgM, beta 0.9, lr 1: d = [0.5, -1] then d = 0 still moves by 0.9 v."""
    s = strategy("fedavgm", server_momentum=0.9)
    # Round 1: fedavg = [0.5, 2], d = [1, 1] - [0.5, 2] = [0.5, -1] = v, new = [0.5, 2].
    first = s.aggregate(t(1, 1), updates((0.0, 2.0), (1.0, 2.0)), 1)
    assert close(first, t(0.5, 2.0))
    # Round 2: fedavg equals the global, d = 0, v = [0.45, -0.9], new = [0.05, 2.9].
    second = s.aggregate(first, updates((0.5, 2.0), (0.5, 2.0)), 2)
    assert close(second, t(0.05, 2.9))


def test_fedadam_first_round_by_hand():
    """FedAdam, b1 = b2 = 0.5, tau = 1: delta [7, 1, -7] gives [3.5/6, 0.25, -3.5/6]."""
    s = strategy("fedadam", beta1=0.5, beta2=0.5, tau=1.0, server_lr=1.0)
    # m = 0.5 delta = [3.5, 0.5, -3.5]; v = 0.5 * 1 + 0.5 delta^2 = [25, 1, 25];
    # sqrt(v) + tau = [6, 2, 6].
    new = s.aggregate(t(0, 0, 0), updates((6.0, 1.0, -6.0), (8.0, 1.0, -8.0)), 1)
    assert close(new, t(0.5833333, 0.25, -0.5833333))


def test_fedyogi_second_moment_rule_by_hand():
    """FedYogi, tau = 2, b2 = 0.5: v grows where delta^2 > v and shrinks where below."""
    s = strategy("fedyogi", beta1=0.5, beta2=0.5, tau=2.0, server_lr=1.0)
    # v0 = 4. delta [8, 0, -8, 1]: v = 4 + 32 = 36; 4 - 0 = 4; 36; 4 - 0.5 = 3.5.
    # m = [4, 0, -4, 0.5]; step = m / (sqrt(v) + 2) = [0.5, 0, -0.5, 0.5 / 3.8708287].
    new = s.aggregate(t(0, 0, 0, 0), updates((8.0, 0.0, -8.0, 1.0)), 1)
    assert close(new, t(0.5, 0.0, -0.5, 0.1291713))
    # Adam's rule on the same delta shrinks v to 0.5 * 4 + 0.5 * 1 = 2.5 instead.
    adam = strategy("fedadam", beta1=0.5, beta2=0.5, tau=2.0, server_lr=1.0)
    other = adam.aggregate(t(0, 0, 0, 0), updates((8.0, 0.0, -8.0, 1.0)), 1)
    assert close(other[3:], t(0.1396204))


def test_fedadagrad_accumulates_squares_by_hand():
    """FedAdagrad, tau = 4, b1 = 0.5: v = 16 + 9 = 25, then 34 after a second delta."""
    s = strategy("fedadagrad", beta1=0.5, tau=4.0, server_lr=1.0, beta2=5.0)
    # Round 1: m = [1.5, 0, -1.5], v = [25, 16, 25], step = 1.5 / (5 + 4) = 1/6.
    first = s.aggregate(t(0, 0, 0), updates((2.0, 0.0, -2.0), (4.0, 0.0, -4.0)), 1)
    assert close(first, t(1 / 6, 0.0, -1 / 6))
    # Round 2, the same delta: m = 2.25, v = 34, step = 2.25 / (sqrt(34) + 4).
    second = s.aggregate(first, updates(tuple((first + t(3, 0, -3)).tolist())), 2)
    assert close(second - first, t(0.2288690, 0.0, -0.2288690))


# Robust strategies by hand


def test_median_odd_and_even_by_hand():
    """Median per coordinate; with an even count, the mean of the two middle values."""
    rows = ((1.0, 5.0, 2.0), (3.0, 1.0, 7.0), (2.0, 9.0, 4.0))
    s = strategy("median", byzantine=1)
    assert torch.equal(s.aggregate(t(0, 0, 0), updates(*rows), 1), t(2, 5, 4))
    # Adding [10, 0, 0]: sorted columns [1,2,3,10], [0,1,5,9], [0,2,4,7].
    even = s.aggregate(t(0, 0, 0), updates(*rows, (10.0, 0.0, 0.0)), 1)
    assert torch.equal(even, t(2.5, 3.0, 3.0))


def test_trimmed_mean_by_hand():
    """Trimmed mean, t = 0.2 of 5 cuts one value from each end of every coordinate."""
    rows = ((1.0, 10.0, -1.0), (2.0, 20.0, -2.0), (3.0, 30.0, -3.0), (4.0, 40.0, -4.0),
            (100.0, -50.0, 0.0))
    s = strategy("trimmed_mean", trim_fraction=0.2, byzantine=0)
    assert close(s.aggregate(t(0, 0, 0), updates(*rows), 1), t(3.0, 20.0, -2.0))


def test_trimmed_mean_cut_that_rounds_to_zero_falls_back_to_byzantine():
    """floor(0.2 * 4) = 0: the cut is server.byzantine; 0 only when that is 0 too."""
    rows = ((1.0,), (2.0,), (3.0,), (100.0,))
    guarded = strategy("trimmed_mean", trim_fraction=0.2, byzantine=1)
    plain = strategy("trimmed_mean", trim_fraction=0.2, byzantine=0)
    assert torch.equal(guarded.aggregate(t(0), updates(*rows), 1), t(2.5))
    assert torch.equal(plain.aggregate(t(0), updates(*rows), 1), t(26.5))


def test_trimmed_mean_cut_sizes():
    """The cut is floor(t * n), not thrown off by 0.29 * 100 = 28.999999999999996."""
    s = TrimmedMean(ServerConfig("trimmed_mean", trim_fraction=0.2, byzantine=0))
    assert [s.cut(n) for n in (1, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]
    s = TrimmedMean(ServerConfig("trimmed_mean", trim_fraction=0.29, byzantine=0))
    assert s.cut(100) == 29


# Five points of the plane for Krum, f = 1, so 2 neighbours each. Squared distances give
# scores a = 1 + 2 = 3, b = 1 + 1 = 2, c = 2 + 4 = 6, d = 1 + 2 = 3, e = 162 + 164.
KRUM_ROWS = ((0.0, 0.0), (1.0, 0.0), (0.0, 2.0), (1.0, 1.0), (10.0, 10.0))


def test_krum_picks_the_lowest_score_by_hand():
    """Krum returns b = [1, 0], the point with the lowest score, whatever the order."""
    s = strategy("krum", byzantine=1)
    ups = updates(*KRUM_ROWS)
    assert torch.equal(s.aggregate(t(0, 0), ups, 1), t(1.0, 0.0))
    assert s.last_selected == [2]
    assert torch.equal(s.aggregate(t(0, 0), ups[::-1], 1), t(1.0, 0.0))


def test_multi_krum_averages_the_best_scores_by_hand():
    """Multi-Krum keeps b, a, d (scores 2, 3, 3) for keep 3, and a-d for keep 0."""
    three = strategy("multi_krum", byzantine=1, multi_krum_keep=3)
    assert close(three.aggregate(t(0, 0), updates(*KRUM_ROWS), 1), t(2 / 3, 1 / 3))
    assert three.last_selected == [2, 1, 4]
    default = strategy("multi_krum", byzantine=1, multi_krum_keep=0)
    assert torch.equal(default.aggregate(t(0, 0), updates(*KRUM_ROWS), 1), t(0.5, 0.75))


def test_krum_scores_an_update_holding_nan_last():
    """An update holding nan is never picked by Multi-Krum, even with keep = n - 1."""
    rows = KRUM_ROWS[:4] + ((float("nan"), 0.0),)
    s = strategy("multi_krum", byzantine=1, multi_krum_keep=4)
    assert torch.equal(s.aggregate(t(0, 0), updates(*rows), 1), t(0.5, 0.75))
    assert 5 not in s.last_selected


# Poisoned rounds

OFFSETS = ((1, -2, 0, 3), (-1, 1, 2, -1), (2, 0, -1, 1), (0, 2, -2, -2), (-2, -1, 1, 0))
HONEST = [t(0.50, -1.00, 2.00, 0.25) + 0.01 * t(*o) for o in OFFSETS]


def poisoned(attack: str) -> list[Update]:
    """Ranks 1-4 honest, rank 5 sends its honest weights scaled by 1e3 or by -1e3."""
    bad = HONEST[4] * (1e3 if attack == "scaled" else -1e3)
    return [Update(rank=i + 1, weights=w, samples=10) for i, w in
            enumerate(HONEST[:4] + [bad])]


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
@pytest.mark.parametrize("name", ROBUST)
def test_robust_strategy_resists_one_poisoned_device(name, attack):
    """One poisoned update of five moves a robust result < 0.05, FedAvg's > 100."""
    honest_mean = torch.stack(HONEST[:4]).mean(dim=0)
    cfg = dict(byzantine=1, trim_fraction=0.2, multi_krum_keep=0)
    robust = strategy(name, **cfg).aggregate(t(0, 0, 0, 0), poisoned(attack), 1)
    plain = strategy("fedavg").aggregate(t(0, 0, 0, 0), poisoned(attack), 1)
    assert (robust - honest_mean).abs().max() < 0.05
    assert (plain - honest_mean).abs().max() > 100


@pytest.mark.parametrize("name", ROBUST)
def test_robust_strategy_ignores_sample_counts(name):
    """A device that claims a huge sample count gains no weight in a robust strategy."""
    ups = poisoned("scaled")
    boasting = ups[:4] + [Update(rank=5, weights=ups[4].weights, samples=10**9)]
    cfg = dict(byzantine=1, trim_fraction=0.2)
    a = strategy(name, **cfg).aggregate(t(0, 0, 0, 0), ups, 1)
    b = strategy(name, **cfg).aggregate(t(0, 0, 0, 0), boasting, 1)
    assert torch.equal(a, b)


# Rounds that cannot be aggregated and setups that cannot run


def test_krum_with_too_few_updates_is_a_strategy_error():
    """Krum with f = 1 needs 2f + 3 = 5 updates; four raise StrategyError saying so."""
    for name in ("krum", "multi_krum"):
        with pytest.raises(StrategyError, match=r"needs at least 5 \(2f\+3"):
            strategy(name, byzantine=1).aggregate(t(0, 0), updates(*KRUM_ROWS[:4]), 3)


def test_median_with_too_few_updates_is_a_strategy_error():
    """The median with f = 1 needs 2f + 1 = 3 updates; two raise StrategyError."""
    with pytest.raises(StrategyError, match="needs at least 3"):
        strategy("median", byzantine=1).aggregate(t(0), updates((1.0,), (2.0,)), 1)


def test_empty_round_is_a_strategy_error():
    """No updates at all is a StrategyError for every strategy."""
    for name in ALL:
        with pytest.raises(StrategyError):
            strategy(name, byzantine=0).aggregate(t(0, 0), [], 1)


def test_malformed_updates_are_strategy_errors():
    """A wrong shape, a repeated rank or zero samples is a StrategyError naming it."""
    s = strategy("fedavg")
    with pytest.raises(StrategyError, match="rank 2 has shape"):
        s.aggregate(t(0, 0), [Update(1, t(1, 1), 1), Update(2, t(1, 1, 1), 1)], 1)
    with pytest.raises(StrategyError, match="more than one update"):
        s.aggregate(t(0, 0), [Update(1, t(1, 1), 1), Update(1, t(1, 1), 1)], 1)
    with pytest.raises(StrategyError, match="0 samples"):
        s.aggregate(t(0, 0), [Update(1, t(1, 1), 0)], 1)


def test_check_rejects_too_few_devices_for_krum():
    """check(4) for Krum with f = 1 is a ConfigError naming the keys and the fix."""
    s = strategy("krum", byzantine=1)
    with pytest.raises(ConfigError, match="server.strategy") as err:
        s.check(4)
    assert "server.byzantine=0" in str(err.value) and "devices.count" in str(err.value)
    s.check(5)


def test_check_suggests_the_largest_byzantine_that_fits():
    """check(4) for the median with f = 2 suggests server.byzantine=1."""
    with pytest.raises(ConfigError, match="server.byzantine=1 or lower"):
        strategy("median", byzantine=2).check(4)


def test_check_rejects_bad_strategy_hyperparameters():
    """Out-of-range betas, tau, momentum and multi_krum_keep are ConfigErrors by key."""
    cases = [
        ("fedadam", dict(beta1=1.0), "server.beta1"),
        ("fedyogi", dict(beta2=-0.1), "server.beta2"),
        ("fedadagrad", dict(tau=0.0), "server.tau"),
        ("fedavgm", dict(server_momentum=1.5), "server.server_momentum"),
        ("fedprox", dict(proximal_mu=-1.0), "server.proximal_mu"),
        ("multi_krum", dict(byzantine=1, multi_krum_keep=5), "server.multi_krum_keep"),
        ("multi_krum", dict(byzantine=1, multi_krum_keep=-1), "server.multi_krum_keep"),
    ]
    for name, fields, key in cases:
        with pytest.raises(ConfigError, match=key):
            strategy(name, **fields).check(5)
    strategy("fedadagrad", beta2=5.0).check(5)  # FedAdagrad has no beta2 to check


# Saved state


def random_round(gen: torch.Generator, size: int = 6, n: int = 5) -> list[Update]:
    return [Update(rank=r + 1, weights=torch.randn(size, generator=gen),
                   samples=int(torch.randint(1, 50, (1,), generator=gen)))
            for r in range(n)]


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip_gives_bit_identical_next_round(name, tmp_path):
    """Two rounds, save, load(weights_only=True) into a fresh one: equal round 3."""
    fields = dict(byzantine=1, server_lr=0.1)
    gen = torch.Generator().manual_seed(7)
    live = strategy(name, **fields)
    weights = torch.zeros(6)
    for server_round in (1, 2):
        weights = live.aggregate(weights, random_round(gen), server_round)

    path = tmp_path / "strategy.pt"
    torch.save(live.state_dict(), path)
    restored = strategy(name, **fields)
    restored.load_state_dict(torch.load(path, weights_only=True))

    round3 = random_round(gen)
    assert torch.equal(live.aggregate(weights, round3, 3),
                       restored.aggregate(weights, round3, 3))
    if name in STATEFUL:
        assert any(isinstance(v, torch.Tensor) for v in live.state_dict().values())


def test_state_of_another_strategy_is_refused():
    """Loading FedAdam's state into FedYogi is a StrategyError naming both."""
    adam = strategy("fedadam")
    adam.aggregate(t(0, 0), updates((1.0, 1.0)), 1)
    with pytest.raises(StrategyError, match="'fedadam'.*'fedyogi'"):
        strategy("fedyogi").load_state_dict(adam.state_dict())


def test_state_of_another_model_size_is_refused():
    """Saved moments of another shape are a StrategyError, not a broadcast."""
    adam = strategy("fedadam")
    adam.aggregate(t(0, 0), updates((1.0, 1.0)), 1)
    fresh = strategy("fedadam")
    fresh.load_state_dict(adam.state_dict())
    with pytest.raises(StrategyError, match="another model"):
        fresh.aggregate(t(0, 0, 0), updates((1.0, 1.0, 1.0)), 2)


# Inputs are left alone


@pytest.mark.parametrize("name", ALL)
def test_aggregate_never_mutates_its_inputs(name):
    """Global weights, updates and a handed-out state_dict are unchanged by a round."""
    gen = torch.Generator().manual_seed(3)
    s = strategy(name, byzantine=1)
    s.aggregate(torch.zeros(6), random_round(gen), 1)
    state = s.state_dict()
    saved = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    global_weights = torch.randn(6, generator=gen)
    ups = random_round(gen)
    copies = [u.weights.clone() for u in ups]
    before = global_weights.clone()

    out = s.aggregate(global_weights, ups, 2)

    assert torch.equal(global_weights, before)
    assert all(torch.equal(u.weights, c) for u, c in zip(ups, copies))
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert out.dtype == torch.float32 and out.shape == (6,)
    ptrs = {u.weights.data_ptr() for u in ups} | {global_weights.data_ptr()}
    assert out.data_ptr() not in ptrs


@pytest.mark.parametrize("name", ALL)
def test_result_owns_only_its_own_storage(name):
    """The new global tensor is no view into a larger block such as the sorted stack."""
    out = strategy(name, byzantine=1).aggregate(
        torch.zeros(6), random_round(torch.Generator().manual_seed(5)), 1)
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()


# Privacy building blocks


def test_clip_update_scales_long_deltas_down_to_the_bound():
    """[3, 4] clipped to 1 is [0.6, 0.8]; a random long delta ends at norm <= bound."""
    assert close(clip_update(t(3, 4), 1.0), t(0.6, 0.8))
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 50
    before = delta.clone()
    clipped = clip_update(delta, 2.5)
    assert clipped.norm().item() <= 2.5 * (1 + 1e-6)
    assert torch.equal(delta, before)


def test_clip_update_never_scales_up():
    """A delta already inside the bound comes back equal, as a new tensor."""
    delta = t(0.3, 0.4)
    out = clip_update(delta, 1.0)
    assert torch.equal(out, delta) and out.data_ptr() != delta.data_ptr()


def test_clip_update_rejects_bad_input():
    """A non-positive bound or a non-finite delta is a ValueError."""
    with pytest.raises(ValueError, match="positive"):
        clip_update(t(1, 1), 0.0)
    with pytest.raises(ValueError, match="inf or nan"):
        clip_update(t(1, float("inf")), 1.0)


def test_gaussian_noise_is_seeded_and_scaled():
    """Same seed, same noise; its spread matches std; std 0 is zeros; std < 0 fails."""
    a = gaussian_noise((20000,), 0.5, torch.Generator().manual_seed(1))
    b = gaussian_noise((20000,), 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert abs(a.std().item() - 0.5) < 0.02 and abs(a.mean().item()) < 0.02
    assert torch.equal(gaussian_noise((3,), 0.0, torch.Generator()), torch.zeros(3))
    with pytest.raises(ValueError, match="negative"):
        gaussian_noise((3,), -1.0, torch.Generator())
