"""Which cluster this trainer process belongs to, and its place in it, from the environment.

Three sources, tried in this order:

1. `TF_CONFIG`, as the Kubeflow training operator (TFJob) and Vertex AI custom training write it:
   `{"cluster": {"chief": [...], "worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}`.
   Vertex AI names its first worker pool "chief" (not worker 0) and adds keys of its own
   ("environment", "job"); keys this module does not know are ignored.
2. A plain Kubernetes Indexed Job (`completionMode: Indexed`), which has no TF_CONFIG. Kubernetes
   sets `JOB_COMPLETION_INDEX` in each pod and names the pod's host `<job name>-<index>`; with the
   pod template's `subdomain` set to a headless Service (`clusterIP: None`) that selects the Job's
   pods, every pod is reachable as `<job name>-<index>.<service name>`. So the addresses of all
   workers follow from a pattern such as `train-{index}.train-workers:2222` (`--indexed_job_hosts`
   or env TRAINER_INDEXED_JOB_HOSTS) and their number (`--num_workers` or env TRAINER_NUM_WORKERS,
   equal to the Job's `completions` and `parallelism`: every worker must run at once). Setting
   `publishNotReadyAddresses: true` on the Service lets a name resolve as soon as its pod exists.
   An Indexed Job without pattern and count is a one-pod job: its process (index 0) trains alone;
   any other index is refused, as it would be a second chief.
3. A JobSet (kubernetes-sigs/jobset) of two replicatedJobs, `chief` (one pod) and `worker` (an
   Indexed Job of N-1 pods), one replica each, as k8s/overlays/jobset makes it. JobSet's webhook
   makes every child Job Indexed and, with its default network (enableDNSHostnames, subdomain the
   JobSet's name), every pod is reachable as `<jobset>-<replicatedJob>-<job index>-<pod index>.<jobset>`
   (pkg/webhooks/jobset_webhook.go and pkg/util/placement in kubernetes-sigs/jobset v0.12.0). The
   pod's env carries JobSet's labels through the downward API (JOBSET_NAME, REPLICATED_JOB_NAME,
   JOB_INDEX); with JOB_COMPLETION_INDEX and the number of tasks, chief included (`--num_workers`
   or TRAINER_NUM_WORKERS), that is the whole cluster, on port 2222.
4. None of these: the process trains alone.

Pure Python on purpose: it runs before TensorFlow starts any server, so a wrong environment
fails here within a second with one line naming what to fix, instead of a worker waiting forever
for peers that will never come.
"""

import dataclasses
import json
import os
import re
from typing import Mapping, Optional

from trainer.errors import UserError

# Task types MultiWorkerMirroredStrategy trains with; anything else in TF_CONFIG is refused.
TASK_TYPES = ("chief", "worker")
# Why the task types other launchers know are refused, in the words a user can act on.
UNSUPPORTED_TASK_TYPES = {
    "ps": "this trainer uses MultiWorkerMirroredStrategy, which has no parameter servers; remove the PS "
          "replicas or worker pool",
    "evaluator": "a separate evaluator task is not supported; remove the Evaluator replica or worker pool",
}
# The JobSet pod's environment (k8s/overlays/jobset), each from the pod label of the same meaning.
JOBSET_VARIABLES = {"JOBSET_NAME": "jobset.sigs.k8s.io/jobset-name",
                    "REPLICATED_JOB_NAME": "jobset.sigs.k8s.io/replicatedjob-name",
                    "JOB_INDEX": "jobset.sigs.k8s.io/job-index"}
# The trainer container's port in every overlay (the containerPort named grpc).
PORT = 2222
# host:port, the host a DNS name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})", re.ASCII)


@dataclasses.dataclass(frozen=True)
class Cluster:
  # {"chief": ["host:port"], "worker": [...]}, as TF_CONFIG's "cluster"; {} when alone.
  spec: dict
  # "chief" or "worker" ("worker" when alone).
  task_type: str
  task_index: int
  # Where the cluster came from, for messages: "TF_CONFIG", "indexed job", "jobset" or "none".
  source: str

  @property
  def num_workers(self) -> int:
    """Training tasks (chief and workers); 1 when alone."""
    return len(self.spec.get("chief", ())) + len(self.spec.get("worker", ())) or 1

  @property
  def is_chief(self) -> bool:
    """The task that writes the real checkpoints and exports: the chief, or worker 0 without one."""
    if self.task_type == "chief":
      return True
    return self.task_type == "worker" and self.task_index == 0 and "chief" not in self.spec

  @property
  def tf_config(self) -> Optional[dict]:
    """The TF_CONFIG MultiWorkerMirroredStrategy reads (a fresh copy); None when alone."""
    if not self.spec:
      return None
    return {"cluster": {name: list(addresses) for name, addresses in self.spec.items()},
            "task": {"type": self.task_type, "index": self.task_index}}


def alone() -> Cluster:
  """A process that trains by itself: no cluster, no TF_CONFIG for TensorFlow."""
  return Cluster(spec={}, task_type="worker", task_index=0, source="none")


def resolve(environ: Optional[Mapping[str, str]] = None, indexed_job_hosts: Optional[str] = None,
            num_workers: Optional[int] = None) -> Cluster:
  """This process's cluster from TF_CONFIG, else an Indexed Job, else alone (see the module docstring).

  `indexed_job_hosts` and `num_workers` are the flags of the same names; None (or "") falls back
  to env TRAINER_INDEXED_JOB_HOSTS / TRAINER_NUM_WORKERS. `environ` defaults to os.environ.
  Raises UserError, one line, for an environment that cannot form a cluster.
  """
  environ = os.environ if environ is None else environ
  text = environ.get("TF_CONFIG", "")
  if text.strip():
    return _from_tf_config(text)
  if any(environ.get(name) for name in JOBSET_VARIABLES):
    return _from_jobset(environ, indexed_job_hosts, num_workers)
  return _from_indexed_job(environ, indexed_job_hosts, num_workers)


def _brief(value, limit=60) -> str:
  """A short one-line repr of an offending value: a whole TF_CONFIG would bury the message."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_address(address, where: str):
  match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
  if not match or not 1 <= int(match.group(1)) <= 65535:
    raise UserError(f"{where} is {_brief(address)}, not a \"host:port\" address (port 1-65535)")


# --- TF_CONFIG ------------------------------------------------------------------------------------

def _from_tf_config(text: str) -> Cluster:
  config = _parse_tf_config(text)
  spec = _check_cluster(config.get("cluster"))
  task_type, task_index = _check_task(config.get("task"), spec)
  return Cluster(spec=spec, task_type=task_type, task_index=task_index, source="TF_CONFIG")


def _parse_tf_config(text: str) -> dict:
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}): {_brief(text)}") from None
  if not isinstance(config, dict):
    raise UserError(f"TF_CONFIG must be a JSON object with \"cluster\" and \"task\", not {_brief(config)}")
  return config


def _check_cluster(cluster) -> dict:
  """TF_CONFIG's "cluster", validated and copied: only the task types this trainer runs."""
  if not isinstance(cluster, dict) or not cluster:
    raise UserError(f"TF_CONFIG needs a non-empty \"cluster\" object of task type -> [\"host:port\", ...] "
                    f"(got {_brief(cluster)})")
  for task_type in cluster:
    _check_task_type(task_type, f"TF_CONFIG's cluster has task type {task_type!r}")
  spec = {}
  for task_type, addresses in cluster.items():
    if not isinstance(addresses, list) or not addresses:
      raise UserError(f"TF_CONFIG cluster[{task_type!r}] must be a non-empty list of \"host:port\" "
                      f"(got {_brief(addresses)})")
    for i, address in enumerate(addresses):
      _check_address(address, f"TF_CONFIG cluster[{task_type!r}][{i}]")
    spec[task_type] = list(addresses)
  if len(spec.get("chief", ())) > 1:
    raise UserError(f"TF_CONFIG cluster['chief'] lists {len(spec['chief'])} tasks; a cluster has at most one chief")
  _check_unique(spec, "TF_CONFIG")
  return spec


def _check_task_type(task_type, what: str):
  if task_type in UNSUPPORTED_TASK_TYPES:
    raise UserError(f"{what}: {UNSUPPORTED_TASK_TYPES[task_type]}")
  if task_type not in TASK_TYPES:
    raise UserError(f"{what}: this trainer runs only 'chief' and 'worker' tasks "
                    "(in a TFJob, name the replicas Chief and Worker)")


def _check_unique(spec: dict, source: str):
  # Two tasks on one address: the second server cannot start, or the peers wait for a task
  # that never answers.
  seen = {}
  for task_type, addresses in spec.items():
    for i, address in enumerate(addresses):
      if address in seen:
        raise UserError(f"{source} gives {address!r} to both {seen[address]} and {task_type} {i}; "
                        "every task needs its own host:port")
      seen[address] = f"{task_type} {i}"


def _check_task(task, spec: dict):
  """TF_CONFIG's "task" as (type, index), checked against the cluster."""
  if not isinstance(task, dict):
    raise UserError(f"TF_CONFIG needs a \"task\" object such as {{\"type\": \"worker\", \"index\": 0}} "
                    f"(got {_brief(task)})")
  task_type, index = task.get("type"), task.get("index")
  if not isinstance(task_type, str) or not task_type:
    raise UserError(f"TF_CONFIG task needs a \"type\", one of {sorted(spec)} (got {_brief(task)})")
  if task_type not in spec:
    _check_task_type(task_type, f"TF_CONFIG task type is {task_type!r}")
    raise UserError(f"TF_CONFIG task type {task_type!r} is not in the cluster, which has {sorted(spec)}")
  # bool is an int to Python, but `"index": true` is a mistake, not task 1.
  if not isinstance(index, int) or isinstance(index, bool):
    raise UserError(f"TF_CONFIG task index must be an integer (got {_brief(index)})")
  if not 0 <= index < len(spec[task_type]):
    raise UserError(f"TF_CONFIG task index {index} is outside cluster[{task_type!r}], which has "
                    f"{len(spec[task_type])} task(s): 0-{len(spec[task_type]) - 1}")
  return task_type, index


# --- Kubernetes Indexed Job -----------------------------------------------------------------------

def _from_indexed_job(environ: Mapping[str, str], hosts: Optional[str], count: Optional[int]) -> Cluster:
  hosts, hosts_name = _setting(hosts, environ, "--indexed_job_hosts", "TRAINER_INDEXED_JOB_HOSTS")
  count, count_name = _setting(count, environ, "--num_workers", "TRAINER_NUM_WORKERS")
  index = environ.get("JOB_COMPLETION_INDEX", "")
  if hosts is None and count is None:
    if index not in ("", "0"):
      # Pod 1 (2, ...) of an Indexed Job that misses its cluster would train alone as a chief and share
      # the job folder with pod 0, each deleting the others' checkpoints and exports.
      raise UserError(f"JOB_COMPLETION_INDEX={index} without a cluster: set --indexed_job_hosts and --num_workers "
                      "(or env TRAINER_INDEXED_JOB_HOSTS and TRAINER_NUM_WORKERS) on every pod, or run a one-pod Job")
    return alone()  # a one-pod Indexed Job: nothing to coordinate with
  given = " and ".join(name for name, value in ((hosts_name, hosts), (count_name, count)) if value is not None)
  if not index:
    verb, them = ("are", "them") if hosts is not None and count is not None else ("is", "it")
    raise UserError(f"{given} {verb} set, but JOB_COMPLETION_INDEX is not: this process does not look like part of a "
                    f"Kubernetes Indexed Job (completionMode: Indexed); unset {them} to train alone")
  if hosts is None:
    raise UserError(f"{count_name} needs --indexed_job_hosts (or env TRAINER_INDEXED_JOB_HOSTS), the workers' "
                    "host:port with {index}, e.g. train-{index}.train-workers:2222")
  if count is None:
    raise UserError(f"{hosts_name} needs --num_workers (or env TRAINER_NUM_WORKERS): the Job's completions")
  count = _check_count(count, count_name)
  addresses = _expand(hosts, hosts_name, count)
  if not re.fullmatch(r"[0-9]+", index, re.ASCII):
    raise UserError(f"JOB_COMPLETION_INDEX={index!r} is not an integer; Kubernetes sets it in Indexed Jobs: "
                    "do not set it by hand")
  if int(index) >= count:
    raise UserError(f"JOB_COMPLETION_INDEX={index} is outside 0-{count - 1} for {count_name}={count}; "
                    f"{count_name} must equal the Job's completions")
  return Cluster(spec={"worker": addresses}, task_type="worker", task_index=int(index), source="indexed job")


def _setting(value, environ: Mapping[str, str], flag: str, variable: str):
  """(value, name to show in errors): the flag's if given, else the environment variable's."""
  if value is not None and value != "":
    return value, flag
  text = environ.get(variable, "")
  return (text, variable) if text else (None, variable)


def _check_count(count, name: str) -> int:
  if isinstance(count, str):
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", count, re.ASCII):
      raise UserError(f"{name}={count!r} is not an integer; give the number of workers")
    count = int(count)
  if not isinstance(count, int) or isinstance(count, bool):
    raise UserError(f"{name}={_brief(count)} is not an integer; give the number of workers")
  if count < 1:
    raise UserError(f"{name} must be at least 1 (got {count})")
  return count


def _expand(pattern: str, name: str, count: int) -> list:
  """Every worker's host:port from the pattern; checked, so a typo fails here and not in a DNS lookup."""
  if "{index}" not in pattern:
    raise UserError(f"{name}={pattern!r} has no {{index}}; write the workers' address with it, "
                    "e.g. train-{index}.train-workers:2222")
  try:
    addresses = [pattern.format(index=i) for i in range(count)]
  except (KeyError, IndexError, ValueError) as e:
    raise UserError(f"{name}={pattern!r} is not a pattern with {{index}} as its only field ({e!r})") from None
  for i, address in enumerate(addresses):
    _check_address(address, f"{name}={pattern!r} for index {i}")
  _check_unique({"worker": addresses}, name)
  return addresses


# --- JobSet ---------------------------------------------------------------------------------------

def _from_jobset(environ: Mapping[str, str], hosts: Optional[str], count: Optional[int]) -> Cluster:
  for variable, label in JOBSET_VARIABLES.items():
    if not environ.get(variable):
      raise UserError(f"{variable} is not set in this JobSet pod: set it from the pod label {label} through the "
                      "downward API, as k8s/overlays/jobset does")
  jobset, role, job_index = (environ[variable] for variable in JOBSET_VARIABLES)
  hosts, hosts_name = _setting(hosts, environ, "--indexed_job_hosts", "TRAINER_INDEXED_JOB_HOSTS")
  if hosts is not None:
    raise UserError(f"{hosts_name} is for an Indexed Job; in a JobSet the trainer finds its peers from JOBSET_NAME: "
                    "unset it")
  if role not in TASK_TYPES:
    raise UserError(f"REPLICATED_JOB_NAME={role!r}: this trainer's JobSet has the replicatedJobs 'chief' and 'worker' "
                    "(k8s/overlays/jobset)")
  if job_index != "0":
    # Every replicatedJob is one Job (its pods are the tasks): a second replica would be a second chief.
    raise UserError(f"JOB_INDEX={job_index!r} is not 0: give each replicatedJob replicas: 1 and scale the worker "
                    "Job's completions and parallelism instead")
  count, count_name = _setting(count, environ, "--num_workers", "TRAINER_NUM_WORKERS")
  if count is None:
    raise UserError("a JobSet pod needs TRAINER_NUM_WORKERS (or --num_workers): the number of tasks, chief included")
  count = _check_count(count, count_name)
  index = environ.get("JOB_COMPLETION_INDEX", "")
  if not index:
    raise UserError(f"JOB_COMPLETION_INDEX is not set in this JobSet pod: its {role} Job must be completionMode: "
                    "Indexed (JobSet's default)")
  if not re.fullmatch(r"[0-9]+", index, re.ASCII):
    raise UserError(f"JOB_COMPLETION_INDEX={index!r} is not an integer; Kubernetes sets it in Indexed Jobs: "
                    "do not set it by hand")
  index = int(index)
  if role == "chief" and index:
    raise UserError(f"JOB_COMPLETION_INDEX={index} in the chief Job: it must be one pod (completions: 1)")
  if role == "worker" and count == 1:
    raise UserError(f"{count_name}=1 counts the chief alone, yet this is a worker pod: set it to all tasks, "
                    "chief included (1 + the worker Job's completions)")
  if role == "worker" and index >= count - 1:
    raise UserError(f"JOB_COMPLETION_INDEX={index} is outside 0-{count - 2}, the worker Job's pods for "
                    f"{count_name}={count} (all tasks, chief included)")
  pattern = f"{jobset}-{{role}}-0-{{index}}.{jobset}:{PORT}"
  spec = {"chief": [pattern.format(role="chief", index=0)]}
  if count > 1:
    spec["worker"] = [pattern.format(role="worker", index=i) for i in range(count - 1)]
  for task_type, addresses in spec.items():
    for i, address in enumerate(addresses):
      _check_address(address, f"JOBSET_NAME={jobset!r} gives {task_type} {i} the address")
  return Cluster(spec=spec, task_type=role, task_index=index, source="jobset")
