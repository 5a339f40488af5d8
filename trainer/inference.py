"""Predictions from an export alone: reading --data for each kind of model and turning the
export's answers into rows a person can read (used by `python -m trainer.predict`)."""

import glob
import os

import numpy as np
import pandas as pd
from absl import logging

from trainer import transfer
from trainer.data import csv_file
from trainer.errors import UserError

# Files a single-image --data may be, as tf.io.decode_image reads them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Rows of a table's predictions printed; --output has them all.
SHOWN_ROWS = 10


def read_series(path, metadata):
  """(frame of the date and model columns, date column or None) from a forecast's CSV."""
  preprocessing = metadata["preprocessing"]
  date_column = metadata["data"].get("date_column")
  frame = _read_csv(path, preprocessing["columns"], date_column, fill_gaps=True)
  window, rows = preprocessing["window"], len(frame)
  if rows < window + 1:
    raise UserError(f"--data={path}: {rows} rows are too few; the model forecasts from the changes over "
                    f"{window} rows, so it needs at least {window + 1}")
  for column in preprocessing["columns"]:
    if (frame[column] <= 0).any():
      raise UserError(f"column {column!r} of {path} has values <= 0; the model forecasts relative changes "
                      "of positive values such as prices")
  return frame, date_column


def forecast_rows(model, metadata, inputs):
  """Every one-step forecast: each row from the window-th on, and the forecast of the row after."""
  from trainer.data import timeseries  # TensorFlow: only once the export and the data are sound

  (frame, date_column), preprocessing = inputs, metadata["preprocessing"]
  target, window = preprocessing["target"], preprocessing["window"]
  forecasts = timeseries.forecast(model, preprocessing, frame[preprocessing["columns"]].to_numpy(np.float64))
  rows = frame.iloc[window:].reset_index(drop=True)
  where = date_column or "row"
  predictions = pd.DataFrame({where: rows[date_column].dt.date if date_column else rows.index + window,
                              target: rows[target], f"forecast_next_{target}": forecasts})
  last = predictions[where].iloc[-1]
  return predictions, (f"next {target} after {last if date_column else f'row {last}'} (the last row of --data): "
                       f"{forecasts[-1]:.8g}")


def read_table(path, metadata):
  frame = _read_csv(path, metadata["preprocessing"]["features"])
  if frame.empty:
    raise UserError(f"--data={path}: no rows to predict")
  return frame


def table_rows(model, metadata, frame):
  """One prediction of the target per row of the feature columns."""
  from trainer.data import tabular  # TensorFlow: only once the export and the data are sound

  preprocessing = metadata["preprocessing"]
  predicted = tabular.predict_table(model, preprocessing, frame[preprocessing["features"]])
  predictions = frame.assign(**{f"predicted_{preprocessing['target']}": predicted})
  shown = predictions.head(SHOWN_ROWS).to_string(index=False)
  more = f"\n... {len(predictions) - SHOWN_ROWS} more rows" if len(predictions) > SHOWN_ROWS else ""
  return predictions, shown + more


def list_images(path, metadata):
  """(local folder or file, [(name, folder class or None)]): one image, or every file below a
  folder by its path inside it; a file in a subfolder is labelled with the subfolder's name, as
  training folders are."""
  del metadata
  local = _local_copy(path, "an image or a folder of images")
  if os.path.isfile(local):
    if not local.lower().endswith(IMAGE_EXTENSIONS):
      raise UserError(f"--data={path} is not an image ({', '.join(IMAGE_EXTENSIONS)}); the model classifies "
                      "images: give an image or a folder of images")
    return os.path.dirname(local), [(os.path.basename(local), None)]
  # glob's ** leaves out hidden files and folders (.DS_Store, .ipynb_checkpoints), as training does.
  names = sorted(os.path.relpath(f, local) for f in glob.glob(os.path.join(local, "**", "*"), recursive=True)
                 if os.path.isfile(f))
  if not names:
    raise UserError(f"--data={path}: no images found in the folder or its subfolders")
  return local, [(name, name.split(os.sep)[0] if os.sep in name else None) for name in names]


def classify_images(model, metadata, inputs):
  """The class and its probability per readable file, decoded and resized as in training."""
  from trainer.data import image_folder, images  # TensorFlow: only once the export and the data are sound

  (folder, files), preprocessing = inputs, metadata["preprocessing"]
  size, class_names = preprocessing["image_size"], preprocessing["class_names"]
  names = [name for name, _ in files]
  paths = [os.path.join(folder, name) for name in names]
  # Labelled with their own index, so the files that do not decode can be dropped and named.
  examples = (image_folder.dataset(paths, range(len(paths)))
              .ignore_errors()
              .map(lambda image, index: images.to_float(images.resize(image, size), index))
              .batch(64))
  probabilities, indices = [], []
  for x, index in examples:
    probabilities.append(model(x, training=False).numpy())
    indices.append(index.numpy())
  indices = np.concatenate(indices) if indices else np.zeros(0, np.int64)
  for skipped in sorted(set(range(len(paths))) - set(indices.tolist())):
    logging.warning("%s: skipped, not a readable image", names[skipped])
  if not len(indices):
    raise UserError(f"--data: none of its {len(paths)} files is a readable image")
  probabilities = np.concatenate(probabilities)
  predicted = probabilities.argmax(axis=1)
  predictions = pd.DataFrame({"file": [names[i] for i in indices], "class": [class_names[p] for p in predicted],
                              "probability": probabilities.max(axis=1)})
  lines = [f"{row.file}  {row['class']}  {row.probability:.4f}" for _, row in predictions.iterrows()]
  folders = [files[i][1] for i in indices]
  if any(folder is not None for folder in folders):
    predictions["folder"] = folders
    labelled = predictions[predictions.folder.notna()]
    hits = int((labelled["class"] == labelled.folder).sum())
    lines.append(f"accuracy against the folder names: {hits / len(labelled):.4f} ({hits} of {len(labelled)})")
  return predictions, "\n".join(lines)


# Each preprocessing kind: how --data is read (no TensorFlow), and how it is predicted.
KINDS = {"forecast": (read_series, forecast_rows), "table": (read_table, table_rows),
         "images": (list_images, classify_images)}


def _read_csv(path, columns, date_column=None, fill_gaps=False):
  """The model's columns of a CSV; a missing one is named as one the model needs."""
  local = _local_copy(path, f"a CSV file with the columns {', '.join(columns)}")
  if os.path.isdir(local):
    raise UserError(f"--data={path} is a folder; the model predicts from a CSV file with the columns "
                    f"{', '.join(columns)}")
  try:
    header = list(pd.read_csv(local, nrows=0).columns)
  except (OSError, ValueError):
    header = None  # read_columns says why it cannot be read
  needed = ([date_column] if date_column else []) + list(columns)
  missing = [c for c in needed if header is not None and c not in header]
  if missing:
    raise UserError(f"--data={path} has no column {missing[0]!r}, which the model needs (it was trained on "
                    f"{', '.join(needed)}); its columns are: {', '.join(map(str, header))}")
  frame, _ = csv_file.read_columns(local, columns[0], columns[1:], date_column, fill_gaps=fill_gaps)
  return frame


def _local_copy(path, wanted):
  """--data itself, or a downloaded copy of a gs:// file or folder."""
  try:
    return transfer.local_path(path)
  except FileNotFoundError:
    raise UserError(f"--data={path}: no such file or folder; give {wanted}") from None
