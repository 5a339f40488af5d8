"""Seeded image augmentation for the CNN classifier: the tutorial's ImageDataGenerator set
(rotation up to 40 degrees, shear 0.2, zoom 0.2, horizontal and vertical flips) as one
projective transform per image.

ImageDataGenerator applies each transform with scipy, one channel at a time, in one Python
thread; Keras' Random* layers apply them one after another, each resampling the whole image.
Here rotation, shear, zoom and both flips are composed into one 3x3 matrix and the image is
resampled once, by a single `ImageProjectiveTransformV3` call (scripts/benchmark_input.py
measures all three).

Randomness is stateless: the same seed (a [2] integer tensor, e.g. derived from (seed, epoch,
example index)) gives the same augmentation eagerly and inside `tf.data`, on any number of
parallel map calls, so a run can be repeated exactly.
"""

import math

import tensorflow as tf

# Where the transform reaches outside the image (corners after a rotation, borders after a zoom
# out), the edge pixel is repeated, as ImageDataGenerator's default fill_mode='nearest' does. It
# is free: one 150x150 float32 image through the op on one thread of this CPU took ~660 us
# bilinear / ~390 us nearest-neighbour with NEAREST fill, ~690 / ~440 with CONSTANT (black),
# ~900 / ~430 with REFLECT.
FILL_MODE = "NEAREST"
# Nearest-neighbour sampling, where ImageDataGenerator interpolates bilinearly (scipy order=1).
# The transform is nearly all the cost of augmenting, and bilinear makes the whole pipeline ~1.6x
# dearer: ~580 vs ~360 CPU microseconds per 150x150 image (scripts/benchmark_input.py). On 2
# cores the pipeline and the training step share the CPU, so that is training speed: fed by the
# pipeline the CNN trained at 0.86-0.99 of its model-only speed with this sampling, 0.84-0.86
# with bilinear (a shared, noisy machine). Rotated edges come out slightly jagged; torchvision's
# RandomRotation and RandomAffine sample this way by default. interpolation="BILINEAR" gives
# ImageDataGenerator's output to float precision (tests/test_augment.py).
INTERPOLATION = "NEAREST"


def transform_matrix(height, width, angle, shear, zoom_x, zoom_y, flip_h, flip_v):
  """The 3x3 matrix mapping an output pixel (x, y, 1) to the input point it samples, about the
  image centre; x is the column and y the row, integer coordinates at pixel centres (the
  convention of ImageProjectiveTransformV3).

  The same transform as ImageDataGenerator's `apply_affine_transform` followed by its flips:
  `angle` and `shear` in degrees (its shear_range is an angle in degrees, not a shear factor, so
  its 0.2 is a barely visible shear); zoom_x > 1 shows more of the image along x (the picture
  shrinks), as its zx does; flip_h / flip_v (bools) mirror the result left-right / top-bottom.
  """
  angle = tf.cast(angle, tf.float32) * (math.pi / 180)
  shear = tf.cast(shear, tf.float32) * (math.pi / 180)
  # ImageDataGenerator flips after transforming: out = flip(affine(image)), so the flip acts on
  # output coordinates first. Both are about the centre, so the flip is the last factor below.
  flip_x = tf.where(tf.cast(flip_h, tf.bool), -1.0, 1.0)
  flip_y = tf.where(tf.cast(flip_v, tf.bool), -1.0, 1.0)
  rotate = [[tf.cos(angle), -tf.sin(angle)], [tf.sin(angle), tf.cos(angle)]]
  shear_ = [[1.0, -tf.sin(shear)], [0.0, tf.cos(shear)]]
  scale = [[tf.cast(zoom_x, tf.float32) * flip_x, 0.0], [0.0, tf.cast(zoom_y, tf.float32) * flip_y]]
  linear = tf.linalg.matmul(tf.linalg.matmul(_stack(rotate), _stack(shear_)), _stack(scale))
  # About the centre: input = centre + linear @ (output - centre). Pixel centres are at integer
  # coordinates, so the centre is (size - 1) / 2, ImageDataGenerator's `size / 2 - 0.5`.
  centre = tf.stack([(tf.cast(width, tf.float32) - 1) / 2, (tf.cast(height, tf.float32) - 1) / 2])
  offset = centre - tf.linalg.matvec(linear, centre)
  return tf.concat([tf.concat([linear, offset[:, None]], axis=1), [[0.0, 0.0, 1.0]]], axis=0)


def _stack(rows):
  return tf.stack([tf.stack([tf.cast(v, tf.float32) for v in row]) for row in rows])


def random_transform(image, seed, rotation=40.0, shear=0.2, zoom=0.2, flips=True,
                     fill_mode=FILL_MODE, interpolation=INTERPOLATION):
  """A randomly rotated, sheared, zoomed and flipped copy of `image` (float32 [H, W, C] in
  [0, 1]), drawn as ImageDataGenerator(rotation_range=rotation, shear_range=shear,
  zoom_range=zoom, horizontal_flip=flips, vertical_flip=flips) draws it: angle uniform in
  [-rotation, rotation] degrees, shear uniform in [-shear, shear] degrees, zoom x and y drawn
  independently from [1 - zoom, 1 + zoom], each flip with probability 0.5.

  `seed`: int32/int64 [2] tensor; same seed, same output, eagerly or in `Dataset.map`.
  """
  image = tf.convert_to_tensor(image, tf.float32)
  # One draw for all six parameters: one op instead of six, per image.
  u = tf.random.stateless_uniform([6], seed, minval=-1.0, maxval=1.0)
  shape = tf.shape(image)
  matrix = transform_matrix(shape[0], shape[1], angle=rotation * u[0], shear=shear * u[1],
                            zoom_x=1 + zoom * u[2], zoom_y=1 + zoom * u[3],
                            flip_h=flips and u[4] < 0, flip_v=flips and u[5] < 0)
  return apply_transform(image, matrix, fill_mode, interpolation)


def apply_transform(image, matrix, fill_mode=FILL_MODE, interpolation=INTERPOLATION):
  """`image` (float32 [H, W, C] in [0, 1]) resampled through a `transform_matrix`, same shape."""
  image = tf.convert_to_tensor(image, tf.float32)
  fill_mode, interpolation = fill_mode.upper(), interpolation.upper()
  # The op takes the first 8 entries, row by row; the 9th is 1 for an affine matrix.
  transforms = tf.reshape(matrix, [1, 9])[:, :8]
  output = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transforms, output_shape=tf.shape(image)[:2], fill_value=0.0,
      interpolation=interpolation, fill_mode=fill_mode)[0]
  output.set_shape(image.shape)
  if interpolation == "BILINEAR":
    # Bilinear weights sum to 1, but in float32 a blend of 1.0s can round a hair above it.
    output = tf.clip_by_value(output, 0.0, 1.0)
  return output
