"""The container image and the Kubernetes manifests agree with the code they run.

Every overlay in k8s/overlays/ is rendered with the real `kubectl kustomize` (offline) and each
document is validated strictly against the Kubernetes API schemas; then the flags, exit codes,
cluster addresses, ports and container names in the rendered manifests are checked against the
trainer's own definitions, and the Dockerfile against setup.py and the pods. Fast: nothing
trains, nothing reaches a network, no cluster is needed.
"""

import copy
import dataclasses
import functools
import importlib
import json
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
from typing import Optional

import jsonschema
import kubernetes_validate
import pytest
import yaml
from absl import flags

from trainer import cluster as cluster_lib
from trainer import config as config_lib
from trainer import errors
from trainer.distribution import per_replica_batch_size
from trainer.errors import signal_exit_code as exit_code

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = sorted(path.parent.name for path in (K8S / "overlays").glob("*/kustomization.yaml"))
# The kubectl installed here and on CI is 1.32; kubernetes-validate ships schemas for 1.25-1.37.
KUBERNETES_VERSION = "1.32"
KUBECTL = shutil.which("kubectl")
# The openAPIV3Schema of the CRDs the custom kinds are applied to (tests/data/crds/README.md says where from).
CRD_SCHEMAS = {"TFJob": ("kubeflow.org/v1", "kubeflow.org_tfjobs.v1.json"),
               "JobSet": ("jobset.x-k8s.io/v1alpha2", "jobset.x-k8s.io_jobsets.v1alpha2.json")}

# An uncaught exception or a flag absl cannot parse: Python's and absl's own exit code.
PYTHON_ERROR = 1
# What a Job's podFailurePolicy must say about the trainer's exit codes (README "Resume,
# preemption and exit codes").
PERMANENT_CODES = {PYTHON_ERROR, errors.USER_ERROR}
RETRYABLE_CODES = {errors.STORAGE_FAILURE, errors.WORKER_LOST, errors.SERVING_BUSY,
                   exit_code(signal.SIGINT), exit_code(signal.SIGTERM)}

# A CronJob names the Jobs it creates <cronjob name>-<scheduled time in minutes since 1970>.
CRONJOB_RUN = "29250180"


def test_the_five_environments_have_overlays():
  assert {"gpu-job", "tfjob", "indexed-job", "cronjob", "jobset"} <= set(OVERLAYS)


# --- rendering -----------------------------------------------------------------------------------

@functools.cache
def _kustomize(overlay):
  done = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                        timeout=120)
  return done.returncode, done.stdout, done.stderr


def render(overlay):
  """The overlay's documents, parsed afresh on every call (tests may change them)."""
  if KUBECTL is None:
    pytest.skip("kubectl is not installed: the manifests cannot be rendered (kubectl kustomize)")
  code, stdout, stderr = _kustomize(overlay)
  assert code == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{stderr}"
  return [doc for doc in yaml.safe_load_all(stdout) if doc]


def find(docs, kind):
  return [doc for doc in docs if doc["kind"] == kind]


@dataclasses.dataclass
class Pod:
  where: str  # for messages, e.g. "TFJob trainer-tfjob Worker"
  template: dict  # the pod template: metadata and spec
  job_name: str  # the name of the job that runs it (for a CronJob, of one run)
  labels: dict  # the labels the running pod carries: the template's and its controller's
  tasks: int  # pods of the workload that train together
  job_spec: Optional[dict]  # the batch/v1 Job spec that runs it; None in a TFJob

  @property
  def spec(self):
    return self.template["spec"]


def _job_pod(where, job_spec, job_name):
  labels = {**job_spec["template"].get("metadata", {}).get("labels", {}), "batch.kubernetes.io/job-name": job_name}
  return Pod(where, job_spec["template"], job_name, labels, job_spec.get("parallelism", 1), job_spec)


def _jobset_pods(jobset):
  """The pods of a JobSet's first child Job of each replicated Job, labelled as JobSet labels them;
  the job folder is named after the JobSet (its child Jobs' names differ per role)."""
  name = jobset["metadata"]["name"]
  replicated = jobset["spec"]["replicatedJobs"]
  tasks = sum(job.get("replicas", 1) * job["template"]["spec"].get("parallelism", 1) for job in replicated)
  found = []
  for job in replicated:
    spec = job["template"]["spec"]
    labels = {**spec["template"].get("metadata", {}).get("labels", {}), "jobset.sigs.k8s.io/jobset-name": name,
              "jobset.sigs.k8s.io/replicatedjob-name": job["name"], "jobset.sigs.k8s.io/job-index": "0",
              "batch.kubernetes.io/job-name": f"{name}-{job['name']}-0"}
    found.append(Pod(f"JobSet {name} {job['name']}", spec["template"], name, labels, tasks, spec))
  return found


def pods(docs):
  """Every pod template of the rendered workloads, with what runs it."""
  found = []
  for doc in docs:
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind == "Job":
      found.append(_job_pod(f"Job {name}", doc["spec"], name))
    elif kind == "CronJob":
      found.append(_job_pod(f"CronJob {name}", doc["spec"]["jobTemplate"]["spec"], f"{name}-{CRONJOB_RUN}"))
    elif kind == "TFJob":
      specs = doc["spec"]["tfReplicaSpecs"]
      tasks = sum(spec.get("replicas", 1) for spec in specs.values())
      for replica_type, spec in specs.items():
        labels = {**spec["template"].get("metadata", {}).get("labels", {}), "training.kubeflow.org/job-name": name,
                  "training.kubeflow.org/replica-type": replica_type.lower()}
        found.append(Pod(f"TFJob {name} {replica_type}", spec["template"], name, labels, tasks, None))
    elif kind == "JobSet":
      found.extend(_jobset_pods(doc))
  assert found, "no Job, CronJob, TFJob or JobSet"
  return found


def _strict(schema):
  """The schema with unknown fields refused wherever it lists an object's fields: what the API server's
  strict field validation (kubectl's default) does with a structural CRD schema."""
  if isinstance(schema, list):
    return [_strict(item) for item in schema]
  if not isinstance(schema, dict):
    return schema
  strict = {key: (value if key == "enum" else _strict(value)) for key, value in schema.items()}
  if "properties" in strict and "additionalProperties" not in strict and \
      not strict.get("x-kubernetes-preserve-unknown-fields"):
    strict["additionalProperties"] = False
  return strict


@functools.cache
def crd_validator(kind):
  _, filename = CRD_SCHEMAS[kind]
  schema = _strict(json.loads((ROOT / "tests" / "data" / "crds" / filename).read_text()))
  return jsonschema.Draft7Validator(schema)


def validate_against_crd(doc):
  api_version, _ = CRD_SCHEMAS[doc["kind"]]
  assert doc["apiVersion"] == api_version, f"{doc['kind']}: {doc['apiVersion']}, the CRD serves {api_version}"
  error = jsonschema.exceptions.best_match(crd_validator(doc["kind"]).iter_errors(doc))
  if error:
    raise error


def validate(doc):
  """Strict schema validation. A TFJob or JobSet against its CRD's schema, then (the Kubernetes schemas
  do not know the kind) through its pod templates (each as a v1 PodTemplate) or Job templates (each as a
  batch/v1 Job)."""
  if doc["kind"] in CRD_SCHEMAS:
    validate_against_crd(doc)
  if doc["kind"] == "JobSet":
    for job in doc["spec"]["replicatedJobs"]:
      kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "spec": job["template"]["spec"],
                                    "metadata": {"name": f"{doc['metadata']['name']}-{job['name']}-0"}},
                                   KUBERNETES_VERSION, strict=True)
  elif doc["kind"] == "TFJob":
    for replica_type, spec in doc["spec"]["tfReplicaSpecs"].items():
      template = {"apiVersion": "v1", "kind": "PodTemplate", "template": spec["template"],
                  "metadata": {"name": f"{doc['metadata']['name']}-{replica_type.lower()}"}}
      kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)
  else:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates_strictly(overlay):
  docs = render(overlay)
  assert docs, f"k8s/overlays/{overlay} renders nothing"
  for doc in docs:
    try:
      validate(doc)
    except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
      pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


def _misspell_job(docs):
  find(docs, "Job")[0]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "IfNotPresent"
  return "imagePullPolicyy"


def _misspell_tfjob_pod(docs):
  find(docs, "TFJob")[0]["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["restartPolicyy"] = "Never"
  return "restartPolicyy"


def _misspell_tfjob(docs):
  find(docs, "TFJob")[0]["spec"]["runPolicy"]["activeDeadlineSecondss"] = 60
  return "activeDeadlineSecondss"


def _misspell_jobset(docs):
  find(docs, "JobSet")[0]["spec"]["failurePolicy"]["maxRestartss"] = 1
  return "maxRestartss"


def _misspell_jobset_job(docs):
  find(docs, "JobSet")[0]["spec"]["replicatedJobs"][1]["template"]["spec"]["backoffLimitt"] = 0
  return "backoffLimitt"


def _misspell_jobset_pod(docs):
  find(docs, "JobSet")[0]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["hostnamee"] = "x"
  return "hostnamee"


@pytest.mark.parametrize("overlay, misspell", [
    ("gpu-job", _misspell_job), ("tfjob", _misspell_tfjob_pod), ("tfjob", _misspell_tfjob),
    ("jobset", _misspell_jobset), ("jobset", _misspell_jobset_job), ("jobset", _misspell_jobset_pod)])
def test_strict_validation_rejects_a_misspelled_field(overlay, misspell):
  docs = render(overlay)
  misspelled = misspell(docs)
  with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError), match=misspelled):
    for doc in docs:
      validate(doc)


# --- the trainer's flags -------------------------------------------------------------------------

@functools.cache
def _defined_flags(module):
  """The flags `python -m <module>` accepts: the module's own (and those it declares key flags)
  and absl's (logging, app)."""
  importlib.import_module(module)
  owners = [module] + [name for name in flags.FLAGS.flags_by_module_dict() if name.startswith("absl.")]
  return [flag for owner in owners for flag in flags.FLAGS.get_key_flags_for_module(owner)]


def parse_flags(module, args):
  """Parses args with copies of the module's absl flag definitions, leaving the global FLAGS
  untouched; raises absl's error for an unknown flag or a value the flag refuses."""
  values = flags.FlagValues()
  for flag in _defined_flags(module):
    values[flag.name] = copy.deepcopy(flag)
  rest = values(["trainer", *args])
  assert rest == ["trainer"], f"arguments that are not flags: {rest[1:]}"
  return values


def expand(text, env):
  """Kubernetes' $(VAR) expansion in env values, command and args: $$ is a literal $, and a
  reference to a variable not defined (earlier in the env list) stays as written."""
  return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_env(pod, container):
  """The container's environment as the kubelet builds it, the downward API read from the labels
  the running pod carries (a label it does not carry reads as empty)."""
  env = {}
  for variable in container.get("env", []):
    if "valueFrom" in variable:
      path = variable["valueFrom"]["fieldRef"]["fieldPath"]
      label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
      assert label, f"{pod.where}: env {variable['name']} reads {path}, which this test does not model"
      env[variable["name"]] = pod.labels.get(label.group(1), "")
    else:
      env[variable["name"]] = expand(variable.get("value", ""), env)
  return env


def local_flagfile(path, pod, container, docs, tmp_path):
  """The file behind a --flagfile path in the container: the ConfigMap key mounted there,
  written to tmp_path."""
  for mount in container.get("volumeMounts", []):
    folder = mount["mountPath"].rstrip("/") + "/"
    if path.startswith(folder):
      volume = next(v for v in pod.spec.get("volumes", []) if v["name"] == mount["name"])
      assert "configMap" in volume, f"{pod.where}: {path} is not mounted from a ConfigMap"
      configmaps = {doc["metadata"]["name"]: doc for doc in find(docs, "ConfigMap")}
      assert volume["configMap"]["name"] in configmaps, f"{pod.where}: ConfigMap {volume['configMap']['name']} " \
                                                         "is not in the overlay"
      key = path[len(folder):]
      data = configmaps[volume["configMap"]["name"]].get("data", {})
      assert key in data, f"{pod.where}: {path}: the ConfigMap has no key {key!r}"
      local = tmp_path / key
      local.write_text(data[key])
      return str(local)
  pytest.fail(f"{pod.where}: --flagfile={path} is in none of the container's mounts")


def trainer_flags(pod, docs, tmp_path):
  """(parsed flags, env) of the pod's trainer container, read as the trainer would read them."""
  container, = pod.spec["containers"]
  command = container.get("command", [])
  assert command[:2] == ["python", "-m"] and len(command) == 3, \
      f"{pod.where}: command {command}: expected python -m <module>, the one place the module is named"
  env = container_env(pod, container)
  args = [expand(arg, env) for arg in container.get("args", [])]
  unresolved = [arg for arg in args if "$(" in arg]
  assert not unresolved, f"{pod.where}: {unresolved} reference variables the container does not define"
  args = [f"--flagfile={local_flagfile(arg.split('=', 1)[1], pod, container, docs, tmp_path)}"
          if arg.startswith("--flagfile=") else arg for arg in args]
  return parse_flags(command[2], args), env


def test_flags_file_is_one_trainer_flag_per_line():
  lines = (K8S / "base" / "trainer.flags").read_text().splitlines()
  for line in lines:
    assert re.fullmatch(r"--[a-z0-9_]+=.*", line), f"k8s/base/trainer.flags: {line!r} is not --flag=value"
  parse_flags("trainer.task", lines)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_flag_is_one_the_trainer_defines(overlay, tmp_path):
  docs = render(overlay)
  for pod in pods(docs):
    try:
      values, _ = trainer_flags(pod, docs, tmp_path)
    except flags.Error as e:
      pytest.fail(f"{overlay}: {pod.where}: {e}")
    # One job folder per Kubernetes job, named after it.
    assert values.job_dir and values.job_dir.endswith("/" + pod.job_name), \
        f"{pod.where}: --job_dir={values.job_dir} is not named after its job {pod.job_name}"


def gpus(container):
  limits = container.get("resources", {}).get("limits", {})
  return int(limits.get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_strategy_and_batch_fit_the_workload(overlay, tmp_path):
  docs = render(overlay)
  for pod in pods(docs):
    values, _ = trainer_flags(pod, docs, tmp_path)
    container, = pod.spec["containers"]
    per_task = gpus(container) or values.cpu_devices or 1
    if gpus(container):
      # NCCL's warnings (a fallback from NVLink or InfiniBand to TCP) belong in a GPU pod's log.
      env = {variable["name"]: variable.get("value") for variable in container.get("env", [])}
      assert env.get("NCCL_DEBUG") == "WARN", f"{overlay}: {pod.where}: no NCCL_DEBUG=WARN"
      if pod.tasks > 1:  # across workers auto is a ring through the hosts
        assert values.communication == "nccl", f"{overlay}: {pod.where}: --communication={values.communication}"
    if pod.tasks > 1:
      assert values.strategy in ("auto", "multi_worker_mirrored"), f"{pod.where}: {pod.tasks} workers"
    elif per_task > 1:
      assert values.strategy in ("auto", "mirrored"), f"{pod.where}: {per_task} devices on one node"
    try:
      per_replica_batch_size(values.batch_size, pod.tasks * per_task)
    except config_lib.UserError as e:
      pytest.fail(f"{overlay}: {pod.where}: {e}")


def test_the_cronjob_retrains_and_promotes_only_into_its_serving_folder(tmp_path):
  docs = render("cronjob")
  cronjob, = find(docs, "CronJob")
  assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"  # the retrain's lease is the second guard
  pod, = pods(docs)
  container, = pod.spec["containers"]
  assert container["command"] == ["python", "-m", "trainer.retrain"]
  values, _ = trainer_flags(pod, docs, tmp_path)
  assert values.serving_dir.startswith("gs://") and not values.serving_dir.startswith(values.job_dir.split("$")[0])
  # The base's fixed test period would freeze the hold-out; each night holds out its newest days.
  assert not values.test_start and values.eval_days >= 1
  assert values.min_improvement > 0


# --- exit codes ----------------------------------------------------------------------------------

def codes(rules, action):
  return {code for rule in rules if rule["action"] == action for code in rule.get("onExitCodes", {}).get("values", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_failure_policy_follows_the_trainers_exit_codes(overlay):
  for pod in pods(render(overlay)):
    if pod.job_spec is None:
      continue  # a TFJob: its ExitCode restart policy, below
    rules = pod.job_spec.get("podFailurePolicy", {}).get("rules", [])
    assert rules, f"{pod.where}: no podFailurePolicy"
    assert pod.spec["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}, \
        f"{pod.where}: evictions and preemptions must not count as failures"
    assert codes(rules, "FailJob") == PERMANENT_CODES
    assert codes(rules, "Count") == RETRYABLE_CODES
    container, = pod.spec["containers"]
    for rule in rules[1:]:
      assert rule["onExitCodes"]["containerName"] == container["name"]
      assert rule["onExitCodes"]["operator"] == "In"
    # A JobSet's child Jobs fail on the first counted failure: the JobSet restarts every pod (retries, below).
    assert pod.job_spec.get("backoffLimit", 6) >= (0 if pod.where.startswith("JobSet") else 1)


# --- the environments ----------------------------------------------------------------------------

def test_tfjob_is_what_the_operator_and_the_trainer_expect():
  docs = render("tfjob")
  tfjob, = find(docs, "TFJob")
  assert tfjob["apiVersion"] == "kubeflow.org/v1"
  spec = tfjob["spec"]
  assert set(spec) <= {"tfReplicaSpecs", "runPolicy", "successPolicy", "enableDynamicWorker"}
  run_policy = spec["runPolicy"]
  assert set(run_policy) <= {"backoffLimit", "cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                             "schedulingPolicy", "suspend", "managedBy"}
  assert run_policy["cleanPodPolicy"] in ("None", "Running", "All")
  assert isinstance(run_policy["backoffLimit"], int) and run_policy["backoffLimit"] >= 1
  replicas = spec["tfReplicaSpecs"]
  # The operator writes TF_CONFIG task types from the replica names; the trainer takes only these.
  assert {name.lower() for name in replicas} <= set(cluster_lib.TASK_TYPES), replicas.keys()
  assert replicas.get("Chief", {}).get("replicas", 1) == 1
  for name, replica in replicas.items():
    assert set(replica) <= {"replicas", "restartPolicy", "template"}, f"{name}: {set(replica)}"
    assert isinstance(replica.get("replicas", 1), int) and replica.get("replicas", 1) >= 1
    assert replica["restartPolicy"] == "ExitCode", f"{name}: preempted workers (exit 143) must be restarted"
    container, = replica["template"]["spec"]["containers"]
    # The operator injects TF_CONFIG only into the container named tensorflow.
    assert container["name"] == "tensorflow"
    assert {"name": "tfjob-port", "containerPort": 2222} in container.get("ports", [])
    assert "TF_CONFIG" not in {variable["name"] for variable in container.get("env", [])}
  # ExitCode restarts a pod on 128-255 and fails the job on 1-127.
  assert all(1 <= code <= 127 for code in PERMANENT_CODES)
  assert all(128 <= code <= 255 for code in (exit_code(signal.SIGINT), exit_code(signal.SIGTERM)))


def test_indexed_job_workers_find_each_other_through_the_trainers_cluster(tmp_path):
  docs = render("indexed-job")
  job, = find(docs, "Job")
  service, = find(docs, "Service")
  spec, name = job["spec"], job["metadata"]["name"]
  assert spec["completionMode"] == "Indexed"
  workers = spec["parallelism"]
  assert spec["completions"] == workers >= 2, "every worker must run at once"
  # Independent indexes are the wrong model for workers that train one model together (k8s/overlays/indexed-job).
  assert "backoffLimitPerIndex" not in spec
  pod, = pods([job])
  pod_spec = pod.spec
  assert service["spec"]["clusterIP"] == "None"
  assert pod_spec["subdomain"] == service["metadata"]["name"]
  assert service["spec"]["selector"].items() <= pod.labels.items(), "the Service must select the Job's pods"
  service_port, = service["spec"]["ports"]
  container, = pod_spec["containers"]
  assert service_port.get("targetPort", service_port["port"]) in [p["containerPort"] for p in container["ports"]]

  values, env = trainer_flags(pod, docs, tmp_path)
  assert "TF_CONFIG" not in env
  expected = [f"{name}-{i}.{service['metadata']['name']}:{service_port['port']}" for i in range(workers)]
  for index in range(workers):
    cluster = cluster_lib.resolve({**env, "JOB_COMPLETION_INDEX": str(index)}, values.indexed_job_hosts,
                                  values.num_workers)
    assert cluster.source == "indexed job"
    assert cluster.spec == {"worker": expected}
    assert (cluster.task_index, cluster.is_chief) == (index, index == 0)


def test_jobset_pods_find_each_other_through_the_trainers_cluster(tmp_path):
  docs = render("jobset")
  jobset, = find(docs, "JobSet")
  name, network = jobset["metadata"]["name"], jobset["spec"]["network"]
  # JobSet's hostnames: <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain, by default the JobSet's name>.
  subdomain = network.get("subdomain", name)
  addresses, tasks = set(), []
  for job, pod in zip(jobset["spec"]["replicatedJobs"], pods([jobset])):
    container, = pod.spec["containers"]
    port, = [p["containerPort"] for p in container["ports"]]
    values, env = trainer_flags(pod, docs, tmp_path)
    assert "TF_CONFIG" not in env
    for job_index in range(job["replicas"]):
      for index in range(job["template"]["spec"]["completions"]):
        addresses.add(f"{name}-{job['name']}-{job_index}-{index}.{subdomain}:{port}")
        cluster = cluster_lib.resolve({**env, "JOB_COMPLETION_INDEX": str(index)}, values.indexed_job_hosts,
                                      values.num_workers)
        assert cluster.source == "jobset"
        tasks.append((cluster.task_type, cluster.task_index, cluster.is_chief, cluster.spec))
  specs = [spec for *_, spec in tasks]
  assert all(spec == specs[0] for spec in specs), "every pod must see the same cluster"
  assert {address for role in specs[0].values() for address in role} == addresses, "the cluster is the JobSet's pods"
  assert sorted(task[:3] for task in tasks) == [("chief", 0, True)] + [("worker", i, False)
                                                                       for i in range(len(tasks) - 1)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_images_user_locked_down(overlay):
  dockerfile = Dockerfile.read()
  uid = int(dockerfile.user.split(":")[0])
  scratch = {dockerfile.env["TMPDIR"], dockerfile.env["HOME"]}
  for pod in pods(render(overlay)):
    security = pod.spec.get("securityContext", {})
    assert security.get("runAsNonRoot") is True, pod.where
    assert security.get("runAsUser") == uid, f"{pod.where}: runAsUser must be the Dockerfile's USER {uid}"
    assert "fsGroup" in security, pod.where
    assert pod.spec.get("serviceAccountName") == "trainer", pod.where
    # Long enough for the trainer to finish a step and save a checkpoint after SIGTERM.
    assert pod.spec.get("terminationGracePeriodSeconds", 30) >= 60, pod.where
    volumes = {volume["name"]: volume for volume in pod.spec.get("volumes", [])}
    for container in pod.spec["containers"]:
      where = f"{pod.where} container {container['name']}"
      context = container.get("securityContext", {})
      assert context.get("allowPrivilegeEscalation") is False, where
      assert context.get("readOnlyRootFilesystem") is True, where
      assert context.get("capabilities", {}).get("drop") == ["ALL"], where
      assert "runAsUser" not in context or context["runAsUser"] == uid, where
      resources = container.get("resources", {})
      assert resources.get("requests") and resources.get("limits", {}).get("memory"), f"{where}: requests and limits"
      assert "nvidia.com/gpu" not in resources["requests"] or \
          resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], where
      # The root filesystem is read-only: HOME and TMPDIR must be on an emptyDir.
      writable = [mount["mountPath"] for mount in container.get("volumeMounts", [])
                  if "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly")]
      for path in scratch:
        assert any(path == folder or path.startswith(folder.rstrip("/") + "/") for folder in writable), \
            f"{where}: {path} (HOME or TMPDIR in the Dockerfile) is not on a writable emptyDir"


IMAGE = re.compile(r"(?P<name>[^:@]+(:[0-9]+/[^:@]+)?)(:(?P<tag>[\w][\w.-]*))?(@sha256:(?P<digest>[0-9a-f]{64}))?")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned(overlay):
  for pod in pods(render(overlay)):
    for container in pod.spec["containers"] + pod.spec.get("initContainers", []):
      image = IMAGE.fullmatch(container["image"])
      assert image, f"{pod.where}: {container['image']} is not an image reference"
      # A tag for people, never latest; the digest once the image is pushed (k8s/base/kustomization.yaml).
      assert image["tag"] and image["tag"] != "latest", f"{pod.where}: image {container['image']} has no fixed tag"


def test_the_image_is_pinned_by_tag_and_digest_as_the_base_says(tmp_path):
  # What k8s/base/kustomization.yaml and the README tell a user to do once the image is pushed.
  if KUBECTL is None:
    pytest.skip("kubectl is not installed")
  shutil.copytree(K8S, tmp_path / "k8s")
  kustomization = tmp_path / "k8s" / "base" / "kustomization.yaml"
  digest = "0123456789abcdef" * 4
  pinned = re.sub(r"# (digest: sha256:)[0-9a-f]{64}", rf"\g<1>{digest}", kustomization.read_text())
  assert pinned != kustomization.read_text(), "k8s/base/kustomization.yaml has no commented digest line to fill in"
  kustomization.write_text(pinned)
  done = subprocess.run([KUBECTL, "kustomize", str(tmp_path / "k8s" / "overlays" / "gpu-job")], capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  job, = [doc for doc in yaml.safe_load_all(done.stdout) if doc and doc["kind"] == "Job"]
  image = IMAGE.fullmatch(job["spec"]["template"]["spec"]["containers"][0]["image"])
  assert (image["tag"], image["digest"]) == ("0.1.0", digest)


# --- cluster policies ----------------------------------------------------------------------------

UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
DAY = 24 * 3600


def quantity(value):
  """A Kubernetes quantity in bytes (or units): 64Gi, 500M, 3."""
  number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
  return float(number) * UNITS[unit]


def workloads(docs):
  """(where, the spec that bounds it in time) of every workload: a Job's spec, a CronJob's job
  template, a TFJob's runPolicy, each Job template of a JobSet."""
  found = []
  for doc in docs:
    kind, name, spec = doc["kind"], doc["metadata"]["name"], doc.get("spec", {})
    if kind == "Job":
      found.append((f"Job {name}", spec))
    elif kind == "CronJob":
      found.append((f"CronJob {name}", spec["jobTemplate"]["spec"]))
    elif kind == "TFJob":
      found.append((f"TFJob {name} runPolicy", spec.get("runPolicy", {})))
    elif kind == "JobSet":
      found += [(f"JobSet {name} {job['name']}", job["template"]["spec"]) for job in spec["replicatedJobs"]]
  return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_a_deadline(overlay):
  # A pod that never schedules (the last GPU of a gang) holds the others' GPUs, and a TFJob's restarts under
  # restartPolicy ExitCode are bounded by nothing else (k8s/overlays/tfjob/tfjob.yaml).
  for where, spec in workloads(render(overlay)):
    deadline = spec.get("activeDeadlineSeconds")
    assert isinstance(deadline, int) and 3600 <= deadline <= 7 * DAY, f"{overlay}: {where}: activeDeadlineSeconds " \
                                                                       f"{deadline}"


def test_the_nightly_run_ends_before_the_next_night():
  # concurrencyPolicy Forbid: a run still going at 03:00 makes the CronJob skip that night.
  cronjob, = find(render("cronjob"), "CronJob")
  assert cronjob["spec"]["schedule"].split()[2:] == ["*", "*", "*"], "a daily schedule"
  spec = cronjob["spec"]
  latest_end = spec["startingDeadlineSeconds"] + spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]
  assert latest_end < DAY, f"a run may start {cronjob['spec']['startingDeadlineSeconds']} s late and last until " \
                           f"{latest_end} s after its time"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_retries_scale_with_the_workers(overlay):
  # One preempted pod is ignored (DisruptionTarget), but each of its peers exits 143 or 171 and counts.
  for doc in render(overlay):
    where, spec = f"{overlay}: {doc['kind']} {doc['metadata']['name']}", doc.get("spec", {})
    if doc["kind"] in ("Job", "CronJob"):
      spec = spec.get("jobTemplate", {}).get("spec", spec)
      assert spec["backoffLimit"] == 4 * spec.get("parallelism", 1), f"{where}: backoffLimit {spec['backoffLimit']}"
    elif doc["kind"] == "TFJob":
      tasks = sum(replica.get("replicas", 1) for replica in spec["tfReplicaSpecs"].values())
      assert spec["runPolicy"]["backoffLimit"] == 4 * tasks, f"{where}: runPolicy.backoffLimit"
    elif doc["kind"] == "JobSet":
      # Any counted failure fails a child Job, and the JobSet restarts every pod together.
      assert spec["failurePolicy"]["maxRestarts"] == 4, where
      assert all(job["template"]["spec"]["backoffLimit"] == 0 for job in spec["replicatedJobs"]), where
      # Exit 1 or 2 (the child Job's podFailurePolicy FailJob) fails the JobSet instead of restarting it, and
      # so does a child Job past its deadline: a restart would give it a new one.
      fail = {reason for rule in spec["failurePolicy"]["rules"] if rule["action"] == "FailJobSet"
              and not rule.get("targetReplicatedJobs") for reason in rule["onJobFailureReasons"]}
      assert fail == {"PodFailurePolicy", "DeadlineExceeded"}, f"{where}: FailJobSet on {fail}"


def test_the_jobset_is_what_jobset_and_the_trainer_expect():
  jobset, = find(render("jobset"), "JobSet")
  spec = jobset["spec"]
  assert jobset["metadata"]["name"] == "trainer-jobset"
  jobs = {job["name"]: job for job in spec["replicatedJobs"]}
  assert list(jobs) == ["chief", "worker"]
  assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["chief"]}
  # Pods resolve as <jobset>-<replicatedJob>-<job index>-<pod index>.<jobset> (JobSet's default subdomain).
  assert spec["network"]["enableDNSHostnames"] is True and "subdomain" not in spec["network"]
  for name, job in jobs.items():
    job_spec = job["template"]["spec"]
    assert job["replicas"] == 1, name
    assert job_spec["completionMode"] == "Indexed", f"{name}: pods get their hostnames from their index"
    assert job_spec["completions"] == job_spec["parallelism"], name
  assert jobs["chief"]["template"]["spec"]["completions"] == 1
  tasks = 1 + jobs["worker"]["template"]["spec"]["completions"]
  for pod in pods([jobset]):
    container, = pod.spec["containers"]
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["TRAINER_NUM_WORKERS"]["value"] == str(tasks), pod.where
    for variable, label in [("JOBSET_NAME", "jobset-name"), ("REPLICATED_JOB_NAME", "replicatedjob-name"),
                            ("JOB_INDEX", "job-index"), ("JOB_NAME", "jobset-name")]:
      assert env[variable]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['jobset.sigs.k8s.io/{label}']"
    assert {"name": "grpc", "containerPort": 2222} in container["ports"], pod.where


def base_memory():
  """What the trainer itself is given in k8s/base/job.yaml: every pod's floor besides /dev/shm."""
  job = yaml.safe_load((K8S / "base" / "job.yaml").read_text())
  return quantity(job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])


def mounted_volumes(pod, container):
  volumes = {volume["name"]: volume for volume in pod.spec.get("volumes", [])}
  return {mount["mountPath"]: volumes[mount["name"]] for mount in container.get("volumeMounts", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_with_several_gpus_have_shared_memory_for_nccl(overlay):
  # NCCL's transport between GPUs of one pod uses /dev/shm, a container's default of which is 64 MiB.
  for pod in pods(render(overlay)):
    container, = pod.spec["containers"]
    if gpus(container) < 2:
      continue
    shm = mounted_volumes(pod, container).get("/dev/shm", {}).get("emptyDir")
    assert shm and shm.get("medium") == "Memory" and shm.get("sizeLimit"), f"{overlay}: {pod.where}: /dev/shm"
    # Memory-backed: what it holds counts against the container's memory limit.
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert quantity(limits["memory"]) >= quantity(shm["sizeLimit"]) + base_memory(), \
        f"{overlay}: {pod.where}: memory limit {limits['memory']} does not leave the trainer its own beside /dev/shm"
    assert requests["memory"] == limits["memory"], f"{overlay}: {pod.where}: the scheduler must reserve /dev/shm too"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scratch_space_is_requested(overlay):
  # Checkpoint staging lives in the /tmp emptyDir: unrequested, GKE Autopilot allows 1 GiB and evicts past it.
  for pod in pods(render(overlay)):
    for container in pod.spec["containers"]:
      disk = [volume["emptyDir"] for volume in mounted_volumes(pod, container).values()
              if "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory"]
      assert all(volume.get("sizeLimit") for volume in disk), f"{overlay}: {pod.where}: an emptyDir without sizeLimit"
      requests = container["resources"]["requests"]
      assert "ephemeral-storage" in requests, f"{overlay}: {pod.where}: no ephemeral-storage request"
      assert quantity(requests["ephemeral-storage"]) >= sum(quantity(volume["sizeLimit"]) for volume in disk), \
          f"{overlay}: {pod.where}: ephemeral-storage {requests['ephemeral-storage']} is less than its emptyDirs"


ACCELERATOR = "cloud.google.com/gke-accelerator"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_pods_are_placed_on_gpu_nodes(overlay):
  for pod in pods(render(overlay)):
    container, = pod.spec["containers"]
    selector, tolerations = pod.spec.get("nodeSelector", {}), pod.spec.get("tolerations", [])
    if gpus(container):
      # Autopilot provisions by it; on a cluster with several GPU types it picks the one the job is sized for.
      assert selector.get(ACCELERATOR), f"{overlay}: {pod.where}: no {ACCELERATOR} nodeSelector"
      # GPU nodes outside GKE carry this taint without a controller adding the toleration.
      assert GPU_TOLERATION in tolerations, f"{overlay}: {pod.where}: no nvidia.com/gpu toleration"
    else:
      assert ACCELERATOR not in selector and GPU_TOLERATION not in tolerations, f"{overlay}: {pod.where}: no GPU"


def test_the_gpu_type_is_set_in_one_place():
  files = [path.relative_to(ROOT) for path in K8S.rglob("*.yaml")
           if re.search(rf"^\s*{re.escape(ACCELERATOR)}:", path.read_text(), re.M)]
  assert len(files) == 1, f"the accelerator nodeSelector is written in {files or 'no file'}: one place to change"
  types = {pod.spec["nodeSelector"][ACCELERATOR] for overlay in OVERLAYS for pod in pods(render(overlay))
           if gpus(pod.spec["containers"][0])}
  assert len(types) == 1, types


def test_the_headless_service_selects_only_its_jobs_pods():
  # Every Indexed Job's pods carry the same app labels: those would also select another job's pods.
  docs = render("indexed-job")
  job, = find(docs, "Job")
  service, = find(docs, "Service")
  assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_get_no_kubernetes_api_token(overlay):
  # The trainer never calls the Kubernetes API; Workload Identity does not need the token.
  for pod in pods(render(overlay)):
    assert pod.spec.get("automountServiceAccountToken") is False, f"{overlay}: {pod.where}"


def test_the_readmes_sed_line_fills_in_every_placeholder(tmp_path):
  # Every file that names the project or the bucket, e.g. the cronjob's retrain.flags (--serving_dir).
  line, = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
           if line.strip().startswith("sed -i") and "PROJECT_ID" in line]
  shutil.copytree(K8S, tmp_path / "k8s")
  done = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, f"README: {line}: {done.stderr}"
  left = [f"{path.relative_to(tmp_path)}: {word}" for path in sorted((tmp_path / "k8s").rglob("*")) if path.is_file()
          for word in ("PROJECT_ID", "BUCKET") if word in path.read_text()]
  assert not left, f"README: {line} leaves {left}"


# --- no secrets ----------------------------------------------------------------------------------

CREDENTIALS = re.compile("|".join([
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"GOOGLE_APPLICATION_CREDENTIALS",  # a key file: use Workload Identity instead
    r"\"private_key(_id)?\"\s*:", r"\"type\"\s*:\s*\"service_account\"",  # a service account key's JSON
    r"\bAKIA[0-9A-Z]{16}\b", r"(?i:aws_secret_access_key)",  # AWS access keys
    r"\bAIza[0-9A-Za-z_-]{35}\b",  # a Google API key
    r"(?i:\b(password|passwd|secret_?key|api_?key|access_?token)\b\s*[:=]\s*\S)",
]))


def _checked_files():
  """Everything that goes into a manifest or the image: k8s/ and the Docker build files."""
  return sorted(path for path in K8S.rglob("*") if path.is_file()) + [ROOT / "Dockerfile", ROOT / ".dockerignore"]


@pytest.mark.parametrize("sample", [
    "-----BEGIN RSA PRIVATE KEY-----", "- name: GOOGLE_APPLICATION_CREDENTIALS", '{"type": "service_account"',
    "AKIAIOSFODNN7EXAMPLE", "password: hunter2", "AIza" + "x" * 35])
def test_credential_check_catches(sample):
  assert CREDENTIALS.search(sample)


def test_no_secrets_or_credentials_in_files():
  for path in _checked_files():
    text = path.read_text(errors="replace")
    found = CREDENTIALS.search(text)
    assert not found, f"{path.relative_to(ROOT)}: {found.group(0)!r} looks like a credential; use Workload Identity"
    assert not re.search(r"^\s*kind:\s*Secret\b|secretGenerator", text, re.M), \
        f"{path.relative_to(ROOT)}: a Secret; the trainer needs none (Workload Identity)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secrets_in_rendered_manifests(overlay):
  docs = render(overlay)
  assert not find(docs, "Secret"), f"{overlay}: a Secret; the trainer needs none (Workload Identity)"
  text = json.dumps(docs)
  assert not CREDENTIALS.search(text), f"{overlay}: {CREDENTIALS.search(text).group(0)!r}"
  for key in ("secretKeyRef", "secretRef", '"secret"'):
    assert key not in text, f"{overlay}: a pod reads a Secret ({key})"
  accounts = {doc["metadata"]["name"]: doc for doc in find(docs, "ServiceAccount")}
  for pod in pods(docs):
    account = accounts.get(pod.spec.get("serviceAccountName"))
    assert account, f"{pod.where}: its service account is not in the overlay"
    assert re.fullmatch(r"[a-z0-9-]+@[A-Za-z0-9_-]+\.iam\.gserviceaccount\.com",
                        account["metadata"].get("annotations", {}).get("iam.gke.io/gcp-service-account", "")), \
        f"{pod.where}: its service account has no Workload Identity annotation"


# --- the image -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Dockerfile:
  base: str
  user: str
  entrypoint: list
  env: dict
  copied: list  # COPY sources
  instructions: list  # (KEYWORD, the rest), in order

  @classmethod
  def read(cls):
    text = (ROOT / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    instructions = [line.strip().split(None, 1) for line in lines.splitlines() if line.strip()]
    found = {"FROM": [], "USER": [], "ENTRYPOINT": [], "ENV": [], "COPY": []}
    for keyword, rest in instructions:
      found.setdefault(keyword.upper(), []).append(rest)
    env = {}
    for rest in found["ENV"]:
      env.update(word.split("=", 1) for word in shlex.split(rest))
    copied = [source for rest in found["COPY"] for source in shlex.split(rest)[:-1] if not source.startswith("--")]
    return cls(base=found["FROM"][-1], user=found["USER"][-1], entrypoint=json.loads(found["ENTRYPOINT"][-1]),
               env=env, copied=copied, instructions=[(keyword.upper(), rest) for keyword, rest in instructions])


def test_dockerfile_builds_on_the_tensorflow_gpu_image_setup_py_pins():
  dockerfile = Dockerfile.read()
  image = re.fullmatch(r"tensorflow/tensorflow:(\d+)\.(\d+)\.(\d+)-gpu(@sha256:[0-9a-f]{64})?", dockerfile.base)
  assert image, f"FROM {dockerfile.base}: expected a pinned tensorflow/tensorflow:X.Y.Z-gpu[@sha256:...]"
  pin = re.search(r"[\"']tensorflow==(\d+)\.(\d+)\.\*[\"']", (ROOT / "setup.py").read_text())
  assert pin, "setup.py does not pin tensorflow==X.Y.*"
  assert image.groups()[:2] == pin.groups(), \
      f"FROM {dockerfile.base}, but setup.py pins tensorflow=={'.'.join(pin.groups())}.*"


def test_dockerfile_runs_the_trainer_as_a_numeric_non_root_user():
  dockerfile = Dockerfile.read()
  assert re.fullmatch(r"[0-9]+(:[0-9]+)?", dockerfile.user), f"USER {dockerfile.user}: Kubernetes can only check " \
                                                              "runAsNonRoot against a numeric user"
  assert int(dockerfile.user.split(":")[0]) != 0
  assert dockerfile.entrypoint == ["python", "-m", "trainer.task"]


def test_dockerfile_installs_the_dependencies_before_copying_the_code():
  # A layer that installs TensorFlow's dependencies must not depend on trainer/: a code change would
  # reinstall them all.
  instructions = Dockerfile.read().instructions
  code = next(i for i, (keyword, rest) in enumerate(instructions)
              if keyword == "COPY" and "trainer/" in shlex.split(rest)[:-1])
  installs = [(i, rest) for i, (keyword, rest) in enumerate(instructions) if keyword == "RUN" and "pip install" in rest]
  assert any(i < code and "--no-deps" not in rest for i, rest in installs), \
      "no pip install of the dependencies before COPY trainer/"
  assert all("--no-deps" in rest for i, rest in installs if i > code), "a pip install after COPY trainer/ resolves " \
                                                                       "dependencies again: give it --no-deps"


def _dockerignored(path, patterns):
  """Docker's .dockerignore rule: the last pattern matching the path or a folder above it decides."""
  parts = path.split("/")
  ignored = False
  for pattern in patterns:
    negate = pattern.startswith("!")
    pattern = pattern.lstrip("!").strip("/")
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*") \
        .replace(r"\?", "[^/]")
    if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
      ignored = not negate
  return ignored


def test_dockerignore_keeps_the_context_to_what_the_image_needs():
  patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
  for path in ("tests/test_k8s.py", "runs/lstm-1/report.json", ".git/config", "k8s/base/trainer.flags",
               "trainer/__pycache__/task.cpython-311.pyc"):
    assert _dockerignored(path, patterns), f".dockerignore lets {path} into the build context"
  for source in Dockerfile.read().copied:
    assert not _dockerignored(source.rstrip("/") + ("/task.py" if source.endswith("/") else ""), patterns), \
        f"the Dockerfile copies {source}, which .dockerignore leaves out"
