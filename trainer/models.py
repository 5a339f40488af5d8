"""The tutorial's networks, each built by one function with the same signature, build_<name> for
each family of trainer.families, picked by name from the plain MODELS dict. Inputs are named so
exported signatures keep stable input keys."""

import keras
from keras import layers

from trainer import families


def build_dense(input_shape, num_outputs=1, bidirectional=False):
  """Dense(16, relu) -> Dense(1): 113 parameters on 5 features."""
  del bidirectional  # recurrent models only
  inputs = keras.Input(input_shape, name="features")
  hidden = layers.Dense(16, activation="relu")(inputs)
  return keras.Model(inputs, _output(num_outputs)(hidden), name="dense")


def build_gru(input_shape, num_outputs=1, bidirectional=False):
  """4 x GRU(32), Dropout(0.2) after the 2nd and 4th, Dense(1): 22,401 parameters on one feature."""
  return _recurrent_stack(layers.GRU, "gru", input_shape, num_outputs, bidirectional)


def build_lstm(input_shape, num_outputs=1, bidirectional=False):
  """4 x LSTM(32), Dropout(0.2) after the 2nd and 4th, Dense(1): 29,345 parameters on one feature."""
  return _recurrent_stack(layers.LSTM, "lstm", input_shape, num_outputs, bidirectional)


def _recurrent_stack(cell, name, input_shape, num_outputs, bidirectional):
  inputs = keras.Input(input_shape, name="window")
  x = inputs
  for i in range(4):
    recurrent = cell(32, return_sequences=i < 3)
    x = (layers.Bidirectional(recurrent) if bidirectional else recurrent)(x)
    if i in (1, 3):
      x = layers.Dropout(0.2)(x)
  return keras.Model(inputs, _output(num_outputs)(x), name=name)


def build_cnn(input_shape, num_outputs=6, bidirectional=False):
  """3 x (Conv2D(32, 3, relu) + MaxPool(2)), Flatten, Dense(128, relu), Dense(classes, softmax):
  1,204,038 parameters on 150x150x3 images and 6 classes. Takes pixels in [0, 1]."""
  del bidirectional  # recurrent models only
  inputs = keras.Input(input_shape, name="image")
  x = inputs
  for _ in range(3):
    x = layers.MaxPooling2D(2)(layers.Conv2D(32, 3, activation="relu")(x))
  x = layers.Dense(128, activation="relu")(layers.Flatten()(x))
  return keras.Model(inputs, _output(num_outputs, activation="softmax")(x), name="cnn")


def _output(units, activation=None):
  """The output layer, in float32 under mixed precision too: exported models then answer
  serving clients in float32, and a softmax in bfloat16 would round probabilities coarsely."""
  return layers.Dense(units, activation=activation, dtype="float32")


MODELS = {name: globals()[f"build_{name}"] for name in families.NAMES}

# The optimizer the tutorial trained each model with.
OPTIMIZERS = {name: getattr(keras.optimizers, family.optimizer) for name, family in families.FAMILIES.items()}
