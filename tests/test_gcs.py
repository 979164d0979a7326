"""Runs in a bucket, against a real GCS server on 127.0.0.1 (tests/gcs.py):
a gs:// run killed with -9 resumes to the same losses as a local run, a
storage outage fails with the path named and resumes from the last
checkpoint, and `llmlab.load` reads a run from gs://."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llmlab import storage
from tests.helpers import ROOT

pytestmark = pytest.mark.integration

STEPS = ["--config.train.steps=300", "--config.checkpoint.every_steps=50",
         "--config.train.eval_every=100"]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "llmlab", "train",
          f"--config={ROOT}/configs/tiny.py:smoke", f"--workdir={workdir}",
          *STEPS, *extra]


def _run(workdir, *extra):
  out = subprocess.run(_cmd(workdir, *extra), capture_output=True, text=True,
                       timeout=900, cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return out


def _start(workdir, log):
  """The run in the background, its output in file `log` (a pipe nobody
  reads would block it)."""
  with open(log, "w") as f:
    return subprocess.Popen(_cmd(workdir), cwd=ROOT, text=True, stdout=f,
                            stderr=subprocess.STDOUT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            start_new_session=True)


def _wait_for(gcs, bucket, name, proc, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if name in gcs.objects(bucket):
      return
    assert proc.poll() is None, f"the run ended ({proc.returncode})"
    time.sleep(0.2)
  raise AssertionError(f"{name} never appeared")


def _losses(workdir):
  rows = storage.jsonl_rows(storage.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("local"))
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_killed_gs_run_resumes_to_the_local_losses(gcs, local_run, tmp_path):
  bucket = gcs.bucket("kill9")
  workdir = f"{bucket}/run"
  proc = _start(workdir, tmp_path / "log")
  _wait_for(gcs, "kill9", "run/checkpoints/100/commit_success.txt", proc)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  rows = storage.jsonl_rows(f"{workdir}/metrics.jsonl")
  assert rows and max(r["step"] for r in rows) >= 100  # flushed at the save
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step" in out.stderr
  want = _losses(local_run)
  got = _losses(workdir)
  assert got == want  # bit-identical, one row per logged step
  steps = [r["step"] for r in storage.jsonl_rows(f"{workdir}/metrics.jsonl")
           if "loss" in r]
  assert steps == sorted(set(steps))
  assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == 300
  objects = gcs.objects("kill9", "run/")
  assert "run/config.json" in objects
  # TensorBoard reads the curves straight from the bucket (fsspec/gcsfs).
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(f"{workdir}/tensorboard")
  acc.Reload()
  curve = {e.step: e.value for e in acc.Scalars("train/loss")}
  assert sorted(curve) == sorted(want)


def test_load_a_run_from_gs(gcs, local_run):
  import llmlab
  bucket = gcs.bucket("load")
  out = _run(f"{bucket}/run", "--config.train.steps=12")
  assert out.returncode == 0, out.stderr[-3000:]
  run = llmlab.load(f"{bucket}/run")
  assert run.step == 12
  logits = np.asarray(run.logits(np.ones((2, 8), np.int32)))
  assert logits.shape == (2, 8, run.info["model_info"]["vocab_size"])
  with pytest.raises(FileNotFoundError, match="gs://load/nope"):
    llmlab.load(f"{bucket}/nope")


def test_storage_outage_names_the_path_and_resumes(gcs, local_run, tmp_path):
  bucket = gcs.bucket("outage")
  workdir = f"{bucket}/run"
  proc = _start(workdir, tmp_path / "log")
  _wait_for(gcs, "outage", "run/checkpoints/50/commit_success.txt", proc)
  gcs.stop()
  try:
    proc.wait(timeout=600)
  finally:
    gcs.start()
  assert proc.returncode != 0
  err = (tmp_path / "log").read_text()
  last = err.strip().splitlines()[-1]
  assert "gs://outage/run" in last, err[-3000:]
  assert "run/checkpoints/50/commit_success.txt" in gcs.objects("outage")
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step" in out.stderr
  assert _losses(workdir) == _losses(local_run)


def _llmlab(*args):
  out = subprocess.run([sys.executable, "-m", "llmlab", *args],
                       capture_output=True, text=True, timeout=1500, cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_study_sweep_and_fit_in_a_bucket(gcs):
  """The scaling study with its workdir in the bucket, then `sweep` and
  `fit` reading and writing gs:// only."""
  bucket = gcs.bucket("science")
  study = f"{bucket}/study"
  _llmlab("study", f"--config={ROOT}/configs/study_quick.py:test",
          f"--workdir={study}")
  result = storage.read_json(f"{study}/study.json")
  assert 0 <= result["are"] < 1
  objects = gcs.objects("science", "study/")
  for name in ("report.md", "records.csv", "loss_curves.png", "experiment.json"):
    assert f"study/{name}" in objects, name
  assert any(o.startswith("study/runs/t1_branch") and
             o.endswith("commit_success.txt") for o in objects)
  out = f"{bucket}/sweep/records.csv"
  _llmlab("sweep", f"--workdir={study}/runs/t1", f"--workdir={study}/runs/t2",
          f"--workdir={study}/runs/t3", f"--out={out}", "--eval_tokens=2048")
  rows = storage.read_text(out).splitlines()
  assert rows[0].startswith("run,") and len(rows) > 3
  _llmlab("fit", f"--records={out}", f"--out={bucket}/fit", "--bootstrap=10")
  fit = storage.read_json(f"{bucket}/fit/fit.json")
  assert set(fit["params"]) == {"E", "A", "B", "alpha", "beta"}
  assert "fit/loss_curves.png" in gcs.objects("science", "fit/")


def test_convert_to_and_from_hf_in_a_bucket(gcs, local_run):
  """`llmlab convert` with every directory in the bucket: a run exported to
  sharded safetensors on gs:// and imported back gives the same logits."""
  import llmlab
  from llmlab.convert import hf as hf_lib
  from llmlab.convert import safetensors_io as st
  bucket = gcs.bucket("convert")
  storage.copytree(local_run, f"{bucket}/run")
  out = hf_lib.to_hf(f"{bucket}/run", f"{bucket}/hf", max_shard_bytes=4096)
  assert len(out["files"]) > 1
  objects = gcs.objects("convert", "hf/")
  assert {f"hf/{n}" for n in out["files"] + ["config.json", st.INDEX_NAME]} \
      <= set(objects), objects
  assert not any(".tmp" in o for o in objects)
  hf_lib.from_hf(f"{bucket}/hf", f"{bucket}/back")
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 64
  want = np.asarray(llmlab.load(local_run).logits(tokens))
  got = np.asarray(llmlab.load(f"{bucket}/back").logits(tokens))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(FileExistsError, match="gs://convert/hf"):
    hf_lib.to_hf(f"{bucket}/run", f"{bucket}/hf")


# --- storage stalls (issue 28): SIGSTOP the server mid-run ---------------------------------------

# The scenario: a local workdir, the tiny config's token store on gs://.
STALL_ENV = {"LLMLAB_STORAGE_STALL_S": "3", "LLMLAB_STORAGE_DEADLINE_S": "10"}


def _stall_cmd(store, workdir):
  return [sys.executable, "-m", "llmlab", "train", f"--config={ROOT}/configs/tiny.py",
          "--config.data.source=tokens", f"--config.data.tokens.path={store}",
          "--config.train.steps=60", "--config.train.log_every=5",
          "--config.checkpoint.every_steps=10", f"--workdir={workdir}"]


def _stall_env(**extra):
  return {**os.environ, "JAX_PLATFORMS": "cpu", **STALL_ENV, **extra}


@pytest.fixture(scope="module")
def gs_store(gcs):
  store = f"{gcs.bucket('stall')}/tok"
  _llmlab("tokenize", f"--config={ROOT}/configs/tiny.py", f"--out={store}")
  return store


def _stalled_start(gcs, store, workdir, log, **env):
  """The run in the background; the server SIGSTOPped once checkpoint 10
  is written (steps go on from prefetched batches, then the reads stall)."""
  with open(log, "w") as f:
    proc = subprocess.Popen(_stall_cmd(store, workdir), cwd=ROOT, text=True, stdout=f,
                            stderr=subprocess.STDOUT, env=_stall_env(**env),
                            start_new_session=True)
  deadline = time.time() + 600
  while not os.path.exists(os.path.join(workdir, "checkpoints", "10")):
    assert proc.poll() is None, open(log).read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.1)
  gcs.proc.send_signal(signal.SIGSTOP)
  return proc


def _wait_or_fail(proc, log, timeout: float, what: str) -> None:
  """Waits for a run that must end; a run still alive is killed and fails
  the test with the end of its log."""
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"{what}: " + log.read_text()[-3000:]) from None


def test_stalled_server_ends_the_run_naming_the_object(gcs, gs_store, tmp_path):
  """No hang: the read past its deadline ends the run with one line naming
  the gs:// object and the restartable status 75; with the server back,
  the same command resumes to an uninterrupted run's losses, bit for bit."""
  ref = str(tmp_path / "ref")
  out = subprocess.run(_stall_cmd(gs_store, ref), capture_output=True, text=True, timeout=900,
                       cwd=ROOT, env=_stall_env())
  assert out.returncode == 0, out.stderr[-3000:]
  workdir, log = str(tmp_path / "run"), tmp_path / "log"
  proc = _stalled_start(gcs, gs_store, workdir, log)
  t = time.time()
  try:
    _wait_or_fail(proc, log, 120, "the run hung")
  finally:
    gcs.proc.send_signal(signal.SIGCONT)
  took = time.time() - t
  assert proc.returncode == 75, log.read_text()[-3000:]
  assert took < 10 + 30, took  # the deadline (10 s) plus the exit
  last = log.read_text().strip().splitlines()[-1]
  assert last.startswith("llmlab train: error: gs://stall/tok/shards/"), last
  assert "no answer from the storage within 10 s" in last
  out = subprocess.run(_stall_cmd(gs_store, workdir), capture_output=True, text=True, timeout=900,
                       cwd=ROOT, env=_stall_env())
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step" in out.stderr
  assert _losses(workdir) == _losses(ref) and len(_losses(ref)) == 12


def test_sigterm_during_a_storage_hang_exits_within_the_grace(gcs, gs_store, tmp_path):
  """A long storage deadline, so the run hangs; SIGTERM (a preemption,
  `timeout`) then ends it after the watchdog's grace with status 75, the
  stacks in WORKDIR/hang-*.txt, and no checkpoint written after it."""
  from llmlab import watchdog
  workdir, log = str(tmp_path / "run"), tmp_path / "log"
  proc = _stalled_start(gcs, gs_store, workdir, log, LLMLAB_STORAGE_DEADLINE_S="600")
  try:
    time.sleep(8)  # the prefetched batches are used up; now it waits on the server
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    os.killpg(proc.pid, signal.SIGTERM)
    t = time.time()
    _wait_or_fail(proc, log, watchdog.SIGTERM_GRACE_S + 30,
                  "SIGTERM did not end the hung run")
  finally:
    gcs.proc.send_signal(signal.SIGCONT)
  assert time.time() - t < watchdog.SIGTERM_GRACE_S + 15
  text = log.read_text()
  assert proc.returncode == 75, text[-3000:]
  assert "llmlab: hang: SIGTERM received" in text
  reports = [n for n in os.listdir(workdir) if n.startswith("hang-")]
  assert len(reports) == 1, os.listdir(workdir)
  assert "read_rows" in open(os.path.join(workdir, reports[0])).read()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_stalled_server_ends_a_gs_run_naming_the_object(gcs, local_run, tmp_path):
  """A run whose workdir is in the stalled bucket: its next metrics upload
  gives up after gcsfs's bounded retries (3 s stall timeout here), the run
  exits 75 naming the object, its clean-up does not wait on the dead
  server again; with the server back it resumes to the local losses."""
  bucket = gcs.bucket("wstall")
  workdir, log = f"{bucket}/run", tmp_path / "log"
  with open(log, "w") as f:
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, text=True, stdout=f,
                            stderr=subprocess.STDOUT, env=_stall_env(),
                            start_new_session=True)
  _wait_for(gcs, "wstall", "run/checkpoints/50/commit_success.txt", proc)
  gcs.proc.send_signal(signal.SIGSTOP)
  t = time.time()
  try:
    _wait_or_fail(proc, log, 300, "the run hung")
  finally:
    gcs.proc.send_signal(signal.SIGCONT)
  took = time.time() - t
  text = log.read_text()
  assert proc.returncode == 75, text[-3000:]
  assert took < 150, took  # gcsfs: 6 attempts x 3 s + 31 s of backoff, once
  last = text.strip().splitlines()[-1]
  assert last.startswith("llmlab train: error: gs://wstall/run/"), last
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step" in out.stderr
  assert _losses(workdir) == _losses(local_run)
