"""Seeded image augmentation for the CNN classifier: the tutorial's ImageDataGenerator set
(rotation up to 40 degrees, shear 0.2, zoom 0.2, horizontal and vertical flips) as one
projective transform per image.

ImageDataGenerator applies each transform with scipy, one channel at a time, in one Python
thread; Keras' Random* layers apply them one after another, each resampling the whole image.
Here rotation, shear, zoom and both flips are composed into one 3x3 matrix per image and each
image is resampled once; a whole batch goes through the same few ops together, which on this
CPU was 1.3x faster than the same work image by image (scripts/benchmark_input.py measures
the pipeline against ImageDataGenerator and Keras' layers).

Randomness is stateless: the same seed (a [2] integer tensor, e.g. derived from (seed, epoch,
example index)) gives the same augmentation eagerly and inside `tf.data`, on any number of
parallel map calls, so a run can be repeated exactly.
"""

import math

import tensorflow as tf

# Where the transform reaches outside the image (corners after a rotation, borders after a zoom
# out), the edge pixel is repeated, as ImageDataGenerator's default fill_mode='nearest' does.
# With nearest sampling it costs nothing: clipping the source coordinates is the fill.
FILL_MODE = "NEAREST"
# Nearest-neighbour sampling, where ImageDataGenerator interpolates bilinearly (scipy order=1).
# With it the whole transform is one gather of whole pixels per batch (_nearest): ~200 CPU
# microseconds per 150x150 image for the whole pipeline against ~700 with bilinear through
# ImageProjectiveTransformV3 (scripts/benchmark_input.py). On 2 cores the pipeline and the
# training step share the CPU, so that difference is training speed. Rotated edges come out
# slightly jagged; torchvision's RandomRotation and RandomAffine sample this way by default.
# interpolation="BILINEAR" gives ImageDataGenerator's output to float precision
# (tests/test_augment.py).
INTERPOLATION = "NEAREST"


def transform_matrices(height, width, angle, shear, zoom_x, zoom_y, flip_h, flip_v):
  """[B, 3, 3] matrices mapping an output pixel (x, y, 1) to the input point it samples, about
  the image centre; x is the column and y the row, integer coordinates at pixel centres (the
  convention of ImageProjectiveTransformV3). The parameters are [B] vectors, one per image.

  The same transform as ImageDataGenerator's `apply_affine_transform` followed by its flips:
  `angle` and `shear` in degrees (its shear_range is an angle in degrees, not a shear factor, so
  its 0.2 is a barely visible shear); zoom_x > 1 shows more of the image along x (the picture
  shrinks), as its zx does; flip_h / flip_v (bools) mirror the result left-right / top-bottom.
  """
  angle = tf.cast(angle, tf.float32) * (math.pi / 180)
  shear = tf.cast(shear, tf.float32) * (math.pi / 180)
  # ImageDataGenerator flips after transforming: out = flip(affine(image)), so the flip acts on
  # output coordinates first. Both are about the centre, so the flip is the last factor:
  # linear = rotate(angle) @ shear_(shear) @ diag(zoom_x * flip_x, zoom_y * flip_y), where
  # rotate = [[cos a, -sin a], [sin a, cos a]] and shear_ = [[1, -sin s], [0, cos s]], multiplied
  # out by hand.
  scale_x = tf.cast(zoom_x, tf.float32) * tf.where(tf.cast(flip_h, tf.bool), -1.0, 1.0)
  scale_y = tf.cast(zoom_y, tf.float32) * tf.where(tf.cast(flip_v, tf.bool), -1.0, 1.0)
  m00, m01 = tf.cos(angle) * scale_x, -tf.sin(angle + shear) * scale_y
  m10, m11 = tf.sin(angle) * scale_x, tf.cos(angle + shear) * scale_y
  # About the centre: input = centre + linear @ (output - centre). Pixel centres are at integer
  # coordinates, so the centre is (size - 1) / 2, ImageDataGenerator's `size / 2 - 0.5`.
  cx, cy = (tf.cast(width, tf.float32) - 1) / 2, (tf.cast(height, tf.float32) - 1) / 2
  m02, m12 = cx - m00 * cx - m01 * cy, cy - m10 * cx - m11 * cy
  zero, one = tf.zeros_like(m00), tf.ones_like(m00)
  return tf.reshape(tf.stack([m00, m01, m02, m10, m11, m12, zero, zero, one], axis=1), [-1, 3, 3])


def transform_matrix(height, width, angle, shear, zoom_x, zoom_y, flip_h, flip_v):
  """One image's 3x3 matrix: transform_matrices with scalars."""
  return transform_matrices(height, width, *[tf.reshape(v, [1]) for v in (angle, shear, zoom_x, zoom_y, flip_h,
                                                                           flip_v)])[0]


def random_transforms(images, seed, rotation=40.0, shear=0.2, zoom=0.2, flips=True,
                      fill_mode=FILL_MODE, interpolation=INTERPOLATION):
  """Each image of the batch `images` ([B, H, W, C], uint8 or float32 in [0, 1]; the output has
  the input's dtype) randomly rotated, sheared, zoomed and flipped, each differently, drawn as
  ImageDataGenerator(rotation_range=rotation, shear_range=shear, zoom_range=zoom,
  horizontal_flip=flips, vertical_flip=flips) draws them: angle uniform in [-rotation, rotation]
  degrees, shear uniform in [-shear, shear] degrees, zoom x and y drawn independently from
  [1 - zoom, 1 + zoom], each flip with probability 0.5.

  `seed`: int32/int64 [2] tensor; same seed, same output, eagerly or in `Dataset.map`.
  """
  images = tf.convert_to_tensor(images)
  shape = tf.shape(images)
  u = tf.random.stateless_uniform(tf.stack([shape[0], 6]), seed, minval=-1.0, maxval=1.0)
  matrices = transform_matrices(shape[1], shape[2], angle=rotation * u[:, 0], shear=shear * u[:, 1],
                                zoom_x=1 + zoom * u[:, 2], zoom_y=1 + zoom * u[:, 3],
                                flip_h=tf.logical_and(flips, u[:, 4] < 0), flip_v=tf.logical_and(flips, u[:, 5] < 0))
  return apply_transforms(images, matrices, fill_mode, interpolation)


def random_transform(image, seed, **options):
  """One image ([H, W, C]) through random_transforms: for previews and tests."""
  return random_transforms(tf.convert_to_tensor(image)[None], seed, **options)[0]


def apply_transforms(images, matrices, fill_mode=FILL_MODE, interpolation=INTERPOLATION):
  """`images` ([B, H, W, C], uint8 or float32 in [0, 1]) resampled each through its matrix
  ([B, 3, 3], from transform_matrices); same shape and dtype."""
  images = tf.convert_to_tensor(images)
  fill_mode, interpolation = fill_mode.upper(), interpolation.upper()
  if (fill_mode, interpolation) == ("NEAREST", "NEAREST"):
    return _nearest(images, matrices)
  # The op takes the first 8 entries of each matrix, row by row; the 9th is 1 (affine).
  output = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.image.convert_image_dtype(images, tf.float32), transforms=tf.reshape(matrices, [-1, 9])[:, :8],
      output_shape=tf.shape(images)[1:3], fill_value=0.0, interpolation=interpolation, fill_mode=fill_mode)
  output.set_shape(images.shape)
  # Bilinear weights sum to 1, but in float32 a blend of 1.0s can round a hair above it.
  return tf.image.convert_image_dtype(tf.clip_by_value(output, 0.0, 1.0), images.dtype, saturate=True)


def apply_transform(image, matrix, **options):
  """One image ([H, W, C]) through one matrix ([3, 3])."""
  return apply_transforms(tf.convert_to_tensor(image)[None], tf.convert_to_tensor(matrix)[None], **options)[0]


def _nearest(images, matrices):
  """What ImageProjectiveTransformV3 does with NEAREST sampling and NEAREST fill (the same
  pixels, tests/test_augment.py), as one gather of whole pixels for the batch: the op computes
  each channel of each output pixel apart. Works on uint8, so cached images are augmented
  before they are widened to float."""
  shape = tf.shape(images)
  batch, height, width = shape[0], shape[1], shape[2]
  m = matrices[:, :2, :, None, None]  # [B, 2, 3, 1, 1], broadcast over [H, W]
  xs = tf.range(tf.cast(width, tf.float32))[None, :]
  ys = tf.range(tf.cast(height, tf.float32))[:, None]
  # Each output pixel's source, rounded; clipping repeats the edge pixels outside the image.
  x = tf.clip_by_value(tf.cast(tf.round(m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]), tf.int32), 0, width - 1)
  y = tf.clip_by_value(tf.cast(tf.round(m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]), tf.int32), 0, height - 1)
  first_pixel = tf.range(batch)[:, None, None] * height * width
  pixels = tf.reshape(images, tf.stack([batch * height * width, shape[3]]))
  output = tf.reshape(tf.gather(pixels, first_pixel + y * width + x), shape)
  output.set_shape(images.shape)
  return output
