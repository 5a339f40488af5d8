"""Python commands forked from a process that has already imported TensorFlow and Keras.

Importing them costs about 9 s of CPU here, and the suite starts a trainer over a hundred times. So
each pytest worker starts one server (`python tests/forked.py SOCKET`) that imports them once, and
forks a child for each command. The child is a real process: it runs its module or script as
`python` would (its own argv, environment, working directory, standard streams, signal handlers,
atexit and exit status), a test signals it by pid, and its exit status comes back as Popen gives it
(-N for a signal). Forking is safe because importing starts no TensorFlow runtime threads (the
server creates no tensor and no device). Modules that define absl flags (the entry points and
trainer.cli) are not imported ahead: a second definition of a flag is an error.

What still starts from scratch: commands that test startup itself (what is imported when, the
installed `trainer` script, the README's commands) and the workers that scripts/local_cluster.py
starts.
"""

import array
import atexit
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

PRELOAD = ("tensorflow", "keras", "google.cloud.storage", "trainer.train", "trainer.retraining", "trainer.inference",
           "trainer.data.timeseries", "trainer.data.tabular", "trainer.data.images")
# The trainer's functions that tf.function and tf.data trace, by the AutoGraph options they are traced
# with: the step functions themselves (user_requested) and what they call (converted on the way).
# Converting them costs 2-3 s of CPU in every trainer run (parsing and rewriting their source); AutoGraph
# caches a conversion by code object and options (tensorflow/python/autograph/pyct/transpiler.py,
# PyToPy.transform_function), so converting them once in the server spares every child. A name that no
# longer exists is skipped: the child then converts it itself, as a fresh process does.
AUTOGRAPH = {
    (True, True): ("trainer.steps:Steps._train", "trainer.steps:Steps._validate", "trainer.checkpoints:_HostCopy.copy"),
    (True, False): ("trainer.steps:Steps._train_step", "trainer.steps:Steps._validation_step",
                    "trainer.steps:Steps._gradients", "trainer.steps:_if_any", "trainer.steps:pixels",
                    "trainer.steps:_summed", "trainer.loop:squared_error", "trainer.loop:absolute_error",
                    "trainer.loop:hits", "trainer.loop:cross_entropy", "trainer.data.augment:_nearest",
                    "trainer.data.augment:transform_matrices", "trainer.data.augment:random_transforms",
                    "trainer.data.augment:apply_transforms", "trainer.data.images:resize",
                    "trainer.data.images:to_float"),
}


# The server ---------------------------------------------------------------------------------------------

def serve(path):
  for module in PRELOAD:
    __import__(module)
  # Finding the devices prints "failed call to cuInit" on a machine without a GPU; a fresh process does it
  # once, when it first needs TensorFlow, so do it here once too, or every child would print it first
  # thing, even where a fresh process exits before it imports TensorFlow. It starts no thread, and a
  # child can still split its CPU into logical devices (--cpu_devices).
  sys.modules["tensorflow"].config.list_physical_devices()
  convert_ahead()
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(path)
  listener.listen(64)
  wakeup_r, wakeup_w = os.pipe()
  os.set_blocking(wakeup_w, False)
  signal.set_wakeup_fd(wakeup_w)
  signal.signal(signal.SIGCHLD, lambda *_: None)
  children = {}  # pid -> the connection its status goes to
  selector = selectors.DefaultSelector()
  selector.register(listener, selectors.EVENT_READ)
  selector.register(wakeup_r, selectors.EVENT_READ)
  selector.register(sys.stdin, selectors.EVENT_READ)  # its end (the test process is gone) ends the server
  print("ready", flush=True)
  try:
    while True:
      for key, _ in selector.select():
        if key.fileobj is listener:
          connection, _ = listener.accept()
          pid = start(connection, listener, children)
          if pid:
            children[pid] = connection
        elif key.fileobj is sys.stdin:
          return
        else:
          os.read(wakeup_r, 4096)
          reap(children)
  finally:
    for pid in children:
      os.kill(pid, signal.SIGKILL)


def convert_ahead():
  """AutoGraph's conversions of the AUTOGRAPH functions, made here for every child: pure Python (source
  in, source out), no TensorFlow runtime starts."""
  import importlib
  from tensorflow.python.autograph.core import converter
  from tensorflow.python.autograph.impl import api
  for (recursive, user_requested), names in AUTOGRAPH.items():
    # The options tf.function passes for a function it traces, and AutoGraph for each one it calls.
    options = converter.ConversionOptions(recursive=recursive, user_requested=user_requested,
                                          internal_convert_user_code=True, optional_features=frozenset())
    for name in names:
      module, _, attribute = name.partition(":")
      function = importlib.import_module(module)
      try:
        for part in attribute.split("."):
          function = getattr(function, part)
      except AttributeError:
        continue
      # A @tf.function's own Python function is what AutoGraph converts when it is traced.
      api._convert_actual(getattr(function, "python_function", function), converter.ProgramContext(options=options))


def reap(children):
  while children:
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid == 0:
      return
    connection = children.pop(pid, None)
    if connection:
      try:
        connection.sendall(f"{status}\n".encode())
      except OSError:  # the test is gone; nothing to tell
        pass
      connection.close()


def start(connection, listener, children):
  """Forks the child a request asks for; returns its pid (0 if the request was cut short)."""
  message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
  if not message:
    connection.close()
    return 0
  request = json.loads(message)
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    listener.close()
    for other in children.values():
      other.close()
    connection.close()
    run_child(request, fds)
  for fd in fds:
    os.close(fd)
  connection.sendall(f"{pid}\n".encode())
  return pid


def run_child(request, fds):
  """Becomes `python ARGV...` as far as the running code can tell, then exits; never returns."""
  signal.set_wakeup_fd(-1)
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
    os.close(fd)
  if request.get("new_session"):
    os.setsid()  # a process group of its own, which the launcher signals as a whole (os.killpg)
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  # tempfile found the server's TMPDIR once (importing TensorFlow asked): find the child's instead.
  tempfile.tempdir = None
  # PYTHONPATH is read when an interpreter starts: add what the child's adds to the server's.
  sys.path[1:1] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
  kind, what, args = request["kind"], request["what"], request["args"]
  code = 0
  try:
    if kind == "-m":
      sys.argv, sys.path[0] = [what, *args], os.getcwd()
      runpy.run_module(what, run_name="__main__", alter_sys=True)
    elif kind == "-c":
      sys.argv, sys.path[0] = ["-c", *args], ""
      exec(compile(what, "<string>", "exec"), {"__name__": "__main__"})
    else:
      sys.argv, sys.path[0] = [what, *args], os.path.dirname(os.path.abspath(what))
      runpy.run_path(what, run_name="__main__")
  except SystemExit as exit:
    code = exit_code(exit.code)
  except KeyboardInterrupt:
    # As the interpreter does: the traceback, then death by SIGINT (a shell shows 130).
    traceback.print_exc()
    finish()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
  except BaseException:
    sys.excepthook(*sys.exc_info())
    code = 1
  finish()
  os._exit(code)


def exit_code(code):
  if code is None:
    return 0
  if isinstance(code, int):
    return code & 0xFF
  print(code, file=sys.stderr)
  return 1


def finish():
  """What the interpreter does before it exits: joins non-daemon threads, runs atexit, flushes."""
  threading._shutdown()
  atexit._run_exitfuncs()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass


# The client ---------------------------------------------------------------------------------------------

class Server:
  """One forking server for this process (a pytest worker); started on first use."""

  process = None
  path = None

  @classmethod
  def socket_path(cls):
    if cls.process is None:
      cls.path = f"/tmp/forked-{os.getpid()}.sock"
      if os.path.exists(cls.path):
        os.remove(cls.path)
      cls.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), cls.path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
      ready = cls.process.stdout.readline()  # the imports take ~10 s; a broken server ends the read
      if ready.strip() != "ready":
        raise RuntimeError(f"the forking server did not start: exit {cls.process.wait(60)}")
      atexit.register(cls.stop)
    return cls.path

  @classmethod
  def stop(cls):
    if cls.process is not None and cls.process.poll() is None:
      cls.process.stdin.close()
      cls.process.wait(60)


def forkable(argv):
  """Whether argv is `python ...` as this interpreter, without interpreter options."""
  return len(argv) >= 2 and argv[0] == sys.executable and (argv[1] in ("-m", "-c") or not argv[1].startswith("-"))


def _stream(option, fd, created):
  """(fd the child gets, fd this side reads or writes or None) for a Popen-style stdin/stdout/stderr
  option; fd is the standard one (0, 1, 2); the fds opened here for the child are added to created."""
  if option is None:
    return fd, None
  if option == subprocess.DEVNULL:
    created.append(os.open(os.devnull, os.O_RDWR))
    return created[-1], None
  if option == subprocess.PIPE:
    read, write = os.pipe()
    child, ours = (read, write) if fd == 0 else (write, read)
    created.append(child)
    return child, ours
  return (option if isinstance(option, int) else option.fileno()), None


class Popen:
  """The part of subprocess.Popen the tests use, for a command the server forks."""

  def __init__(self, argv, stdin=None, stdout=None, stderr=None, env=None, cwd=None, text=False,
               start_new_session=False):
    kind, what, args = (argv[1], argv[2], argv[3:]) if argv[1] in ("-m", "-c") else ("script", argv[1], argv[2:])
    created = []
    child_in, _ = _stream(stdin, 0, created)
    child_out, ours_out = _stream(stdout, 1, created)
    child_err, ours_err = (child_out, None) if stderr == subprocess.STDOUT else _stream(stderr, 2, created)
    self.args, self.returncode, self.stdin = argv, None, None
    self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self._connection.connect(Server.socket_path())
    request = {"kind": kind, "what": what, "args": list(map(str, args)), "cwd": os.fspath(cwd or os.getcwd()),
               "env": dict(os.environ if env is None else env), "new_session": start_new_session}
    socket.send_fds(self._connection, [json.dumps(request).encode()], [child_in, child_out, child_err])
    for fd in created:  # the child has its own copies now: the pipes end when the child's ends close
      os.close(fd)
    self._reply = self._connection.makefile("r")
    self.pid = int(self._reply.readline())
    mode = "r" if text else "rb"
    self.stdout = os.fdopen(ours_out, mode) if ours_out is not None else None
    self.stderr = os.fdopen(ours_err, mode) if ours_err is not None else None

  def poll(self):
    if self.returncode is None and selectors_ready(self._connection, 0):
      self._read_status()
    return self.returncode

  def wait(self, timeout=None):
    if self.returncode is None:
      if not selectors_ready(self._connection, timeout):
        raise subprocess.TimeoutExpired(self.args, timeout)
      self._read_status()
    return self.returncode

  def _read_status(self):
    line = self._reply.readline()
    if not line:
      raise RuntimeError("the forking server ended before the child it started")
    self.returncode = os.waitstatus_to_exitcode(int(line))
    self._connection.close()

  def send_signal(self, signum):
    if self.poll() is None:
      os.kill(self.pid, signum)

  def terminate(self):
    self.send_signal(signal.SIGTERM)

  def kill(self):
    self.send_signal(signal.SIGKILL)

  def communicate(self, timeout=None):
    """(stdout, stderr) read to their ends, then the exit status; kills and raises TimeoutExpired after
    timeout seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    streams = {s.fileno(): (s, []) for s in (self.stdout, self.stderr) if s is not None}
    open_fds = set(streams)
    while open_fds:
      left = None if deadline is None else max(0.0, deadline - time.monotonic())
      ready = selectors_ready_any(open_fds, left)
      if not ready:
        self.kill()
        self.wait()
        raise subprocess.TimeoutExpired(self.args, timeout)
      for fd in ready:
        data = os.read(fd, 1 << 16)
        if data:
          streams[fd][1].append(data)
        else:
          open_fds.discard(fd)
    outputs = []
    for stream in (self.stdout, self.stderr):
      if stream is None:
        outputs.append(None)
        continue
      data = b"".join(streams[stream.fileno()][1])
      outputs.append(data.decode() if "b" not in stream.mode else data)
      stream.close()
    self.wait(None if deadline is None else max(1.0, deadline - time.monotonic()))
    return tuple(outputs)


def selectors_ready(connection, timeout):
  with selectors.DefaultSelector() as selector:
    selector.register(connection, selectors.EVENT_READ)
    return bool(selector.select(timeout))


def selectors_ready_any(fds, timeout):
  with selectors.DefaultSelector() as selector:
    for fd in fds:
      selector.register(fd, selectors.EVENT_READ)
    return [key.fd for key, _ in selector.select(timeout)]


def popen(argv, **kwargs):
  """A forked Popen for `python ...` commands, subprocess.Popen for any other."""
  argv = [os.fspath(a) for a in argv]
  return Popen(argv, **kwargs) if forkable(argv) else subprocess.Popen(argv, **kwargs)


def run(argv, capture_output=False, text=False, env=None, cwd=None, timeout=None, check=False, stdin=None):
  """subprocess.run for `python ...` commands, forked; any other command is passed to subprocess.run."""
  argv = [os.fspath(a) for a in argv]
  if not forkable(argv):
    return subprocess.run(argv, capture_output=capture_output, text=text, env=env, cwd=cwd, timeout=timeout,
                          check=check)
  pipe = subprocess.PIPE if capture_output else None
  process = Popen(argv, stdout=pipe, stderr=pipe, env=env, cwd=cwd, text=text,
                  stdin=subprocess.DEVNULL if stdin is None else stdin)
  out, err = process.communicate(timeout)
  done = subprocess.CompletedProcess(argv, process.returncode, out, err)
  if check:
    done.check_returncode()
  return done


if __name__ == "__main__":
  serve(sys.argv[1])
