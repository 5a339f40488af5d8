"""--cache=memory, disk and none: the same training batches, in an order drawn from (seed, epoch),
and exact resume under each (trainer/data/images.py, trainer/data/decoded.py)."""

import errno
import json
import os
import re
import signal
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from processes import Job, run, stalled

from trainer import errors, storage, transfer
from trainer.config import Config
from trainer.data import decoded, image_folder, image_tfrecords, images

POLICIES = ("memory", "disk", "none")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
  """TMPDIR for this test: where a disk cache goes."""
  folder = tmp_path / "scratch"
  folder.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(folder))
  monkeypatch.setattr(transfer, "_scratch", None)
  return folder


def epochs(prepared, *numbers, split="train"):
  """[(uint8 images, labels)] of each epoch, as the training loop gets them (an input context)."""
  context = tf.distribute.InputContext()
  result = []
  for epoch in numbers:
    pairs = [(x.numpy(), y.numpy()) for x, y in prepared.make_dataset(split, 8, context, epoch)]
    result.append((np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])))
  return result


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_the_three_policies_give_identical_training_batches_for_a_folder(make_image_folder, scratch):
  folder = make_image_folder({"a": 14, "b": 10, "c": 8})
  got = {}
  cache_files = lambda: {f for folder in scratch.glob("trainer-scratch-*") for f in os.listdir(folder)}
  for policy in POLICIES:
    before = cache_files()
    prepared = images.prepare(Config(model="cnn", data=folder, image_size=24, cache=policy))
    assert prepared.summary["cache"] == policy
    got[policy] = epochs(prepared, 0, 1) + epochs(prepared, 0, split="validation")
    # Only the disk cache writes to the scratch folder: one file per split (test, train, validation).
    assert len(cache_files() - before) == (3 if policy == "disk" else 0), policy
  for policy in ("disk", "none"):
    for (x, y), (x_memory, y_memory) in zip(got[policy], got["memory"]):
      np.testing.assert_array_equal(x, x_memory, err_msg=policy)
      np.testing.assert_array_equal(y, y_memory, err_msg=policy)
  (first, _), (second, _), _ = got["memory"]
  assert not np.array_equal(first, second)  # another epoch, another order and augmentation


def test_an_epoch_is_a_permutation_of_the_examples_drawn_from_seed_and_epoch(make_image_folder, scratch):
  """Without augmentation an epoch's pixels are the stored images at permutation(count, seed, epoch)."""
  folder = make_image_folder({"a": 9, "b": 9})
  config = Config(model="cnn", data=folder, image_size=24, cache="none", augment=False)
  (x, y), = epochs(images.prepare(config), 3)
  store = decoded.fill(images.resized(image_folder.dataset(*_train_files(config)), 24), 24, "memory")
  order = np.random.default_rng(config.seed * 100_003 + 3).permutation(len(store))
  np.testing.assert_array_equal(x, store.read(order))
  np.testing.assert_array_equal(y, store.labels[order])


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_a_stream_under_none_is_the_same_for_the_same_seed_and_epoch(make_image_folder, tmp_path, scratch):
  scan = image_folder.scan(make_image_folder({"a": 10, "b": 10}))
  image_tfrecords.write_shards(scan, str(tmp_path / "shards"), num_shards=2)
  config = Config(model="cnn", data=str(tmp_path / "shards"), image_size=24, cache="none", augment=False)
  prepared = images.prepare(config)
  (first, labels), (second, _) = epochs(prepared, 0, 1)
  (again, _), = epochs(images.prepare(config), 0)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, second)  # another epoch, another order
  assert sorted(map(bytes, first)) == sorted(map(bytes, second))
  assert len(labels) == sum(prepared.summary["counts"]["train"])


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
@pytest.mark.parametrize("cache", POLICIES)
def test_each_input_pipeline_gets_its_own_share_of_a_stream(make_image_folder, tmp_path, scratch, cache):
  """Two workers: each trains on its own share, even where prepare() read the whole stream first
  to count its classes (that count's store is not the first worker's share)."""
  scan = image_folder.scan(make_image_folder({"a": 10, "b": 10}))
  image_tfrecords.write_shards(scan, str(tmp_path / "shards"), num_shards=2)
  prepared = images.prepare(Config(model="cnn", data=str(tmp_path / "shards"), image_size=24, cache=cache))
  shares = []
  for worker in (0, 1):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker)
    shares.append(np.concatenate([x.numpy() for x, _ in prepared.make_dataset("validation", 4, context)]))
  assert len(shares[0]) + len(shares[1]) == sum(prepared.summary["counts"]["validation"])
  assert not {bytes(x) for x in shares[0]} & {bytes(x) for x in shares[1]}


@pytest.mark.parametrize("budgets, chosen", [((100, 100), "memory"), ((1, 100), "disk"), ((1, 1), "none")])
@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_auto_counts_the_images_before_decoding_and_takes_the_first_policy_that_fits(
    make_image_folder, tmp_path, scratch, kind, budgets, chosen):
  """36 images at 150 px: 2.4 MiB decoded, over budgets of 1 MiB (folders: counted by the scan;
  shards: from metadata.json, before any is read)."""
  data = make_image_folder({"a": 12, "b": 12, "c": 12})
  if kind == "shards":
    image_tfrecords.write_shards(image_folder.scan(data), str(tmp_path / "shards"), num_shards=2)
    data = str(tmp_path / "shards")
  memory, disk = budgets
  prepared = images.prepare(Config(model="cnn", data=data, cache="auto", memory_budget_mb=memory,
                                   disk_budget_mb=disk))
  assert prepared.summary["cache"] == chosen


def test_a_full_scratch_disk_is_one_line_and_a_storage_error(make_image_folder, scratch, monkeypatch):
  """The disk fills up while the cache is written (the budget flag was above the real space, or
  another process wrote there): one line naming the file and what to change, exit 170, file removed."""
  def full(store, images):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(decoded.OnDisk, "append", full)
  with pytest.raises(errors.StorageError) as raised:
    images.prepare(Config(model="cnn", data=make_image_folder(), image_size=24, cache="disk"))
  assert re.fullmatch(r"cannot write the disk cache of decoded images \(\S+\.uint8\): No space left on device; give "
                      r"the scratch folder \(TMPDIR\) more space, lower --disk_budget_mb, or use --cache=none",
                      str(raised.value))
  assert not [f for folder in scratch.glob("trainer-scratch-*") for f in os.listdir(folder)]


def _train_files(config):
  """The training split's (paths, labels) as images.prepare splits a folder."""
  scan = image_folder.scan(config.data)
  labels = np.array(scan.labels, np.int32)
  rest, _ = image_folder.stratified_split(labels, config.test_split, config.seed)
  train, _ = image_folder.stratified_split(labels[rest], config.validation_split, config.seed + 1)
  return list(np.array(scan.paths)[rest][train]), list(labels[rest][train])


# Exact resume under every policy: real trainer processes, SIGTERM'd at a named write ------------------------------

def _write_images(root, per_class=12, size=22):
  rng = np.random.default_rng(0)
  for k, name in enumerate(("red", "green", "blue")):
    os.makedirs(os.path.join(root, name))
    for i in range(per_class):
      pixels = rng.integers(0, 60, (size, size, 3))
      pixels[..., k] += 180
      with open(os.path.join(root, name, f"{i}.png"), "wb") as f:
        f.write(tf.io.encode_png(pixels.astype(np.uint8)).numpy())
  return root


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory):
  """{"folder": a class folder of 36 tiny images, "shards": the same as two TFRecord shards}."""
  root = tmp_path_factory.mktemp("cache_data")
  folder = _write_images(str(root / "folder"))
  image_tfrecords.write_shards(image_folder.scan(folder), str(root / "shards"), num_shards=2)
  return {"folder": folder, "shards": str(root / "shards")}


def cnn_flags(data, job_dir, *extra):
  return ["--model=cnn", f"--data={data}", "--image_size=22", "--batch_size=4", f"--job_dir={job_dir}", *extra]


def report(job_dir):
  return json.loads(storage.read_text(storage.join(job_dir, "report.json")))


def uninterrupted(data, job_dir, epochs, cache):
  """(report, steps per epoch) of a job run from start to end."""
  code, job = run(cnn_flags(data, job_dir, f"--epochs={epochs}", f"--cache={cache}"))
  assert code == 0, job.stderr[-3000:]
  steps = sorted(int(n[5:]) for n in os.listdir(os.path.join(job_dir, "checkpoints")) if re.fullmatch(r"ckpt-\d+", n))
  assert steps[-1] == epochs * steps[0]  # each epoch's end
  assert steps[0] > 4  # so that a checkpoint half way into an epoch is 2 steps or more before its end
  return report(job_dir), steps[0]


def sigtermed(flags, step):
  """Runs flags SIGTERM'd while the checkpoint of `step` is published: it stops 2 steps later, exit 143."""
  job = Job(flags, command=stalled("trainer.task", rename=rf"/ckpt-{step}$", until_signal=True))
  job.wait_for("^STALLED")
  job.signal(signal.SIGTERM)
  assert job.finish() == 143, job.stderr[-3000:]
  assert re.search(rf"stopped by SIGTERM at step {step + 2}", job.last_line()), job.stderr[-3000:]


def resumed(flags, step, env=None):
  """The report of flags run to the end, resumed from `step`, with the job's log under "log"."""
  code, job = run(flags, env=env)
  assert code == 0, job.stderr[-3000:]
  assert re.search(rf"resuming from \S+ckpt-{step}: ", job.stderr), job.stderr[-3000:]
  return {**report(next(f for f in flags if f.startswith("--job_dir="))[len("--job_dir="):]), "log": job.stderr}


def assert_same_training(result, expected):
  assert result["history"] == expected["history"]
  assert result["weights_checksum"] == expected["weights_checksum"]


@pytest.mark.slow  # four short trainer processes: a policy's resume is only shown by real signals and checkpoints
def test_every_policy_resumes_mid_epoch_to_the_weights_of_an_uninterrupted_run(image_sets, tmp_path):
  """Every policy gives the same batches, so a job may even resume under another one (with
  --cache=auto the budget may have changed between the runs). Three epochs, checkpoints every
  half epoch: the job starts under none and is SIGTERM'd in epoch 2, resumes under memory and is
  SIGTERM'd in epoch 3, resumes under disk and ends with the weights of a run never stopped."""
  expected, epoch_steps = uninterrupted(image_sets["folder"], str(tmp_path / "reference"), 3, "memory")
  half = epoch_steps // 2
  flags = lambda cache: cnn_flags(image_sets["folder"], str(tmp_path / "job"), "--epochs=3", f"--cache={cache}",
                                  f"--checkpoint_every_steps={half}", "--steps_per_loop=1",
                                  "--async_checkpoints=false")
  sigtermed(flags("none"), epoch_steps + half)
  # The stall is at a checkpoint of a multiple of `half`: 2 steps after the first is not one.
  second = next(s for s in range(2 * epoch_steps, 3 * epoch_steps) if s % half == 0 and s > 2 * epoch_steps)
  resumed_flags = flags("memory")
  job = Job(resumed_flags, command=stalled("trainer.task", rename=rf"/ckpt-{second}$", until_signal=True))
  job.wait_for("^STALLED")
  job.signal(signal.SIGTERM)
  assert job.finish() == 143, job.stderr[-3000:]
  assert re.search(rf"resuming from \S+ckpt-{epoch_steps + half + 2}: 1 epochs done", job.stderr), job.stderr[-3000:]
  # The disk cache goes to TMPDIR, in a folder of its own that is removed when the job ends.
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  result = resumed(flags("disk"), second + 2, env={"TMPDIR": str(scratch)})
  assert result["data"]["cache"] == "disk"
  assert re.search(rf"disk cache: \d+ decoded images in {re.escape(str(scratch))}/trainer-scratch-", result["log"])
  assert not os.listdir(scratch)
  assert result["resumed_from"]["epoch"] == 2 and result["resumed_from"]["step"] > 0  # mid-epoch
  assert_same_training(result, expected)


@pytest.mark.slow  # three short trainer processes and a refused one
def test_a_stream_under_none_resumes_exactly_and_refuses_a_cached_order(image_sets, tmp_path):
  """TFRecords under --cache=none come through a shuffle buffer seeded by (seed, epoch): a resume
  sees the same order. A cached copy would be shuffled by index, another order: refused in one line."""
  expected, epoch_steps = uninterrupted(image_sets["shards"], str(tmp_path / "reference"), 2, "none")
  step = epoch_steps + epoch_steps // 2
  flags = lambda cache: cnn_flags(image_sets["shards"], str(tmp_path / "job"), "--epochs=2", f"--cache={cache}",
                                  f"--checkpoint_every_steps={step}", "--steps_per_loop=1",
                                  "--async_checkpoints=false")
  sigtermed(flags("none"), step)
  code, refused = run(flags("memory"))
  assert code == 2, refused.stderr[-3000:]
  assert re.fullmatch(r"trainer: error: \S+ holds checkpoints of another job: --cache was 'none: streamed, shuffled "
                      r"in a buffer', now 'memory or disk: by index'; use another --job_dir, or --restart to discard "
                      r"them",
                      refused.last_line()), refused.stderr[-3000:]
  result = resumed(flags("none"), step + 2)
  assert result["resumed_from"]["epoch"] == 1 and result["resumed_from"]["step"] > 0  # mid-epoch
  assert_same_training(result, expected)
