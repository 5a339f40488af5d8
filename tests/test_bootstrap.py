"""The paired bootstrap of a candidate's improvement over production (trainer.bootstrap): an
identical or equally good candidate's interval holds 0 and a clearly better one's does not, the
same rows give the same interval, moving blocks widen it on autocorrelated errors, and
--min_confidence in the decision."""

import numpy as np
import pytest

from trainer import bootstrap
from trainer.retraining import PROMOTED, REJECTED, decide

ROWS = 365  # a year of daily forecasts


def targets_and_predictions(seeds, noise, rows=ROWS):
  """Targets and, per noise level, predictions off them by that much noise (each its own draw)."""
  rng = np.random.default_rng(seeds)
  targets = 100 + np.cumsum(rng.standard_normal(rows))
  return targets, [targets + level * rng.standard_normal(rows) for level in noise]


def rmse(predictions, targets):
  return float(np.sqrt(np.mean((predictions - targets) ** 2)))


def test_an_identical_or_equally_good_candidate_holds_0_and_a_clearly_better_one_does_not():
  targets, (production, equal, better) = targets_and_predictions(0, [1.0, 1.0, 0.8])
  block = bootstrap.block_length("forecast", ROWS)
  assert block == 7  # 365 ** (1 / 3) = 7.1

  same = bootstrap.paired_improvements("rmse", True, targets, production.copy(), production, block)
  assert same.shape == (bootstrap.RESAMPLES,)
  assert bootstrap.interval(same) == [0.0, 0.0]  # paired: the same rows, the same errors, no spread at all

  low, high = bootstrap.interval(bootstrap.paired_improvements("rmse", True, targets, equal, production, block))
  assert low < 0 < high

  improvements = bootstrap.paired_improvements("rmse", True, targets, better, production, block)
  low, high = bootstrap.interval(improvements)
  point = bootstrap.relative_gain(rmse(better, targets), rmse(production, targets), True)
  assert 0 < low < point < high  # 0.2 of the noise less: about 20% better
  assert low < bootstrap.lower_bound(improvements, 0.95) < point

  # Accuracy from per-row hits: right on 90% of the images against 70%.
  labels = np.arange(1000) % 3
  wrong = (labels + 1) % 3
  rng = np.random.default_rng(1)
  production, candidate = (np.where(rng.random(1000) < share, labels, wrong) for share in (0.7, 0.9))
  low, high = bootstrap.interval(bootstrap.paired_improvements("accuracy", False, labels, candidate, production))
  point = np.mean(candidate == labels) / np.mean(production == labels) - 1
  assert 0 < low < point < high


def test_the_same_rows_give_the_same_interval_whatever_the_memory_bound(monkeypatch):
  targets, (production, candidate) = targets_and_predictions(2, [1.0, 0.95])
  first = bootstrap.paired_improvements("rmse", True, targets, candidate, production, block=7)
  assert np.array_equal(first, bootstrap.paired_improvements("rmse", True, targets, candidate, production, block=7))
  assert not np.array_equal(first, bootstrap.paired_improvements("rmse", True, targets, candidate, production,
                                                                 block=7, seed=1))
  monkeypatch.setattr(bootstrap, "_GATHER", 2 * ROWS * 3)  # three resamples gathered at a time
  assert np.array_equal(first, bootstrap.paired_improvements("rmse", True, targets, candidate, production, block=7))


def test_moving_blocks_widen_the_interval_on_autocorrelated_errors():
  # Errors that carry over from day to day (AR(1), 0.8), as a forecaster's do through a trend it
  # misses: the two models' difference in squared error is autocorrelated too.
  rng = np.random.default_rng(3)

  def carried_over():
    errors = rng.standard_normal(ROWS)
    for t in range(1, ROWS):
      errors[t] += 0.8 * errors[t - 1]
    return errors

  targets, production, candidate = np.zeros(ROWS), carried_over(), carried_over()
  widths = {}
  for block in (1, bootstrap.block_length("forecast", ROWS)):
    low, high = bootstrap.interval(bootstrap.paired_improvements("rmse", True, targets, candidate, production, block))
    widths[block] = high - low
  assert widths[7] > 1.4 * widths[1]  # rows drawn one by one: too sure, as if the days were independent


def test_predictions_that_are_not_all_finite_give_no_interval():
  targets, (production,) = targets_and_predictions(4, [1.0])
  diverged = production.copy()
  diverged[10] = np.nan
  assert bootstrap.paired_improvements("rmse", True, targets, diverged, production) is None
  assert bootstrap.paired_improvements("rmse", True, targets, production, diverged) is None


RMSE = ("rmse", True)


@pytest.mark.parametrize("improvements, min_confidence, decision, says", [
    (None, 0.95, PROMOTED, "(--min_improvement 1.00%)"),  # no interval (a model's rows not finite): metrics decide
    (np.linspace(-0.05, 0.25, 2000), 0, PROMOTED, "(--min_improvement 1.00%)"),  # not asked
    (np.linspace(-0.05, 0.25, 2000), 0.95, REJECTED,  # 10% better, but could be 3.5% worse
     "10.00% better than production's 10, but only -3.50% better at 95% confidence by a paired bootstrap of the "
     "hold-out's rows; --min_confidence=0.95 asks for 1.00%"),
    (np.linspace(0.05, 0.15, 2000), 0.95, PROMOTED,
     "(--min_improvement 1.00%; at least +5.50% better at 95% confidence by a paired bootstrap "
     "of the hold-out's rows)"),
    (np.linspace(0.0, 0.2, 2000), 0.975, REJECTED, "only +0.50% better at 97.5% confidence"),
])
def test_min_confidence_asks_the_improvements_lower_bound_to_reach_min_improvement(improvements, min_confidence,
                                                                                    decision, says):
  name, lower_is_better = RMSE
  got, reason, improvement = decide(name, lower_is_better, {name: 9.0}, {name: 10.0}, {name: 12.0}, 0.01,
                                    min_confidence, improvements)
  assert (got, improvement) == (decision, pytest.approx(0.1)), reason
  assert says in reason
