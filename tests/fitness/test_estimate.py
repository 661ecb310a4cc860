"""The difference estimator of a candidate's full-dev score (evomerge.fitness.estimate),
on synthetic per-document data: unbiased whether its prediction is good, useless or
wrong, an SE that covers the truth at about the nominal rate, exact given every
document, and a lower error than the subset mean when the prediction is good."""

import math

import numpy as np
import pytest

from evomerge.fitness.estimate import Estimate, Pool, Rungs, combine, difference, draw, plain_mean, prediction

N = 400


def population(seed=0):
    """Per-document 0/1 scores: three references and two candidates, one that
    tracks the references (better than all of them) and one that does not."""
    rng = np.random.default_rng(seed)
    hardness = rng.normal(size=N)

    def model(skill, noise=0.8):
        return (skill - hardness + noise * rng.normal(size=N) > 0).astype(float)

    references = np.vstack([model(0.0), model(0.3), model(-0.2)])
    return references, {"tracks": model(0.6), "unrelated": (rng.random(N) < 0.5).astype(float)}


def estimates(y, predicted, n, reps, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(reps):
        scored = rng.permutation(N)[:n]
        out.append((difference(scored, y[scored], predicted), plain_mean(y[scored], N)))
    return out


@pytest.mark.parametrize("which", ["tracks", "unrelated", "wrong"])
@pytest.mark.parametrize("n", [10, 50, 200])
def test_the_estimate_is_unbiased_and_its_error_bar_covers_the_truth(which, n):
    references, candidates = population()
    y = candidates["tracks" if which == "wrong" else which]
    predicted = prediction(references)
    if which == "wrong":
        predicted = 1 - predicted  # a prediction that gets every document backwards
    truth = y.mean()
    got = estimates(y, predicted, n, reps=1000)
    values = np.array([e.value for e, _ in got])
    # unbiased: the mean of many estimates within 3 standard errors of the truth
    assert abs(values.mean() - truth) <= 3 * values.std() / math.sqrt(len(values)), (values.mean(), truth)
    covered = np.mean([abs(e.value - truth) <= 1.96 * e.se for e, _ in got])
    assert 0.90 <= covered <= 0.98, covered  # nominal 95%


def test_every_document_gives_the_full_score_with_no_error():
    references, candidates = population()
    y = candidates["tracks"]
    order = np.random.default_rng(3).permutation(N)
    e = difference(order, y[order], prediction(references))
    assert math.isclose(e.value, y.mean(), abs_tol=1e-12) and e.se == 0.0 and (e.scored, e.total) == (N, N)
    p = plain_mean(y[order], N)
    assert math.isclose(p.value, y.mean(), abs_tol=1e-12) and p.se == 0.0


def test_predictive_references_beat_the_subset_mean_at_an_eighth_of_the_documents():
    references, candidates = population()
    y = candidates["tracks"]
    got = estimates(y, prediction(references), N // 8, reps=1000)
    difference_error = np.mean([abs(e.value - y.mean()) for e, _ in got])
    plain_error = np.mean([abs(p.value - y.mean()) for _, p in got])
    assert difference_error < 0.95 * plain_error, (difference_error, plain_error)


def test_the_prediction_pools_references_and_earlier_candidates_per_document():
    references = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert prediction(references).tolist() == [0.5, 0.0, 1.0]
    pooled = prediction(references, [{0: 1.0, 2: 0.0}, {0: 1.0}])
    assert pooled.tolist() == [0.75, 0.0, 2 / 3]  # document 1: no candidate scored it yet
    assert difference([], [], pooled).se == math.inf


def test_each_candidate_draws_its_own_documents_from_the_run_seed():
    a = draw(0, 7, "math", 50)
    assert sorted(a) == list(range(50))  # a permutation: a fidelity scores a prefix of it
    assert draw(0, 7, "math", 50) == a  # the same candidate, the same order (resume)
    assert draw(0, 8, "math", 50) != a and draw(1, 7, "math", 50) != a and draw(0, 7, "french", 50) != a


def test_objectives_combine_as_independent_strata():
    parts = {"math": Estimate(0.8, 0.03, 50, 400), "french": Estimate(0.6, 0.04, 50, 300)}
    total = combine(parts, {"math": 1.0, "french": 0.5})
    assert math.isclose(total.value, 0.8 + 0.3) and math.isclose(total.se, math.hypot(0.03, 0.02))
    assert (total.scored, total.total) == (100, 700)


# -- the pool and the rungs of a multi-fidelity search ----------------------------------


def test_the_pool_is_the_prediction_kept_up_to_date_from_prefixes_and_own_subsets():
    pool = Pool({"math/acc": 4, "fr/acc": 3}, {"math/acc": "math", "fr/acc": "fr"})
    pool.add({"math/acc": [1, 0, 1, 1], "fr/acc": [0, 0, 1]})  # a baseline: every document
    pool.add({"math/acc": [1, 0]})  # stopped early against the incumbent: a prefix
    pool.add({"math/acc": [0, 1], "fr/acc": [1]}, {"math": [3, 1], "fr": [2]})  # its own subset
    pool.add({"math/acc": [1, 1, 1, 1, 1]})  # more documents than the objective has: not this pool's
    got = pool.prediction()
    assert got["math/acc"] == pytest.approx([1.0, 1 / 3, 1.0, 0.5]) and got["fr/acc"] == [0.0, 0.0, 1.0]
    # the same as prediction() over the same scores
    earlier = [{0: 1.0, 1: 0.0}, {3: 0.0, 1: 1.0}]
    assert got["math/acc"] == pytest.approx(prediction(np.array([[1, 0, 1, 1]]), earlier).tolist())


def _rungs(**kw):
    settings = dict(key="fp", seed=0, predicted={"a": [0.5] * 40}, axes=[{"a": 1.0}], front=[[0.8]])
    return Rungs(**{**settings, **kw})


def test_rungs_end_at_their_fractions_skipping_steps_below_min_docs():
    rungs = _rungs(fractions=(0.125, 0.25, 0.5), min_docs=8)
    assert rungs.ends({"t": 100, "u": 40}) == [{"t": 25, "u": 10}, {"t": 50, "u": 20}, {"t": 100, "u": 40}]
    assert _rungs(fractions=(0.5,), min_docs=30).ends({"t": 40}) == [{"t": 40}]  # 20 < 30: all at once
    order = rungs.order("t", 100)
    assert sorted(order) == list(range(100)) and order == draw(0, "fp", "t", 100)
    assert _rungs(key="other").order("t", 100) != order  # each candidate its own subset


def test_a_candidate_is_beaten_only_by_more_than_z_standard_errors():
    rungs = _rungs(z=1.0)
    assert rungs.beaten({"a": Estimate(0.70, 0.05, 10, 40)})  # 0.8 > 0.75
    assert not rungs.beaten({"a": Estimate(0.70, 0.15, 10, 40)})  # 0.8 < 0.85: too uncertain to stop
    assert not _rungs(front=[]).beaten({"a": Estimate(0.0, 0.0, 10, 40)})  # nothing to beat it yet
    assert _rungs(z=0.0).beaten({"a": Estimate(0.79, 0.5, 10, 40)})
    # several objectives (NSGA-II): a point of the front must beat it on every axis
    two = _rungs(axes=[{"a": 1.0}, {"b": -1.0}], front=[[0.8, -2.0], [0.5, -1.0]])
    assert not two.beaten({"a": Estimate(0.7, 0.01, 10, 40), "b": Estimate(1.5, 0.01, 10, 40)})
    assert two.beaten({"a": Estimate(0.4, 0.01, 10, 40), "b": Estimate(1.5, 0.01, 10, 40)})


def test_rung_estimates_are_unbiased_at_every_rung_and_exact_at_the_last():
    """The estimate at each rung, before any stopping, on a candidate's own
    draws: unbiased, and the full score once every document is scored."""
    references, candidates = population()
    y = candidates["tracks"]
    predicted = {"o": prediction(references).tolist()}
    rungs = [
        Rungs(key=str(k), seed=0, predicted=predicted, axes=[{"o": 1.0}], fractions=(0.125, 0.5), min_docs=4)
        for k in range(600)
    ]
    for i, n in enumerate([50, 200, N]):
        values = []
        for r in rungs:
            order = r.order("t", N)
            assert r.ends({"t": N})[i] == {"t": n}
            values.append(r.estimates({"o": y[order[:n]].tolist()}, {"t": order}, {"o": "t"})["o"].value)
        values = np.array(values)
        if n < N:
            assert abs(values.mean() - y.mean()) <= 3 * values.std() / math.sqrt(len(values))
        else:
            assert np.allclose(values, y.mean(), atol=1e-12)
