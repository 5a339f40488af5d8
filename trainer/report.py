"""Test metrics beside the naive baseline, plots a person can read, report.json and a summary."""

import json
import os

import matplotlib

matplotlib.use("Agg")  # jobs run without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainer import storage  # noqa: E402


def metrics(targets, predictions):
  """RMSE, MAE and R2 in the data's own units."""
  targets, predictions = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
  errors = predictions - targets
  spread = np.sum((targets - targets.mean()) ** 2)
  return {"rmse": float(np.sqrt(np.mean(errors ** 2))), "mae": float(np.mean(np.abs(errors))),
          "r2": float(1 - np.sum(errors ** 2) / spread) if spread > 0 else float("nan")}


def classification_metrics(labels, predicted, class_names):
  """Accuracy, per-class precision and recall, and the confusion matrix (rows: true class)."""
  n = len(class_names)
  confusion = np.zeros((n, n), np.int64)
  np.add.at(confusion, (np.asarray(labels), np.asarray(predicted)), 1)
  hits = np.diag(confusion)
  with np.errstate(invalid="ignore", divide="ignore"):
    precision, recall = hits / confusion.sum(axis=0), hits / confusion.sum(axis=1)
  per_class = {name: {"precision": None if np.isnan(p) else float(p), "recall": None if np.isnan(r) else float(r)}
               for name, p, r in zip(class_names, precision, recall)}
  return {"accuracy": float(hits.sum() / max(confusion.sum(), 1)), "per_class": per_class}, confusion


def evaluate(prepared, predictions):
  """The report's test, baseline and (for classifiers) confusion-matrix entries."""
  if prepared.kind != "images":
    return {"test": metrics(prepared.test_targets, predictions),
            "baseline": {"name": prepared.baseline_name,
                         **metrics(prepared.test_targets, prepared.baseline_predictions)}}
  class_names = prepared.preprocessing["class_names"]
  test, confusion = classification_metrics(prepared.test_targets, predictions, class_names)
  baseline, _ = classification_metrics(prepared.test_targets, prepared.baseline_predictions, class_names)
  return {"test": test, "baseline": {"name": prepared.baseline_name, "accuracy": baseline["accuracy"]},
          "confusion_matrix": confusion.tolist(), "class_names": class_names,
          "skipped_files": prepared.summary["skipped_files"]}


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


def plot_confusion_matrix(confusion, class_names, path):
  confusion = np.asarray(confusion)
  fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2.5, 1.2 * len(class_names) + 2))
  ax.imshow(confusion, cmap="Blues")
  for (i, j), count in np.ndenumerate(confusion):
    ax.text(j, i, str(count), ha="center", va="center",
            color="white" if count > confusion.max() / 2 else "black")
  ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
  ax.set_yticks(range(len(class_names)), class_names)
  ax.set(xlabel="predicted", ylabel="true", title="Test set: confusion matrix")
  _save(fig, path)


def plot_class_distribution(counts, class_names, path):
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(class_names)), 4))
  positions = np.arange(len(class_names))
  splits = [(name, c) for name, c in counts.items() if c]
  for k, (name, c) in enumerate(splits):
    ax.bar(positions + (k - (len(splits) - 1) / 2) * 0.8 / len(splits), c, width=0.8 / len(splits), label=name)
  ax.set_xticks(positions, class_names, rotation=30, ha="right")
  ax.set(ylabel="images", title="Images per class")
  ax.legend()
  _save(fig, path)


def plot_image_grid(images, titles, path, columns=4):
  rows = int(np.ceil(len(images) / columns))
  fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, image, (title, colour) in zip(axes.flat, images, titles):
    ax.imshow(np.clip(image, 0, 1))
    ax.set_title(title, fontsize=8, color=colour)
  _save(fig, path)


def _save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_plots(job_dir, prepared, history, predictions, model_name, evaluation):
  """PNG plots under <job_dir>/plots; `evaluation` is what evaluate() returned. Returns their names."""
  plots = os.path.join(job_dir, "plots")
  os.makedirs(plots, exist_ok=True)
  plot_history(history, os.path.join(plots, "history.png"))
  if prepared.kind == "images":
    _classification_plots(plots, prepared, predictions, evaluation)
  elif prepared.kind == "forecast":
    index = np.array(prepared.test_index, dtype="datetime64[D]" if prepared.summary["date_column"] else None)
    plot_forecast(index, prepared.test_targets, predictions, prepared.baseline_predictions, model_name,
                  prepared.preprocessing["target"], os.path.join(plots, "forecast.png"))
  else:
    plot_predicted_vs_true(prepared.test_targets, predictions, os.path.join(plots, "predicted_vs_true.png"))
    plot_error_histogram(prepared.test_targets, predictions, os.path.join(plots, "error_histogram.png"))
  return sorted(os.listdir(plots))


def _classification_plots(plots, prepared, predictions, evaluation):
  from trainer.data import augment  # TensorFlow: only for classifiers' previews
  names = evaluation["class_names"]
  plot_confusion_matrix(evaluation["confusion_matrix"], names, os.path.join(plots, "confusion_matrix.png"))
  counts = {split: prepared.summary["counts"].get(split) for split in ("train", "validation", "test")}
  if not any(counts.values()):
    counts = {"test": np.bincount(prepared.test_targets, minlength=len(names)).tolist()}
  plot_class_distribution(counts, names, os.path.join(plots, "class_distribution.png"))
  # Up to 16 test images, taken round-robin over the classes so every class is seen.
  by_class = [np.flatnonzero(prepared.test_targets == k)[:16] for k in range(len(names))]
  chosen = [int(group[rank]) for rank in range(16) for group in by_class if rank < len(group)]
  chosen = sorted(chosen[:16])
  images, offset = [], 0
  for batch, _ in prepared.make_dataset("test", 256):
    images += [batch[i - offset].numpy() for i in chosen if offset <= i < offset + len(batch)]
    offset += len(batch)
    if offset > chosen[-1]:
      break
  titles = [(f"true {names[prepared.test_targets[i]]}\npredicted {names[predictions[i]]}",
             "black" if prepared.test_targets[i] == predictions[i] else "red") for i in chosen]
  plot_image_grid(images, titles, os.path.join(plots, "test_predictions.png"))
  previews = [images[0]] + [augment.random_transform(images[0], [7, k]).numpy() for k in range(7)]
  plot_image_grid(previews, [("original", "black")] + [(f"augmented #{k + 1}", "black") for k in range(7)],
                  os.path.join(plots, "augmentation_preview.png"))


def summary_table(report):
  plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"
  lines = [f"strategy {report['strategy']}: {plural(report['num_replicas'], 'replica')} on "
           f"{plural(report['num_workers'], 'worker')}, batch {report['global_batch_size']} "
           f"({report['per_replica_batch_size']} per replica)"]
  if "accuracy" in report["test"]:
    return "\n".join(lines + [f"{report['model']} (test) accuracy  {report['test']['accuracy']:.3f}",
                               f"{report['baseline']['name']} accuracy  {report['baseline']['accuracy']:.3f}"])
  name = f"{report['model']} (test)"
  base = report["baseline"]["name"]
  width = max(len(name), len(base))
  lines.append(f"{'':<{width}}  {'RMSE':>10}  {'MAE':>10}  {'R2':>7}")
  for label, m in ((name, report["test"]), (base, report["baseline"])):
    lines.append(f"{label:<{width}}  {m['rmse']:>10.4g}  {m['mae']:>10.4g}  {m['r2']:>7.3f}")
  lines.append(f"{'RMSE vs baseline':<{width}}  {report['test']['rmse'] / report['baseline']['rmse']:>10.3f}x")
  return "\n".join(lines)


def write_report(job_dir, report):
  """report.json, written whole or not at all (local or gs://)."""
  storage.write_text(storage.join(job_dir, "report.json"), json.dumps(report, indent=2))
