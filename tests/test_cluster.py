"""trainer.cluster: TF_CONFIG as Kubeflow and Vertex AI write it, Indexed Jobs, and every mistake as one line.

Each test passes its own environ dict: os.environ is never read or changed.
"""

import json
import subprocess
import sys

import pytest

from trainer import cluster as cluster_lib
from trainer.errors import UserError

KUBEFLOW_WORKERS = ["mnist-worker-0.default.svc:2222", "mnist-worker-1.default.svc:2222",
                    "mnist-worker-2.default.svc:2222"]
KUBEFLOW_CHIEF = ["mnist-chief-0.default.svc:2222"]
# The shape Vertex AI custom training writes: pool 0 is the chief, and it adds keys of its own.
VERTEX = {
    "cluster": {"chief": ["cmle-training-workerpool0-1a2b3c4d5e-0:2222"],
                "worker": ["cmle-training-workerpool1-1a2b3c4d5e-0:2222",
                           "cmle-training-workerpool1-1a2b3c4d5e-1:2222"]},
    "environment": "cloud",
    "task": {"type": "chief", "index": 0},
    "job": json.dumps({"python_module": "trainer.task", "package_uris": ["gs://bucket/trainer.tar.gz"]}),
}


def tf_config(cluster, task_type="worker", index=0, **extra):
  return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}, **extra})}


def resolve_error(environ, *args):
  with pytest.raises(UserError) as caught:
    cluster_lib.resolve(environ, *args)
  message = str(caught.value)
  assert "\n" not in message
  return message


# --- TF_CONFIG --------------------------------------------------------------------------------------

def test_kubeflow_worker():
  cluster = cluster_lib.resolve(tf_config({"worker": KUBEFLOW_WORKERS}, "worker", 2))
  assert (cluster.spec, cluster.task_type, cluster.task_index, cluster.source) == (
      {"worker": KUBEFLOW_WORKERS}, "worker", 2, "TF_CONFIG")
  assert cluster.num_workers == 3
  assert not cluster.is_chief


def test_kubeflow_chief_and_workers():
  spec = {"chief": KUBEFLOW_CHIEF, "worker": KUBEFLOW_WORKERS}
  chief = cluster_lib.resolve(tf_config(spec, "chief", 0))
  worker0 = cluster_lib.resolve(tf_config(spec, "worker", 0))
  assert chief.num_workers == worker0.num_workers == 4
  assert chief.is_chief
  assert not worker0.is_chief  # with a chief, worker 0 is an ordinary worker


def test_vertex_ai_chief_first_and_extra_keys_ignored():
  chief = cluster_lib.resolve({"TF_CONFIG": json.dumps(VERTEX)})
  assert (chief.task_type, chief.task_index, chief.num_workers, chief.is_chief) == ("chief", 0, 3, True)
  assert chief.spec == VERTEX["cluster"]
  worker = cluster_lib.resolve({"TF_CONFIG": json.dumps({**VERTEX, "task": {"type": "worker", "index": 1,
                                                                            "trial": ""}})})
  assert (worker.task_type, worker.task_index, worker.is_chief) == ("worker", 1, False)


@pytest.mark.parametrize("task_type, index, is_chief", [("worker", 0, True), ("worker", 1, False)])
def test_worker_zero_is_chief_without_a_chief(task_type, index, is_chief):
  assert cluster_lib.resolve(tf_config({"worker": KUBEFLOW_WORKERS}, task_type, index)).is_chief is is_chief


def test_single_task_tf_config():
  cluster = cluster_lib.resolve(tf_config({"chief": ["localhost:2222"]}, "chief", 0))
  assert (cluster.num_workers, cluster.is_chief, cluster.source) == (1, True, "TF_CONFIG")
  assert cluster.tf_config is not None


@pytest.mark.parametrize("config", [
    {"cluster": {"worker": KUBEFLOW_WORKERS}, "task": {"type": "worker", "index": 1}},
    {"cluster": {"chief": KUBEFLOW_CHIEF, "worker": KUBEFLOW_WORKERS}, "task": {"type": "chief", "index": 0}},
    VERTEX,
])
def test_tf_config_round_trip(config):
  produced = cluster_lib.resolve({"TF_CONFIG": json.dumps(config)}).tf_config
  assert json.loads(json.dumps(produced)) == {"cluster": config["cluster"], "task": config["task"]}
  # A copy: changing it cannot change the frozen Cluster.
  produced["cluster"]["worker"].append("x:1")
  assert cluster_lib.resolve({"TF_CONFIG": json.dumps(config)}).tf_config["cluster"] == config["cluster"]


def test_ipv4_ipv6_and_blank_tf_config():
  cluster = cluster_lib.resolve(tf_config({"worker": ["127.0.0.1:2222", "[::1]:2223"]}, "worker", 1))
  assert cluster.num_workers == 2
  assert cluster_lib.resolve({"TF_CONFIG": "  "}).source == "none"


@pytest.mark.parametrize("text, expected", [
    ("{cluster: {}}", ["TF_CONFIG is not valid JSON", "{cluster"]),
    ('{"cluster": ' + '"x" ' * 80, ["TF_CONFIG is not valid JSON", "..."]),
    ("[1, 2]", ["TF_CONFIG must be a JSON object", "[1, 2]"]),
    (json.dumps({"task": {"type": "worker", "index": 0}}), ["TF_CONFIG needs a non-empty \"cluster\"", "None"]),
    (json.dumps({"cluster": {}, "task": {}}), ["TF_CONFIG needs a non-empty \"cluster\"", "{}"]),
    (json.dumps({"cluster": ["a:1"], "task": {}}), ["TF_CONFIG needs a non-empty \"cluster\"", "['a:1']"]),
    (json.dumps({"cluster": {"worker": "a:1"}}), ["TF_CONFIG cluster['worker'] must be a non-empty list", "'a:1'"]),
    (json.dumps({"cluster": {"worker": []}}), ["TF_CONFIG cluster['worker'] must be a non-empty list", "[]"]),
    (json.dumps({"cluster": {"worker": {"0": "a:1"}}}), ["TF_CONFIG cluster['worker'] must be a non-empty list"]),
    (json.dumps({"cluster": {"worker": ["a:1", "b"]}}), ["TF_CONFIG cluster['worker'][1] is 'b'", "host:port"]),
    (json.dumps({"cluster": {"worker": ["a:http"]}}), ["TF_CONFIG cluster['worker'][0] is 'a:http'"]),
    (json.dumps({"cluster": {"worker": ["a:0"]}}), ["TF_CONFIG cluster['worker'][0] is 'a:0'", "1-65535"]),
    (json.dumps({"cluster": {"worker": ["a:65536"]}}), ["TF_CONFIG cluster['worker'][0] is 'a:65536'"]),
    (json.dumps({"cluster": {"worker": [":2222"]}}), ["TF_CONFIG cluster['worker'][0] is ':2222'"]),
    (json.dumps({"cluster": {"worker": [2222]}}), ["TF_CONFIG cluster['worker'][0] is 2222"]),
    (json.dumps({"cluster": {"worker": ["a:1"]}}), ["TF_CONFIG needs a \"task\" object", "None"]),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": "worker"}), ["TF_CONFIG needs a \"task\"", "'worker'"]),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"index": 0}}), ["TF_CONFIG task needs a \"type\""]),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}),
     ["TF_CONFIG task type 'chief' is not in the cluster", "['worker']"]),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"}}),
     ["TF_CONFIG task index must be an integer", "None"]),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}),
     ["TF_CONFIG task index must be an integer", "'0'"]),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": True}}),
     ["TF_CONFIG task index must be an integer", "True"]),
    (json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}),
     ["TF_CONFIG task index 2 is outside cluster['worker']", "0-1"]),
    (json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": -1}}),
     ["TF_CONFIG task index -1 is outside cluster['worker']"]),
    (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, "task": {"type": "worker", "index": 0}}),
     ["TF_CONFIG's cluster has task type 'ps'", "MultiWorkerMirroredStrategy, which has no parameter servers"]),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}),
     ["TF_CONFIG task type is 'ps'", "MultiWorkerMirroredStrategy, which has no parameter servers"]),
    (json.dumps({"cluster": {"worker": ["a:1"], "evaluator": ["e:1"]}, "task": {"type": "worker", "index": 0}}),
     ["TF_CONFIG's cluster has task type 'evaluator'", "not supported"]),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}),
     ["TF_CONFIG task type is 'evaluator'", "not supported"]),
    (json.dumps({"cluster": {"master": ["m:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}),
     ["TF_CONFIG's cluster has task type 'master'", "only 'chief' and 'worker'"]),
    (json.dumps({"cluster": {"chief": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 0}}),
     ["TF_CONFIG cluster['chief'] lists 2 tasks", "at most one chief"]),
    (json.dumps({"cluster": {"chief": ["a:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}),
     ["TF_CONFIG gives 'a:1' to both chief 0 and worker 0"]),
])
def test_tf_config_errors(text, expected):
  message = resolve_error({"TF_CONFIG": text})
  assert len(message) < 250, message
  for part in expected:
    assert part in message, message


def test_tf_config_wins_over_indexed_job():
  environ = {**tf_config({"worker": ["a:1", "b:1"]}, "worker", 1), "JOB_COMPLETION_INDEX": "0"}
  cluster = cluster_lib.resolve(environ, "train-{index}.svc:2222", 4)
  assert (cluster.source, cluster.task_index, cluster.num_workers) == ("TF_CONFIG", 1, 2)


# --- Kubernetes Indexed Job -------------------------------------------------------------------------

PATTERN = "train-{index}.train-workers:2222"
WORKERS = ["train-0.train-workers:2222", "train-1.train-workers:2222", "train-2.train-workers:2222"]


def test_indexed_job_from_arguments():
  cluster = cluster_lib.resolve({"JOB_COMPLETION_INDEX": "1"}, PATTERN, 3)
  assert (cluster.spec, cluster.task_type, cluster.task_index, cluster.source) == (
      {"worker": WORKERS}, "worker", 1, "indexed job")
  assert (cluster.num_workers, cluster.is_chief) == (3, False)
  assert cluster.tf_config == {"cluster": {"worker": WORKERS}, "task": {"type": "worker", "index": 1}}
  assert cluster_lib.resolve({"JOB_COMPLETION_INDEX": "0"}, PATTERN, 3).is_chief


def test_indexed_job_from_environment():
  environ = {"JOB_COMPLETION_INDEX": "2", "TRAINER_INDEXED_JOB_HOSTS": PATTERN, "TRAINER_NUM_WORKERS": "3"}
  cluster = cluster_lib.resolve(environ)
  assert (cluster.spec, cluster.task_index, cluster.source) == ({"worker": WORKERS}, 2, "indexed job")


def test_arguments_override_environment():
  environ = {"JOB_COMPLETION_INDEX": "0", "TRAINER_INDEXED_JOB_HOSTS": "other-{index}:1", "TRAINER_NUM_WORKERS": "9"}
  assert cluster_lib.resolve(environ, PATTERN, 3).spec == {"worker": WORKERS}
  # "" and None are "not given", as absl leaves an unset flag.
  assert cluster_lib.resolve(environ, "", None).num_workers == 9


@pytest.mark.parametrize("environ, args, expected", [
    ({"JOB_COMPLETION_INDEX": "x"}, (PATTERN, 3), ["JOB_COMPLETION_INDEX='x' is not an integer"]),
    ({"JOB_COMPLETION_INDEX": "-1"}, (PATTERN, 3), ["JOB_COMPLETION_INDEX='-1' is not an integer"]),
    ({"JOB_COMPLETION_INDEX": "3"}, (PATTERN, 3), ["JOB_COMPLETION_INDEX=3 is outside 0-2 for --num_workers=3"]),
    ({"JOB_COMPLETION_INDEX": "3", "TRAINER_NUM_WORKERS": "3"}, (PATTERN,),
     ["JOB_COMPLETION_INDEX=3 is outside 0-2 for TRAINER_NUM_WORKERS=3"]),
    ({"JOB_COMPLETION_INDEX": "0"}, ("train-0.train-workers:2222", 3), ["--indexed_job_hosts=", "has no {index}"]),
    ({"JOB_COMPLETION_INDEX": "0", "TRAINER_INDEXED_JOB_HOSTS": "train:2222"}, (None, 3),
     ["TRAINER_INDEXED_JOB_HOSTS='train:2222' has no {index}"]),
    ({"JOB_COMPLETION_INDEX": "0"}, ("train-{index}.svc", 2), ["--indexed_job_hosts=", "is 'train-0.svc', not a"]),
    ({"JOB_COMPLETION_INDEX": "0"}, ("train-{index}-{job}:1", 2), ["--indexed_job_hosts=", "only field"]),
    ({"JOB_COMPLETION_INDEX": "0"}, (PATTERN, 0), ["--num_workers must be at least 1 (got 0)"]),
    ({"JOB_COMPLETION_INDEX": "0", "TRAINER_NUM_WORKERS": "0"}, (PATTERN,),
     ["TRAINER_NUM_WORKERS must be at least 1 (got 0)"]),
    ({"JOB_COMPLETION_INDEX": "0", "TRAINER_NUM_WORKERS": "two"}, (PATTERN,),
     ["TRAINER_NUM_WORKERS='two' is not an integer"]),
    ({}, (PATTERN, 3), ["--indexed_job_hosts and --num_workers are set, but JOB_COMPLETION_INDEX is not",
                        "does not look like part of a Kubernetes Indexed Job"]),
    ({"TRAINER_NUM_WORKERS": "2"}, (), ["TRAINER_NUM_WORKERS is set, but JOB_COMPLETION_INDEX is not",
                                       "does not look like part of a Kubernetes Indexed Job"]),
    ({"JOB_COMPLETION_INDEX": "0"}, (None, 3), ["--num_workers needs --indexed_job_hosts"]),
    ({"JOB_COMPLETION_INDEX": "0"}, (PATTERN,), ["--indexed_job_hosts needs --num_workers"]),
])
def test_indexed_job_errors(environ, args, expected):
  message = resolve_error(environ, *args)
  for part in expected:
    assert part in message, message


# --- Alone ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("environ", [{}, {"TF_CONFIG": ""}, {"JOB_COMPLETION_INDEX": "0"}])
def test_alone(environ):
  cluster = cluster_lib.resolve(environ)
  assert (cluster.spec, cluster.task_type, cluster.task_index, cluster.source) == ({}, "worker", 0, "none")
  assert (cluster.num_workers, cluster.is_chief, cluster.tf_config) == (1, True, None)


@pytest.mark.parametrize("index", ["1", "2", "x"])
def test_indexed_job_pod_other_than_0_without_a_cluster_is_refused(index):
  # Pods 1..N-1 of an Indexed Job that misses its hosts and count would each train alone as chief,
  # in the same job folder, deleting each other's checkpoints and exports.
  message = resolve_error({"JOB_COMPLETION_INDEX": index})
  assert message.startswith(f"JOB_COMPLETION_INDEX={index}"), message
  for part in ("--indexed_job_hosts", "--num_workers", "TRAINER_INDEXED_JOB_HOSTS", "TRAINER_NUM_WORKERS"):
    assert part in message, message


def test_import_does_not_start_tensorflow():
  done = subprocess.run([sys.executable, "-c", "import trainer.cluster, sys; print('tensorflow' in sys.modules)"],
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "False"


# --- JobSet -----------------------------------------------------------------------------------------
# k8s/overlays/jobset: JobSet "trainer-jobset" with replicatedJobs chief (1 pod) and worker (an Indexed
# Job of N-1 pods), replicas 1 each; JobSet's default network names each pod
# <jobset>-<replicatedJob>-<job index>-<pod index>.<jobset>.

JOBSET_CHIEF = ["trainer-jobset-chief-0-0.trainer-jobset:2222"]
JOBSET_WORKERS = ["trainer-jobset-worker-0-0.trainer-jobset:2222", "trainer-jobset-worker-0-1.trainer-jobset:2222"]


def jobset_pod(replicated_job, index, workers="3", **changes):
  """The environment of a JobSet pod as k8s/overlays/jobset sets it (the downward API from JobSet's labels)."""
  environ = {"JOBSET_NAME": "trainer-jobset", "REPLICATED_JOB_NAME": replicated_job, "JOB_INDEX": "0",
             "JOB_COMPLETION_INDEX": str(index), "TRAINER_NUM_WORKERS": workers}
  environ.update(changes)
  return {name: value for name, value in environ.items() if value is not None}


@pytest.mark.parametrize("replicated_job, index, is_chief", [("chief", 0, True), ("worker", 0, False),
                                                             ("worker", 1, False)])
def test_jobset_pods(replicated_job, index, is_chief):
  cluster = cluster_lib.resolve(jobset_pod(replicated_job, index))
  assert (cluster.spec, cluster.task_type, cluster.task_index, cluster.source) == (
      {"chief": JOBSET_CHIEF, "worker": JOBSET_WORKERS}, replicated_job, index, "jobset")
  assert (cluster.num_workers, cluster.is_chief) == (3, is_chief)


def test_jobset_of_a_chief_alone_and_the_flag_over_the_environment():
  cluster = cluster_lib.resolve(jobset_pod("chief", 0, workers="1"))
  assert (cluster.spec, cluster.num_workers, cluster.is_chief) == ({"chief": JOBSET_CHIEF}, 1, True)
  assert cluster_lib.resolve(jobset_pod("worker", 1, workers="9"), None, 3).spec["worker"] == JOBSET_WORKERS


def test_tf_config_wins_over_jobset():
  environ = {**jobset_pod("worker", 1), **tf_config({"worker": ["a:1", "b:1"]}, "worker", 0)}
  assert cluster_lib.resolve(environ).source == "TF_CONFIG"


@pytest.mark.parametrize("changes, args, expected", [
    ({"JOBSET_NAME": None}, (), ["JOBSET_NAME is not set", "jobset.sigs.k8s.io/jobset-name"]),
    ({"REPLICATED_JOB_NAME": None}, (), ["REPLICATED_JOB_NAME is not set", "jobset.sigs.k8s.io/replicatedjob-name"]),
    ({"JOB_INDEX": None}, (), ["JOB_INDEX is not set", "jobset.sigs.k8s.io/job-index"]),
    ({"JOB_COMPLETION_INDEX": None}, (), ["JOB_COMPLETION_INDEX is not set", "completionMode: Indexed"]),
    ({"TRAINER_NUM_WORKERS": None}, (), ["TRAINER_NUM_WORKERS", "--num_workers", "chief included"]),
    ({"TRAINER_NUM_WORKERS": "two"}, (), ["TRAINER_NUM_WORKERS='two' is not an integer"]),
    ({"TRAINER_NUM_WORKERS": "0"}, (), ["TRAINER_NUM_WORKERS must be at least 1 (got 0)"]),
    ({"REPLICATED_JOB_NAME": "ps"}, (), ["REPLICATED_JOB_NAME='ps'", "'chief' and 'worker'"]),
    ({"REPLICATED_JOB_NAME": "workers"}, (), ["REPLICATED_JOB_NAME='workers'", "'chief' and 'worker'"]),
    ({"JOB_INDEX": "1"}, (), ["JOB_INDEX='1' is not 0", "replicas: 1"]),
    ({"JOB_INDEX": "x"}, (), ["JOB_INDEX='x'", "replicas: 1"]),
    ({"JOB_COMPLETION_INDEX": "x"}, (), ["JOB_COMPLETION_INDEX='x' is not an integer"]),
    ({"JOB_COMPLETION_INDEX": "2"}, (), ["JOB_COMPLETION_INDEX=2 is outside 0-1", "worker", "TRAINER_NUM_WORKERS=3",
                                         "chief included"]),
    ({"REPLICATED_JOB_NAME": "chief", "JOB_COMPLETION_INDEX": "1"}, (), ["JOB_COMPLETION_INDEX=1", "chief",
                                                                         "one pod"]),
    ({"TRAINER_NUM_WORKERS": "1", "JOB_COMPLETION_INDEX": "0"}, (), ["TRAINER_NUM_WORKERS=1 counts the chief alone",
                                                                     "a worker pod"]),
    ({"JOBSET_NAME": "trainer jobset"}, (), ["JOBSET_NAME='trainer jobset'", "host:port"]),
    ({}, ("train-{index}.svc:2222",), ["--indexed_job_hosts is for an Indexed Job", "unset it"]),
    ({"TRAINER_INDEXED_JOB_HOSTS": "train-{index}.svc:2222"}, (), ["TRAINER_INDEXED_JOB_HOSTS is for an Indexed Job"]),
])
def test_jobset_errors(changes, args, expected):
  message = resolve_error(jobset_pod("worker", 1, **changes), *args)
  assert len(message) < 300, message
  for part in expected:
    assert part in message, message
