"""The CNN's input pipeline side by side: the tutorial's ImageDataGenerator, Keras preprocessing
layers, ours (trainer/data/augment.py), and the CNN's training speed fed by ours.

    python scripts/benchmark_input.py       # 3,000 150x150 JPEGs in 6 classes, batch 32, ~3 minutes

Writes a temporary folder of JPEGs (random shapes and colours), then measures images per second
over the same number of batches after a warm-up, each method with the same images, the same
augmentations (rotation 40 degrees, shear 0.2 degrees, zoom 0.2, both flips), the same output
size and batch size, read batch by batch from Python as a training loop would:
  imagedatagenerator  the tutorial's way: PIL decode and scipy transforms every epoch, with its
                      defaults: bilinear interpolation, fill 'nearest'
  keras_layers        RandomRotation, RandomShear, RandomZoom, RandomFlip on batches in tf.data
  ours                the trainer's pipeline (trainer/data/images.py): decode once into a cache,
                      then one transform per image, with augment.py's fill mode and
                      interpolation (or --fill_mode, --interpolation)
  ours_bilinear       the same with bilinear interpolation, like for like with ImageDataGenerator
  ours_no_augment     the same pipeline without augmentation: the cost of everything else
Then the tutorial's CNN trained by a tf.function step, fed by our pipeline and fed one in-memory
batch over and over (the model-only ceiling). Prints a table, then one line of JSON.
"""

import argparse
import itertools
import json
import math
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.data import augment, decoded, image_folder, images  # noqa: E402
from trainer.models import build_cnn  # noqa: E402

CLASSES = 6
ROTATION, SHEAR, ZOOM = 40.0, 0.2, 0.2  # the tutorial's ImageDataGenerator ranges


def write_images(folder, count, size, seed):
  """`count` JPEGs of random rectangles and discs on random backgrounds, in CLASSES subfolders."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:size, :size]
  for i in range(count):
    image = np.empty((size, size, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    for _ in range(rng.integers(2, 6)):
      top, left = rng.integers(0, size, 2)
      extent = rng.integers(size // 10, size // 2)
      if rng.random() < 0.5:
        mask = (abs(rows - top) < extent) & (abs(cols - left) < extent // 2)
      else:
        mask = (rows - top) ** 2 + (cols - left) ** 2 < extent ** 2
      image[mask] = rng.integers(0, 256, 3)
    class_folder = os.path.join(folder, f"class_{i % CLASSES}")
    os.makedirs(class_folder, exist_ok=True)
    tf.io.write_file(os.path.join(class_folder, f"{i:05d}.jpg"), tf.io.encode_jpeg(image, quality=90))


def images_per_second(batches, count, warmup):
  """(images per second, CPU microseconds per image) over `count` batches drawn from the iterator
  after `warmup` batches. CPU time counts every thread of this process: on a shared machine it
  is the steadier figure, as other jobs slow the clock but not the work."""
  for _ in range(warmup):
    next(batches)
  images = 0
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(count):
    images += len(next(batches)[0])
  return images / (time.perf_counter() - start), (time.process_time() - cpu_start) / images * 1e6


def our_pipeline(folder, args, augmented=True, floats=True):
  """The trainer's own training pipeline under --cache=memory (trainer/data/images.py) as its
  training loop reads it, a new dataset each epoch over one decoded store: (batches(first_epoch)
  -> an endless iterator of batches from that epoch on, number of images)."""
  scan = image_folder.scan(folder)
  examples = images.resized(image_folder.dataset(scan.paths, scan.labels), args.image_size)
  store = decoded.fill(examples, args.image_size, "memory")  # decoded before the clock starts
  options = {"fill_mode": args.fill_mode, "interpolation": args.interpolation}

  def epoch(epoch_seed):
    return images.augmented_batches(store.batches(images.permutation(len(store), epoch_seed), args.batch_size),
                                    epoch_seed, augmented, floats, **options)

  def batches(first_epoch=0):
    return itertools.chain.from_iterable(epoch(args.seed * 100_003 + e) for e in itertools.count(first_epoch))
  return batches, len(scan.paths), epoch


def measure_imagedatagenerator(folder, args):
  generator = tf.keras.preprocessing.image.ImageDataGenerator(
      rescale=1 / 255, rotation_range=ROTATION, shear_range=SHEAR, zoom_range=ZOOM,
      horizontal_flip=True, vertical_flip=True)
  flow = generator.flow_from_directory(folder, target_size=(args.image_size, args.image_size),
                                       batch_size=args.batch_size, seed=args.seed)
  return images_per_second(flow, args.batches, warmup=2)


def measure_keras_layers(folder, args):
  # The same ranges in the layers' units: rotation as a fraction of a full turn; the shear as
  # the matrix entry ImageDataGenerator's 0.2 degrees gives; zoom +-20% on each axis
  # independently. The same fill mode and interpolation as ours.
  options = {"fill_mode": args.fill_mode.lower(), "interpolation": args.interpolation.lower(), "seed": args.seed}
  layers = keras.Sequential([
      keras.layers.RandomRotation(ROTATION / 360, **options),
      keras.layers.RandomShear(x_factor=math.sin(math.radians(SHEAR)), **options),
      keras.layers.RandomZoom((-ZOOM, ZOOM), (-ZOOM, ZOOM), **options),
      keras.layers.RandomFlip("horizontal_and_vertical", seed=args.seed),
  ])
  scan = image_folder.scan(folder)
  examples = images.resized(image_folder.dataset(scan.paths, scan.labels), args.image_size).cache()
  dataset = (examples.shuffle(len(scan.paths), seed=args.seed).repeat()
             .map(images.to_float, num_parallel_calls=tf.data.AUTOTUNE)
             .batch(args.batch_size)
             .map(lambda x, y: (layers(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
             .prefetch(tf.data.AUTOTUNE))
  # A whole first epoch before the clock starts: it fills the cache.
  return images_per_second(iter(dataset), args.batches, warmup=math.ceil(len(scan.paths) / args.batch_size) + 1)


def measure_ours(folder, args, augmented=True):
  batches, _, _ = our_pipeline(folder, args, augmented)
  return images_per_second(batches(), args.batches, warmup=2)


def timed_steps(train_step, batches, steps):
  """Seconds for `steps` training steps, each on the next batch from the iterator."""
  start = time.perf_counter()
  for _ in range(steps):
    loss = train_step(*next(batches))
  float(loss)  # waits for the last step
  return time.perf_counter() - start


def measure_training(folder, args):
  """(img/s fed by our pipeline, img/s fed one in-memory batch over and over, median of the
  per-round ratios of the two).

  A round is one epoch of training fed by our pipeline, exactly as the trainer's loop runs it
  (a fresh dataset over the decoded cache, its prefetch buffer empty at the start), and the
  same number of steps on one fixed batch (the model-only ceiling). The two alternate, so a
  change in the machine's load falls on both; the median of the rounds' ratios shrugs off a
  burst of someone else's work on one round, the ratio of the totals does not. No pipeline
  iterator is alive during a ceiling round, so the ceiling never pays for the pipeline's work.
  """
  model = build_cnn((args.image_size, args.image_size, 3), CLASSES)
  optimizer = keras.optimizers.Adam()
  loss_fn = keras.losses.SparseCategoricalCrossentropy()

  @tf.function
  def train_step(pixels, labels):
    with tf.GradientTape() as tape:
      loss = loss_fn(labels, model(pixels, training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    return loss

  _, count, epoch_of_seed = our_pipeline(folder, args)
  epoch = lambda e: epoch_of_seed(args.seed * 100_003 + e)
  fixed = next(iter(epoch(0)))
  train_step(*fixed)  # traces
  # Full batches only: a last, smaller one would make the step trace again on the clock.
  ceiling, pipeline, steps = [], [], count // args.batch_size
  for r in range(1, args.rounds + 1):
    ceiling.append(timed_steps(train_step, itertools.repeat(fixed), steps))
    pipeline.append(timed_steps(train_step, iter(epoch(r)), steps))
  n_images = args.rounds * steps * args.batch_size
  median_ratio = float(np.median(np.array(ceiling) / np.array(pipeline)))
  return n_images / sum(pipeline), n_images / sum(ceiling), median_ratio


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=3000, help="JPEGs to write")
  parser.add_argument("--image_size", type=int, default=150)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=100, help="batches timed per input pipeline")
  parser.add_argument("--rounds", type=int, default=3, help="training epochs timed per feed")
  parser.add_argument("--fill_mode", default=augment.FILL_MODE, choices=("CONSTANT", "NEAREST", "REFLECT", "WRAP"))
  parser.add_argument("--interpolation", default=augment.INTERPOLATION, choices=("BILINEAR", "NEAREST"))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as folder:
    write_images(folder, args.images, args.image_size, args.seed)
    measured = {"imagedatagenerator": measure_imagedatagenerator(folder, args),
                "keras_layers": measure_keras_layers(folder, args),
                "ours": measure_ours(folder, args),
                "ours_bilinear": measure_ours(folder, argparse.Namespace(**vars(args) | {"interpolation": "BILINEAR"})),
                "ours_no_augment": measure_ours(folder, args, augmented=False)}
    training, ceiling, median_ratio = measure_training(folder, args)

  rates = {name: rate for name, (rate, _) in measured.items()}
  rates.update(training_fed_by_ours=training, training_ceiling=ceiling)
  cpu_us = {name: cpu for name, (_, cpu) in measured.items()}
  baseline = rates["imagedatagenerator"]
  print(f"{args.images} JPEGs of {args.image_size}x{args.image_size} in {CLASSES} classes, "
        f"batch {args.batch_size}, {args.batches} batches per pipeline, {args.rounds} training epochs "
        f"per feed; fill {args.fill_mode}, interpolation {args.interpolation}; {os.cpu_count()} CPUs")
  print(f"{'method':<22} {'img/s':>9} {'x IDG':>7} {'CPU us/img':>11}")
  for name, rate in rates.items():
    cpu = f"{cpu_us[name]:>11,.0f}" if name in cpu_us else f"{'':>11}"
    print(f"{name:<22} {rate:>9,.0f} {rate / baseline:>7.2f} {cpu}")
  print(f"ours vs ImageDataGenerator: {rates['ours'] / baseline:.2f}x the images per second, "
        f"{cpu_us['imagedatagenerator'] / cpu_us['ours']:.2f}x fewer CPU microseconds per image")
  print(f"training fed by ours vs the model-only ceiling: {median_ratio:.3f} (median of rounds), "
        f"{training / ceiling:.3f} (totals)")
  summary = {"images": args.images, "image_size": args.image_size, "batch_size": args.batch_size,
             "batches": args.batches, "training_epochs": args.rounds, "fill_mode": args.fill_mode,
             "interpolation": args.interpolation, "cpus": os.cpu_count(),
             "img_per_s": {name: round(rate, 1) for name, rate in rates.items()},
             "cpu_us_per_img": {name: round(cpu) for name, cpu in cpu_us.items()},
             "vs_imagedatagenerator": round(rates["ours"] / baseline, 2),
             "bilinear_vs_imagedatagenerator": round(rates["ours_bilinear"] / baseline, 2),
             "cpu_vs_imagedatagenerator": round(cpu_us["imagedatagenerator"] / cpu_us["ours"], 2),
             "keras_layers_vs_imagedatagenerator": round(rates["keras_layers"] / baseline, 2),
             "training_vs_ceiling": round(median_ratio, 3),
             "training_vs_ceiling_totals": round(training / ceiling, 3)}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
