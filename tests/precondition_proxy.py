"""Cloud Storage's generation preconditions in front of the emulator, which ignores them: the
lease (trainer.serving_lease.Lease) depends on them, so its gs:// tests run through this proxy."""

import http.client
import http.server
import json
import re
import threading
import urllib.parse


class PreconditionProxy:
  """Cloud Storage's `ifGenerationMatch` in front of the emulator, which ignores it
  (gcp-storage-emulator 2026.7: test_the_emulator_ignores_preconditions). A conditional request
  is checked against the object's generation and forwarded only if it holds, else answered 412
  as Cloud Storage does; one request at a time, so no other request comes between a check and
  the write it guards. Understands what the storage layer sends with a precondition: multipart
  uploads, downloads and deletes of one object."""

  def __init__(self, upstream):
    self.upstream = urllib.parse.urlsplit(upstream)
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def forward(self):
        proxy.handle(self)

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = forward

      def log_message(self, *args):
        pass

    self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)  # not threading: one request at a time
    self.host = f"http://127.0.0.1:{self.server.server_port}"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def handle(self, request):
    body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
    url = urllib.parse.urlsplit(request.path)
    query = urllib.parse.parse_qs(url.query)
    if "ifGenerationMatch" in query:
      target = self._object(url.path, query, body)
      if target is None:
        return self._reply(request, 501, [], b"the precondition proxy does not know this request")
      if self._generation(*target) != int(query["ifGenerationMatch"][0]):
        error = {"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
                           "errors": [{"reason": "conditionNotMet"}]}}
        return self._reply(request, 412, [("Content-Type", "application/json")], json.dumps(error).encode())
    self._reply(request, *self._send(request.command, request.path, dict(request.headers), body))

  @staticmethod
  def _object(path, query, body):
    one = re.search(r"/b/([^/]+)/o/(.+)$", path)
    if one:
      return one.group(1), urllib.parse.unquote(one.group(2))
    upload = re.search(r"/b/([^/]+)/o$", path)
    meta = re.search(rb"\r\n\r\n(\{.*?\})\r\n", body, re.S)
    if upload and query.get("uploadType") == ["multipart"] and meta:
      return upload.group(1), json.loads(meta.group(1))["name"]
    return None

  def _generation(self, bucket, name):
    status, _, data = self._send("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}", {}, b"")
    return int(json.loads(data)["generation"]) if status == 200 else 0

  def _send(self, method, path, headers, body):
    connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
    try:
      connection.request(method, path, body=body or None, headers=headers)
      response = connection.getresponse()
      data = response.read()
    finally:
      connection.close()
    hop = {"connection", "keep-alive", "transfer-encoding", "content-length"}
    return response.status, [(k, v) for k, v in response.getheaders() if k.lower() not in hop], data

  @staticmethod
  def _reply(request, status, headers, data):
    request.send_response(status)
    for key, value in headers:
      request.send_header(key, value)
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)
