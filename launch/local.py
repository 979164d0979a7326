#!/usr/bin/env python3
"""Runs one command as N cooperating processes on this machine: a multi-host job in miniature.

  python launch/local.py -n 2 --devices_per_process=4 -- python -m llmlab train --config=... --workdir=...

Each process gets LLMLAB_COORDINATOR/LLMLAB_NUM_PROCESSES/LLMLAB_PROCESS_ID (read by
llmlab.distributed.initialize) and, with --devices_per_process, K simulated CPU devices. Output lines
are prefixed with `[p{i}] `. One failure stops the whole job (a JAX job cannot continue without one of
its processes and the survivors would otherwise block in a collective forever): the others get SIGTERM,
then SIGKILL after --grace seconds, and the launcher exits with the failed process's status. Standard
library only, so it starts fast and needs nothing installed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s -n N [options] -- CMD [ARGS...]")
  parser.add_argument("-n", "--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="simulate K CPU devices per process (sets JAX_PLATFORMS=cpu)")
  parser.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("--timeout", type=float, default=None, help="stop everything after S seconds (exit 124)")
  parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
  if "--" not in argv:
    parser.error("missing '-- CMD [ARGS...]' (the command every process runs)")
  split = argv.index("--")
  args = parser.parse_args(argv[:split])
  args.cmd = argv[split + 1:]
  if not args.cmd:
    parser.error("empty command after '--'")
  if args.num_processes < 1:
    parser.error(f"-n must be >= 1, got {args.num_processes}")
  if args.devices_per_process is not None and args.devices_per_process < 1:
    parser.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
  if args.port is not None and not 1 <= args.port <= 65535:
    parser.error(f"--port must be in 1..65535, got {args.port}")
  return args


def free_port() -> int:
  """A port the OS just handed out; racy in principle, but the coordinator binds it within seconds."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(index: int, args: argparse.Namespace, port: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
      LLMLAB_COORDINATOR=f"127.0.0.1:{port}",
      LLMLAB_NUM_PROCESSES=str(args.num_processes),
      LLMLAB_PROCESS_ID=str(index),
  )
  env.setdefault("PYTHONUNBUFFERED", "1")  # lines show up as they are printed, not at exit
  if args.devices_per_process is not None:
    flag = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
  return env


def pump(stream, sink, prefix: bytes, lock: threading.Lock) -> None:
  """Copies a child's stream line by line, prefixed, without interleaving within a line."""
  for line in iter(stream.readline, b""):
    with lock:
      sink.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
      sink.flush()
  stream.close()


class Job:
  """The N children, each in its own process group so that signals reach whatever they spawn."""

  def __init__(self, args: argparse.Namespace):
    port = args.port or free_port()
    self.grace = args.grace
    self.procs: list[subprocess.Popen] = []
    self.pumps: list[threading.Thread] = []
    lock = threading.Lock()
    for i in range(args.num_processes):
      proc = subprocess.Popen(args.cmd, env=child_env(i, args, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)
      self.procs.append(proc)
      for stream, sink in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer)):
        thread = threading.Thread(target=pump, args=(stream, sink, f"[p{i}] ".encode(), lock), daemon=True)
        thread.start()
        self.pumps.append(thread)

  def signal_all(self, signum: int) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          os.killpg(proc.pid, signum)
        except ProcessLookupError:
          pass

  def stop(self, signum: int = signal.SIGTERM) -> None:
    """Sends `signum` to everyone still running; SIGKILL to whoever outlives the grace period.

    Only groups whose leader is not yet reaped are signalled: a reaped leader's id may be reused.
    """
    self.signal_all(signum)
    deadline = time.monotonic() + self.grace
    while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
      time.sleep(0.05)
    self.signal_all(signal.SIGKILL)
    for proc in self.procs:
      proc.wait()
    for thread in self.pumps:
      thread.join(timeout=2.0)  # grandchildren outside the group may hold a pipe open

  def first_failure(self) -> tuple[int, int] | None:
    for i, proc in enumerate(self.procs):
      if proc.poll() not in (None, 0):
        return i, proc.returncode
    return None


def exit_status(returncode: int) -> int:
  """Shell convention: killed by signal s -> 128 + s."""
  return 128 - returncode if returncode < 0 else returncode


def run(args: argparse.Namespace) -> int:
  received: list[int] = []

  def forward(signum, _frame):
    received.append(signum)

  job = Job(args)
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, forward)
  deadline = None if args.timeout is None else time.monotonic() + args.timeout
  while True:
    if received:
      log(f"got signal {received[0]}; passing it on and stopping all processes")
      job.stop(received[0])
      return 128 + received[0]
    failed = job.first_failure()
    if failed is not None:
      index, code = failed
      log(f"process {index} exited with status {exit_status(code)}; stopping the others")
      job.stop()
      return exit_status(code)
    if all(p.poll() == 0 for p in job.procs):
      job.stop()  # only joins the output pumps: everyone has exited
      return 0
    if deadline is not None and time.monotonic() > deadline:
      log(f"timeout after {args.timeout:g} s; stopping all processes")
      job.stop()
      return 124
    time.sleep(0.05)


def log(message: str) -> None:
  print(f"[launch] {message}", file=sys.stderr, flush=True)


def main() -> None:
  sys.exit(run(parse_args(sys.argv[1:])))


if __name__ == "__main__":
  main()
