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
    # 3 convolutions (896 + 9,248 + 9,248), 17x17x32 = 9,248 flattened -> 128 (1,183,872), -> 6 (774).
    ("cnn", (150, 150, 3), False, 1_204_038),
])
def test_parameter_counts_match_the_tutorial(name, input_shape, bidirectional, parameters):
  outputs = 6 if name == "cnn" else 1
  assert MODELS[name](input_shape, outputs, bidirectional).count_params() == parameters


def test_dense_weights_have_the_tutorials_shapes():
  assert [tuple(w.shape) for w in MODELS["dense"]((5,)).get_weights()] == [(5, 16), (16,), (16, 1), (1,)]


@pytest.mark.parametrize("name, input_name, shape", [
    ("dense", "features", (5,)), ("gru", "window", (10, 1)), ("lstm", "window", (10, 1)),
    ("cnn", "image", (32, 32, 3))])
def test_inputs_are_named(name, input_name, shape):
  assert MODELS[name](shape).inputs[0].name == input_name


def test_every_model_has_an_optimizer():
  assert set(OPTIMIZERS) == set(MODELS)
