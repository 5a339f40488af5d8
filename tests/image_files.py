"""Image files written by the tests: every format the trainer reads, and broken ones."""

import io
import os

import numpy as np
import tensorflow as tf
from PIL import Image


def write_image(path, pixels):
  """Writes uint8 pixels ([H, W, C], C = 1, 3 or 4) in the format the file extension names."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ext = os.path.splitext(path)[1]
  if ext == ".jpg":
    data = tf.io.encode_jpeg(pixels, quality=95).numpy()
  elif ext == ".png":
    data = tf.io.encode_png(pixels).numpy()
  else:  # TF encodes neither BMP nor GIF
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, ext[1:].upper())
    data = buffer.getvalue()
  with open(path, "wb") as f:
    f.write(data)
  return data


def rgb(rows, cols, seed, colours=None):
  rng = np.random.default_rng(seed)
  if colours is None:
    return rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8)
  # Few colours: a GIF's palette holds them exactly, so its pixels survive unchanged.
  palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
  return palette[rng.integers(0, colours, (rows, cols))]


def expected_rgb(pixels):
  """What decode must give for pixels written losslessly: gray copied to R, G, B; alpha dropped."""
  return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels[..., :3]
