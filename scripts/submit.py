"""Submits a training job: a Kubernetes workload from k8s/overlays/<target>, or a Vertex AI job.

    python scripts/submit.py --target=indexed-job --image=REGISTRY/PATH:TAG --job_name=gru-1 \\
        --job_dir=gs://BUCKET/jobs/gru-1 -- --model=gru --epochs=30
    python scripts/submit.py --target=vertex --image=REGISTRY/PATH:TAG --job_name=gru-1 \\
        --job_dir=gs://BUCKET/jobs/gru-1 --workers=3 -- --model=gru
    ... --dry_run   prints what would be applied or run, and changes nothing

Kubernetes targets (gpu-job, tfjob, indexed-job, jobset, cronjob): a temporary kustomization takes
the overlay as its resource, pins the image and appends `-<job_name>` to the names of the objects
each job has its own of (the workload, its Service, the flags ConfigMap; the references to them
follow, an Indexed Job's hosts pattern and pod subdomain included), while the shared Workload
Identity ServiceAccount keeps its name. --workers sets a multi-worker target's workers besides the
first (the chief), TRAINER_NUM_WORKERS and the retries that scale with them. --job_dir and the
trainer flags after `--` are appended to the trainer container's args, after the overlay's own, so
they win (absl: the last value counts); the overlay's --job_dir arg is replaced in place. A
CronJob's runs each write to <job_dir>/<the run's Job name>. `kubectl kustomize` renders it; the
YAML goes to stdout, a summary to stderr, and `kubectl apply -f -` applies it in the current
context (not with --dry_run, whose stdout can be piped into kubectl later), unless a workload of
the same name is there already: `kubectl apply` would leave a finished Job as it is and refuses a
changed pod template, so that is refused, or deleted first with --replace. A multi-worker job's
folder must be on gs://: every worker reads its checkpoints to resume; a one-pod job's may also be
under a persistent volume the pod mounts.

Vertex AI targets: k8s/vertex/custom_job.yaml (vertex) or hptuning_job.yaml with the custom job
as its trialJobSpec (vertex-hptuning), filled in and printed as YAML, then passed to
`gcloud ai custom-jobs create` or `gcloud ai hp-tuning-jobs create` (the command is the first
line of the output, as a comment). --job_dir becomes baseOutputDirectory, not a trainer flag: the
trainer takes the folder above AIP_MODEL_DIR.

The trainer flags after `--` are checked against the trainer's own definitions first, so a typo
fails here and not in a pod; so is the global batch against the replicas the job will have, and
what would be applied or submitted against the placeholders (PROJECT_ID, BUCKET...) left in k8s/.
Mistakes are one line on stderr and exit code 2, before anything reaches a cluster or Google Cloud;
a failing kubectl or gcloud exits with its own code.
"""

import argparse
import copy
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
  import yaml
except ImportError:  # main() says so in one line
  yaml = None

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERNETES_TARGETS = ("gpu-job", "tfjob", "indexed-job", "jobset", "cronjob")
MULTI_WORKER_TARGETS = ("tfjob", "indexed-job", "jobset")
VERTEX_TARGETS = ("vertex", "vertex-hptuning")
# Options that only a Vertex AI job has (the Kubernetes overlays fix their own machines).
VERTEX_OPTIONS = ("region", "machine_type", "accelerator_type", "accelerator_count", "service_account",
                  "scheduling_strategy", "timeout", "tensorboard")
HPTUNING_OPTIONS = ("max_trials", "parallel_trials")
# Vertex AI's scheduling strategies a user picks (the others are deprecated): Scheduling.Strategy of
# the aiplatform v1 API.
SCHEDULING_STRATEGIES = ("STANDARD", "SPOT", "FLEX_START")
# Restarts of the whole job before Kubernetes gives up. A preempted pod is not counted (the
# podFailurePolicy ignores DisruptionTarget), but each of its peers then exits 143 and is: one
# preemption costs up to one counted failure per pod, so a multi-worker Job's or TFJob's
# backoffLimit is this many times its pods. A JobSet restarts the set as one (maxRestarts, unscaled).
RETRIES = 4
# What README "The manifests" has users replace, and the image's parts as Artifact Registry's
# documentation names them (k8s/vertex/custom_job.yaml's imageUri).
PLACEHOLDER = re.compile(r"(?<!\w)(PROJECT_ID|PROJECT|BUCKET|REGION|REPOSITORY|TAG)(?!\w)")

# An image reference as Docker reads it: [registry[:port]/]path[:tag][@digest].
_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE = re.compile(rf"(?P<name>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
                   r"(?::(?P<tag>\w[\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?", re.ASCII)
DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?", re.ASCII)
GCS_FOLDER = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](?:/.*)?", re.ASCII)
REGION = re.compile(r"[a-z]+(?:-[a-z]+)+[0-9]+", re.ASCII)
SERVICE_ACCOUNT = re.compile(r"[a-z0-9][a-z0-9._-]*@[a-z0-9][a-z0-9.-]*\.gserviceaccount\.com", re.ASCII)
TENSORBOARD = re.compile(r"projects/[^/]+/locations/(?P<region>[^/]+)/tensorboards/[^/]+", re.ASCII)
DURATION = re.compile(r"(?:[0-9]+[dhms])+", re.ASCII)
SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# Kubernetes' longest names: a DNS label, and 52 for a CronJob (its Jobs add an 11-character suffix).
MAX_NAME, MAX_CRONJOB_NAME = 63, 52


class UsageError(Exception):
  """A mistake in the command line or its environment: one line, exit code 2."""


class Parser(argparse.ArgumentParser):

  def error(self, message):
    # argparse prints its whole usage block first; one line says it.
    raise UsageError(message)


def parse_args(argv):
  """(our options, the trainer's flags) from the command line, split at the first `--`."""
  # Split by hand, as scripts/local_cluster.py does: argparse's own `--` handling differs between versions.
  ours, trainer_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
  parser = Parser(description=__doc__.splitlines()[0],
                  usage="%(prog)s --target=TARGET --image=REGISTRY/PATH:TAG --job_name=NAME --job_dir=gs://... "
                        "[--dry_run] [-- <trainer flags>]")
  parser.add_argument("--target", required=True, choices=KUBERNETES_TARGETS + VERTEX_TARGETS,
                      help="k8s/overlays/<target>, or Vertex AI custom training (vertex) or tuning (vertex-hptuning).")
  parser.add_argument("--image", required=True, help="The trainer image, pinned: REGISTRY/PATH:TAG or @sha256:DIGEST.")
  parser.add_argument("--job_name", required=True,
                      help="Names this job: a suffix of the Kubernetes objects' names, the Vertex AI display name.")
  parser.add_argument("--job_dir", required=True,
                      help="The job folder: gs://BUCKET/PATH (one-pod jobs: or a path on a persistent volume).")
  parser.add_argument("--dry_run", action="store_true", help="Print what would be applied or run; change nothing.")
  parser.add_argument("--workers", type=int,
                      help="Workers besides the chief (or worker 0): tfjob's Worker replicas, indexed-job's and "
                           "jobset's pods after the first, Vertex AI's pool 1 (default: the overlay's; vertex: 1).")
  parser.add_argument("--replace", action="store_true",
                      help="Kubernetes: delete a workload of the same name (its pods first) and apply this one.")
  vertex = parser.add_argument_group("Vertex AI (--target=vertex or vertex-hptuning)")
  vertex.add_argument("--region", help="Vertex AI region (default us-central1).")
  vertex.add_argument("--machine_type", help="Every replica's machine type (default: custom_job.yaml's).")
  vertex.add_argument("--accelerator_type", help="e.g. NVIDIA_L4, or none (default: custom_job.yaml's).")
  vertex.add_argument("--accelerator_count", type=int, help="Accelerators per replica (default: custom_job.yaml's).")
  vertex.add_argument("--service_account", help="The Google service account the job runs as (default: "
                                                "custom_job.yaml's, the one the GKE pods act as).")
  vertex.add_argument("--scheduling_strategy", type=str.upper, choices=SCHEDULING_STRATEGIES,
                      help="STANDARD (on demand), SPOT (preemptible, cheaper) or FLEX_START (queued until the "
                           "machines are free).")
  vertex.add_argument("--timeout", help="The longest the job may run, e.g. 12h, 90m, 2d (Vertex AI's default: 7d).")
  vertex.add_argument("--tensorboard", help="A Vertex AI TensorBoard in --region to stream the job's logs to: "
                                            "projects/PROJECT/locations/REGION/tensorboards/ID.")
  vertex.add_argument("--max_trials", type=int, help="vertex-hptuning: trials in all (default: hptuning_job.yaml's).")
  vertex.add_argument("--parallel_trials", type=int, help="vertex-hptuning: trials at once (default: its yaml's).")
  args, unknown = parser.parse_known_args(ours)
  if unknown:
    raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (trainer flags go after --)")
  misplaced = [name for name in VERTEX_OPTIONS + HPTUNING_OPTIONS if getattr(args, name) is not None and (
      args.target not in VERTEX_TARGETS or name in HPTUNING_OPTIONS and args.target != "vertex-hptuning")]
  if misplaced:
    where = "--target=vertex-hptuning" if misplaced[0] in HPTUNING_OPTIONS else "the Vertex AI targets"
    raise UsageError(f"--{misplaced[0]} is for {where} only (the Kubernetes overlays set their own machines)")
  if args.workers is not None and args.target not in MULTI_WORKER_TARGETS + VERTEX_TARGETS:
    raise UsageError(f"--workers is for the multi-worker targets ({', '.join(MULTI_WORKER_TARGETS + VERTEX_TARGETS)})"
                     f": --target={args.target} runs one pod")
  if args.replace and args.target in VERTEX_TARGETS:
    raise UsageError("--replace is for the Kubernetes targets only (every Vertex AI job is a new one)")
  for name in ("workers", "accelerator_count", "max_trials", "parallel_trials"):
    # A Kubernetes multi-worker target's chief needs a worker: --target=gpu-job runs one pod.
    least = 0 if name == "accelerator_count" or name == "workers" and args.target in VERTEX_TARGETS else 1
    if getattr(args, name) is not None and getattr(args, name) < least:
      target = f" for --target={args.target} (one pod: --target=gpu-job)" if name == "workers" and least else ""
      raise UsageError(f"--{name} must be at least {least}{target} (got {getattr(args, name)})")
  # gs://bucket/jobs/x/ and gs://bucket/jobs/x are one folder; the first would render .../x//<run>.
  args.job_dir = args.job_dir.rstrip("/") or args.job_dir[:1]
  return args, trainer_flags


# --- checks that need no cluster ------------------------------------------------------------------

def parse_image(image):
  """(name, tag, digest) of a pinned image reference; UsageError for anything else."""
  check_no_placeholder("--image", image)
  match = IMAGE.fullmatch(image)
  if not match:
    raise UsageError(f"--image={image!r} is not an image reference like REGISTRY/PATH:TAG")
  name, tag, digest = match.group("name", "tag", "digest")
  # Every pod pulls the image on its own node, and again when it restarts: a moving tag can give one
  # job's workers different code.
  if not tag and not digest:
    raise UsageError(f"--image={image} has no tag or digest: pin the build (REGISTRY/PATH:TAG or "
                     "REGISTRY/PATH@sha256:DIGEST) so that every worker and every restart runs the same one")
  if tag == "latest" and not digest:
    raise UsageError(f"--image={image} is pinned to :latest, which moves with every push: give a version tag or a "
                     "digest so that every worker and every restart runs the same build")
  return name, tag, digest


def check_no_placeholder(flag, value, where=""):
  """UsageError if a value given on the command line still holds one of the README's placeholders."""
  found = PLACEHOLDER.search(value)
  if found:
    raise UsageError(f"{flag}={value}{where} still holds the placeholder {found[1]}: put your own value there")


def check_job_name(name):
  if not DNS_LABEL.fullmatch(name) or len(name) > MAX_NAME:
    raise UsageError(f"--job_name={name!r} is not a DNS-1123 label: lowercase letters, digits and '-', starting and "
                     f"ending with a letter or digit, at most {MAX_NAME} characters (it becomes part of Kubernetes "
                     "object and pod host names)")


def check_gcs_folder(folder, why, flag="--job_dir"):
  """UsageError unless folder is gs://BUCKET[/PATH]; `why` says why it must be on Cloud Storage."""
  if not folder.startswith("gs://"):
    raise UsageError(f"{flag}={folder} is not on Cloud Storage: {why}; give a gs://BUCKET/PATH folder")
  if not GCS_FOLDER.fullmatch(folder):
    bucket = folder[len("gs://"):].split("/")[0]
    raise UsageError(f"{flag}={folder}: {bucket!r} is not a bucket name (3 or more lowercase letters, digits, "
                     "'-', '_' and '.', starting and ending with a letter or digit)")


def check_trainer_flags(trainer_flags, module="trainer.task"):
  """The trainer flags after `--`, --flagfile expanded, checked against the definitions of the
  module the pods run (trainer.retrain for the cronjob: the trainer's flags and its own).

  Returns (the flags to pass, the names of the flags given).
  """
  flags, values = trainer_flag_values(module)
  try:
    # A --flagfile names a file on this machine, which the pods do not have: send its lines instead.
    expanded = values.read_flags_from_files(list(trainer_flags), force_gnu=True)
    rest = values(["trainer", *expanded], known_only=False)
  except flags.Error as e:
    raise UsageError(f"trainer flags after --: {e}") from None
  if len(rest) > 1:
    raise UsageError(f"unexpected argument {rest[1]!r} after --: trainer flags are written --name=value")
  given = {name for name in values if values[name].present}
  if "job_dir" in given:
    raise UsageError("--job_dir after -- : give it to submit.py, before --, where it is checked and passed on")
  for flag in expanded:
    name, _, value = flag.partition("=")
    check_no_placeholder(name, value, " (after --)")
  return expanded, given


def trainer_flag_values(module):
  """(absl.flags, fresh FlagValues holding the flags `python -m <module>` accepts): the module's own
  (and those it declares key flags) and absl's, unparsed, whatever this process has parsed."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python scripts/submit.py` from a checkout without `pip install -e .`
  try:
    from absl import flags
    importlib.import_module(module)  # defines its flags; neither module imports TensorFlow
  except ImportError as e:
    raise UsageError(f"the trainer's flags cannot be checked without its dependencies ({e}): "
                     "pip install -e . (or pip install absl-py pandas)") from None
  values = flags.FlagValues()
  owners = [module] + [name for name in flags.FLAGS.flags_by_module_dict() if name.startswith("absl.")]
  for owner in owners:
    for flag in flags.FLAGS.get_key_flags_for_module(owner):
      values[flag.name] = copy.deepcopy(flag)
  values.unparse_flags()
  return flags, values


def parse_trainer_flags(args, module="trainer.task"):
  """The trainer's flag values for a container's args (no --flagfile), as the pod parses them."""
  _, values = trainer_flag_values(module)
  values(["trainer", *args], known_only=True)
  return values


def load_yaml(path):
  with open(path, encoding="utf-8") as f:
    return yaml.safe_load(f)


def dump_yaml(document):
  return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


# --- Kubernetes -----------------------------------------------------------------------------------
# The objects each submission gets its own of, renamed <name>-<job_name>. Anything else the overlay
# renders (the Workload Identity ServiceAccount, volumes...) is shared by every job and keeps its
# name: a renamed ServiceAccount would lose its IAM binding.
PER_JOB_KINDS = ("Job", "CronJob", "TFJob", "JobSet", "Service", "ConfigMap")
# The workloads `kubectl get` looks for before applying, as kubectl names their resources.
WORKLOAD_RESOURCES = {"Job": "jobs.batch", "CronJob": "cronjobs.batch", "TFJob": "tfjobs.kubeflow.org",
                      "JobSet": "jobsets.jobset.x-k8s.io"}
# What installs the custom kinds: a cluster without it has no such resource type.
CONTROLLERS = {"TFJob": "the Kubeflow training operator (v1, release-1.9)", "JobSet": "the JobSet controller"}
# Kustomize renames a Service's references in the fields it knows; a pod's `subdomain`, which must
# name the headless Service that gives an Indexed Job's pods their host names, is not one of them.
NAME_REFERENCES = """\
nameReference:
- kind: Service
  fieldSpecs:
  - {kind: Job, path: spec/template/spec/subdomain}
  - {kind: CronJob, path: spec/jobTemplate/spec/template/spec/subdomain}
"""
# Volumes that outlive their pod: a job folder elsewhere on a pod's disk is lost with the pod.
PERSISTENT_VOLUMES = ("persistentVolumeClaim", "nfs")


class ToolError(Exception):
  """kubectl failed, or an overlay is not what this script expects: one line, and an exit code."""

  def __init__(self, message, code=1):
    super().__init__(message)
    self.code = code


def require_kubectl(dry_run):
  if not shutil.which("kubectl"):
    raise UsageError("kubectl is not on PATH: it renders the overlay (kubectl kustomize) and applies it; install it")
  if dry_run:
    return
  done = subprocess.run(["kubectl", "config", "current-context"], capture_output=True, text=True)
  if done.returncode or not done.stdout.strip():
    said = last_line(done.stderr) or "no context"
    raise UsageError(f"kubectl has no current context ({said}): choose a cluster with `kubectl config use-context "
                     "NAME`, or add --dry_run to only print the job")


def last_line(text):
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def kustomize(folder):
  """What `kubectl kustomize folder` renders: (YAML text, the objects as dicts)."""
  done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True)
  if done.returncode:
    raise ToolError(f"kubectl kustomize {folder} failed: {last_line(done.stderr)}", done.returncode)
  return done.stdout, [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def pod_templates(obj):
  """(JSON pointer, spec) of each pod template of a workload; [] for other kinds."""
  spec = obj.get("spec") or {}
  if obj["kind"] == "Job":
    return [("/spec/template/spec", spec["template"]["spec"])]
  if obj["kind"] == "CronJob":
    return [("/spec/jobTemplate/spec/template/spec", spec["jobTemplate"]["spec"]["template"]["spec"])]
  if obj["kind"] == "TFJob":
    return [(f"/spec/tfReplicaSpecs/{kind}/template/spec", replica["template"]["spec"])
            for kind, replica in spec["tfReplicaSpecs"].items()]
  if obj["kind"] == "JobSet":
    return [(f"/spec/replicatedJobs/{i}/template/spec/template/spec", job["template"]["spec"]["template"]["spec"])
            for i, job in enumerate(spec["replicatedJobs"])]
  return []


def pods_at_once(obj):
  spec = obj.get("spec") or {}
  if obj["kind"] == "TFJob":
    return sum(replica.get("replicas", 1) for replica in spec["tfReplicaSpecs"].values())
  if obj["kind"] == "JobSet":
    return sum(job.get("replicas", 1) * job["template"]["spec"].get("parallelism", 1) for job in spec["replicatedJobs"])
  if obj["kind"] == "CronJob":
    spec = spec["jobTemplate"]["spec"]
  return spec.get("parallelism", 1) if obj["kind"] in ("Job", "CronJob") else 0


def derived_names(obj):
  """(what, name, limit): the longest names Kubernetes or the operator derives from an object's name."""
  name, spec = obj["metadata"]["name"], obj.get("spec") or {}
  if obj["kind"] == "CronJob":
    return [("the CronJob", name, MAX_CRONJOB_NAME)]
  if obj["kind"] == "Job" and spec.get("completionMode") == "Indexed":
    return [("the last pod's host name", f"{name}-{spec.get('completions', 1) - 1}", MAX_NAME)]
  if obj["kind"] == "TFJob":
    return [(f"the last {kind} pod's name", f"{name}-{kind.lower()}-{replica.get('replicas', 1) - 1}", MAX_NAME)
            for kind, replica in spec["tfReplicaSpecs"].items()]
  if obj["kind"] == "JobSet":
    # Pods' host names <jobset>-<replicatedJob>-<job index>-<pod index> (JobSet's own network).
    return [(f"the last {job['name']} pod's host name", f"{name}-{job['name']}-{job.get('replicas', 1) - 1}-"
             f"{job['template']['spec'].get('completions', 1) - 1}", MAX_NAME) for job in spec["replicatedJobs"]]
  if obj["kind"] in ("Job", "Service"):
    return [(f"the {obj['kind']}", name, MAX_NAME)]
  return []


def trainer_images():
  """The names the trainer's image has in the overlays: `trainer`, and what k8s/base pins it to."""
  base = load_yaml(K8S / "base" / "kustomization.yaml")
  return {"trainer"} | {entry["newName"] for entry in base.get("images", [])
                        if entry.get("name") == "trainer" and entry.get("newName")}


def image_name(image):
  """An image reference without its tag and digest (placeholders such as PROJECT_ID allowed)."""
  name = image.split("@")[0]
  head, _, tag = name.rpartition(":")
  return head if head and "/" not in tag else name


def size_patch(obj, workers):
  """(JSON patch operations, pods): a multi-worker workload given `workers` workers besides the
  chief (None: the overlay's), and the retries that scale with its pods (RETRIES)."""
  spec = obj.get("spec") or {}
  pods = pods_at_once(obj) if workers is None else workers + 1
  if obj["kind"] == "Job" and spec.get("completionMode") == "Indexed":
    sizes = [(f"/spec/{key}", pods) for key in ("completions", "parallelism")]
    retries = [("/spec/backoffLimit", RETRIES * pods)]
  elif obj["kind"] == "TFJob":
    sizes = [("/spec/tfReplicaSpecs/Worker/replicas", pods - 1)]
    retries = [("/spec/runPolicy/backoffLimit", RETRIES * pods)]
  elif obj["kind"] == "JobSet":
    # The contract with k8s/overlays/jobset: a replicated Job `chief` of one pod and `worker`, an
    # Indexed Job of the others; the set restarts as a whole (failurePolicy.maxRestarts, unscaled).
    index = next((i for i, job in enumerate(spec["replicatedJobs"]) if job["name"] == "worker"), None)
    if index is None:
      raise ToolError("k8s/overlays/jobset: the JobSet has no replicated Job named worker, which --workers sizes")
    sizes = [(f"/spec/replicatedJobs/{index}/template/spec/{key}", pods - 1) for key in ("completions", "parallelism")]
    retries = []
  else:
    return [], pods
  operations = sizes if workers is not None else []
  return [{"op": "add", "path": path, "value": value} for path, value in operations + retries], pods


def container_patch(obj, trainer_flags, renamed_services, target, env_values=None):
  """JSON patch operations for the trainer's containers in `obj`: these flags after their own args,
  the renamed Services in the addresses they are given (an Indexed Job's hosts pattern), and the
  values of `env_values` in the variables of those names the overlay sets.

  The trainer's absl flags: a later one wins, over the flags file and the overlay's args alike. An
  arg --job_dir of the overlay's is replaced in place rather than overridden, so that `kubectl
  describe` shows one.
  """
  operations, images = [], trainer_images()
  # <pod>.<service>[.namespace...]:port: the Service's name as a DNS label after the pod's.
  addresses = [(re.compile(rf"(?<=\.){re.escape(old)}(?=[.:]|$)"), new) for old, new in renamed_services.items()]

  def readdressed(value):
    for pattern, new in addresses:
      value = pattern.sub(new, value)
    return value

  for pointer, spec in pod_templates(obj):
    for i, container in enumerate(spec.get("containers", [])):
      if image_name(container.get("image", "")) not in images:
        continue
      container_pointer, args, flags = f"{pointer}/containers/{i}", container.get("args"), list(trainer_flags)
      for j, env in enumerate(container.get("env", [])):
        if env.get("name") in (env_values or {}) and "value" in env:
          operations.append({"op": "replace", "path": f"{container_pointer}/env/{j}/value",
                             "value": env_values[env["name"]]})
        elif isinstance(env.get("value"), str) and readdressed(env["value"]) != env["value"]:
          operations.append({"op": "replace", "path": f"{container_pointer}/env/{j}/value",
                             "value": readdressed(env["value"])})
      for j, arg in enumerate(args or []):
        if readdressed(arg) != arg:
          operations.append({"op": "replace", "path": f"{container_pointer}/args/{j}", "value": readdressed(arg)})
      if obj["kind"] == "CronJob":
        # Every run is a new Job: each gets its own folder under --job_dir, as a new job should.
        if not any(env.get("name") == "JOB_NAME" for env in container.get("env", [])):
          raise ToolError(f"k8s/overlays/{target}: the CronJob's container {container['name']} has no JOB_NAME "
                          "variable, which names each run's job folder")
        flags[0] += "/$(JOB_NAME)"
      if args is None:
        operations.append({"op": "add", "path": f"{container_pointer}/args", "value": flags})
        continue
      old = [j for j, arg in enumerate(args) if arg.startswith("--job_dir=")]
      if old:
        operations.append({"op": "replace", "path": f"{container_pointer}/args/{old[-1]}", "value": flags.pop(0)})
      operations += [{"op": "add", "path": f"{container_pointer}/args/-", "value": flag} for flag in flags]
  if pod_templates(obj) and not operations:
    raise ToolError(f"k8s/overlays/{target}: no container of {obj['kind']}/{obj['metadata']['name']} runs the "
                    f"trainer image ({', '.join(sorted(images))})")
  return operations


def kustomization(args, trainer_flags, objects, overlay, folder):
  """Writes this submission's kustomization into `folder`: the overlay renamed, pinned and given its flags."""
  name, tag, digest = parse_image(args.image)
  images = [{"name": old, "newName": name, **({"newTag": tag} if tag else {}), **({"digest": digest} if digest else {})}
            for old in sorted(trainer_images())]
  suffix = f"-{args.job_name}"
  renamed = sorted({obj["kind"] for obj in objects} & set(PER_JOB_KINDS))
  rename = {"apiVersion": "builtin", "kind": "PrefixSuffixTransformer", "metadata": {"name": "job-name"},
            "suffix": suffix, "fieldSpecs": [{"kind": kind, "path": "metadata/name"} for kind in renamed]}
  flags = [f"--job_dir={args.job_dir}", *trainer_flags]
  services = {obj["metadata"]["name"]: obj["metadata"]["name"] + suffix for obj in objects if obj["kind"] == "Service"}
  patches = []
  for obj in objects:
    # Patches see the overlay's names: they run before the renaming transformer.
    operations, pods = size_patch(obj, args.workers) if args.target in MULTI_WORKER_TARGETS else ([], 1)
    env = {"TRAINER_NUM_WORKERS": str(pods)} if args.target in MULTI_WORKER_TARGETS else {}
    operations += container_patch(obj, flags, services, args.target, env)
    if operations:
      patches.append({"target": {"kind": obj["kind"], "name": obj["metadata"]["name"]}, "patch": dump_yaml(operations)})
  (folder / "rename.yaml").write_text(dump_yaml(rename), encoding="utf-8")
  (folder / "name_references.yaml").write_text(NAME_REFERENCES, encoding="utf-8")
  document = {
      "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
      "resources": [os.path.relpath(overlay, folder)],  # kustomize takes no absolute resource paths
      "images": images,
      "patches": patches,
      "transformers": ["rename.yaml"],
      "configurations": ["name_references.yaml"],
  }
  (folder / "kustomization.yaml").write_text(dump_yaml(document), encoding="utf-8")


def check_rendered(args, objects, trainer_flags, given):
  """Mistakes only the rendered objects show: names too long, a job folder (or the cronjob's
  serving folder) the pods cannot share or keep, a batch the replicas cannot split, a placeholder."""
  derived = [names for obj in objects for names in derived_names(obj)]
  what, name, limit = max(derived, key=lambda names: len(names[1]) - names[2], default=("", "", MAX_NAME))
  if len(name) > limit:
    most = len(args.job_name) - (len(name) - limit)
    raise UsageError(f"--job_name={args.job_name} is too long for --target={args.target}: {what} would be {name} "
                     f"({len(name)} characters, at most {limit}); use at most {max(most, 0)} characters")
  workers = max([pods_at_once(obj) for obj in objects] + [0])
  serving_dir = next((flag.split("=", 1)[1] for flag in reversed(trainer_flags) if flag.startswith("--serving_dir=")),
                     None)
  if serving_dir and not serving_dir.startswith("gs://"):
    check_kept("--serving_dir", serving_dir, objects, "the models it promotes")
  elif serving_dir:
    check_gcs_folder(serving_dir, "", flag="--serving_dir")
  if args.job_dir.startswith("gs://") or workers > 1:
    check_gcs_folder(args.job_dir, f"--target={args.target} runs {workers} workers on different nodes, and "
                     "every one of them reads the job's checkpoints to resume")
  else:
    check_kept("--job_dir", args.job_dir, objects, "the job folder")
  containers = trainer_containers(objects, args.image)
  workload, spec, container = containers[0]
  gpus = int((container.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
  module = "trainer.retrain" if args.target == "cronjob" else "trainer.task"
  check_batch(args, container_flags(objects, spec, container), given, pods_at_once(workload), gpus, module=module)
  # The trainer's flags are checked by their last values; everything else as it is.
  trainer_args = [container_flags(objects, spec, container) for _, spec, container in containers]
  rest = copy.deepcopy(objects)
  for obj in rest:
    if obj["kind"] == "ConfigMap":
      obj.pop("data", None)
    for _, _, container in trainer_containers([obj], args.image):
      container["args"] = []
  check_placeholders(rest, trainer_args, [path for path in K8S.iterdir() if path.name != "vertex"])


def trainer_containers(objects, image):
  """(workload, pod spec, container) of each container running the trainer's image."""
  return [(obj, spec, container) for obj in objects for _, spec in pod_templates(obj)
          for container in spec.get("containers", []) if container.get("image") == image]


def flag_lines(text):
  """The flags of a flags file's text, as absl reads them: one a line, # and // lines comments."""
  lines = (line.strip() for line in text.splitlines())
  return [line for line in lines if line and not line.startswith(("#", "//"))]


def container_flags(objects, spec, container):
  """The trainer flags a container runs with, in order: its args, each --flagfile in a mounted
  ConfigMap replaced by the file's lines. Of a flag given twice, the last counts."""
  data = {obj["metadata"]["name"]: obj.get("data") or {} for obj in objects if obj["kind"] == "ConfigMap"}
  volumes = {volume["name"]: data.get(volume["configMap"]["name"], {})
             for volume in spec.get("volumes", []) if "configMap" in volume}
  files = {f"{mount['mountPath'].rstrip('/')}/{key}": text for mount in container.get("volumeMounts", [])
           for key, text in volumes.get(mount["name"], {}).items()}
  flags = []
  for arg in container.get("args") or []:
    path = arg[len("--flagfile="):] if arg.startswith("--flagfile=") else None
    flags += flag_lines(files[path]) if path in files else [arg]
  return flags


def replicas_per_task(values, tasks, gpus):
  """How many replicas each task runs, by the trainer's rule (trainer/distribution.py: make_strategy):
  MultiWorkerMirroredStrategy one per GPU (or the CPU), MirroredStrategy one per GPU (or per
  --cpu_devices), the others one."""
  strategy = values.strategy
  if strategy == "auto":
    strategy = ("multi_worker_mirrored" if tasks > 1 else
                "mirrored" if gpus > 1 or values.cpu_devices > 1 else "one_device")
  if strategy == "multi_worker_mirrored":
    return max(gpus, 1)
  if strategy == "mirrored":
    return gpus or max(values.cpu_devices, 1)
  return 1


def check_batch(args, flags, given, tasks, gpus, module="trainer.task", study=None):
  """UsageError unless the global --batch_size (each of the study's, in a tuning job) splits evenly
  across the job's replicas: the trainer refuses it with exit 2, but only once the machines are up."""
  values = parse_trainer_flags(flags, module)
  per_task = replicas_per_task(values, tasks, gpus)
  replicas = tasks * per_task
  if study:
    where, sizes = "k8s/vertex/hptuning_job.yaml's study", study
  else:
    where = "after --" if "batch_size" in given else source_of(f"--batch_size={values.batch_size}", [K8S])
    sizes = [values.batch_size]
  for size in sizes:
    if size % replicas:
      device = "GPU" if gpus else "CPU"
      raise UsageError(f"--batch_size={size} ({where}) does not split evenly across the {replicas} replicas of "
                       f"--target={args.target} ({tasks} task{'s' * (tasks != 1)} x {per_task} {device}"
                       f"{'s' * (per_task != 1)}), so every pod would exit 2 once its machine is up: use a multiple "
                       f"of {replicas}" + ("" if study else " (-- --batch_size=N)"))


def source_of(text, places):
  """The first file under `places` (files and folders) that holds `text`, as a path from the checkout."""
  files = sorted(path for place in places for path in ([place] if place.is_file() else place.rglob("*")))
  for path in files:
    if path.is_file() and text in path.read_text(encoding="utf-8", errors="replace"):
      return str(path.relative_to(K8S.parent))
  return "the rendered manifests"


def check_placeholders(documents, flag_lists, places):
  """UsageError naming the first placeholder left in what would be applied or submitted, and the file
  under `places` it comes from: a flag's last value in each of `flag_lists` (a placeholder an
  override after -- hides is harmless), and every string in `documents` (flags left out)."""
  for flags in flag_lists:
    last = {flag.partition("=")[0]: flag for flag in flags}
    for flag in last.values():
      found = PLACEHOLDER.search(flag.partition("=")[2])
      if found:
        raise UsageError(f"{flag} ({source_of(flag, places)}) still holds the placeholder {found[1]}: replace it "
                         f"there (README \"The manifests\"), or give {flag.partition('=')[0]} after --")
  for value in strings(documents):
    found = PLACEHOLDER.search(value)
    if found:
      raise UsageError(f"{value!r} ({source_of(value, places)}) still holds the placeholder {found[1]}: replace it "
                       "there (README \"The manifests\")")


def strings(node):
  """Every string value in a document (not its keys)."""
  if isinstance(node, str):
    yield node
  elif isinstance(node, dict):
    for value in node.values():
      yield from strings(value)
  elif isinstance(node, list):
    for value in node:
      yield from strings(value)


def check_kept(flag, folder, objects, what):
  """UsageError unless folder is on a persistent volume the pods mount: outlives the pod."""
  mounts = []
  for obj in objects:
    for _, spec in pod_templates(obj):
      persistent = {volume["name"] for volume in spec.get("volumes", [])
                    if any(kind in volume for kind in PERSISTENT_VOLUMES)}
      mounts += [mount["mountPath"] for container in spec.get("containers", [])
                 for mount in container.get("volumeMounts", []) if mount["name"] in persistent]
  path = os.path.normpath(folder)
  if not (os.path.isabs(path) and any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)):
    where = f"a folder under {' or '.join(sorted(set(mounts)))}" if mounts else "none, the pod mounts no such volume"
    raise UsageError(f"{flag}={folder} is neither gs:// nor on a persistent volume of the pod, so {what} would be "
                     f"lost with the pod; give gs://BUCKET/PATH (local paths: {where})")


def submit_kubernetes(args, trainer_flags, given):
  require_kubectl(args.dry_run)
  overlay = K8S / "overlays" / args.target
  _, objects = kustomize(overlay)
  with tempfile.TemporaryDirectory(prefix="submit-") as folder:
    kustomization(args, trainer_flags, objects, overlay, Path(folder))
    text, objects = kustomize(folder)
  check_rendered(args, objects, trainer_flags, given)
  names = ", ".join(f"{obj['kind']}/{obj['metadata']['name']}" for obj in objects)
  if not args.dry_run:
    replace_existing(objects, args.replace)
  print(text, end="", flush=True)
  output = f"job folders {args.job_dir}/<each run's Job>" if args.target == "cronjob" else f"job folder {args.job_dir}"
  print(f"submit: {args.target} {args.job_name}: {names}; image {args.image}; {output}", file=sys.stderr, flush=True)
  if args.dry_run:
    print("submit: dry run: nothing applied (pipe the YAML above into `kubectl apply -f -` to apply it)",
          file=sys.stderr)
    return 0
  return subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True).returncode


def replace_existing(objects, replace):
  """Refuses to apply over a workload of the same name in the cluster, or with `replace` deletes it
  first. `kubectl apply` leaves a finished Job as it is ("unchanged": it never runs again) and
  refuses a Job whose pod template changed (immutable), such as a new flags ConfigMap's name."""
  names = [f"{WORKLOAD_RESOURCES[obj['kind']]}/{obj['metadata']['name']}" for obj in objects
           if obj["kind"] in WORKLOAD_RESOURCES]
  done = subprocess.run(["kubectl", "get", *names, "--ignore-not-found", "-o", "name"], capture_output=True,
                        text=True)
  missing = [kind for kind in CONTROLLERS if f'resource type "{WORKLOAD_RESOURCES[kind].split(".")[0]}"' in done.stderr]
  if missing:
    raise UsageError(f"the cluster has no {missing[0]} kind ({last_line(done.stderr)}): install "
                     f"{CONTROLLERS[missing[0]]}, or choose another --target")
  if done.returncode:
    raise ToolError(f"kubectl get {' '.join(names)} failed: {last_line(done.stderr)}", done.returncode)
  found = done.stdout.split()
  if found and not replace:
    raise UsageError(f"{found[0]} already exists in the cluster, and kubectl apply would not run it again: give "
                     "another --job_name for a new job, or add --replace to delete it (its pods stop after saving a "
                     "checkpoint) and start this one, which resumes from the job folder")
  for name in found:
    print(f"submit: deleting {name} and its pods (--replace)", file=sys.stderr, flush=True)
    # Foreground: the object goes only once its pods have, so that no old pod (same host names,
    # same job folder) still runs beside the new ones; --wait returns then.
    deleted = subprocess.run(["kubectl", "delete", name, "--cascade=foreground", "--wait=true"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if deleted.returncode:
      raise ToolError(f"kubectl delete {name} failed: {last_line(deleted.stderr)}", deleted.returncode)


# --- Vertex AI ------------------------------------------------------------------------------------

def base_flags():
  """k8s/base/trainer.flags as a list: the trainer flags every Kubernetes workload starts from."""
  return flag_lines((K8S / "base" / "trainer.flags").read_text(encoding="utf-8"))


def custom_job_spec(args, trainer_flags):
  """k8s/vertex/custom_job.yaml filled in for this job (a CustomJobSpec)."""
  spec = load_yaml(K8S / "vertex" / "custom_job.yaml")
  # Where `gcloud ai custom-jobs create --config` reads them: in the spec itself (its own flags
  # only override them; googlecloudsdk/command_lib/ai/custom_jobs/custom_jobs_util.py).
  if args.service_account:
    spec["serviceAccount"] = args.service_account
  scheduling = spec.setdefault("scheduling", {})
  if args.scheduling_strategy:
    scheduling["strategy"] = args.scheduling_strategy
  if args.timeout:
    scheduling["timeout"] = f"{seconds(args.timeout)}s"
  if args.tensorboard:
    spec["tensorboard"] = args.tensorboard
  # The same trainer flags as on Kubernetes: the base's, then those after --, which win.
  trainer_flags = [*base_flags(), *trainer_flags]
  pools = spec["workerPoolSpecs"]
  workers = 1 if args.workers is None else args.workers
  pools[0]["replicaCount"] = 1  # Vertex AI's chief: one, always
  del pools[2 if workers else 1:]
  if workers:
    pools[1]["replicaCount"] = workers
  for pool in pools:
    container = pool["containerSpec"]
    container["imageUri"] = args.image
    container["args"] = [*(container.get("args") or []), *trainer_flags]
    machine = pool["machineSpec"]
    if args.machine_type:
      machine["machineType"] = args.machine_type
    if args.accelerator_type:
      machine["acceleratorType"] = args.accelerator_type
    if args.accelerator_count is not None:
      machine["acceleratorCount"] = args.accelerator_count
    if str(machine.get("acceleratorType", "")).lower() in ("", "none") or machine.get("acceleratorCount") == 0:
      machine.pop("acceleratorType", None)  # a CPU machine: Vertex AI refuses a type with no count and vice versa
      machine.pop("acceleratorCount", None)
  spec["baseOutputDirectory"] = {"outputUriPrefix": args.job_dir}
  return spec


def hptuning_job(args, trainer_flags, given):
  """k8s/vertex/hptuning_job.yaml filled in for this job, its trials running custom_job_spec."""
  job = load_yaml(K8S / "vertex" / "hptuning_job.yaml")
  tuned = [p["parameterId"] for p in job["studySpec"]["parameters"] if p["parameterId"] in given]
  if tuned:
    # Vertex AI appends each trial's value after the args, where it would silently win.
    raise UsageError(f"--{tuned[0]} after -- is what the study tunes (k8s/vertex/hptuning_job.yaml): drop it, or "
                     "change its range there")
  job["displayName"] = args.job_name
  if args.max_trials is not None:
    job["maxTrialCount"] = args.max_trials
  if args.parallel_trials is not None:
    job["parallelTrialCount"] = args.parallel_trials
  job["trialJobSpec"] = custom_job_spec(args, trainer_flags)
  return job


def seconds(duration):
  """Seconds in a duration such as 12h, 90m, 1h30m or 2d; UsageError for anything else."""
  parts = re.findall(r"([0-9]+)([dhms])", duration) if DURATION.fullmatch(duration) else []
  total = sum(int(number) * SECONDS[unit] for number, unit in parts)
  if not total:
    raise UsageError(f"--timeout={duration} is not a duration like 12h, 90m or 2d (at least a second)")
  return total


def check_vertex_options(args, region):
  for name in ("service_account", "tensorboard"):
    if getattr(args, name):
      check_no_placeholder(f"--{name}", getattr(args, name))
  if args.service_account and not SERVICE_ACCOUNT.fullmatch(args.service_account):
    raise UsageError(f"--service_account={args.service_account} is not a service account's email "
                     "(NAME@PROJECT_ID.iam.gserviceaccount.com)")
  if args.timeout:
    seconds(args.timeout)
  if args.tensorboard:
    match = TENSORBOARD.fullmatch(args.tensorboard)
    if not match:
      raise UsageError(f"--tensorboard={args.tensorboard} is not a Vertex AI TensorBoard's name "
                       "(projects/PROJECT/locations/REGION/tensorboards/ID)")
    # Vertex AI streams a job's logs only to a TensorBoard in its own region (its TensorBoard setup guide).
    if match["region"] != region:
      raise UsageError(f"--tensorboard={args.tensorboard} is in {match['region']}, the job in --region={region}: "
                       "Vertex AI needs both in the same region")


def check_vertex_job(args, document, given):
  """The filled-in job's mistakes: a batch its replicas cannot split, a placeholder, a TensorBoard
  without the service account Vertex AI requires for it."""
  spec = document.get("trialJobSpec", document)
  pools = spec["workerPoolSpecs"]
  machine = pools[0]["machineSpec"]
  gpus = machine.get("acceleratorCount", 0) if machine.get("acceleratorType") else 0
  study = None
  if "trialJobSpec" in document:
    parameters = {p["parameterId"]: p for p in document["studySpec"]["parameters"]}
    values = parameters.get("batch_size", {}).get("categoricalValueSpec", {}).get("values")
    study = [int(value) for value in values] if values else None
  check_batch(args, pools[0]["containerSpec"]["args"], given, sum(pool["replicaCount"] for pool in pools), gpus,
              study=study)
  rest = copy.deepcopy(document)
  for pool in rest.get("trialJobSpec", rest)["workerPoolSpecs"]:
    pool["containerSpec"]["args"] = []
  check_placeholders([rest], [pool["containerSpec"]["args"] for pool in pools],
                     [K8S / "vertex", K8S / "base" / "trainer.flags"])
  if spec.get("tensorboard") and not spec.get("serviceAccount"):
    raise UsageError("--tensorboard needs a service account (--service_account, or serviceAccount in "
                     "k8s/vertex/custom_job.yaml): Vertex AI streams TensorBoard logs only as one")


def submit_vertex(args, trainer_flags, given):
  region = args.region or "us-central1"
  if not REGION.fullmatch(region):
    raise UsageError(f"--region={region!r} is not a Google Cloud region like us-central1")
  check_gcs_folder(args.job_dir, "Vertex AI writes a job's output to Cloud Storage (baseOutputDirectory)")
  check_vertex_options(args, region)
  if args.target == "vertex":
    document, command = custom_job_spec(args, trainer_flags), ["ai", "custom-jobs", "create"]
  else:
    document, command = hptuning_job(args, trainer_flags, given), ["ai", "hp-tuning-jobs", "create"]
  check_vertex_job(args, document, given)
  if not args.dry_run and not shutil.which("gcloud"):
    raise UsageError("gcloud is not on PATH: install the Google Cloud CLI (or use --dry_run to see the job)")
  text = dump_yaml(document)
  with tempfile.TemporaryDirectory(prefix="submit-") as folder:
    config = Path(folder) / "config.yaml"
    config.write_text(text, encoding="utf-8")
    command = ["gcloud", *command, f"--region={region}", f"--display-name={args.job_name}", f"--config={config}"]
    shown = shlex.join(command[:-1] + ["--config=FILE"])
    print(f"# {shown}, FILE holding this document\n{text}", end="", flush=True)
    if args.dry_run:
      print("submit: dry run: nothing submitted", file=sys.stderr)
      return 0
    return subprocess.run(command, stdin=subprocess.DEVNULL).returncode


def main(argv=None):
  try:
    if yaml is None:
      raise UsageError("PyYAML is not installed: pip install pyyaml")
    args, trainer_flags = parse_args(sys.argv[1:] if argv is None else argv)
    parse_image(args.image)
    check_job_name(args.job_name)
    check_no_placeholder("--job_dir", args.job_dir)
    trainer_flags, given = check_trainer_flags(trainer_flags,
                                               "trainer.retrain" if args.target == "cronjob" else "trainer.task")
    if args.target in VERTEX_TARGETS:
      return submit_vertex(args, trainer_flags, given)
    return submit_kubernetes(args, trainer_flags, given)
  except UsageError as e:
    print(f"submit: error: {e}", file=sys.stderr, flush=True)
    return 2
  except ToolError as e:
    print(f"submit: error: {e}", file=sys.stderr, flush=True)
    return e.code


if __name__ == "__main__":
  sys.exit(main())
