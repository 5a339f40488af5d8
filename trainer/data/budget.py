"""How much memory and local disk the data may take, and what follows from it: where decoded images
are kept (`choose_cache`: --cache=auto picks memory, disk or none; an explicit choice that cannot fit
is refused) and whether a table or series may be read whole (`check_table`).

Why refuse in one line: a process over its container's memory limit is killed (exit 137), a code
that TFJob's ExitCode policy and the podFailurePolicy retry, so an oversized job would loop on its
GPUs instead of saying what to change (exit 2, before TensorFlow starts training).

No TensorFlow here: trainer.data.csv_file checks a table's size before TensorFlow starts.
"""

import os
import shutil
import tempfile

from absl import logging

from trainer import storage
from trainer.errors import UserError

MIB = 1 << 20
# Where the kernel reports memory: the container's cgroup (v2 at its root, v1 under memory/), and
# the machine's. Constants so tests can point them at folders of test files.
CGROUP = "/sys/fs/cgroup"
MEMINFO = "/proc/meminfo"
SELF_STATUS = "/proc/self/status"
# What TensorFlow and the model take besides the data, from the peak resident memory of trainer
# processes on tiny data sets (2 epochs on CPU): the dense regressor 752 MiB, the LSTM 827 MiB; the
# CNN 1,242 MiB at --image_size=150 and --batch_size=32, 1,547 MiB at batch 64, 1,866 MiB at 224 px,
# so its activations and their gradients add about 740 bytes a pixel of a batch. Rounded up. What
# this process already holds counts towards it, so the budget is the same whenever it is measured.
RESERVE = 900 * MIB
CNN_BYTES_PER_BATCH_PIXEL = 750
# A CSV read whole takes up to this many times its size on disk at its peak: the bytes read, pandas'
# parse, the numeric columns and their float32 copies in TensorFlow. Measured (trainer.data's
# prepare and a first batch of each split, peak resident memory over that before): a numeric
# table 3.8x, a dated price series with a text column 4.8x, a table with two short text columns
# 10.4x (pandas holds each text value as a Python string); the largest, rounded up.
CSV_EXPANSION = 11


def mib(size):
  """A byte count as the flags give it: MiB, to one decimal below 10."""
  value = size / MIB
  return f"{value:,.1f} MiB" if value < 10 else f"{value:,.0f} MiB"


def memory_budget(config):
  """(bytes the data may take in memory, how that was found)."""
  if config.memory_budget_mb:
    return config.memory_budget_mb * MIB, f"--memory_budget_mb={config.memory_budget_mb}"
  free, how = _free_memory()
  # What TensorFlow and the model will still take: their reserve less what this process holds already.
  still_needed = max(0, reserve(config) - _own_resident())
  return max(0, free - still_needed), f"{how}, less {mib(still_needed)} for TensorFlow and the model"


def reserve(config):
  """Bytes TensorFlow and config's model take at their peak, besides the data (measured: RESERVE)."""
  if config.kind != "images":
    return RESERVE
  return RESERVE + config.batch_size * config.image_size ** 2 * CNN_BYTES_PER_BATCH_PIXEL


def disk_budget(config, folder):
  """(bytes the data may take in the local scratch folder, how that was found); config None: no
  flags to read (a script without them), the folder's free space."""
  if config is not None and config.disk_budget_mb:
    return config.disk_budget_mb * MIB, f"--disk_budget_mb={config.disk_budget_mb}"
  return shutil.disk_usage(folder).free, f"free space of {folder}"


def _free_memory():
  """(bytes, how): the smaller of the container's headroom under its cgroup limit (if it has one)
  and the machine's available memory (a node may be overcommitted)."""
  available = _meminfo("MemAvailable")
  limited = _cgroup_headroom()
  if limited is not None and limited[0] < available:
    return limited
  return available, f"{mib(available)} available on this machine ({MEMINFO} MemAvailable)"


def _cgroup_headroom():
  """(limit - working set, how) for a cgroup v2 or v1 memory limit; None without one. The working
  set is the usage less inactive file cache, which the kernel reclaims before killing anything
  (what the kubelet counts too)."""
  for limit_file, usage_file, inactive in (("memory.max", "memory.current", "inactive_file"),
                                           ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                            "total_inactive_file")):
    limit = _read_number(os.path.join(CGROUP, limit_file))
    if limit is None:
      continue
    # v1 says "no limit" with a huge number (2^63 rounded down to a page): above the machine's memory.
    if limit == "max" or limit >= _meminfo("MemTotal"):
      return None
    usage = _read_number(os.path.join(CGROUP, usage_file)) or 0
    stat = os.path.join(CGROUP, os.path.dirname(usage_file), "memory.stat")
    working_set = max(0, usage - _stat_value(stat, inactive))
    return (max(0, limit - working_set),
            f"{mib(limit - working_set)} left under the container's limit of {mib(limit)} ({CGROUP}/{limit_file})")
  return None


def _read_number(path):
  """A cgroup file's number, "max" as such, None when there is no such file."""
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    return None
  return text if text == "max" else int(text)


def _stat_value(path, key):
  try:
    with open(path) as f:
      values = dict(line.split() for line in f if line.strip())
  except OSError:
    return 0
  return int(values.get(key, 0))


def _meminfo(key):
  """A /proc/meminfo value in bytes (the file says kB)."""
  with open(MEMINFO) as f:
    for line in f:
      name, value = line.split(":", 1)
      if name == key:
        return int(value.split()[0]) * 1024
  raise KeyError(f"{MEMINFO} has no {key}")


def _own_resident():
  """This process's resident memory in bytes (0 where /proc says nothing)."""
  try:
    with open(SELF_STATUS) as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def choose_cache(config, decoded_bytes, description):
  """Where decoded images are kept: config.cache, or for auto the first of memory, disk (the local
  scratch folder) and none that fits decoded_bytes. Logs one line saying which and why; raises
  UserError for an explicit memory or disk that does not fit. description says what the images
  are (e.g. "20,000 images of 150x150 px"), for that line."""
  if config.cache == "none":
    logging.info("cache: none (--cache=none): %s, %s decoded, decoded again every epoch", description,
                 mib(decoded_bytes))
    return "none"
  memory, memory_how = memory_budget(config)
  wanted = f"{description} take {mib(decoded_bytes)} decoded"
  if config.cache == "memory" or (config.cache == "auto" and decoded_bytes <= memory):
    if decoded_bytes > memory:
      raise UserError(f"--cache=memory: {wanted}, over the memory budget of {mib(memory)} ({memory_how}); "
                      "use --cache=disk or --cache=none (or --cache=auto), or give more memory (--memory_budget_mb)")
    logging.info("cache: memory (--cache=%s): %s, within the memory budget of %s (%s)", config.cache, wanted,
                 mib(memory), memory_how)
    return "memory"
  folder = tempfile.gettempdir()
  disk, disk_how = disk_budget(config, folder)
  if config.cache == "disk" or decoded_bytes <= disk:
    if decoded_bytes > disk:
      raise UserError(f"--cache=disk: {wanted}, over the disk budget of {mib(disk)} ({disk_how}); "
                      "use --cache=none (or --cache=auto), or give more scratch disk (--disk_budget_mb, TMPDIR)")
    over = "" if config.cache == "disk" else f"over the memory budget of {mib(memory)} ({memory_how}), "
    logging.info("cache: disk (--cache=%s): %s, %swithin the disk budget of %s (%s)", config.cache, wanted, over,
                 mib(disk), disk_how)
    return "disk"
  logging.info("cache: none (--cache=auto): %s, over the memory budget of %s (%s) and the disk budget of %s (%s); "
               "decoded again every epoch", wanted, mib(memory), memory_how, mib(disk), disk_how)
  return "none"


def check_table(config, paths):
  """Refuses CSVs (paths: (flag, path) pairs, all held at once) whose size read whole would be over
  the memory budget, before reading them. A missing file is left to the reading, which names it."""
  sizes = [(flag, path, _file_size(path)) for flag, path in paths if path]
  total = sum(size for _, _, size in sizes)
  memory, how = memory_budget(config)
  if total * CSV_EXPANSION > memory:
    files = " and ".join(f"{flag}={path} ({mib(size)})" for flag, path, size in sizes)
    raise UserError(f"{files}: about {mib(total * CSV_EXPANSION)} in memory ({CSV_EXPANSION}x on disk), over the "
                    f"memory budget of {mib(memory)} ({how}); give a smaller file or more memory "
                    "(--memory_budget_mb)")


def _file_size(path):
  try:
    if storage.is_remote(path):
      return storage.stat(path)["size"]  # on gs://, from the object's metadata
    return os.path.getsize(path)
  except FileNotFoundError:
    return 0
