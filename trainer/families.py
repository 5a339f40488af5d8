"""The model families, in one table: each --model's kind, the data module that feeds it and the
optimizer the tutorial trained it with. A new network is one row here and one build_<name>
function in trainer.models.

No TensorFlow and no Keras: trainer.config checks --model with this table before TensorFlow
starts, so the data module and the optimizer are named here and resolved only when training.
"""

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Family:
  # What the network learns from, and so how its data is prepared, scored and exported: "table"
  # (a regressor on rows), "forecast" (the next value of a series) or "images" (a classifier).
  kind: str
  # Its module in trainer.data (prepare(config) -> Prepared).
  data: str
  # Its class in keras.optimizers.
  optimizer: str


# In the order --help lists them.
FAMILIES = {
    "dense": Family(kind="table", data="tabular", optimizer="RMSprop"),
    "gru": Family(kind="forecast", data="timeseries", optimizer="Adam"),
    "lstm": Family(kind="forecast", data="timeseries", optimizer="Adam"),
    "cnn": Family(kind="images", data="images", optimizer="Adam"),
}
NAMES = tuple(FAMILIES)

# Exports written before one word named each kind call an image classifier "classification"
# (trainer_export.json's "kind"): read as "images".
OLD_KINDS = {"classification": "images"}
# What each kind of model is judged on: (metric, True when lower is better); an old word too.
METRICS = {"table": ("rmse", True), "forecast": ("rmse", True), "images": ("accuracy", False)}
METRICS.update({old: METRICS[new] for old, new in OLD_KINDS.items()})


def kind(word):
  """The kind a word names, an old export's word included."""
  return OLD_KINDS.get(word, word)


def data_module(model):
  """The trainer.data module that prepares `model`'s data (imports TensorFlow)."""
  return importlib.import_module(f"trainer.data.{FAMILIES[model].data}")
