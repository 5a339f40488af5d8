"""scripts/submit.py: what it renders, what it refuses, what it runs.

Nothing here reaches a cluster or Google Cloud. Most tests call the script's main() in this process
(importing the trainer's flag definitions, as every `python scripts/submit.py` does, costs more than
the rest of a run); a few run it as a real subprocess. Both run a copy of the project's k8s/ with
the README's placeholders (PROJECT_ID, BUCKET) filled in, as in a checkout a user has set up.
Rendering uses the real `kubectl kustomize`, which works offline; where the script would reach a
cluster or create a job, a fake `kubectl` or `gcloud` first on PATH records its arguments and input
instead.
"""

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from absl import flags

import trainer.cluster
import trainer.retrain  # noqa: F401 -- defines the trainer's flags and the retrain's (the cronjob's), which
                       # the jobs' args must parse with
from trainer import hptuning

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "submit.py"
IMAGE = "europe-docker.pkg.dev/proj/repo/trainer:v1.2.3"
JOB_DIR = "gs://bucket-1/jobs/gru-7"
JOB = ["--image=" + IMAGE, "--job_name=gru-7", "--job_dir=" + JOB_DIR]
REAL_KUBECTL = shutil.which("kubectl")
# The README's `sed` line, applied to every file under k8s/.
FILLED = {"PROJECT_ID": "my-project", "BUCKET": "my-bucket"}

# Records one JSON line per call (argv, stdin, and for gcloud the --config file's text, which the
# script deletes afterwards) in $FAKE_LOG. The fake kubectl has a current context unless
# $FAKE_NO_CONTEXT is set, and `get` finds the objects named in $FAKE_EXISTING (or fails with
# $FAKE_GET_ERROR).
FAKE_CLI = '''
import json, os, sys
name, argv = sys.argv[1], sys.argv[2:]
if argv[:2] == ["config", "current-context"]:
  if os.environ.get("FAKE_NO_CONTEXT"):
    sys.exit(print("error: current-context is not set", file=sys.stderr) or 1)
  sys.exit(print("test-cluster"))
config = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
record = {"argv": argv, "stdin": sys.stdin.read() if argv[-1:] == ["-"] else None,
          "config": open(config[0]).read() if config else None}
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(json.dumps(record) + "\\n")
if argv[:1] == ["get"] and os.environ.get("FAKE_GET_ERROR"):
  sys.exit(print(os.environ["FAKE_GET_ERROR"], file=sys.stderr) or 1)
if argv[:1] == ["get"]:
  existing = os.environ.get("FAKE_EXISTING", "").split()
  sys.exit(print("".join(f"{found}\\n" for found in existing if found.split("/")[1] in str(argv)), end=""))
print(f"{name}: created")
'''
# `kubectl kustomize` goes to the real kubectl straight from the shell: no Python start per render.
FAKE_WRAPPER = '''#!/bin/sh
if [ "$1" = kustomize ]; then exec "$REAL_KUBECTL" "$@"; fi
exec "{python}" "{fake}" {name} "$@"
'''


def fill_placeholders(k8s):
  for path in k8s.rglob("*"):
    if path.is_file():
      text = path.read_text()
      for old, new in FILLED.items():
        text = text.replace(old, new)
      path.write_text(text)


@pytest.fixture(scope="session")
def project(tmp_path_factory):
  """A copy of scripts/submit.py and k8s/ with the placeholders filled in."""
  root = tmp_path_factory.mktemp("project")
  shutil.copytree(ROOT / "k8s", root / "k8s")
  fill_placeholders(root / "k8s")
  (root / "scripts").mkdir()
  shutil.copy(SCRIPT, root / "scripts" / "submit.py")
  return root


@pytest.fixture(scope="session")
def script():
  """scripts/submit.py as a module, loaded once."""
  spec = importlib.util.spec_from_file_location("submit_under_test", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def submit(script, project, capfd, monkeypatch):
  """Runs the script's main() on the filled-in copy of k8s/: (exit code, stdout, stderr). `path`
  replaces PATH (the fakes' folder, or an empty one), `env` adds variables, `k8s` is another k8s/."""
  monkeypatch.setattr(script, "K8S", project / "k8s")
  capfd.readouterr()

  def run(*args, path=None, env=None, k8s=None):
    with monkeypatch.context() as patch:
      if path is not None:
        patch.setenv("PATH", str(path))
      for name, value in (env or {}).items():
        patch.setenv(name, value)
      if k8s is not None:
        patch.setattr(script, "K8S", k8s)
      code = script.main(list(args))
    stdout, stderr = capfd.readouterr()
    return code, stdout, stderr
  return run


def run_script(project, *args, path=None, env=None, python_args=()):
  """(exit code, stdout, stderr) of `python scripts/submit.py` (the filled-in copy), a real process."""
  environ = {**os.environ, **(env or {})}
  if path is not None:
    environ["PATH"] = str(path)
  done = subprocess.run([sys.executable, *python_args, str(project / "scripts" / "submit.py"), *args],
                        capture_output=True, text=True, env=environ, timeout=60, cwd=ROOT)
  return done.returncode, done.stdout, done.stderr


def assert_usage_error(code, stderr, *expected):
  """Exit code 2 and exactly one line on stderr, no traceback, saying each of `expected`."""
  assert code == 2, stderr
  assert "Traceback" not in stderr, stderr
  (line,) = stderr.splitlines()
  assert line.startswith("submit: error: "), line
  for text in expected:
    assert text in line, line


@pytest.fixture
def fake_bin(tmp_path):
  """A PATH folder with a fake kubectl and gcloud: (folder, their environment, a function reading their calls)."""
  folder = tmp_path / "bin"
  folder.mkdir()
  (tmp_path / "fake.py").write_text(FAKE_CLI)
  for name in ("kubectl", "gcloud"):
    (folder / name).write_text(FAKE_WRAPPER.format(python=sys.executable, fake=tmp_path / "fake.py", name=name))
    (folder / name).chmod(0o755)
  log = tmp_path / "calls.jsonl"

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  env = {"FAKE_LOG": str(log), "REAL_KUBECTL": REAL_KUBECTL or "kubectl-is-missing"}
  return folder, env, calls


def trainer_flags(args):
  """The trainer's flag values for a container's args, parsed by the trainer's own definitions."""
  values = copy.deepcopy(flags.FLAGS)  # a copy: the test process's flags stay as they are
  rest = values(["trainer", *args])
  assert rest == ["trainer"], rest
  return values


# --- argument checks, before anything runs ---------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--image=europe-docker.pkg.dev/proj/repo/trainer"], ["has no tag or digest", "pin"]),
    (["--image=europe-docker.pkg.dev/proj/repo/trainer:latest"], [":latest", "version tag or a digest"]),
    (["--image=Trainer Image:v1"], ["not an image reference"]),
    (["--job_name=GRU_7"], ["--job_name='GRU_7' is not a DNS-1123 label"]),
    (["--job_name=-gru"], ["is not a DNS-1123 label"]),
    (["--job_name=" + "a" * 64], ["is not a DNS-1123 label", "at most 63"]),
    (["--", "--modle=gru"], ["Unknown command line flag 'modle'"]),
    (["--", "--epochs=many"], ["--epochs=many"]),
    (["--", "--job_dir=gs://bucket-1/other"], ["give it to submit.py, before --"]),
    (["--", "gru"], ["unexpected argument 'gru'"]),
    (["--target=gpu-job", "--workers=2"], ["--workers is for the multi-worker targets", "gpu-job runs one pod"]),
    (["--target=cronjob", "--workers=2"], ["--workers is for the multi-worker targets", "cronjob runs one pod"]),
    (["--workers=0"], ["--workers must be at least 1 for --target=tfjob"]),
    (["--max_trials=4"], ["--max_trials is for --target=vertex-hptuning only"]),
    (["--service_account=a@b.iam.gserviceaccount.com"], ["--service_account is for the Vertex AI targets only"]),
    (["--target=vertex", "--replace"], ["--replace is for the Kubernetes targets only"]),
    (["--epochs=3"], ["unrecognized arguments: --epochs=3", "after --"]),
    # The README's own placeholders, copied as they are: the fault is named.
    (["--image=us-docker.pkg.dev/PROJECT_ID/trainer/trainer:0.1.0"],
     ["--image=us-docker.pkg.dev/PROJECT_ID/trainer/trainer:0.1.0 still holds the placeholder PROJECT_ID"]),
    (["--image=REGION-docker.pkg.dev/my-project/trainer/trainer:TAG"], ["still holds the placeholder REGION"]),
    (["--job_dir=gs://BUCKET/jobs/gru-7"], ["--job_dir=gs://BUCKET/jobs/gru-7 still holds the placeholder BUCKET"]),
    (["--target=cronjob", "--", "--serving_dir=gs://BUCKET/serving"],
     ["--serving_dir=gs://BUCKET/serving (after --) still holds the placeholder BUCKET"]),
])
def test_mistakes_in_the_command_line_are_one_line_and_exit_2(args, expected, submit, tmp_path):
  ours, trainer = (args[:args.index("--")], args[args.index("--"):]) if "--" in args else (args, [])
  # Later options win in argparse: each case replaces one of JOB's. An empty PATH: nothing may run.
  code, stdout, stderr = submit("--target=tfjob", *JOB, *ours, "--dry_run", *trainer, path=tmp_path)
  assert_usage_error(code, stderr, *expected)
  assert stdout == ""


def test_a_missing_option_or_unknown_target_is_one_line_and_exit_2(submit, tmp_path):
  assert_usage_error(*submit("--target=tfjob", "--image=" + IMAGE, "--job_dir=" + JOB_DIR, path=tmp_path)[::2],
                     "--job_name")
  assert_usage_error(*submit("--target=slurm", *JOB, path=tmp_path)[::2], "--target", "invalid choice")


def test_a_flagfile_after_the_separator_is_sent_as_its_flags(submit, tmp_path):
  (tmp_path / "job.flags").write_text("--model=gru\n--epochs=4\n")
  _, spec = vertex_dry_run(submit, "--", f"--flagfile={tmp_path / 'job.flags'}", "--window=30")
  args = spec["workerPoolSpecs"][0]["containerSpec"]["args"]
  assert args[-3:] == ["--model=gru", "--epochs=4", "--window=30"]  # the pods do not have the file


# Hides absl-py from the script's process, as a machine without it (PyYAML is installed beside it).
WITHOUT_ABSL = """
import runpy, sys
class Hide:
  def find_spec(self, name, path=None, target=None):
    if name == "absl" or name.startswith("absl."):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_without_absl_is_one_line_and_exit_2(project, tmp_path):
  # A real process: absl is imported for good in this one.
  code, stdout, stderr = run_script(project, "--target=vertex", *JOB, "--dry_run", path=tmp_path,
                                    python_args=("-c", WITHOUT_ABSL))
  assert_usage_error(code, stderr, "No module named 'absl'", "pip install")
  assert stdout == ""


# --- Kubernetes: what is checked before anything is applied ----------------------------------------

def test_kubectl_missing_is_one_line_and_exit_2(submit, tmp_path):
  code, stdout, stderr = submit("--target=indexed-job", *JOB, "--dry_run", path=tmp_path)
  assert_usage_error(code, stderr, "kubectl is not on PATH")


def test_no_current_context_is_one_line_and_exit_2_and_applies_nothing(submit, fake_bin):
  folder, env, calls = fake_bin
  code, stdout, stderr = submit("--target=indexed-job", *JOB, path=folder, env={**env, "FAKE_NO_CONTEXT": "1"})
  assert_usage_error(code, stderr, "kubectl has no current context", "current-context is not set", "--dry_run")
  assert calls() == []


# --- Kubernetes: what is rendered ----------------------------------------------------------------

# The fast tier (-m "not slow") keeps one case of each Kubernetes check: every render costs ~0.4 CPU-seconds.
def also(*values):
  return pytest.param(*values, marks=pytest.mark.slow)


needs_kubectl = pytest.mark.skipif(REAL_KUBECTL is None, reason="kubectl is not installed: it renders the overlays "
                                   "(kubectl kustomize), here and in the script")
TARGETS = ("gpu-job", "tfjob", "indexed-job", "jobset", "cronjob")
WORKLOADS = ("Job", "CronJob", "TFJob", "JobSet")


def kubernetes_dry_run(submit, target, *args):
  code, stdout, stderr = submit(f"--target={target}", *JOB, "--dry_run", *args)
  assert code == 0, stderr
  assert "Traceback" not in stderr, stderr
  return stdout, [doc for doc in yaml.safe_load_all(stdout) if doc]


def pod_specs(node):
  """Every pod spec (a mapping with containers) anywhere in an object, whatever its kind."""
  if isinstance(node, dict):
    if "containers" in node:
      yield node
    for value in node.values():
      yield from pod_specs(value)
  elif isinstance(node, list):
    for value in node:
      yield from pod_specs(value)


def trainer_containers(objects):
  return [(spec, container) for obj in objects for spec in pod_specs(obj) for container in spec["containers"]]


def container_flags(objects, spec, container, folder):
  """The trainer's flag values in a container: its args, with its --flagfile read from the mounted ConfigMap."""
  config_maps = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "ConfigMap"}
  volumes = {volume["name"]: volume for volume in spec["volumes"]}
  args = list(container["args"])
  for mount in container["volumeMounts"]:
    source = volumes[mount["name"]].get("configMap")
    if source:
      local = folder / mount["name"]
      local.mkdir(exist_ok=True)
      for key, text in config_maps[source["name"]]["data"].items():
        (local / key).write_text(text)
      args = [arg.replace(f"--flagfile={mount['mountPath']}/", f"--flagfile={local}/") for arg in args]
  return trainer_flags(args)


@pytest.mark.slow  # every target rendered twice; the tests below render each in the fast tier
@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_kubernetes_dry_run_renders_the_overlay_for_this_job(target, submit, project, tmp_path):
  stdout, objects = kubernetes_dry_run(submit, target, "--", "--model=gru", "--epochs=5", "--bidirectional")
  plain = [doc for doc in yaml.safe_load_all(subprocess.run(
      [REAL_KUBECTL, "kustomize", str(project / "k8s" / "overlays" / target)], capture_output=True, text=True,
      check=True).stdout) if doc]
  # The same objects, the per-job ones renamed: the workload and its Service <name>-gru-7, the flags
  # ConfigMap <name>-gru-7-<hash>; the shared Workload Identity ServiceAccount keeps its name.
  assert [obj["kind"] for obj in objects] == [obj["kind"] for obj in plain]
  for obj, before in zip(objects, plain):
    name, old = obj["metadata"]["name"], before["metadata"]["name"]
    if obj["kind"] == "ConfigMap":
      assert name.startswith(old.rsplit("-", 1)[0] + "-gru-7-"), (name, old)
    elif obj["kind"] in (*WORKLOADS, "Service"):
      assert name == old + "-gru-7"
    else:
      assert name == old
  (workload,) = [obj for obj in objects if obj["kind"] in WORKLOADS]
  assert workload["metadata"]["name"].startswith("trainer") and workload["metadata"]["name"].endswith("-gru-7")
  # Every reference inside resolves to an object applied with it.
  names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
  specs = list(pod_specs(workload))
  assert specs
  for spec in specs:
    assert ("ServiceAccount", spec["serviceAccountName"]) in names
    for volume in spec["volumes"]:
      if "configMap" in volume:
        assert ("ConfigMap", volume["configMap"]["name"]) in names
    if "subdomain" in spec:
      assert ("Service", spec["subdomain"]) in names
  # The image everywhere a container's image is; the trainer's flags in every container.
  for spec, container in trainer_containers(objects):
    assert container["image"] == IMAGE
    assert sum(arg.startswith("--job_dir=") for arg in container["args"]) == 1
    values = container_flags(objects, spec, container, tmp_path)
    assert values.job_dir == (JOB_DIR + "/$(JOB_NAME)" if target == "cronjob" else JOB_DIR)
    # The flags after -- win over the flags file (--epochs=60) and the overlay's args.
    assert (values.model, values.epochs, values.bidirectional) == ("gru", 5, True)
    assert values.strategy == ("mirrored" if target in ("gpu-job", "cronjob") else "multi_worker_mirrored")


def environment(container, labels):
  """A container's environment as Kubernetes expands it: fieldRefs to labels, $(VAR) of earlier variables."""
  values = {}
  for variable in container.get("env", []):
    if "value" in variable:
      values[variable["name"]] = re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), variable["value"])
    else:
      path = variable["valueFrom"]["fieldRef"]["fieldPath"]
      values[variable["name"]] = labels[re.fullmatch(r"metadata\.labels\['(.+)'\]", path)[1]]
  return values


@needs_kubectl
@pytest.mark.parametrize("workers", [also(None), 7])
def test_indexed_job_hosts_name_the_renamed_job_and_its_service(workers, submit, tmp_path):
  _, objects = kubernetes_dry_run(submit, "indexed-job", *([f"--workers={workers}"] if workers else []))
  (job,) = [obj for obj in objects if obj["kind"] == "Job"]
  (service,) = [obj for obj in objects if obj["kind"] == "Service"]
  name, pods = job["metadata"]["name"], job["spec"]["completions"]
  # --workers: the workers besides the first (the chief), as on Vertex AI; the overlay's 2 pods without it.
  assert pods == (workers + 1 if workers else 2)
  assert job["spec"]["parallelism"] == pods and job["spec"]["completionMode"] == "Indexed"
  # One preemption costs up to one counted failure per pod (its peers exit 143): 4 retries of the whole job.
  assert job["spec"]["backoffLimit"] == 4 * pods
  template = job["spec"]["template"]
  # Kubernetes labels the pods with their Job's name; the headless Service must select them.
  labels = {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": name, "job-name": name}
  assert service["spec"]["clusterIP"] == "None"
  assert service["spec"]["selector"].items() <= labels.items()
  assert template["spec"]["subdomain"] == service["metadata"]["name"] == "trainer-workers-gru-7"
  ((spec, container),) = trainer_containers(objects)
  env, values = environment(container, labels), container_flags(objects, spec, container, tmp_path)
  cluster = trainer.cluster.resolve({"JOB_COMPLETION_INDEX": str(pods - 1), **env}, values.indexed_job_hosts,
                                    values.num_workers)
  port = service["spec"]["ports"][0]["port"]
  assert cluster.spec == {"worker": [f"{name}-{i}.{service['metadata']['name']}:{port}" for i in range(pods)]}
  assert (cluster.task_type, cluster.task_index) == ("worker", pods - 1)


@needs_kubectl
@pytest.mark.parametrize("workers", [also(None), 7])
def test_tfjob_workers_and_retries(workers, submit):
  _, objects = kubernetes_dry_run(submit, "tfjob", *([f"--workers={workers}"] if workers else []))
  (tfjob,) = [obj for obj in objects if obj["kind"] == "TFJob"]
  replicas = tfjob["spec"]["tfReplicaSpecs"]
  assert (replicas["Chief"]["replicas"], replicas["Worker"]["replicas"]) == (1, workers or 3)
  assert tfjob["spec"]["runPolicy"]["backoffLimit"] == 4 * (1 + (workers or 3))


@needs_kubectl
@pytest.mark.parametrize("workers", [also(None), 7])
def test_jobset_workers_and_restarts(workers, submit, tmp_path):
  _, objects = kubernetes_dry_run(submit, "jobset", *([f"--workers={workers}"] if workers else []))
  (jobset,) = [obj for obj in objects if obj["kind"] == "JobSet"]
  name, jobs = jobset["metadata"]["name"], {job["name"]: job for job in jobset["spec"]["replicatedJobs"]}
  assert name == "trainer-jobset-gru-7"
  pods = 1 + (workers or 3)
  assert [(jobs[role]["replicas"], jobs[role]["template"]["spec"]["completions"],
           jobs[role]["template"]["spec"]["parallelism"]) for role in ("chief", "worker")] == [
      (1, 1, 1), (1, pods - 1, pods - 1)]
  # The whole set restarts as one: 4 times, whatever the workers.
  assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 4
  # Every pod, as JobSet labels it, finds the same cluster of the renamed JobSet's pods, with the
  # chief's pod as chief, through the trainer's own code; its job folder is named after the JobSet.
  expected = {"chief": [f"{name}-chief-0-0.{name}:2222"],
              "worker": [f"{name}-worker-0-{i}.{name}:2222" for i in range(pods - 1)]}
  for role in ("chief", "worker"):
    spec = jobs[role]["template"]["spec"]["template"]["spec"]
    ((container_spec, container),) = trainer_containers([{"spec": spec}])
    labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": role,
              "jobset.sigs.k8s.io/job-index": "0"}
    env, values = environment(container, labels), container_flags(objects, container_spec, container, tmp_path)
    assert env["JOB_NAME"] == name and values.job_dir == JOB_DIR
    last = jobs[role]["template"]["spec"]["completions"] - 1
    cluster = trainer.cluster.resolve({"JOB_COMPLETION_INDEX": str(last), **env}, values.indexed_job_hosts,
                                      values.num_workers)
    assert cluster.spec == expected and (cluster.task_type, cluster.task_index) == (role, last)


@needs_kubectl
def test_an_image_digest_is_kept(submit):
  image = "europe-docker.pkg.dev/proj/repo/trainer:v2@sha256:" + "0123456789abcdef" * 4
  _, objects = kubernetes_dry_run(submit, "gpu-job", "--image=" + image)
  assert {container["image"] for _, container in trainer_containers(objects)} == {image}


@needs_kubectl
@pytest.mark.parametrize("target", [also("indexed-job"), "cronjob"])
def test_a_job_dir_with_a_trailing_slash_is_the_same_folder(target, submit, tmp_path):
  _, objects = kubernetes_dry_run(submit, target, f"--job_dir={JOB_DIR}/")
  for spec, container in trainer_containers(objects):
    values = container_flags(objects, spec, container, tmp_path)
    assert values.job_dir == (JOB_DIR + "/$(JOB_NAME)" if target == "cronjob" else JOB_DIR)


@pytest.mark.slow  # renders every target four times
@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_a_job_name_too_long_for_the_names_kubernetes_derives_says_how_long_it_may_be(target, submit):
  code, _, stderr = submit(f"--target={target}", *JOB, "--dry_run", "--job_name=" + "a" * 63)
  assert_usage_error(code, stderr, f"--job_name={'a' * 63} is too long for --target={target}")
  longest = int(re.search(r"use at most (\d+) characters", stderr)[1])
  kubernetes_dry_run(submit, target, "--job_name=" + "a" * longest)
  code, _, stderr = submit(f"--target={target}", *JOB, "--dry_run", "--job_name=" + "a" * (longest + 1))
  assert_usage_error(code, stderr, f"use at most {longest} characters")


@needs_kubectl
@pytest.mark.parametrize("target, expected", [
    ("indexed-job", ["is not on Cloud Storage: --target=indexed-job runs 2 workers", "gs://BUCKET/PATH"]),
    also("tfjob", ["is not on Cloud Storage: --target=tfjob runs 4 workers"]),
    ("gpu-job", ["neither gs:// nor on a persistent volume of the pod", "lost with the pod"]),
    also("cronjob", ["neither gs:// nor on a persistent volume of the pod"]),
])
def test_a_job_folder_the_pods_cannot_share_or_keep_is_refused(target, expected, submit):
  code, stdout, stderr = submit(f"--target={target}", *JOB, "--job_dir=/mnt/jobs/gru-7", "--dry_run")
  assert_usage_error(code, stderr, "--job_dir=/mnt/jobs/gru-7", *expected)
  assert stdout == ""


@pytest.mark.slow  # renders the cronjob three times
@needs_kubectl
def test_the_cronjob_takes_the_retrains_flags_and_other_targets_refuse_them(submit, tmp_path):
  _, objects = kubernetes_dry_run(submit, "cronjob", "--", "--serving_dir=gs://models/serving",
                                  "--min_improvement=0.05")
  (spec, container), = trainer_containers(objects)
  values = container_flags(objects, spec, container, tmp_path)
  assert (values.serving_dir, values.min_improvement) == ("gs://models/serving", 0.05)
  code, _, stderr = submit("--target=gpu-job", *JOB, "--dry_run", "--", "--serving_dir=gs://models/serving")
  assert_usage_error(code, stderr, "serving_dir")
  # Promoted models must outlive the pod that promoted them.
  code, stdout, stderr = submit("--target=cronjob", *JOB, "--dry_run", "--", "--serving_dir=/models")
  assert_usage_error(code, stderr, "--serving_dir=/models is neither gs:// nor on a persistent volume of the pod",
                     "the models it promotes would be lost with the pod")
  assert stdout == ""
  code, _, stderr = submit("--target=cronjob", *JOB, "--dry_run", "--", "--serving_dir=gs://Models/serving")
  assert_usage_error(code, stderr, "--serving_dir=gs://Models/serving: 'Models' is not a bucket name")


@needs_kubectl
@pytest.mark.parametrize("target, args, expected", [
    # The batch in k8s/base/trainer.flags, 32, over 3 pods of 1 GPU.
    ("indexed-job", ["--workers=2"], ["--batch_size=32 (k8s/base/trainer.flags)", "3 replicas",
                                      "3 tasks x 1 GPU", "multiple of 3"]),
    also("tfjob", ["--workers=4"], ["--batch_size=32 (k8s/base/trainer.flags)", "5 replicas"]),
    # One pod of 4 GPUs.
    ("gpu-job", ["--", "--batch_size=30"], ["--batch_size=30 (after --)", "4 replicas", "1 task x 4 GPUs"]),
    also("cronjob", ["--", "--batch_size=30"], ["--batch_size=30 (after --)", "4 replicas"]),
])
def test_a_batch_that_does_not_split_across_the_replicas_is_refused(target, args, expected, submit, fake_bin):
  folder, env, calls = fake_bin
  code, stdout, stderr = submit(f"--target={target}", *JOB, *args, path=folder, env=env)
  assert_usage_error(code, stderr, *expected)
  assert stdout == "" and calls() == []


def restore(k8s, relative):
  """The project's own file, placeholders and all, in the copy k8s/."""
  shutil.copy(ROOT / "k8s" / relative, k8s / relative)


@needs_kubectl
@pytest.mark.parametrize("target, file, args, expected", [
    # The README's sed line once covered k8s/base only.
    ("cronjob", "overlays/cronjob/retrain.flags", [],
     "--serving_dir=gs://BUCKET/serving (k8s/overlays/cronjob/retrain.flags) still holds the placeholder BUCKET"),
    also("gpu-job", "base/serviceaccount.yaml", [],
     "'trainer@PROJECT_ID.iam.gserviceaccount.com' (k8s/base/serviceaccount.yaml) still holds the placeholder "
     "PROJECT_ID"),
    also("indexed-job", "base/trainer.flags", [],
     "--data=gs://BUCKET/data/GOOGL.csv (k8s/base/trainer.flags) still holds the placeholder BUCKET"),
    ("vertex", "base/trainer.flags", [], "--data=gs://BUCKET/data/GOOGL.csv (k8s/base/trainer.flags)"),
    ("vertex", "vertex/custom_job.yaml", [],
     "'trainer@PROJECT_ID.iam.gserviceaccount.com' (k8s/vertex/custom_job.yaml) still holds the placeholder "
     "PROJECT_ID"),
])
def test_a_placeholder_left_in_the_manifests_is_refused(target, file, args, expected, submit, project, fake_bin,
                                                          tmp_path):
  folder, env, calls = fake_bin
  k8s = tmp_path / "k8s"
  shutil.copytree(project / "k8s", k8s)
  restore(k8s, file)
  code, stdout, stderr = submit(f"--target={target}", *JOB, *args, path=folder, env=env, k8s=k8s)
  assert_usage_error(code, stderr, expected, "replace it")
  assert stdout == "" and calls() == []


@pytest.mark.slow  # a render
@needs_kubectl
def test_a_placeholder_the_flags_after_the_separator_replace_is_not_in_the_way(submit, project, tmp_path):
  k8s = tmp_path / "k8s"
  shutil.copytree(project / "k8s", k8s)
  restore(k8s, "base/trainer.flags")
  code, _, stderr = submit("--target=indexed-job", *JOB, "--dry_run", "--", "--data=gs://my-bucket/prices.csv",
                           k8s=k8s)
  assert code == 0, stderr


# --- Kubernetes: what is applied -------------------------------------------------------------------

def kubectl_calls(calls):
  return [call["argv"] for call in calls()]


@needs_kubectl
def test_kubernetes_applies_what_the_dry_run_printed(project, fake_bin, submit):
  folder, env, calls = fake_bin
  dry_run, _ = kubernetes_dry_run(submit, "indexed-job", "--", "--model=gru")
  # A real process, as users run it.
  code, stdout, stderr = run_script(project, "--target=indexed-job", *JOB, "--", "--model=gru", path=folder, env=env)
  assert code == 0, stderr
  assert stdout == dry_run + "kubectl: created\n"
  get, apply = calls()
  assert get["argv"] == ["get", "jobs.batch/trainer-indexed-gru-7", "--ignore-not-found", "-o", "name"]
  assert apply == {"argv": ["apply", "-f", "-"], "stdin": dry_run, "config": None}


@needs_kubectl
@pytest.mark.parametrize("target, existing", [
    ("indexed-job", "job.batch/trainer-indexed-gru-7"),
    also("cronjob", "cronjob.batch/trainer-nightly-gru-7"),
    also("tfjob", "tfjob.kubeflow.org/trainer-tfjob-gru-7"),
    ("jobset", "jobset.jobset.x-k8s.io/trainer-jobset-gru-7"),
])
def test_an_existing_job_of_the_same_name_is_not_applied_over(target, existing, submit, fake_bin):
  folder, env, calls = fake_bin
  code, stdout, stderr = submit(f"--target={target}", *JOB, path=folder, env={**env, "FAKE_EXISTING": existing})
  assert_usage_error(code, stderr, f"{existing} already exists", "another --job_name", "--replace")
  assert stdout == "" and [argv[0] for argv in kubectl_calls(calls)] == ["get"]


@needs_kubectl
@pytest.mark.parametrize("target, resource, controller", [
    ("tfjob", "tfjobs", "the Kubeflow training operator (v1, release-1.9)"),
    also("jobset", "jobsets", "the JobSet controller"),
])
def test_a_cluster_without_the_kinds_controller_is_one_line(target, resource, controller, submit, fake_bin):
  folder, env, calls = fake_bin
  error = f'error: the server doesn\'t have a resource type "{resource}"'
  code, stdout, stderr = submit(f"--target={target}", *JOB, path=folder, env={**env, "FAKE_GET_ERROR": error})
  assert_usage_error(code, stderr, error, f"install {controller}")
  assert [argv[0] for argv in kubectl_calls(calls)] == ["get"]


@needs_kubectl
def test_replace_deletes_the_existing_job_and_its_pods_first(submit, fake_bin):
  folder, env, calls = fake_bin
  existing = "job.batch/trainer-indexed-gru-7"
  code, stdout, stderr = submit("--target=indexed-job", *JOB, "--replace", path=folder,
                                env={**env, "FAKE_EXISTING": existing})
  assert code == 0, stderr
  # Foreground: the Job goes only once its pods have, so no old pod runs beside the new ones.
  assert kubectl_calls(calls)[1:] == [["delete", existing, "--cascade=foreground", "--wait=true"],
                                      ["apply", "-f", "-"]]


# --- Vertex AI ---------------------------------------------------------------------------------------

def vertex_dry_run(submit, *args, target="vertex"):
  code, stdout, stderr = submit(f"--target={target}", *JOB, "--dry_run", *args)
  assert code == 0, stderr
  assert stderr.strip() == "submit: dry run: nothing submitted"
  return stdout, yaml.safe_load(stdout)


def check_worker_pools(spec, workers, machine):
  """Pool 0 one chief, pool 1 the workers; every replica the same image, machine, command and flags."""
  pools = spec["workerPoolSpecs"]
  assert [pool["replicaCount"] for pool in pools] == [1] + ([workers] if workers else [])
  for pool in pools:
    assert pool["machineSpec"] == machine
    assert pool["containerSpec"]["imageUri"] == IMAGE
    assert pool["containerSpec"]["command"] == ["python", "-m", "trainer.task"]
    # The Kubernetes workloads' trainer flags first, as on Kubernetes; those after -- win.
    base = [line.replace("BUCKET", FILLED["BUCKET"]) for line in (ROOT / "k8s" / "base" / "trainer.flags")
            .read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert pool["containerSpec"]["args"][:len(base)] == base
    values = trainer_flags(pool["containerSpec"]["args"])
    assert (values.model, values.epochs, values.bidirectional) == ("gru", 5, True)
    assert values.job_dir is None  # the trainer takes the folder above AIP_MODEL_DIR
  assert spec["baseOutputDirectory"] == {"outputUriPrefix": JOB_DIR}


def test_vertex_custom_job_is_filled_in(submit):
  stdout, spec = vertex_dry_run(submit, "--workers=3", "--machine_type=g2-standard-8", "--accelerator_type=NVIDIA_L4",
                                "--", "--model=gru", "--epochs=5", "--bidirectional")
  assert stdout.splitlines()[0] == ("# gcloud ai custom-jobs create --region=us-central1 --display-name=gru-7 "
                                    "--config=FILE, FILE holding this document")
  check_worker_pools(spec, 3, {"machineType": "g2-standard-8", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 1})
  assert spec["scheduling"] == {"restartJobOnWorkerRestart": True}
  # The Google service account the GKE pods act as (k8s/base/serviceaccount.yaml), not Vertex AI's agent.
  assert spec["serviceAccount"] == "trainer@my-project.iam.gserviceaccount.com"


def test_vertex_service_account_scheduling_and_tensorboard(submit):
  tensorboard = "projects/my-project/locations/europe-west4/tensorboards/1234"
  _, spec = vertex_dry_run(submit, "--region=europe-west4", "--service_account=tb@my-project.iam.gserviceaccount.com",
                           "--scheduling_strategy=spot", "--timeout=1h30m", f"--tensorboard={tensorboard}")
  assert spec["serviceAccount"] == "tb@my-project.iam.gserviceaccount.com"
  assert spec["scheduling"] == {"restartJobOnWorkerRestart": True, "strategy": "SPOT", "timeout": "5400s"}
  assert spec["tensorboard"] == tensorboard
  _, job = vertex_dry_run(submit, "--workers=3", "--scheduling_strategy=FLEX_START", "--timeout=2d",
                          target="vertex-hptuning")
  assert job["trialJobSpec"]["scheduling"] == {"restartJobOnWorkerRestart": True, "strategy": "FLEX_START",
                                               "timeout": "172800s"}


def test_vertex_chief_alone_on_a_cpu_machine(submit):
  _, spec = vertex_dry_run(submit, "--workers=0", "--accelerator_type=none", "--region=europe-west4",
                           "--", "--model=gru", "--epochs=5", "--bidirectional")
  check_worker_pools(spec, 0, {"machineType": "n1-standard-8"})
  _, spec = vertex_dry_run(submit, f"--job_dir={JOB_DIR}/", "--", "--model=gru", "--epochs=5", "--bidirectional")
  assert spec["baseOutputDirectory"] == {"outputUriPrefix": JOB_DIR}


def test_vertex_tuning_job_is_filled_in(submit):
  stdout, job = vertex_dry_run(submit, "--workers=3", "--max_trials=20", "--parallel_trials=4",
                               "--", "--model=gru", "--epochs=5", "--bidirectional", target="vertex-hptuning")
  assert stdout.startswith("# gcloud ai hp-tuning-jobs create --region=us-central1 --display-name=gru-7 ")
  assert (job["displayName"], job["maxTrialCount"], job["parallelTrialCount"]) == ("gru-7", 20, 4)
  # The metric the trainer reports, and parameters that are the trainer's flags with values it accepts.
  assert job["studySpec"]["metrics"] == [{"metricId": hptuning.METRIC, "goal": "MINIMIZE"}]
  parameters = {p["parameterId"]: p for p in job["studySpec"]["parameters"]}
  assert parameters["learning_rate"]["scaleType"] == "UNIT_LOG_SCALE"
  low, high = parameters["learning_rate"]["doubleValueSpec"].values()
  assert 0 < low < high and trainer_flags([f"--learning_rate={low}"]).learning_rate == low
  batch_sizes = parameters["batch_size"]["categoricalValueSpec"]["values"]
  assert [trainer_flags([f"--batch_size={value}"]).batch_size for value in batch_sizes] == [32, 64, 128]
  _, custom = vertex_dry_run(submit, "--workers=3", "--", "--model=gru", "--epochs=5", "--bidirectional")
  assert job["trialJobSpec"] == custom


@pytest.mark.parametrize("target, args, expected", [
    ("vertex", ["--job_dir=/mnt/jobs/gru-7"], ["--job_dir=/mnt/jobs/gru-7 is not on Cloud Storage"]),
    ("vertex", ["--job_dir=gs://B/jobs"], ["'B' is not a bucket name"]),
    ("vertex", ["--region=central"], ["--region='central'"]),
    ("vertex", ["--workers=-1"], ["--workers must be at least 0"]),
    ("vertex-hptuning", ["--", "--batch_size=64"], ["--batch_size after -- is what the study tunes"]),
    # The pods would fail with exit 2 once their GPUs are provisioned.
    ("vertex", ["--workers=2"], ["--batch_size=32 (k8s/base/trainer.flags)", "3 replicas", "3 tasks x 1 GPU"]),
    ("vertex", ["--accelerator_count=3"], ["--batch_size=32", "6 replicas", "2 tasks x 3 GPUs"]),
    ("vertex", ["--workers=2", "--accelerator_type=none"], ["--batch_size=32", "3 replicas", "3 tasks x 1 CPU"]),
    ("vertex", ["--", "--batch_size=45"], ["--batch_size=45 (after --)", "2 replicas"]),
    # Every batch size the study tries must split.
    ("vertex-hptuning", ["--workers=2"], ["--batch_size=32 (k8s/vertex/hptuning_job.yaml's study)", "3 replicas"]),
    ("vertex", ["--service_account=trainer"], ["--service_account=trainer is not a service account's email"]),
    ("vertex", ["--service_account=trainer@PROJECT_ID.iam.gserviceaccount.com"], ["placeholder PROJECT_ID"]),
    ("vertex", ["--scheduling_strategy=cheap"], ["--scheduling_strategy", "'CHEAP'", "SPOT"]),
    ("vertex", ["--timeout=soon"], ["--timeout=soon is not a duration like 12h, 90m or 2d"]),
    ("vertex", ["--timeout=0s"], ["--timeout=0s is not a duration"]),
    ("vertex", ["--tensorboard=my-board"], ["--tensorboard=my-board is not",
                                             "projects/PROJECT/locations/REGION/tensorboards/ID"]),
    ("vertex", ["--tensorboard=projects/p/locations/us-east1/tensorboards/1"],
     ["in us-east1", "--region=us-central1", "same region"]),
])
def test_vertex_mistakes_are_one_line_and_exit_2(target, args, expected, submit, fake_bin):
  folder, env, calls = fake_bin
  assert_usage_error(*submit(f"--target={target}", *JOB, *args, path=folder, env=env)[::2], *expected)
  assert calls() == []


def test_vertex_without_gcloud_is_one_line_and_exit_2(submit, tmp_path):
  assert_usage_error(*submit("--target=vertex", *JOB, path=tmp_path)[::2], "gcloud is not on PATH")


@pytest.mark.parametrize("target, command", [("vertex", "custom-jobs"), ("vertex-hptuning", "hp-tuning-jobs")])
def test_vertex_creates_the_job_with_gcloud(target, command, fake_bin, submit):
  folder, env, calls = fake_bin
  dry_run, _ = vertex_dry_run(submit, "--", "--model=gru", target=target)
  code, stdout, stderr = submit(f"--target={target}", *JOB, "--", "--model=gru", path=folder, env=env)
  assert code == 0, stderr
  assert stdout == dry_run + "gcloud: created\n"
  (call,) = calls()
  assert call["argv"][:5] == ["ai", command, "create", "--region=us-central1", "--display-name=gru-7"]
  assert call["argv"][5].startswith("--config=") and len(call["argv"]) == 6
  assert call["config"] == dry_run.split("\n", 1)[1]  # the document printed, without the command line
  assert not Path(call["argv"][5].split("=", 1)[1]).exists()  # the temporary file is gone


def gcloud_sdk():
  """The Google Cloud SDK's root when gcloud is installed as a whole SDK, else None."""
  gcloud = shutil.which("gcloud")
  root = Path(os.path.realpath(gcloud)).parents[1] if gcloud else None
  return root if root and (root / "lib" / "googlecloudsdk").is_dir() else None


# gcloud's own reading of a --config file (googlecloudsdk/api_lib/ai), offline: unknown or misspelt
# fields and enum values are errors there, as they would be in `gcloud ai ... create`.
PARSE_AS_GCLOUD = """
import sys
sys.path[:0] = [sys.argv[1] + "/lib", sys.argv[1] + "/lib/third_party"]
from googlecloudsdk.api_lib.util import apis, messages
from googlecloudsdk.core import yaml
message = getattr(apis.GetMessagesModule("aiplatform", "v1"), "GoogleCloudAiplatformV1" + sys.argv[2])
messages.DictToMessageWithErrorCheck(yaml.load_path(sys.argv[3]), message)
"""


@pytest.mark.skipif(gcloud_sdk() is None, reason="the Google Cloud SDK (gcloud's own libraries) is not installed")
@pytest.mark.parametrize("target, message", [("vertex", "CustomJobSpec"),
                                             ("vertex-hptuning", "HyperparameterTuningJob")])
@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_vertex_configs_parse_as_gcloud_reads_them(target, message, submit, tmp_path):
  stdout, _ = vertex_dry_run(submit, "--workers=3", "--service_account=tb@my-project.iam.gserviceaccount.com",
                             "--scheduling_strategy=SPOT", "--timeout=12h",
                             "--tensorboard=projects/my-project/locations/us-central1/tensorboards/1",
                             "--", "--model=gru", target=target)
  (tmp_path / "config.yaml").write_text(stdout)
  done = subprocess.run([sys.executable, "-c", PARSE_AS_GCLOUD, str(gcloud_sdk()), message,
                         str(tmp_path / "config.yaml")], capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr[-2000:]
