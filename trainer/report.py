"""Test metrics beside the naive baseline, plots a person can read, report.json and a summary."""

import json
import os

import matplotlib

matplotlib.use("Agg")  # jobs run without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def metrics(targets, predictions):
  """RMSE, MAE and R2 in the data's own units."""
  targets, predictions = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
  errors = predictions - targets
  spread = np.sum((targets - targets.mean()) ** 2)
  return {"rmse": float(np.sqrt(np.mean(errors ** 2))), "mae": float(np.mean(np.abs(errors))),
          "r2": float(1 - np.sum(errors ** 2) / spread) if spread > 0 else float("nan")}


def plot_history(history, path):
  fig, ax = plt.subplots(figsize=(7, 4))
  epochs = range(1, len(history["loss"]) + 1)
  ax.plot(epochs, history["loss"], label="training loss")
  ax.plot(epochs, history["val_loss"], label="validation loss")
  ax.axvline(history["best_epoch"], color="grey", linestyle=":", label=f"best epoch ({history['best_epoch']})")
  ax.set(xlabel="epoch", ylabel="loss (standardised units)", title="Training history")
  ax.legend()
  _save(fig, path)


def plot_forecast(index, targets, predictions, baseline, model_name, target_name, path):
  fig, ax = plt.subplots(figsize=(10, 4.5))
  ax.plot(index, targets, color="black", linewidth=1.2, label="actual")
  ax.plot(index, predictions, color="tab:red", linewidth=1, label=f"{model_name} forecast")
  ax.plot(index, baseline, color="tab:blue", linewidth=0.8, alpha=0.6, label="persistence")
  ax.set(xlabel="date", ylabel=target_name, title=f"Next-step forecasts of {target_name} over the test period")
  ax.legend()
  fig.autofmt_xdate()
  _save(fig, path)


def plot_predicted_vs_true(targets, predictions, path):
  fig, ax = plt.subplots(figsize=(5.5, 5.5))
  ax.scatter(targets, predictions, s=4, alpha=0.5)
  lo, hi = float(min(targets.min(), predictions.min())), float(max(targets.max(), predictions.max()))
  ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
  ax.set(xlabel="true value", ylabel="predicted value", title="Test set: predicted vs true")
  _save(fig, path)


def plot_error_histogram(targets, predictions, path):
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(predictions - targets, bins=50)
  ax.set(xlabel="prediction error", ylabel="count", title="Test set: error histogram")
  _save(fig, path)


def _save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_plots(job_dir, prepared, history, predictions, model_name):
  plots = os.path.join(job_dir, "plots")
  os.makedirs(plots, exist_ok=True)
  plot_history(history, os.path.join(plots, "history.png"))
  if prepared.kind == "forecast":
    index = np.array(prepared.test_index, dtype="datetime64[D]" if prepared.summary["date_column"] else None)
    plot_forecast(index, prepared.test_targets, predictions, prepared.baseline_predictions, model_name,
                  prepared.preprocessing["target"], os.path.join(plots, "forecast.png"))
  else:
    plot_predicted_vs_true(prepared.test_targets, predictions, os.path.join(plots, "predicted_vs_true.png"))
    plot_error_histogram(prepared.test_targets, predictions, os.path.join(plots, "error_histogram.png"))
  return sorted(os.listdir(plots))


def summary_table(report):
  name = f"{report['model']} (test)"
  base = report["baseline"]["name"]
  width = max(len(name), len(base))
  lines = [f"{'':<{width}}  {'RMSE':>10}  {'MAE':>10}  {'R2':>7}"]
  for label, m in ((name, report["test"]), (base, report["baseline"])):
    lines.append(f"{label:<{width}}  {m['rmse']:>10.4g}  {m['mae']:>10.4g}  {m['r2']:>7.3f}")
  lines.append(f"{'RMSE vs baseline':<{width}}  {report['test']['rmse'] / report['baseline']['rmse']:>10.3f}x")
  return "\n".join(lines)


def write_report(job_dir, report):
  with open(os.path.join(job_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
