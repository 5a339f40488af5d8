"""Writes a class-per-subfolder image folder as sharded TFRecord files for `--data=OUT_DIR`.

    python scripts/make_tfrecords.py seg_train/ shards/train/ --shards=16
    python scripts/make_tfrecords.py seg_train/ shards/train/ --shard_mb=200
    python scripts/make_tfrecords.py seg_test/ shards/test/           # about 100 MiB per shard

Every file is decoded once first (trainer/data/image_folder.py): unreadable files are left out
and listed, with the reason, in the summary and in OUT_DIR/metadata.json. Use at least as many
shards as the job will have workers, so that each worker reads whole files of its own. A worker
streams shards from gs:// with three on its scratch disk at a time: --shard_mb sets that size.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from trainer.errors import StorageError, UserError  # noqa: E402
from trainer.data import image_folder, image_tfrecords  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src_dir", metavar="SRC_DIR", help="folder with one subfolder of images per class")
  parser.add_argument("out_dir", metavar="OUT_DIR", help="empty (or new) folder for the shards and metadata.json")
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--shards", type=int, default=None, help="number of shard files")
  size.add_argument("--shard_mb", type=float, default=image_tfrecords.TARGET_SHARD_BYTES / 2**20,
                    help="target size of a shard in MiB, of images (default: %(default)g)")
  args = parser.parse_args()
  try:
    if not args.shard_mb > 0:  # also NaN
      raise UserError(f"--shard_mb={args.shard_mb} must be more than 0; give a size in MiB, e.g. 100")
    scan = image_folder.scan(args.src_dir, flag="SRC_DIR")
    metadata = image_tfrecords.write_shards(scan, args.out_dir, args.shards, args.shard_mb * 2**20)
  except (UserError, StorageError) as e:
    sys.exit(f"make_tfrecords: error: {e}")
  print(summary(metadata, args.out_dir))


def summary(metadata, out_dir):
  shards, sizes = len(metadata["shards"]), metadata["shard_bytes"]
  mib = lambda size: f"{size / 2**20:.2f} MiB"
  each = mib(sizes[0]) if shards == 1 else f"{mib(min(sizes))} to {mib(max(sizes))} ({mib(sum(sizes))})"
  lines = [f"{metadata['num_examples']} images in {len(metadata['class_names'])} classes -> "
           f"{shards} shard{'' if shards == 1 else 's'} of {each} in {out_dir}"]
  width = max(len(name) for name in metadata["class_names"])
  lines += [f"  {name:<{width}}  {count}" for name, count in metadata["counts"].items()]
  skipped = metadata["skipped_files"]
  if skipped:
    lines.append(f"skipped {len(skipped)} unreadable files:")
    lines += [f"  {s['path']}: {s['reason']}" for s in skipped]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
