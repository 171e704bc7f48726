"""Paired accuracy comparisons: exact McNemar, items needed, against hand computations and simulation."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.accuracy import above_chance, items_needed, mcnemar_exact, paired_accuracy
from analysis.errors import InputError


def test_mcnemar_exact_by_hand():
    # b = 10, c = 2: p = 2 P(X <= 2), X ~ Binomial(12, 1/2) = 2 (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(2, 10) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(InputError):
        mcnemar_exact(-1, 2)


def test_items_needed_formula_and_power_by_simulation():
    z_a, z_b = 1.959963984540054, 0.8416212335729143
    want = math.ceil((z_a * math.sqrt(0.15) + z_b * math.sqrt(0.15 - 0.03**2)) ** 2 / 0.03**2)
    n = items_needed(0.15, 0.03)
    assert n == want
    # simulate paired items at that size: discordant ~ Binomial(n, 0.15), a's share of them gives a 3-point lead
    rng = np.random.default_rng(0)
    discordant = rng.binomial(n, 0.15, size=1500)
    a_only = rng.binomial(discordant, (0.15 + 0.03) / (2 * 0.15))
    power = np.mean([mcnemar_exact(b, d - b) < 0.05 for b, d in zip(a_only, discordant)])
    assert 0.75 < power < 0.85
    with pytest.raises(InputError):
        items_needed(0.0005, 0.03)


def test_above_chance():
    # 7 of 8 right against chance 1/2: P(X >= 7) = (8 + 1) / 256
    assert above_chance(7, 8, 0.5) == pytest.approx(9 / 256)


def test_paired_accuracy_known_counts():
    # task t: 10 items; a right on 0-7, b right on 0-4 and 8: a_only = {5, 6, 7}, b_only = {8}
    a = [1] * 8 + [0, 0]
    b = [1] * 5 + [0, 0, 0, 1, 0]
    items = pd.DataFrame({"drop_set": ["A"] * 10 + ["B"] * 10, "task": "t", "item": list(range(10)) * 2, "correct": a + b})
    row = paired_accuracy(items, "A", "B", n_boot=500).iloc[0]
    assert (row["n"], row["a_only"], row["b_only"]) == (10, 3, 1)
    assert (row["acc_a"], row["acc_b"], row["difference"]) == pytest.approx((0.8, 0.6, 0.2))
    assert row["p_mcnemar"] == pytest.approx(2 * 5 / 16)
    assert row["ci_low"] <= 0.2 <= row["ci_high"]
    assert row["items_for_delta"] == items_needed(0.4, 0.03)
    with pytest.raises(InputError, match="no items of drop set"):
        paired_accuracy(items, "A", "C")
    with pytest.raises(InputError, match="same items"):
        paired_accuracy(items[~((items["drop_set"] == "B") & (items["item"] == 9))], "A", "B")
