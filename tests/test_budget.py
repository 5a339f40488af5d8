"""Memory and disk budgets (trainer.data.budget): what --cache=auto picks, what an explicit cache
that cannot fit says, where the numbers come from (flags, cgroup v2 and v1 files, /proc/meminfo,
the scratch folder's free space), and a table too large for memory refused before training."""

import logging
import shutil
import sys
import tempfile

import forked
import pytest

from trainer import config as config_module
from trainer.data import budget
from trainer.errors import UserError

MIB = budget.MIB


def make_config(**flags):
  return config_module.Config(**{"model": "cnn", **flags})


def choose(caplog, config, decoded_bytes):
  """choose_cache's answer and its one log line."""
  caplog.clear()
  # On absl's logger itself: TensorFlow's saving code sets absl's verbosity and restores it to WARNING
  # in a process whose flags were never parsed (tensorflow/python/trackable/autotrackable.py).
  with caplog.at_level(logging.INFO, logger="absl"):
    chosen = budget.choose_cache(config, decoded_bytes, "1,000 images of 64x64 px")
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cache:")]
  assert len(lines) == 1, lines
  return chosen, lines[0]


@pytest.mark.parametrize("decoded_mib, expected, reasons", [
    (5, "memory", ["5.0 MiB decoded", "within the memory budget of 10 MiB (--memory_budget_mb=10)"]),
    (50, "disk", ["50 MiB decoded", "over the memory budget of 10 MiB", "within the disk budget of 100 MiB "
                  "(--disk_budget_mb=100)"]),
    (500, "none", ["500 MiB decoded", "over the memory budget of 10 MiB (--memory_budget_mb=10) and the disk "
                   "budget of 100 MiB (--disk_budget_mb=100)", "decoded again every epoch"]),
])
def test_auto_picks_the_first_that_fits(caplog, decoded_mib, expected, reasons):
  chosen, line = choose(caplog, make_config(memory_budget_mb=10, disk_budget_mb=100), decoded_mib * MIB)
  assert chosen == expected
  assert line.startswith(f"cache: {expected} (--cache=auto): 1,000 images of 64x64 px take"), line
  for reason in reasons:
    assert reason in line, line


def test_auto_measures_the_scratch_folders_free_space(caplog, tmp_path, monkeypatch):
  """Without --disk_budget_mb the disk budget is the free space of the scratch folder (TMPDIR)."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  config = make_config(memory_budget_mb=1)
  free = shutil.disk_usage(tmp_path).free
  chosen, line = choose(caplog, config, free // 2)
  assert chosen == "disk" and f"(free space of {tmp_path})" in line, line
  # More than the whole folder's file system holds: nothing may be cached.
  chosen, line = choose(caplog, config, shutil.disk_usage(tmp_path).total + MIB)
  assert chosen == "none" and f"(free space of {tmp_path})" in line, line


def test_explicit_choices_are_kept_when_they_fit(caplog):
  config = dict(memory_budget_mb=10, disk_budget_mb=100)
  assert choose(caplog, make_config(cache="memory", **config), 10 * MIB)[0] == "memory"
  assert choose(caplog, make_config(cache="disk", **config), 1 * MIB)[0] == "disk"  # fits memory: still disk
  chosen, line = choose(caplog, make_config(cache="none", **config), 1 * MIB)
  assert chosen == "none" and "(--cache=none)" in line, line


@pytest.mark.parametrize("cache, decoded_mib, expected", [
    ("memory", 11, ["--cache=memory: 1,000 images of 64x64 px take 11 MiB decoded, over the memory budget of "
                    "10 MiB (--memory_budget_mb=10)", "--cache=disk", "--memory_budget_mb"]),
    ("disk", 101, ["--cache=disk: 1,000 images of 64x64 px take 101 MiB decoded, over the disk budget of 100 MiB "
                   "(--disk_budget_mb=100)", "--cache=none", "--disk_budget_mb"]),
])
def test_an_explicit_cache_that_cannot_fit_is_refused(cache, decoded_mib, expected):
  config = make_config(cache=cache, memory_budget_mb=10, disk_budget_mb=100)
  with pytest.raises(UserError) as refused:
    budget.choose_cache(config, decoded_mib * MIB, "1,000 images of 64x64 px")
  message = str(refused.value)
  assert "\n" not in message
  for text in expected:
    assert text in message, message


GIB = 1024 * MIB


@pytest.fixture
def machine(tmp_path, monkeypatch):
  """A fake /sys/fs/cgroup, /proc/meminfo and /proc/self/status the module reads instead: a machine
  of 16 GiB with 8 GiB available, this process holding 512 MiB. Returns the cgroup folder."""
  cgroup = tmp_path / "cgroup"
  (cgroup / "memory").mkdir(parents=True)
  (tmp_path / "meminfo").write_text(f"MemTotal:       {16 * GIB // 1024} kB\nMemFree:         1000 kB\n"
                                    f"MemAvailable:    {8 * GIB // 1024} kB\n")
  (tmp_path / "status").write_text(f"Name:\tpython\nVmHWM:\t  900000 kB\nVmRSS:\t  {512 * MIB // 1024} kB\n")
  monkeypatch.setattr(budget, "CGROUP", str(cgroup))
  monkeypatch.setattr(budget, "MEMINFO", str(tmp_path / "meminfo"))
  monkeypatch.setattr(budget, "SELF_STATUS", str(tmp_path / "status"))
  return cgroup


def test_the_reserve_grows_with_the_cnns_batches():
  """What TensorFlow and the model need: the same for tables and series, more for larger CNN batches."""
  assert budget.reserve(make_config(model="dense")) == budget.reserve(make_config(model="lstm")) == budget.RESERVE
  small, large = budget.reserve(make_config(image_size=150)), budget.reserve(make_config(image_size=224))
  assert budget.RESERVE < small < large < budget.reserve(make_config(image_size=224, batch_size=64))


def measured():
  return budget.memory_budget(make_config())


def test_the_budget_flag_wins_over_what_is_measured(machine):
  assert budget.memory_budget(make_config(memory_budget_mb=300)) == (300 * MIB, "--memory_budget_mb=300")


def test_without_a_cgroup_limit_the_machines_available_memory_less_the_reserve(machine):
  still_needed = budget.reserve(make_config()) - 512 * MIB  # what this process holds already counts towards the reserve
  size, how = measured()
  assert size == 8 * GIB - still_needed
  assert how == (f"8,192 MiB available on this machine ({budget.MEMINFO} MemAvailable), "
                 f"less {budget.mib(still_needed)} for TensorFlow and the model")


@pytest.mark.parametrize("files, inactive", [
    ({"memory.max": "2147483648\n", "memory.current": "1073741824\n"}, "inactive_file"),
    ({"memory/memory.limit_in_bytes": "2147483648\n", "memory/memory.usage_in_bytes": "1073741824\n"},
     "total_inactive_file"),
], ids=["v2", "v1"])
def test_a_cgroup_limit_less_the_working_set(machine, files, inactive):
  for name, text in files.items():
    (machine / name).write_text(text)
  # Reclaimable file cache is not part of what the limit kills for.
  stat = machine / (name.rpartition("/")[0] or ".") / "memory.stat"
  stat.write_text(f"anon 100\nactive_file 5\n{inactive} {256 * MIB}\n")
  size, how = measured()
  assert size == 2 * GIB - (GIB - 256 * MIB) - (budget.reserve(make_config()) - 512 * MIB)
  limit_file = [n for n in files if "max" in n or "limit" in n][0]
  assert how.startswith(f"1,280 MiB left under the container's limit of 2,048 MiB ({machine}/{limit_file}), less "), how


@pytest.mark.parametrize("files", [
    {"memory.max": "max\n", "memory.current": "1073741824\n"},
    {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "1073741824\n"},
    # A limit above what the machine has available: the machine's memory is what runs out first.
    {"memory.max": f"{12 * GIB}\n", "memory.current": f"{GIB}\n"},
], ids=["v2-max", "v1-unlimited", "over-available"])
def test_no_cgroup_limit_or_a_larger_one_leaves_the_machines_memory(machine, files):
  for name, text in files.items():
    (machine / name).write_text(text)
  size, how = measured()
  assert size == 8 * GIB - (budget.reserve(make_config()) - 512 * MIB)
  assert "MemAvailable" in how, how


def test_this_machines_own_files_are_read():
  size, how = measured()
  assert size >= 0 and "for TensorFlow and the model" in how, how


def test_a_table_within_the_budget_passes(table_csv):
  budget.check_table(make_config(model="dense", memory_budget_mb=1), [("--data", table_csv(rows=100)),
                                                                      ("--test_data", None)])


def test_a_table_on_cloud_storage_is_sized_from_its_metadata(gcs_bucket, table_csv):
  from trainer import storage
  path = f"{gcs_bucket}/table.csv"
  with open(table_csv(rows=10_000), "rb") as f:
    storage.write_bytes(path, f.read())
  expected = r"^--data=gs://.*/table.csv \(0\.\d MiB\): about \d+ MiB in memory \(11x on disk\), over the memory budget"
  with pytest.raises(UserError, match=expected):
    budget.check_table(make_config(model="dense", memory_budget_mb=1), [("--data", path)])


@pytest.mark.slow
@pytest.mark.parametrize("model, flags", [
    ("dense", ["--target_column=y"]),
    ("lstm", ["--target_column=Close", "--date_column=Date"]),
])
def test_a_table_too_large_for_memory_is_refused_before_training(tmp_path, table_csv, prices_csv, model, flags):
  data = table_csv(rows=10_000) if model == "dense" else prices_csv(rows=6_000)
  job_dir = tmp_path / "job"
  done = forked.run([sys.executable, "-m", "trainer.task", f"--model={model}", f"--data={data}", *flags,
                     "--memory_budget_mb=1", "--epochs=1", f"--job_dir={job_dir}"],
                    capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr
  lines = [line for line in done.stderr.splitlines() if line.startswith("trainer: error:")]
  assert len(lines) == 1, done.stderr
  assert f"--data={data} (" in lines[0] and "over the memory budget of 1.0 MiB (--memory_budget_mb=1)" in lines[0]
  assert "--memory_budget_mb" in lines[0].rpartition(";")[2], lines[0]
  assert not job_dir.exists() or not any(job_dir.rglob("checkpoint*")), list(job_dir.rglob("*"))


@pytest.mark.slow
def test_images_asked_to_stay_in_memory_beyond_the_budget_are_refused_before_training(tmp_path, make_image_folder):
  """36 images at 150 px are 2.3 MiB decoded: --cache=memory with a budget of 1 MiB stops before any
  image is decoded, in one line naming the sizes and the flags to change, exit 2 (not a kill for memory)."""
  job_dir = tmp_path / "job"
  done = forked.run([sys.executable, "-m", "trainer.task", "--model=cnn", f"--data={make_image_folder()}",
                     "--cache=memory", "--memory_budget_mb=1", "--epochs=1", f"--job_dir={job_dir}"],
                    capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr
  lines = [line for line in done.stderr.splitlines() if line.startswith("trainer: error:")]
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith("trainer: error: --cache=memory: 36 images of 150x150 px") and "2.3 MiB decoded, " \
      "over the memory budget of 1.0 MiB (--memory_budget_mb=1); use --cache=disk or --cache=none" in lines[0], lines[0]
  assert not job_dir.exists() or not any(job_dir.rglob("checkpoint*")), list(job_dir.rglob("*"))
