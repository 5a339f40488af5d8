"""trainer/data/augment.py: every op eagerly and inside tf.data (the two differ), the matrix against
known points and against ImageDataGenerator's own transform, and seeding."""

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import augment

SIZE = 16


def an_image(seed=0, height=SIZE, width=SIZE):
  return np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)


def in_dataset(fn, *args):
  """fn(*args) run as a tf.data map function (graph mode, parallel calls), as the pipeline runs it."""
  dataset = tf.data.Dataset.from_tensors(tuple(args)).map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.get_single_element().numpy()


def both(fn, *args):
  """fn(*args) eagerly and in tf.data; fails unless the two are identical."""
  eager = fn(*args).numpy()
  np.testing.assert_array_equal(eager, in_dataset(fn, *args))
  return eager


def seed(a, b=0, dtype=tf.int64):
  return tf.constant([a, b], dtype)


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
@pytest.mark.parametrize("interpolation", ["NEAREST", "BILINEAR"])
@pytest.mark.parametrize("fill_mode", ["NEAREST", "CONSTANT", "REFLECT"])
def test_shape_dtype_and_range_are_kept(fill_mode, interpolation):
  # Non-square, and pixels at both ends of the range, where a blend could overshoot.
  image = np.round(an_image(height=SIZE, width=2 * SIZE))
  for s in range(5):
    out = both(lambda x, sd: augment.random_transform(x, sd, fill_mode=fill_mode, interpolation=interpolation),
               image, seed(s))
    assert out.shape == image.shape and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1


def test_static_shape_is_kept_inside_tf_data():
  dataset = tf.data.Dataset.from_tensors(an_image()).map(lambda x: augment.random_transform(x, seed(1)))
  assert dataset.element_spec.shape == (SIZE, SIZE, 3)
  assert dataset.element_spec.dtype == tf.float32


@pytest.mark.parametrize("seed_dtype", [tf.int32, tf.int64])
def test_same_seed_same_output_eagerly_and_in_a_parallel_map(seed_dtype):
  images = np.stack([an_image(i) for i in range(8)])
  seeds = tf.stack([seed(7, i, seed_dtype) for i in range(8)])
  mapped = list(tf.data.Dataset.from_tensor_slices((images, seeds))
                .map(augment.random_transform, num_parallel_calls=tf.data.AUTOTUNE)
                .as_numpy_iterator())
  for image, s, from_dataset in zip(images, seeds, mapped):
    eager = augment.random_transform(image, s).numpy()
    np.testing.assert_array_equal(eager, from_dataset)
    np.testing.assert_array_equal(eager, augment.random_transform(image, s).numpy())  # and again


def test_different_seeds_give_different_images():
  image = an_image()
  outputs = [both(augment.random_transform, image, s) for s in (seed(0, 0), seed(0, 1), seed(1, 0))]
  for i in range(3):
    for j in range(i):
      assert not np.array_equal(outputs[i], outputs[j])


@pytest.mark.parametrize("interpolation", ["NEAREST", "BILINEAR"])
def test_zero_ranges_without_flips_is_the_identity(interpolation):
  image = an_image(height=SIZE, width=SIZE + 5)
  out = both(lambda x, s: augment.random_transform(x, s, rotation=0, shear=0, zoom=0, flips=False,
                                                   interpolation=interpolation), image, seed(3))
  np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("interpolation", ["NEAREST", "BILINEAR"])
def test_pure_flips_equal_tf_image_flips(interpolation):
  image = an_image(height=SIZE, width=SIZE + 5)
  h, w = image.shape[:2]

  def flipped(flip_h, flip_v):
    return lambda x: augment.apply_transform(x, augment.transform_matrix(h, w, 0, 0, 1, 1, flip_h, flip_v),
                                             interpolation=interpolation)

  np.testing.assert_array_equal(both(flipped(True, False), image), tf.image.flip_left_right(image))
  np.testing.assert_array_equal(both(flipped(False, True), image), tf.image.flip_up_down(image))
  np.testing.assert_array_equal(both(flipped(True, True), image), image[::-1, ::-1])


@pytest.mark.slow
def test_flips_alone_give_each_of_the_four_flips():
  image = an_image()
  candidates = {"none": image, "left_right": image[:, ::-1], "up_down": image[::-1], "both": image[::-1, ::-1]}
  seen = set()
  for s in range(40):
    # Eagerly: that tf.data gives the same image is test_shape_dtype_and_range_are_kept's (a
    # dataset per seed traced 40 graphs, 17 s).
    out = augment.random_transform(image, seed(s), rotation=0, shear=0, zoom=0).numpy()
    seen.update(name for name, candidate in candidates.items() if np.array_equal(out, candidate))
  assert seen == set(candidates)


def apply(matrix, point):
  x, y, k = np.asarray(matrix) @ np.array([*point, 1.0])
  return x / k, y / k


def test_matrix_maps_known_points():
  # 9 wide, 5 high: the centre is (x, y) = (4, 2). A matrix maps an output pixel to its input.
  m = lambda **kw: augment.transform_matrix(**{"height": 5, "width": 9, "angle": 0, "shear": 0, "zoom_x": 1,
                                               "zoom_y": 1, "flip_h": False, "flip_v": False, **kw}).numpy()
  np.testing.assert_allclose(m(), np.eye(3))
  for kw in [{"angle": 37}, {"shear": 10}, {"zoom_x": 1.3, "zoom_y": 0.7}, {"flip_h": True, "flip_v": True}]:
    np.testing.assert_allclose(apply(m(**kw), (4, 2)), (4, 2), atol=1e-5)  # about the centre
  # 90 degrees, as ImageDataGenerator turns: the output pixel 3 left of the centre samples 3 above it.
  np.testing.assert_allclose(apply(m(angle=90), (1, 2)), (4, -1), atol=1e-5)
  np.testing.assert_allclose(apply(m(angle=180), (0, 0)), (8, 4), atol=1e-5)
  # Zoom > 1 samples farther from the centre: the picture shrinks.
  np.testing.assert_allclose(apply(m(zoom_x=2, zoom_y=0.5), (6, 4)), (8, 3), atol=1e-6)
  np.testing.assert_allclose(apply(m(flip_h=True), (0, 1)), (8, 1), atol=1e-6)
  np.testing.assert_allclose(apply(m(flip_v=True), (3, 0)), (3, 4), atol=1e-6)
  # Shear in degrees: 0.2 (the tutorial's) moves a point 2 rows from the centre by under 0.01 pixel.
  x, y = apply(m(shear=0.2), (4, 4))
  assert 0 < abs(x - 4) < 0.01 and abs(y - 4) < 0.01


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # its scipy.ndimage.interpolation import
@pytest.mark.parametrize("theta, shear, zx, zy, flip_h, flip_v", [
    (30, 0.2, 1.1, 0.9, False, False),
    (-40, 15, 0.8, 1.2, True, False),
    (12, -5, 1.2, 1.15, True, True),
])
def test_matrix_matches_image_data_generator(theta, shear, zx, zy, flip_h, flip_v):
  image = an_image(4)
  expected = tf.keras.preprocessing.image.apply_affine_transform(
      image, theta=theta, shear=shear, zx=zx, zy=zy, row_axis=0, col_axis=1, channel_axis=2,
      fill_mode="nearest", order=1)
  expected = expected[:, ::-1] if flip_h else expected  # flips come after, as in its apply_transform
  expected = expected[::-1] if flip_v else expected
  matrix = augment.transform_matrix(SIZE, SIZE, theta, shear, zx, zy, flip_h, flip_v)
  out = both(lambda x: augment.apply_transform(x, matrix, fill_mode="NEAREST", interpolation="BILINEAR"), image)
  np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("k", range(5))
def test_gather_resampling_gives_the_ops_nearest_pixels(k):
  """The fast path (one gather) against ImageProjectiveTransformV3 with NEAREST sampling and fill."""
  image = an_image(seed=k, height=SIZE + 3)  # not square
  u = np.random.default_rng(k).uniform(-1, 1, 6)
  matrix = augment.transform_matrix(SIZE + 3, SIZE, 40 * u[0], 0.2 * u[1], 1 + 0.2 * u[2], 1 + 0.2 * u[3],
                                    u[4] < 0, u[5] < 0)
  op = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(matrix, [1, 9])[:, :8], output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation="NEAREST", fill_mode="NEAREST")[0]
  np.testing.assert_array_equal(both(augment.apply_transform, image, matrix), op.numpy())


def test_uint8_images_stay_uint8_and_match_the_float_result():
  image = an_image()
  image8 = tf.image.convert_image_dtype(image, tf.uint8)
  out8 = augment.random_transform(image8, seed(3))
  assert out8.dtype == tf.uint8
  out = augment.random_transform(tf.image.convert_image_dtype(image8, tf.float32), seed(3))
  np.testing.assert_array_equal(tf.image.convert_image_dtype(out8, tf.float32).numpy(), out.numpy())


def test_a_batch_is_transformed_image_by_image():
  """Batched resampling (offsets into one gather) gives each image its own transform, exactly as
  the op does image by image, eagerly and in tf.data."""
  batch = np.stack([an_image(seed=k) for k in range(3)])
  matrices = augment.transform_matrices(SIZE, SIZE, [30.0, -10.0, 0.0], [0.2, 5.0, 0.0], [1.1, 0.9, 1.0],
                                        [0.8, 1.2, 1.0], [True, False, False], [False, True, False])
  op = tf.raw_ops.ImageProjectiveTransformV3(
      images=batch, transforms=tf.reshape(matrices, [-1, 9])[:, :8], output_shape=[SIZE, SIZE],
      fill_value=0.0, interpolation="NEAREST", fill_mode="NEAREST")
  np.testing.assert_array_equal(both(augment.apply_transforms, batch, matrices), op.numpy())
  np.testing.assert_array_equal(augment.apply_transforms(batch, matrices)[2], batch[2])  # the identity


def test_each_image_of_a_batch_gets_its_own_augmentation():
  batch = np.stack([an_image()] * 4)
  out = augment.random_transforms(batch, seed(9)).numpy()
  assert len({o.tobytes() for o in out}) == 4
