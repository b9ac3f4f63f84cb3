"""The accuracy-aware mode: ``apply(net, rules, sample_inputs=..., error_budget=...)`` (msbnb_pass.mixed).

A four-layer Dense chain plus a side layer whose output is added, amplified 4x, to the chain's (a layer
made deliberately sensitive: its quantization error dominates the output's): the mode must find it, give it a more precise format, meet its budget
in bytes and cosine (checked against a float64 oracle of the rewritten network), and leave the network
untouched when the budget is bad or cannot be met. The knapsack is checked against brute force.
"""

from __future__ import annotations

import copy
import itertools

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import msbnb_pass as mb
from msbnb_pass.mixed import ErrorBudget, as_budget, backtrack, solve
from tests.bounds import gamma

D = 128
AMPLIFY = 4.0


class Chain(nn.Cell):
    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        layers = []
        for i in range(5):
            w = rng.standard_normal((D, D)) / np.sqrt(D)
            dense = nn.Dense(D, D, activation="relu" if i < 3 else None)
            dense.weight.set_data(Tensor(w.astype(np.float32)))
            dense.bias.set_data(Tensor((0.1 * rng.standard_normal(D)).astype(np.float32)))
            layers.append(dense)
        self.layers = nn.SequentialCell(layers[:4])
        self.side = layers[4]

    def construct(self, x):
        return self.layers(x) + AMPLIFY * self.side(x)


def _cells(net) -> dict[str, nn.Cell]:
    return {**{f"layers.{i}": c for i, c in enumerate(net.layers)}, "side": net.side}


@pytest.fixture(autouse=True)
def _pynative(ms_cpu):
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _x(rows: int = 48, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, D)).astype(np.float32)


def _weights(net) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every layer's (weight, bias) in float64 (chain, then side): the float one, or the dequantized one of a
    quantized cell."""
    out = []
    for cell in _cells(net).values():
        w = cell.dequantized_weight() if hasattr(cell, "dequantized_weight") else cell.weight.asnumpy()
        out.append((np.asarray(w, np.float64), cell.bias.asnumpy().astype(np.float64)))
    return out


def _forward64(weights, x) -> tuple[np.ndarray, np.ndarray]:
    """The network in float64, and the float32 rounding bound of computing it (errors propagate through
    |W| since ReLU is 1-Lipschitz; each matmul adds gamma(K + 2) times its magnitude; then the scaled sum)."""
    h = x.astype(np.float64)
    err = np.zeros_like(h)
    for i, (w, b) in enumerate(weights[:4]):
        mag = np.abs(h) @ np.abs(w).T + np.abs(b)
        err = err @ np.abs(w).T + gamma(D + 2) * mag
        h = h @ w.T + b
        if i < 3:
            h = np.maximum(h, 0.0)
    w, b = weights[4]
    side = x.astype(np.float64) @ w.T + b
    side_err = gamma(D + 2) * (np.abs(x) @ np.abs(w).T + np.abs(b))
    out = h + AMPLIFY * side
    err = err + AMPLIFY * side_err * (1 + gamma(1)) + gamma(2) * (np.abs(h) + AMPLIFY * np.abs(side))
    return out, err


def _mean_cos(a, b) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


def _state(net) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def _assert_untouched(net, before: dict[str, np.ndarray]) -> None:
    after = _state(net)
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert np.array_equal(after[k], v), k
    assert all(type(c) is nn.Dense for c in _cells(net).values())


def test_error_budget_meets_cosine_and_bytes_and_upgrades_the_sensitive_layer():
    net = Chain()
    weights = _weights(net)
    x = _x()
    budget = ErrorBudget(min_cosine=0.999, max_bytes_ratio=1.3)
    result = mb.apply(net, "nf4", sample_inputs=Tensor(x), error_budget=budget)
    plan = result.mixed
    choice = {c.path: c.chosen for c in plan.layers}
    assert len(choice) == 5 and set(choice.values()) <= {"nf4:64", "nf4:32", "int8", "float"}
    # the heavy-tailed layer is by far the most sensitive, and gets a more precise format
    sens = {c.path: c.sensitivity["nf4:64"] for c in plan.layers}
    assert max(sens, key=sens.get) == "side"
    assert sorted(sens.values())[-2] < sens["side"] / 4
    assert choice["side"] in ("int8", "float")

    # bytes: the plan's figures are the cells' own, and within the cap
    cells = _cells(net)
    for path, chosen in choice.items():
        cell = cells[path]
        expected = {"int8": mb.Linear8bit, "float": nn.Dense}.get(chosen, mb.Linear4bit)
        assert type(cell) is expected, (path, chosen, type(cell))
        if chosen.startswith("nf4"):
            assert cell.blocksize == int(chosen.split(":")[1])
    assert plan.bytes == sum(
        c.weight_nbytes() if hasattr(c, "weight_nbytes") else c.weight.size * 4 for c in cells.values()
    )
    base_bytes = sum(c.bytes["nf4:64"] for c in plan.layers)
    assert plan.base_bytes == base_bytes and plan.bytes <= 1.3 * base_bytes

    # cosine: the rewritten network against a float64 oracle of the same dequantized weights, and the
    # measured cosine against the float64 cosine (within what float32 rounding of both forwards allows)
    ref, ref_err = _forward64(weights, x)
    mix, mix_err = _forward64(_weights(net), x)
    y = net(Tensor(x)).asnumpy().astype(np.float64)
    assert np.all(np.abs(y - mix) <= mix_err)
    oracle = _mean_cos(ref, mix)
    slack = float(np.mean(2 * (np.linalg.norm(ref_err, axis=1) / np.linalg.norm(ref, axis=1))))
    slack += float(np.mean(2 * (np.linalg.norm(mix_err, axis=1) / np.linalg.norm(mix, axis=1))))
    assert abs(plan.measured_cosine - oracle) <= slack
    assert oracle >= 0.999 - slack
    # and all-NF4 would not have met it
    all_nf4 = [
        (np.asarray(mb.Linear4bit.from_float(w.astype(np.float32)).dequantized_weight(), np.float64), b)
        for w, b in weights
    ]
    assert _mean_cos(ref, _forward64(all_nf4, x)[0]) < 0.999
    assert abs(plan.base_cosine - _mean_cos(ref, _forward64(all_nf4, x)[0])) <= 2 * slack
    text = result.summary()
    assert "accuracy-aware (min_cosine=0.999, max_bytes_ratio=1.3)" in text
    assert result.to_dict()["mixed"]["bytes_ratio"] == pytest.approx(plan.bytes / plan.base_bytes)


def test_min_cosine_alone_spends_the_fewest_bytes_that_reach_it():
    x = _x()
    loose = mb.apply(Chain(), "nf4", sample_inputs=Tensor(x), error_budget=0.02).mixed  # min_cosine 0.98
    tight = mb.apply(Chain(), "nf4", sample_inputs=Tensor(x), error_budget={"min_cosine": 0.9995}).mixed
    assert loose.budget.min_cosine == pytest.approx(0.98)
    assert loose.measured_cosine >= 0.98 and tight.measured_cosine >= 0.999
    assert loose.bytes < tight.bytes


def test_knapsack_is_exact_against_brute_force_and_beats_greedy():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n, k = 5, 3
        sizes = [sorted(rng.integers(1, 12, k).tolist()) for _ in range(n)]
        errors = [sorted(rng.random(k).tolist(), reverse=True) for _ in range(n)]
        cap = int(rng.integers(sum(s[0] for s in sizes), sum(s[-1] for s in sizes) + 1))
        best, table = solve(errors, sizes, cap)
        pick = backtrack(table, sizes, cap)
        brute = min(
            sum(errors[i][c] for i, c in enumerate(combo))
            for combo in itertools.product(range(k), repeat=n)
            if sum(sizes[i][c] for i, c in enumerate(combo)) <= cap
        )
        assert sum(sizes[i][c] for i, c in enumerate(pick)) <= cap
        assert sum(errors[i][c] for i, c in enumerate(pick)) == pytest.approx(brute) == pytest.approx(best[cap])
    # greedy by error saved per byte upgrades the small layer first and then cannot afford the big one
    errors = [[1.0, 0.0], [10.0, 0.0]]
    sizes = [[1, 2], [1, 10]]
    best, table = solve(errors, sizes, 11)
    assert backtrack(table, sizes, 11) == [0, 1] and best[11] == 1.0


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (1.5, "error_budget: a number is the allowed mean cosine distance (1 - cosine) and must be in (0, 1), got 1.5"),
        ({}, "error_budget: give min_cosine, max_bytes_ratio or both"),
        ({"min_cosine": 1.0}, "error_budget: min_cosine must be in (0, 1), got 1.0"),
        (
            {"max_bytes_ratio": -1},
            "error_budget: max_bytes_ratio must be a positive finite number (a multiple of the all-base-format "
            "bytes, e.g. 1.2), got -1",
        ),
        (
            {"max_bytes_ratio": 1.2, "candidates": ["nf5"]},
            "error_budget: candidates: unknown format 'nf5'; accepted: 'float', 'int8', or nf4/fp4/int4 with an "
            "optional blocksize ('nf4', 'nf4:32')",
        ),
        (
            {"max_bytes_ratio": 1.2, "candidates": ["nf4:48"]},
            "error_budget: candidates: format 'nf4:48': the blocksize must be a power of two in [32, 4096]",
        ),
        (
            {"max_cos": 0.9},
            "error_budget: unknown key(s) ['max_cos']; accepted: ['candidates', 'max_bytes_ratio', "
            "'min_cosine', 'output_fn']",
        ),
        ("0.98", "error_budget must be an ErrorBudget, a dict of its fields or a number in (0, 1), got str"),
    ],
)
def test_bad_error_budgets_raise_clear_errors(budget, message):
    net = Chain()
    before = _state(net)
    with pytest.raises(mb.PassError) as info:
        mb.apply(net, "nf4", sample_inputs=Tensor(_x(8)), error_budget=budget)
    assert str(info.value) == message
    _assert_untouched(net, before)


def test_error_budget_needs_sample_inputs_and_no_dry_run():
    net = Chain()
    with pytest.raises(mb.PassError, match=r"^error_budget needs sample_inputs: the layers' sensitivity is measured"):
        mb.apply(net, "nf4", error_budget=0.01)
    with pytest.raises(mb.PassError, match=r"^error_budget cannot be combined with dry_run"):
        mb.apply(net, "nf4", sample_inputs=Tensor(_x(8)), error_budget=0.01, dry_run=True)
    with pytest.raises(mb.PassError, match=r"^error_budget: no layer is rewritten with a weight-only format"):
        mb.apply(net, "llm_int8", sample_inputs=Tensor(_x(8)), error_budget=0.01)


def test_unreachable_budgets_fail_and_leave_the_network_untouched():
    net = Chain()
    before = _state(net)
    with pytest.raises(mb.PassError) as info:  # cheaper than all-NF4 is impossible with these candidates
        mb.apply(net, "nf4", sample_inputs=Tensor(_x(8)), error_budget={"max_bytes_ratio": 0.5})
    assert str(info.value).startswith("error_budget: max_bytes_ratio=0.5 allows ")
    assert "but the cheapest choice of the candidates takes" in str(info.value)
    _assert_untouched(net, before)
    with pytest.raises(mb.PassError) as info:  # a cosine beyond reach within the cap
        mb.apply(net, "nf4", sample_inputs=Tensor(_x(8)), error_budget={"min_cosine": 0.999999, "max_bytes_ratio": 1.0})
    assert "< min_cosine 0.999999 on the sample inputs within max_bytes_ratio=1.0" in str(info.value)
    assert str(info.value).endswith("the network is untouched")
    _assert_untouched(net, before)
    # on_violation="warn" keeps the best mix found and says so
    result = mb.apply(
        net,
        "nf4",
        sample_inputs=Tensor(_x(8)),
        error_budget={"min_cosine": 0.999999, "max_bytes_ratio": 1.0},
        on_violation="warn",
    )
    assert result.mixed.notes and "< min_cosine 0.999999" in result.mixed.notes[0]


def test_as_budget_forms_agree():
    assert as_budget(0.02) == ErrorBudget(min_cosine=0.98)
    assert as_budget({"max_bytes_ratio": 1.2}) == ErrorBudget(max_bytes_ratio=1.2)
    b = ErrorBudget(max_bytes_ratio=1.2, candidates=["int8"])
    assert b.candidates == ("int8",) and as_budget(b) is b
    assert copy.deepcopy(b) == b


class WithIdleLayer(Chain):
    """Chain plus a layer its construct never calls (like BERT's pooler when only hidden states are used)."""

    def __init__(self):
        super().__init__()
        self.idle = nn.Dense(D, D)


def test_a_layer_that_does_not_run_costs_no_forward_run_and_stays_cheapest():
    result = mb.apply(WithIdleLayer(), "nf4", sample_inputs=Tensor(_x(8)), error_budget={"max_bytes_ratio": 1.3})
    plan = result.mixed
    idle = next(c for c in plan.layers if c.path == "idle")
    assert idle.measured == "" and set(idle.sensitivity.values()) == {0.0} and idle.chosen == "nf4:64"
    assert all(c.measured == "nf4:64" for c in plan.layers if c.path != "idle")
    # one run per layer that ran (5), all at the base format (1), the chosen mix (1)
    assert plan.forward_runs == 7
