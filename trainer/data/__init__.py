"""Input pipelines: one module per kind of data, each ending in the same `Prepared` bundle."""

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

import numpy as np


@dataclasses.dataclass
class Prepared:
  """What the training loop and the report need from a data source, whatever its kind."""
  # make_dataset(split, per_replica_batch_size, input_context, epoch) -> batched (inputs, target)
  # pairs; split is "train" (shuffled in an order fixed by the seed and the epoch) or "validation".
  # A regressor's validation batches may carry a third element: per example, the data's units per
  # unit of the target the network sees (trainer.steps: the validation metric in the data's units).
  # Images, with an input_context (the training loop's distributed input): uint8 pixels, a quarter
  # of float32's bytes to copy to a GPU, turned into floats on each replica's device by the step
  # (trainer.steps.pixels); without one, float pixels in [0, 1], what the model and its export take.
  make_dataset: Callable[..., Any]
  input_shape: Tuple[int, ...]
  # Saved beside the model: everything inference needs besides the weights.
  preprocessing: Dict[str, Any]
  # predict(model, export_preprocessing=None) -> test predictions in the data's own units; with
  # another export's saved preprocessing (trainer.retraining scores the production model on this test
  # set), that export's own columns, window or image size are read from the raw data.
  predict: Callable[..., np.ndarray]
  test_targets: np.ndarray
  baseline_name: str
  baseline_predictions: np.ndarray
  # Dates (or row numbers) of the test targets, for plots.
  test_index: List[Any]
  # The report's "data" section.
  summary: Dict[str, Any]
  # "table", "forecast" or "images" (trainer.families).
  kind: str = "table"
  # Units of the model's output layer: 1 for regressors, the number of classes for classifiers.
  num_outputs: int = 1
