"""Is a candidate's improvement over production more than the luck of the hold-out? A paired
bootstrap of the relative improvement on the hold-out's rows (paired_improvements), its
confidence interval for the history (interval) and the lower bound --min_confidence asks of it
(lower_bound).

Paired: each resample draws rows, with replacement, and scores both models on the same drawn
rows (from per-row squared errors for RMSE, per-row hits for accuracy, so a resample costs a
gather and a mean, no model call). A night of hard rows is hard for both models; resampling the
two together leaves that out of the comparison's spread, which then measures only how much the
models differ row by row. Scored on separate draws, the interval would also carry the rows'
difficulty, and be far too wide to ever say "better".

Forecasts: a day's error is like its neighbours' (volatile weeks are volatile for every model),
so rows drawn one by one would count a volatile week as many independent pieces of evidence and
make the interval too narrow. A moving-block bootstrap (Kuensch 1989, "The jackknife and the
bootstrap for general stationary observations", Annals of Statistics 17(3)) draws runs of
consecutive rows instead, which keep that dependence within each run; runs of n^(1/3) rows, the
order Hall, Horowitz and Jing (1995, Biometrika 82(3)) found best for a bootstrap's variance
(6 rows for a year of 252 trading days). Table rows and images are independent: runs of one row.

The interval is the percentile interval of the resampled improvements. The seed is fixed: the
same predictions on the same rows always give the same interval, so a retry of a night decides
as the night did.
"""

import math

import numpy as np

RESAMPLES = 2000
SEED = 0
# The history's and the table's interval: two-sided, this level.
CONFIDENCE = 0.95
# A resample's rows are gathered this many at a time at most: bounded memory on large hold-outs.
_GATHER = 2 ** 22

# Per metric: the per-row values whose mean, through finish, is the metric.
_ROWS = {
    "rmse": (lambda predictions, targets: (predictions - targets) ** 2, np.sqrt),
    "accuracy": (lambda predictions, targets: (predictions == targets).astype(np.float64), lambda mean: mean),
}


def relative_gain(new, old, lower_is_better):
  """How much better new is than old, relative to old: +0.05 is 5% better, whichever direction
  the metric improves in; +inf against an old value that is NaN or infinite; a number, or an
  array of them for arrays."""
  new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
  change = old - new if lower_is_better else new - old
  with np.errstate(divide="ignore", invalid="ignore"):
    gain = np.where(old == 0, np.where(new == old, 0.0, np.sign(change) * np.inf), change / np.abs(old))
  gain = np.where(np.isfinite(old), gain, np.inf)
  return float(gain) if gain.ndim == 0 else gain


def block_length(kind, rows):
  """Consecutive rows per drawn run: n^(1/3) for forecasts (their errors are autocorrelated), 1
  for tables and images (independent rows)."""
  return max(1, round(rows ** (1 / 3))) if kind == "forecast" else 1


def paired_improvements(metric, lower_is_better, targets, candidate, production, block=1, resamples=RESAMPLES,
                        seed=SEED):
  """The candidate's relative improvement over production (relative_gain) on each of resamples
  paired resamples of the hold-out's rows: targets and both models' predictions, row by row. Each
  resample is as many rows as the hold-out, in runs of block consecutive rows drawn anywhere in
  it (moving blocks; block 1: rows drawn one by one). None when a model's predictions are not all
  finite: there is no spread to estimate, the metrics alone decide."""
  per_row, finish = _ROWS[metric]
  targets = np.asarray(targets, np.float64).reshape(-1)
  both = np.stack([per_row(np.asarray(p, np.float64).reshape(-1), targets) for p in (candidate, production)])
  if not np.isfinite(both).all():
    return None
  rows = targets.size
  block = min(block, rows)
  runs = math.ceil(rows / block)
  rng = np.random.default_rng(seed)
  step, means = max(1, _GATHER // (2 * rows)), []
  for first in range(0, resamples, step):
    count = min(step, resamples - first)
    starts = rng.integers(0, rows - block + 1, size=(count, runs))
    drawn = (starts[:, :, None] + np.arange(block)).reshape(count, -1)[:, :rows]
    means.append(both[:, drawn].mean(axis=2))
  new, old = finish(np.concatenate(means, axis=1))
  return relative_gain(new, old, lower_is_better)


def interval(improvements, confidence=CONFIDENCE):
  """[low, high]: the central interval holding confidence of the resampled improvements."""
  low, high = np.quantile(improvements, [(1 - confidence) / 2, (1 + confidence) / 2], method="inverted_cdf")
  return [float(low), float(high)]


def lower_bound(improvements, confidence):
  """The improvement the candidate reaches at least, at this one-sided confidence."""
  return float(np.quantile(improvements, 1 - confidence, method="inverted_cdf"))
