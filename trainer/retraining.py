"""Scheduled retraining (`python -m trainer.retrain`): train a candidate on the newest data, score
it beside the model in production and the naive baseline on the same hold-out, and promote it
into the serving folder only when it beats both; otherwise production stays as it is.

TFX splits this into a Trainer, an Evaluator that "blesses" the candidate and a Pusher. Here:

  1. train.run trains the candidate into its own job folder (checkpoints, resume,
     an export), starting from production's weights when it is the same network (warm start),
     and its export's warm-up requests are replayed (trainer.warmup): TF Serving would not load
     a version whose warm-up fails, so such a candidate is rejected;
  2. under the serving folder's Lease, production is looked up again (another retrain may have
     promoted meanwhile), and candidate and production are each loaded from their exports and
     scored on the candidate's test rows, each with its own saved preprocessing, so both answer
     exactly as a server loading that folder would;
  3. decide() blesses or rejects; promotion.promote publishes a blessed candidate as the next
     version, unless an operator holds promotions (trainer.hold: the night records "held"); every
     run, either way, appends one line to the history and redraws its plot.

A candidate whose training diverges is a rejection, not a failure: the night's answer is "keep
production", and the CronJob only alerts on failures of the job itself.
"""

import dataclasses
import datetime
import json
import math
import os
import secrets
import socket

from absl import logging

from trainer import bootstrap, export, hold, promotion, report, retrain_history, serving_lease, storage, train, warmup
from trainer.errors import UserError
from trainer.families import METRICS  # what each kind of model is judged on
from trainer.no_new_data import RUN  # in the job folder: the random half of the run's identity (run_identity)
from trainer.state import WarmStart
PROMOTED, REJECTED = "promoted", "rejected"


@dataclasses.dataclass
class Options:
  serving_dir: str
  warm_start: bool = True
  # Relative: 0.01 promotes a candidate whose RMSE is at least 1% below production's (or whose
  # accuracy is 1% above it), so noise between two equally good models does not churn versions.
  min_improvement: float = 0.01
  # 0.95: and only when the improvement's one-sided 95% lower confidence bound (a paired bootstrap
  # of the hold-out's rows, trainer.bootstrap) reaches min_improvement too; 0: the bound is not asked.
  min_confidence: float = 0.0
  keep_versions: int = 5
  # A crashed retrain blocks others for lease_ttl_seconds at most; a live one renews its lease.
  lease_ttl_seconds: float = 300
  # Longer than the TTL: a retry after a crash outwaits the lease its killed attempt left.
  lease_wait_seconds: float = 900


def retrain(config, job_dir, options):
  """Trains, judges and maybe promotes; returns the history entry written (None on a worker
  that is not the chief: the chief alone decides)."""
  serving_dir = options.serving_dir
  offered = WarmStart(reason="--nowarm_start")
  if options.warm_start:
    offered = promotion.production(serving_dir) or WarmStart(reason="no production model yet")
    if isinstance(offered, WarmStart):
      logging.info("warm start: no production model in %s yet; from random weights", serving_dir)
  trained = train.run(config, job_dir, warm_start=offered)
  result, failure = trained.report, trained.diverged and str(trained.diverged)
  if failure:
    logging.warning("candidate rejected: %s", failure)
  if not config.cluster.is_chief:
    return None
  if result and (failure := warmup.failure(result["export"])):  # TF Serving would not load it
    logging.warning("candidate rejected: %s", failure)
  # The split the candidate was tested on, as training prepared it (for images: decoded once).
  prepared = trained.prepared
  metric, lower_is_better = METRICS[prepared.kind]
  run = run_identity(job_dir)
  owner = f"{socket.gethostname()} pid {os.getpid()} ({job_dir})"
  with serving_lease.Lease(serving_dir, owner, options.lease_ttl_seconds, options.lease_wait_seconds,
                           keep_alive=True) as lease:
    history = retrain_history.read(serving_dir)
    recorded = next((e for e in history if e.get("run") == run), None)
    if recorded:  # a retry of a run killed after its history line: decided and recorded once
      logging.info("%s (recorded already by an earlier attempt of this job): %s", recorded.get("decision"),
                   recorded.get("reason"))
      retrain_history.plot(history, storage.join(serving_dir, retrain_history.PLOT))
      return recorded
    production = promotion.production(serving_dir)
    production_metadata = export.read_metadata(production) if production else None
    baseline = report.evaluate(prepared, prepared.baseline_predictions)["baseline"]
    candidate, candidate_rows = score(prepared, result["export"]) if result else (None, None)
    current, production_rows = score(prepared, production) if production else (None, None)
    paired = None if not (candidate and current) else bootstrap.paired_improvements(
        metric, lower_is_better, prepared.test_targets, candidate_rows, production_rows,
        bootstrap.block_length(prepared.kind, len(prepared.test_targets)))
    warnings = _hold_out_warnings(config, prepared.summary, production_metadata)
    version = production_version = production_metadata["version"] if production_metadata else None
    # A retry of a job killed between promoting and writing the history finds its own model in
    # production: that promotion stands (decided then, against what was production then). Its
    # own by the run recorded in the version, not by the export's folder, which nights may share.
    promoted_before = bool(result and production_metadata) and production_metadata.get("run") == run
    if failure:
      decision, reason, improvement = REJECTED, failure, None
    elif promoted_before:
      decision, reason, improvement = PROMOTED, (f"promoted as version {version} by an earlier attempt of this job, "
                                                 "stopped before it recorded that"), None
    else:
      decision, reason, improvement = decide(metric, lower_is_better, candidate, current, baseline,
                                             options.min_improvement, options.min_confidence, paired)
      # Read under the lease: a hold set while this night trained applies to it.
      if decision == PROMOTED and (held := hold.read(serving_dir)) is not None:
        decision, reason = hold.HELD, hold.withheld(held, reason)
    if decision == PROMOTED and not promoted_before:
      folder = promotion.promote(result["export"], serving_dir, options.keep_versions, lease, run=run)
      version = int(os.path.basename(folder))
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "decision": decision, "version": version, "reason": reason, "metric": metric,
        "candidate": candidate, "production": current, "baseline": baseline, "improvement": improvement,
        "improvement_interval": None if paired is None else bootstrap.interval(paired),
        "production_version": production_version,
        "warm_start": trained.warm_start.to_json(), "warnings": warnings,
        "data": prepared.summary, "job_dir": job_dir, "candidate_export": result["export"] if result else None,
        "run": run,
    }
    lease.check()  # the history, too, is only written by the lease's holder
    if retrain_history.append(serving_dir, entry):
      history.append(entry)
    retrain_history.plot(history, storage.join(serving_dir, retrain_history.PLOT))
  logging.info("%s: %s", decision, reason)
  return entry


def score(prepared, version_dir):
  """(test metrics, test predictions) of the export at version_dir on prepared's test rows, fed
  through the export's SavedModel and its own saved preprocessing (columns, window, statistics,
  image size). The predictions, row by row, are for the paired bootstrap."""
  metadata = export.read_metadata(version_dir)
  model = export.load(version_dir, metadata)
  predictions = prepared.predict(model, metadata["preprocessing"])
  test = report.evaluate(prepared, predictions)["test"]
  metrics = {name: value for name, value in test.items() if not isinstance(value, dict)}  # no per-class detail
  return metrics, predictions


def decide(metric, lower_is_better, candidate, production, baseline, min_improvement, min_confidence=0.0,
           improvements=None):
  """(decision, reason, relative improvement over production or None): promote a candidate that
  beats the baseline and, when there is a production model, beats it by min_improvement; with a
  min_confidence, also by min_improvement at that one-sided confidence of improvements, the
  paired bootstrap's resampled improvements (None when a model's predictions are not all finite:
  the metrics alone decide)."""
  c, b = candidate[metric], baseline[metric]
  gain = lambda new, old: bootstrap.relative_gain(new, old, lower_is_better)
  if not math.isfinite(c):
    return REJECTED, f"the candidate's {metric} is {c}", None
  improvement = None if production is None else gain(c, production[metric])
  if gain(c, b) <= 0:
    return REJECTED, f"the candidate's {metric} {c:.5g} does not beat the baseline's {b:.5g}", improvement
  if production is None:
    return PROMOTED, (f"no production model yet; the candidate's {metric} {c:.5g} is {gain(c, b):.2%} better than "
                      f"the baseline's {b:.5g}"), None
  versus = (f"the candidate's {metric} {c:.5g} is {abs(improvement):.2%} {'better' if improvement >= 0 else 'worse'} "
            f"than production's {production[metric]:.5g}")
  if improvement < min_improvement or improvement <= 0:
    return REJECTED, f"{versus}; --min_improvement asks for {min_improvement:.2%} better", improvement
  asked = f"--min_improvement {min_improvement:.2%}"
  if min_confidence and improvements is not None:
    bound = bootstrap.lower_bound(improvements, min_confidence)
    confident = (f"{bound:+.2%} better at {min_confidence * 100:.4g}% confidence by a paired bootstrap of the "
                 "hold-out's rows")
    if bound < min_improvement:
      return REJECTED, f"{versus}, but only {confident}; --min_confidence={min_confidence:g} asks for " \
          f"{min_improvement:.2%}", improvement
    asked += f"; at least {confident}"
  return PROMOTED, f"{versus} ({asked}) and {gain(c, b):.2%} better than the baseline's {b:.5g}", improvement


def run_identity(job_dir):
  """{"job_dir", "id"}: what this run's promoted version and history line are known by. The id
  is random, kept in the job folder: a retry of the job (the same --job_dir) is the same run; a
  later night, even one sharing --export_dir, or a job folder made anew, is another."""
  path = storage.join(job_dir, RUN)
  try:
    run_id = json.loads(storage.read_text(path))["id"]
  except FileNotFoundError:
    run_id = secrets.token_hex(8)
    storage.write_text(path, json.dumps({"id": run_id}))
  except (ValueError, TypeError, KeyError):
    raise UserError(f"{path}: not a run record of this trainer; remove it (a retry of this job then counts as "
                    "a new run)") from None
  return {"job_dir": job_dir, "id": run_id}


def _hold_out_warnings(config, summary, production_metadata):
  """Production trained on rows of this hold-out scores too well on them, and the comparison
  favours it (a candidate then has to beat it by more than --min_improvement): say so."""
  if not production_metadata:
    return []
  seen = production_metadata.get("data", {})
  if config.is_forecast:
    test_first = summary.get("split", {}).get("test", {}).get("first")
    seen_last = seen.get("split", {}).get("validation", {}).get("last")
    if not (isinstance(test_first, str) and isinstance(seen_last, str)) or seen_last < test_first:
      return []
    message = (f"the production model trained on rows up to {seen_last}, inside this hold-out (from {test_first}): "
               "its score is flattered; hold out a later period (--eval_start, --eval_days)")
  elif not config.test_data and seen.get("path") == summary.get("path"):
    message = (f"the hold-out is a random split of {summary.get('path')}, which production was trained on too: some "
               "of its rows may be production's training rows, flattering its score; give --eval_data")
  else:
    return []
  logging.warning("%s", message)
  return [message]
