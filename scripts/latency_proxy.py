"""Cloud Storage round-trip latency in front of the storage emulator, which answers over loopback
in about a millisecond: every request waits `delay` seconds, then goes on to the emulator, so a
job's sequential requests cost what they would against the real service. Requests are served on
threads of their own, as the service serves them; point STORAGE_EMULATOR_HOST at `host`."""

import http.client
import http.server
import threading
import time
import urllib.parse


class LatencyProxy:
  """Forwards every request to `upstream` (the emulator's http://host:port) after `delay` seconds."""

  def __init__(self, upstream, delay=0.05):
    self.upstream, self.delay, self.requests = urllib.parse.urlsplit(upstream), delay, 0
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"  # keep-alive, as google-cloud-storage's connection pool expects

      def forward(self):
        proxy.forward(self)

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = forward

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.host = f"http://127.0.0.1:{self.server.server_port}"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def forward(self, request):
    body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
    self.requests += 1
    time.sleep(self.delay)  # the round trip the emulator's loopback does not have
    connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
    try:
      connection.request(request.command, request.path, body=body or None, headers=dict(request.headers))
      response = connection.getresponse()
      data = response.read()
    finally:
      connection.close()
    request.send_response(response.status)
    hop = {"connection", "keep-alive", "transfer-encoding", "content-length"}
    for key, value in response.getheaders():
      if key.lower() not in hop:
        request.send_header(key, value)
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)

  def stop(self):
    self.server.shutdown()
    self.server.server_close()
