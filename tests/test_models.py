import pytest

from trainer.models import MODELS, OPTIMIZERS


@pytest.mark.parametrize("name, input_shape, bidirectional, parameters", [
    ("dense", (5,), False, 113),
    ("gru", (60, 1), False, 22_401),
    ("lstm", (60, 1), False, 29_345),
    # Bidirectional doubles each layer and the next layer sees 64 features:
    # gru 2*3*(32+32*32+64) + 3 * 2*3*(64*32+32*32+64) + 65 = 63,233.
    ("gru", (60, 1), True, 63_233),
    # lstm 2*4*(32+32*32+32) + 3 * 2*4*(64*32+32*32+32) + 65 = 83,265.
    ("lstm", (60, 1), True, 83_265),
])
def test_parameter_counts_match_the_tutorial(name, input_shape, bidirectional, parameters):
  assert MODELS[name](input_shape, 1, bidirectional).count_params() == parameters


def test_dense_weights_have_the_tutorials_shapes():
  assert [tuple(w.shape) for w in MODELS["dense"]((5,)).get_weights()] == [(5, 16), (16,), (16, 1), (1,)]


@pytest.mark.parametrize("name, input_name", [("dense", "features"), ("gru", "window"), ("lstm", "window")])
def test_inputs_are_named(name, input_name):
  shape = (5,) if name == "dense" else (10, 1)
  assert MODELS[name](shape).inputs[0].name == input_name


def test_every_model_has_an_optimizer():
  assert set(OPTIMIZERS) == set(MODELS)
