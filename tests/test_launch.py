"""Multi-process runtime and launchers: llmlab/distributed.py, launch/local.py, launch/tpu.sh, launch/slurm.*.

Launchers run for real against stand-ins: local.py starts real processes (two of them real 2-process
JAX jobs over gloo), tpu.sh drives a fake gcloud through a preemption, slurm.sbatch gets its requeue
signal under a fake srun/scontrol.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from llmlab import distributed
from tests import helpers

ROOT = pathlib.Path(helpers.ROOT)
HELPERS = ROOT / "tests" / "helpers"
LOCAL = [sys.executable, str(ROOT / "launch" / "local.py")]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMLAB_", "SLURM_"))}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  env.update(extra)
  return env


def _launch(*args, timeout=60, **env):
  return subprocess.run([*LOCAL, *args], env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _gone(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  return False


@pytest.fixture
def pid_dir(tmp_path):
  """Where helper processes record their pids; any still alive after the test (a failed one) is killed."""
  yield tmp_path
  for record in [*tmp_path.glob("*.pid"), *tmp_path.glob("*.ready")]:
    text = record.read_text()
    if text and not _gone(int(text)):
      os.kill(int(text), signal.SIGKILL)


# --- llmlab.distributed -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="localhost", num_processes=2, process_id=0), "must be 'host:port'"),
    (dict(coordinator="h:99999", num_processes=2, process_id=0), "must be 'host:port'"),
    (dict(coordinator="h:1234", num_processes=2, process_id=2), "out of range for num_processes 2"),
    (dict(coordinator="h:1234", num_processes=0, process_id=0), "argument num_processes must be an integer >= 1"),
    (dict(coordinator="h:1234", num_processes=2, process_id=-1), "argument process_id must be an integer >= 0"),
    (dict(coordinator="h:1234", num_processes=True, process_id=0), "must be an integer"),
    (dict(coordinator="h:1234"), "got coordinator (argument coordinator) but not num_processes, process_id"),
])
def test_plan_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError) as err:
    distributed.plan(**kwargs, environ={}, on_tpu_vm=False)
  assert message in str(err.value)


def test_plan_names_the_bad_env_var():
  environ = {"LLMLAB_COORDINATOR": "10.0.0.1:8476", "LLMLAB_NUM_PROCESSES": "two", "LLMLAB_PROCESS_ID": "0"}
  with pytest.raises(ValueError, match="env LLMLAB_NUM_PROCESSES must be an integer >= 1, got 'two'"):
    distributed.plan(environ=environ, on_tpu_vm=False)


def test_plan_sources_in_order():
  env = {"LLMLAB_COORDINATOR": "10.0.0.1:8476", "LLMLAB_NUM_PROCESSES": "4", "LLMLAB_PROCESS_ID": "3"}
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
           "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "5"}
  plan = distributed.plan
  assert plan(environ=env, on_tpu_vm=False) == distributed.Plan("explicit", "10.0.0.1:8476", 4, 3)
  # Arguments override the env field by field, and win over SLURM.
  assert plan(process_id="1", environ={**env, **slurm}, on_tpu_vm=False) == distributed.Plan(
      "explicit", "10.0.0.1:8476", 4, 1)
  assert plan(coordinator="h:1", num_processes=1, process_id=0, environ=slurm, on_tpu_vm=False) is None
  assert plan(environ=slurm, on_tpu_vm=True) == distributed.Plan("slurm")
  # The batch script (no step task count) and single-task steps stay single-process.
  assert plan(environ={k: v for k, v in slurm.items() if k != "SLURM_STEP_NUM_TASKS"}, on_tpu_vm=False) is None
  assert plan(environ={**slurm, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}, on_tpu_vm=False) is None
  assert plan(environ={"TPU_WORKER_HOSTNAMES": "w0,w1"}, on_tpu_vm=True) == distributed.Plan("tpu")
  assert plan(environ={"TPU_WORKER_HOSTNAMES": "w0,w1"}, on_tpu_vm=False) is None
  assert plan(environ={"TPU_SKIP_MDS_QUERY": "1"}, on_tpu_vm=True) is None
  assert plan(environ={}, on_tpu_vm=False) is None


def test_initialize_is_idempotent_and_refuses_a_different_job(monkeypatch):
  for name in list(os.environ):
    if name.startswith(("LLMLAB_", "SLURM_")):
      monkeypatch.delenv(name)
  monkeypatch.setattr(distributed, "_joined", distributed._NOT_CALLED)
  with pytest.raises(ValueError, match="local_device_ids"):
    distributed.initialize(local_device_ids=[-1])
  with pytest.raises(ValueError, match="must be 'host:port'"):
    distributed.initialize(coordinator="nohost", num_processes=2, process_id=0)
  distributed.initialize()  # single process: a no-op
  distributed.initialize()
  with pytest.raises(RuntimeError, match="already initialised"):
    distributed.initialize(coordinator="127.0.0.1:1234", num_processes=2, process_id=0)
  assert not __import__("jax").distributed.is_initialized()


# --- launch/local.py ----------------------------------------------------------------------------------

def test_two_process_jax_job_over_gloo():
  """Two processes x 2 CPU devices build one global array; both compute the same jitted sum."""
  result = _launch("-n", "2", "--devices_per_process=2", "--timeout=50", "--",
                   sys.executable, str(HELPERS / "dist_check.py"))
  assert result.returncode == 0, result.stdout + result.stderr
  for i in range(2):
    assert (f"[p{i}] info global_device_count=4 local_device_count=2 platform=cpu "
            f"process_count=2 process_index={i} slice_count=1") in result.stderr.splitlines()
    assert f"[p{i}] shape=(8, 3) sum=36 expected=36 primary={i == 0}" in result.stderr.splitlines()
  for stream in (result.stdout, result.stderr):
    assert all(line.startswith(("[p0] ", "[p1] ")) for line in stream.splitlines())


def test_env_wiring_and_prefixes():
  result = _launch("-n", "2", "--devices_per_process=3", "--", sys.executable, str(HELPERS / "proc.py"), "echo",
                   XLA_FLAGS="--xla_dump_to=/nonexistent")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  coordinators = {line.split()[2] for line in lines if "coordinator" in line}
  assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
  assert sorted(line.split()[0] for line in lines) == ["[p0]", "[p0]", "[p1]", "[p1]"]
  assert "[p1] xla_flags --xla_dump_to=/nonexistent --xla_force_host_platform_device_count=3 platforms cpu" in lines
  assert sorted(result.stderr.splitlines()) == ["[p0] to stderr from 0", "[p1] to stderr from 1"]


def test_one_failure_stops_the_job(pid_dir):
  """p0 exits 3; p1 ignores SIGTERM and would sleep for an hour: SIGKILL after the 1 s grace."""
  tmp_path = pid_dir
  start = time.monotonic()
  result = _launch("-n", "2", "--grace=1", "--", sys.executable, str(HELPERS / "proc.py"), "fail", str(tmp_path),
                   timeout=20)
  elapsed = time.monotonic() - start
  assert result.returncode == 3
  assert "process 0 exited with status 3; stopping the others" in result.stderr
  assert elapsed < 10, elapsed
  assert _gone(int((tmp_path / "p1.ready").read_text()))


def test_signal_is_forwarded_and_timeout_stops(pid_dir):
  tmp_path = pid_dir
  proc = subprocess.Popen([*LOCAL, "-n", "2", "--grace=2", "--", sys.executable, str(HELPERS / "proc.py"), "sleep",
                           str(tmp_path)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  pid_files = [tmp_path / "p0.pid", tmp_path / "p1.pid"]
  deadline = time.monotonic() + 20
  while not all(f.exists() and f.read_text() for f in pid_files):
    assert time.monotonic() < deadline and proc.poll() is None, "children never started"
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=10)
  assert proc.returncode == 128 + signal.SIGTERM, stderr
  assert all(_gone(int(f.read_text())) for f in pid_files)

  start = time.monotonic()
  result = _launch("-n", "2", "--timeout=1", "--", sys.executable, str(HELPERS / "proc.py"), "sleep", str(tmp_path),
                   timeout=20)
  assert result.returncode == 124 and "timeout after 1 s" in result.stderr
  assert time.monotonic() - start < 10


def test_launcher_usage_errors():
  assert _launch("-n", "2", "echo").returncode == 2  # no '--'
  assert _launch("-n", "0", "--", "true").returncode == 2


# --- launch/tpu.sh ------------------------------------------------------------------------------------

TPU_FLAGS = ["--name=llm1", "--zone=us-west4-a", "--accelerator=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]


def _tpu(tmp_path, *args, outcomes=(), **extra_env):
  fake = tmp_path / "gcloud"
  fake.mkdir(parents=True, exist_ok=True)
  (fake / "outcomes").write_text("".join(f"{o}\n" for o in outcomes))
  env = _env(FAKE_GCLOUD_DIR=str(fake), PATH=f"{HELPERS / 'fake_gcloud'}{os.pathsep}{os.environ['PATH']}")
  env.pop("LIBTPU_INIT_ARGS", None)
  env.update(extra_env)
  result = subprocess.run(["bash", str(ROOT / "launch" / "tpu.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=30)
  log = fake / "calls.log"
  return result, log.read_text().splitlines() if log.exists() else []


def test_tpu_dry_run_prints_the_plan(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text("")
  result, calls = _tpu(tmp_path, "--dry_run", *TPU_FLAGS, "--spot", "--env=XLA_FLAGS=--a", "--",
                       "train", f"--config={config}:small", "--workdir=gs://bucket/run1")
  assert result.returncode == 0, result.stderr
  assert calls == []  # nothing ran
  lines = result.stdout.splitlines()
  assert all(line.startswith("+ ") for line in lines)
  expected = [
      "python3 -m pip wheel --quiet --no-deps --wheel-dir=",  # default install: this checkout
      "gcloud compute tpus tpu-vm describe llm1 --zone=us-west4-a",
      "gcloud compute tpus tpu-vm create llm1 --zone=us-west4-a --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite --spot",
      "gcloud compute tpus tpu-vm scp /",
      f"gcloud compute tpus tpu-vm scp {config} llm1:llmlab_dist/ --zone=us-west4-a --worker=all",
      "--worker=all --ssh-flag=-oServerAliveInterval=60 '--command=python3 -m pip install",
      "--worker=all --ssh-flag=-oServerAliveInterval=60 '--command=cd ~ && env PYTHONUNBUFFERED=1 "
      "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true\\ ",
      "\\ --xla_tpu_scoped_vmem_limit_kib=98304 XLA_FLAGS=--a "
      "python3 -m llmlab train --config=llmlab_dist/tiny.py:small --workdir=gs://bucket/run1'",
  ]
  position = 0
  for fragment in expected:  # in this order
    found = [i for i in range(position, len(lines)) if fragment in lines[i]]
    assert found, f"{fragment!r} not found after line {position} of:\n{result.stdout}"
    position = found[0] + (fragment != expected[-2])  # the last two share a line


def _worker_command(result) -> str:
  """The command every worker runs (the last ssh of a dry run)."""
  line = [l for l in result.stdout.splitlines() if "python3 -m llmlab" in l][-1]
  return line.split("'--command=", 1)[1]


def test_tpu_flags_are_the_ones_plan_compiles_with(tmp_path):
  """launch/tpu.sh and llmlab/slices.py (`llmlab plan --target`) keep one
  list of recipe flags."""
  from llmlab import slices
  for accelerator, generation in [("v5p-128", "v5p"), ("v5litepod-16", "v5e"), ("v6e-8", "v6e"),
                                  ("v4-32", "v4")]:
    result, _ = _tpu(tmp_path / accelerator, "--dry_run", "--name=n", "--zone=z", f"--accelerator={accelerator}",
                     "--version=v", "--install=git+https://example.com/llmlab.git", "--", "train")
    command = _worker_command(result)
    value = command.split("LIBTPU_INIT_ARGS=", 1)[1].split(" python3 ", 1)[0]
    assert value.replace("\\ ", " ") == slices.libtpu_args(generation)


@pytest.mark.parametrize("accelerator, env, extra, expect", [
    # MaxText's recipe flags, with the scoped VMEM of the generation
    ("v5p-128", {}, [], "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true\\ "),
    ("v5p-128", {}, [], "--xla_tpu_overlap_compute_collective_tc=true\\ "),
    ("v5p-128", {}, [], "--xla_tpu_scoped_vmem_limit_kib=81920 python3"),
    ("v6e-8", {}, [], "--xla_tpu_scoped_vmem_limit_kib=98304 python3"),
    ("v4-32", {}, [], "--xla_tpu_data_parallel_opt_different_sized_ops=true python3"),
    # the caller's environment replaces them; empty means libtpu's defaults
    ("v5p-128", {"LIBTPU_INIT_ARGS": "--xla_mine=1"}, [], "env PYTHONUNBUFFERED=1 LIBTPU_INIT_ARGS=--xla_mine=1 python3"),
    ("v5p-128", {"LIBTPU_INIT_ARGS": ""}, [], "env PYTHONUNBUFFERED=1 python3"),
    # --env= comes last, so `env` keeps it
    ("v5p-128", {}, ["--env=LIBTPU_INIT_ARGS=--xla_y=2"], "=81920 LIBTPU_INIT_ARGS=--xla_y=2 python3"),
])
def test_tpu_compiler_flags(tmp_path, accelerator, env, extra, expect):
  result, _ = _tpu(tmp_path, "--dry_run", "--name=n", "--zone=z", f"--accelerator={accelerator}", "--version=v",
                   "--install=git+https://example.com/llmlab.git", *extra, "--", "train", "--workdir=gs://b/r",
                   **env)
  assert result.returncode == 0, result.stderr
  command = _worker_command(result)
  assert expect in command, command
  if accelerator == "v4-32":
    assert "scoped_vmem" not in command


def test_tpu_dry_run_queued_best_effort(tmp_path):
  result, _ = _tpu(tmp_path, "--dry_run", *TPU_FLAGS, "--best_effort", "--project=p1",
                   "--install=git+https://example.com/llmlab.git@v1", "--", "train", "--config=base",
                   "--workdir=gs://b/r")
  assert result.returncode == 0, result.stderr
  assert ("+ gcloud alpha compute tpus queued-resources create llm1 --node-id=llm1 --zone=us-west4-a "
          "--project=p1 --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --best-effort"
          ) in result.stdout
  assert "pip install --quiet --upgrade git+https://example.com/llmlab.git@v1 jax\\[tpu\\]" in result.stdout
  assert "pip wheel" not in result.stdout


def test_tpu_recreates_a_preempted_slice_and_reruns(tmp_path):
  args = [*TPU_FLAGS, "--spot", "--poll=0", "--install=git+https://example.com/llmlab.git", "--",
          "train", "--config=base", "--workdir=gs://b/r"]
  result, calls = _tpu(tmp_path, *args, outcomes=["preempt", "ok"])
  assert result.returncode == 0, result.stderr
  runs = [c for c in calls if "python3 -m llmlab train --config=base --workdir=gs://b/r" in c]
  assert len(runs) == 2
  assert sum(" create " in f" {c} " for c in calls) == 2
  assert sum(" delete " in f" {c} " for c in calls) == 1
  assert "retry 1 of 3" in result.stderr


def test_tpu_gives_up(tmp_path):
  args = [*TPU_FLAGS, "--poll=0", "--install=git+https://example.com/llmlab.git", "--", "train"]
  healthy, calls = _tpu(tmp_path / "a", *args, outcomes=["fail"])
  assert healthy.returncode == 1 and "on a healthy slice llm1; not retrying" in healthy.stderr
  assert sum("python3 -m llmlab" in c for c in calls) == 1
  lost, calls = _tpu(tmp_path / "b", "--retries=1", *args, outcomes=["preempt", "preempt"])
  assert lost.returncode == 1 and "giving up (--retries=1)" in lost.stderr
  assert sum("python3 -m llmlab" in c for c in calls) == 2
  missing, _ = _tpu(tmp_path / "c", "--name=x", "--", "train")
  assert missing.returncode == 2 and "--zone=... is required" in missing.stderr


def test_tpu_restarts_a_hung_run_on_the_same_slice(tmp_path):
  """Exit status 75 (llmlab's watchdog or a storage deadline) is restartable, like a preemption, but the
  healthy slice is kept."""
  args = [*TPU_FLAGS, "--poll=0", "--install=git+https://example.com/llmlab.git", "--", "train",
          "--workdir=gs://b/r"]
  result, calls = _tpu(tmp_path / "a", *args, outcomes=["hang", "ok"])
  assert result.returncode == 0, result.stderr
  assert sum("python3 -m llmlab" in c for c in calls) == 2
  assert sum(" create " in f" {c} " for c in calls) == 1
  assert not any(" delete " in f" {c} " for c in calls)
  assert "exited with status 75" in result.stderr and "restart 1 of 3" in result.stderr
  again, calls = _tpu(tmp_path / "b", "--retries=1", *args, outcomes=["hang", "hang"])
  assert again.returncode == 1 and "giving up (--retries=1)" in again.stderr
  assert sum("python3 -m llmlab" in c for c in calls) == 2


# --- launch/slurm.sh, launch/slurm.sbatch -------------------------------------------------------------

def test_slurm_dry_run_prints_sbatch_and_script():
  result = subprocess.run(
      ["bash", str(ROOT / "launch" / "slurm.sh"), "--dry_run", "--nodes=2", "--gpus_per_node=4",
       "--partition=gpu", "--time=2:00:00", "--", "train", "--config=configs/base.py", "--workdir=/shared/r1"],
      env=_env(), capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  command, *script = result.stdout.splitlines()
  assert command.startswith("+ sbatch --job-name=llmlab --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 "
                            "--partition=gpu --time=2:00:00 ")
  assert command.endswith("launch/slurm.sbatch train --config=configs/base.py --workdir=/shared/r1")
  for line in ["#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "trap requeue USR1",
               '  scontrol requeue "$SLURM_JOB_ID"']:
    assert line in script
  assert any(line.startswith("srun ") and "-m llmlab" in line for line in script)
  assert 'export XLA_FLAGS="${XLA_FLAGS-\\' in script


def test_sbatch_script_requeues_on_usr1(pid_dir):
  tmp_path = pid_dir
  env = _env(FAKE_SLURM_DIR=str(tmp_path), SLURM_JOB_ID="4242",
             PATH=f"{HELPERS / 'fake_slurm'}{os.pathsep}{os.environ['PATH']}")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), "train", "--config=c.py"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 10
  while not ((tmp_path / "srun.pid").exists() and (tmp_path / "srun.pid").read_text()):
    assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
    time.sleep(0.02)
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends
  _, stderr = proc.communicate(timeout=10)
  assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
  assert (tmp_path / "srun.args").read_text().split() == [
      "--kill-on-bad-exit=1", "python", "-m", "llmlab", "train", "--config=c.py"]
  assert proc.returncode == 128 + signal.SIGTERM, stderr  # srun's status once SLURM stopped it
  # The job's tasks get MaxText's GPU flags (env XLA_FLAGS unset here).
  assert (tmp_path / "srun.xla_flags").read_text().split() == [
      "--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_enable_pipelined_all_gather=true",
      "--xla_gpu_enable_pipelined_reduce_scatter=true", "--xla_gpu_enable_pipelined_all_reduce=true",
      "--xla_gpu_enable_while_loop_double_buffering=true", "--xla_gpu_enable_highest_priority_async_stream=true"]


@pytest.mark.parametrize("mine", ["--xla_dump_to=/tmp/d", ""])
def test_sbatch_script_keeps_the_callers_xla_flags(pid_dir, mine):
  tmp_path = pid_dir
  env = _env(FAKE_SLURM_DIR=str(tmp_path), SLURM_JOB_ID="7", XLA_FLAGS=mine,
             PATH=f"{HELPERS / 'fake_slurm'}{os.pathsep}{os.environ['PATH']}")
  proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), "train"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  flags = tmp_path / "srun.xla_flags"
  deadline = time.monotonic() + 10
  while not ((tmp_path / "srun.pid").exists() and (tmp_path / "srun.pid").read_text()):
    assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
    time.sleep(0.02)
  assert flags.read_text() == mine + "\n"
  os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGTERM)
  proc.communicate(timeout=10)


@pytest.mark.parametrize("restarts, requeued", [("0", True), ("3", False)])
def test_sbatch_script_requeues_a_hung_run(pid_dir, restarts, requeued):
  """srun ending with 75 (llmlab's watchdog or a storage deadline) requeues the job, at most
  LLMLAB_MAX_RESTARTS (3) times."""
  tmp_path = pid_dir
  env = _env(FAKE_SLURM_DIR=str(tmp_path), SLURM_JOB_ID="4242", FAKE_SRUN_EXIT="75",
             SLURM_RESTART_COUNT=restarts, PATH=f"{HELPERS / 'fake_slurm'}{os.pathsep}{os.environ['PATH']}")
  result = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "train"], env=env,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 75, result.stderr
  assert (tmp_path / "scontrol.args").exists() == requeued, result.stderr
  if requeued:
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert "restart 1 of 3" in result.stderr
  else:
    assert "not requeueing (LLMLAB_MAX_RESTARTS=3)" in result.stderr
