"""The fitness rules (``fitness:`` and ``normalize``): each aggregate's value
and gradient, the paired comparison and the error bars under them, and the
race and the estimator's combination under ``min``."""

import math
import random

import numpy as np
import pytest

from evomerge.fitness.aggregate import Aggregate
from evomerge.fitness.estimate import Estimate, Rungs, combine
from evomerge.fitness.paired import fitness, paired, standard_error
from evomerge.fitness.race import Entrant, plan, selection_estimate
from evomerge.fitness.spec import ObjectiveSpec

W = {"a": 1.0, "b": 1.0}


def _docs(rng, means, n):
    return {name: [float(rng.random() < m) for _ in range(n)] for name, m in means.items()}


def test_the_sum_is_the_weighted_sum_bit_for_bit_and_signed_weights_give_it():
    rng = random.Random(0)
    weights = {"a": 0.7, "b": -0.3, "c": 2.0}
    for _ in range(50):
        a = {k: [rng.random() for _ in range(9)] for k in weights}
        b = {k: [rng.random() for _ in range(9)] for k in weights}
        agg = Aggregate(weights)
        assert fitness(a, agg) == fitness(a, weights) == sum(w * sum(a[k]) / 9 for k, w in weights.items())
        assert paired(a, b, agg) == paired(a, b, weights)
        assert standard_error(a, agg) == standard_error(a, weights)


def test_each_aggregate_of_the_terms():
    values = {"a": 0.9, "b": 0.3}
    refs = {"a": 0.9, "b": 0.6}  # retention: a keeps 100%, b 50%
    assert Aggregate(W, refs).value(values) == pytest.approx(1.5)
    assert Aggregate({"a": 1.0, "b": 3.0}, refs, "mean").value(values) == pytest.approx((1.0 + 3 * 0.5) / 4)
    assert Aggregate(W, refs, "min").value(values) == pytest.approx(0.5)
    assert Aggregate(W, refs).retention(values) == pytest.approx({"a": 1.0, "b": 0.5})
    for t in (0.3, 0.05, 0.001):
        soft = Aggregate(W, refs, "softmin", t).value(values)
        assert 0.5 - t * math.log(2) - 1e-12 <= soft <= 0.5  # a lower bound of the min, within T log k
    assert Aggregate(W, refs, "softmin", 1e-4).value(values) == pytest.approx(0.5, abs=1e-3)
    # a minimised objective counts negatively in every rule
    assert Aggregate({"a": 1.0, "p": -1.0}, rule="min").value({"a": 0.5, "p": 2.0}) == -2.0
    with pytest.raises(ValueError, match="unknown aggregate"):
        Aggregate(W, rule="max")


@pytest.mark.parametrize("rule", ["sum", "mean", "min", "softmin"])
def test_the_gradient_is_the_numerical_one(rule):
    agg = Aggregate({"a": 1.0, "b": 2.0, "c": -0.5}, {"a": 0.8}, rule, 0.1)
    x = {"a": 0.6, "b": 0.4, "c": 0.3}
    grad = agg.gradient(x)
    for name in x:
        h = 1e-6
        up, down = dict(x), dict(x)
        up[name] += h
        down[name] -= h
        assert grad[name] == pytest.approx((agg.value(up) - agg.value(down)) / (2 * h), abs=1e-5)


def test_the_standard_error_of_a_min_covers_the_truth_at_about_the_nominal_rate():
    """Two skills well apart: the min is the weak one's mean, and its error
    bar (the delta method) covers the true min about 95% of the time."""
    rng = random.Random(1)
    truth = {"a": 0.8, "b": 0.5}
    agg = Aggregate(W, rule="min")
    covered = 0
    for _ in range(400):
        docs = _docs(rng, truth, 200)
        value, se = fitness(docs, agg), standard_error(docs, agg)
        covered += abs(value - 0.5) <= 1.96 * se
    assert 0.90 <= covered / 400 <= 0.99


def test_a_paired_difference_under_min_compares_the_worst_kept_skills():
    rng = random.Random(2)
    n = 300
    # a: strong on skill a, weak on b; b: even. The sum prefers a, the min prefers b.
    a = _docs(rng, {"a": 0.95, "b": 0.45}, n)
    b = {name: [float(rng.random() < 0.62) for _ in range(n)] for name in W}
    by_sum, by_min = paired(a, b, W), paired(a, b, Aggregate(W, rule="min"))
    assert by_sum.diff > 0 and by_min.diff < 0
    assert by_min.diff == pytest.approx(fitness(a, Aggregate(W, rule="min")) - fitness(b, Aggregate(W, rule="min")))
    assert by_min.p_worse < 0.05 < by_sum.p_worse
    # the paired SE under min: each side's own weak objective, paired
    # document by document where both are the same one
    weak = min(W, key=lambda k: sum(b[k]))
    x, y = np.array(a["b"]), np.array(b[weak])
    if weak == "b":
        expect = math.sqrt(np.var(x - y, ddof=1) / n)
    else:
        expect = math.sqrt(np.var(x, ddof=1) / n + np.var(y, ddof=1) / n)
    assert by_min.se == pytest.approx(expect)


def test_the_race_ranks_by_the_aggregate():
    rng = random.Random(3)
    n = 64
    lopsided = _docs(rng, {"a": 1.0, "b": 0.4}, n)
    even = _docs(rng, {"a": 0.6, "b": 0.6}, n)
    stored = {1: {"docs": lopsided}, 2: {"docs": even}}
    field = [Entrant(1, dev=1.0), Entrant(2, dev=0.9)]
    sizes, tasks = {"a": n, "b": n}, {"a": "a", "b": "b"}
    assert plan(field, stored, sizes, tasks, W).winner == 1
    assert plan(field, stored, sizes, tasks, Aggregate(W, rule="min")).winner == 2
    assert selection_estimate(stored[1], Aggregate(W, rule="min")).value == pytest.approx(sum(lopsided["b"]) / n)


def test_the_estimators_combination_under_min_and_the_rung_rule():
    estimates = {"a": Estimate(0.8, 0.02, 10, 80), "b": Estimate(0.5, 0.05, 10, 80)}
    got = combine(estimates, Aggregate(W, rule="min"))
    assert got.value == 0.5 and got.se == pytest.approx(0.05)
    plain = combine(estimates, W)
    assert plain.value == pytest.approx(1.3) and plain.se == pytest.approx(math.hypot(0.02, 0.05))
    rungs = Rungs("k", 0, {}, axes=[Aggregate(W, rule="min")], front=[[0.6]], z=1.0)
    assert rungs.beaten(estimates)  # 0.6 > 0.5 + 0.05
    assert not Rungs("k", 0, {}, axes=[W], front=[[1.33]], z=1.0).beaten(estimates)


def test_an_objectives_normalize_and_its_references():
    objectives = [
        ObjectiveSpec(task="a", metric="acc", normalize="expert"),
        ObjectiveSpec(task="b", metric="acc", normalize=0.5, weight=2.0),
        ObjectiveSpec(perplexity="x.txt"),
    ]
    agg = Aggregate.of_objectives(objectives, "min", experts={"a/acc": 0.8})
    assert agg.references == {"a/acc": 0.8, "b/acc": 0.5}
    assert agg.weights == {"a/acc": 1.0, "b/acc": 2.0, "perplexity:x.txt": -1.0}
    assert agg.terms({"a/acc": 0.4, "b/acc": 0.25, "perplexity:x.txt": 3.0}) == pytest.approx(
        {"a/acc": 0.5, "b/acc": 1.0, "perplexity:x.txt": -3.0}
    )
    with pytest.raises(ValueError, match="no expert reference"):
        Aggregate.of_objectives(objectives)
    for bad in (0, -1, math.inf):
        with pytest.raises(Exception, match="give a positive number or 'expert'"):
            ObjectiveSpec(task="a", metric="acc", normalize=bad)
    # an objective without normalize dumps as it did before the setting existed
    assert "normalize" not in ObjectiveSpec(task="a", metric="acc").model_dump()
