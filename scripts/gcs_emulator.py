"""gcp-storage-emulator on 127.0.0.1 in a subprocess, its objects on disk so that they outlive a
restart: what the tests (tests/conftest.py) and scripts/benchmark_checkpoints.py point
STORAGE_EMULATOR_HOST at, so that nothing reaches the real Cloud Storage."""

import itertools
import socket
import subprocess
import time
import urllib.request
import uuid


class GcsEmulator:
  """start() (returns itself) / stop(), client(), new_bucket()."""

  def __init__(self, data_dir, log_path):
    self.data_dir, self.log_path = str(data_dir), str(log_path)
    with socket.socket() as s:  # a free port; the restart binds the same one (SO_REUSEADDR)
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.host = f"http://127.0.0.1:{self.port}"
    self._process = None
    self._names = itertools.count()

  def start(self):
    """Starts it and waits until it answers; RuntimeError naming the log if it does not."""
    # --data-dir belongs to the main parser, before the subcommand; without it objects go to ./.
    command = ["gcp-storage-emulator", f"--data-dir={self.data_dir}", "start", "--host=127.0.0.1",
               f"--port={self.port}", "--quiet"]
    with open(self.log_path, "ab") as log:
      self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise RuntimeError(f"the storage emulator exited with {self._process.returncode}; see {self.log_path}")
      try:
        with direct.open(f"{self.host}/storage/v1/b", timeout=1):
          return self
      except OSError:
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"the storage emulator did not answer on {self.host} within 30 s; see {self.log_path}")

  def stop(self):
    if self._process is not None and self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    self._process = None

  def client(self):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    return storage.Client(project="emulator", credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": self.host})

  def new_bucket(self, name=None):
    """Creates an empty bucket (by default with a name nothing else uses); returns "gs://<name>"."""
    name = name or f"test-{next(self._names)}-{uuid.uuid4().hex[:8]}"
    self.client().create_bucket(name)
    return f"gs://{name}"
