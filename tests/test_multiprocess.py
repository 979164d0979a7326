"""Multi-host training with real processes on 127.0.0.1 (gloo collectives):
2 processes x 2 CPU devices train exactly like 1 process x 4 devices, and
checkpoints move between the two layouts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers
from tests.helpers import ROOT

SMOKE = [f"--config={ROOT}/configs/tiny.py:smoke", "--config.mesh.data=1",
         "--config.mesh.fsdp=4", "--config.model.d_model=64",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         # A schedule that does not depend on train.steps, so a run cut at
         # step 8 and continued to 16 equals one planned for 16.
         "--config.optim.schedule=constant"]


def _env(devices):
  return helpers.env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _one(workdir, *extra):
  out = subprocess.run([sys.executable, "-m", "llmlab", "train", *SMOKE,
                        f"--workdir={workdir}", *extra], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env=_env(4))
  assert out.returncode == 0, out.stderr[-4000:]


def _two(workdir, *extra):
  out = subprocess.run([sys.executable, f"{ROOT}/launch/local.py", "-n", "2",
                        "--devices_per_process=2", "--timeout=500", "--",
                        sys.executable, "-m", "llmlab", "train", *SMOKE,
                        f"--workdir={workdir}", *extra], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env=_env(2))
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return out


def _losses(workdir):
  return {r["step"]: r["loss"] for r in helpers.rows(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("mp")
  _one(str(base / "one"), "--config.train.steps=16")
  _two(str(base / "two"), "--config.train.steps=16")
  return base


def test_two_processes_match_one(runs):
  one, two = _losses(runs / "one"), _losses(runs / "two")
  assert sorted(one) == sorted(two) == list(range(1, 17))
  a = np.array([one[s] for s in sorted(one)])
  b = np.array([two[s] for s in sorted(two)])
  assert np.max(np.abs(a - b) / a) <= 1e-4, (a, b)
  assert a[-1] < a[0]


@pytest.mark.integration  # 4 more processes, ~21 s
def test_checkpoints_move_between_layouts(runs, tmp_path):
  # 1 process writes steps 1..8; 2 processes resume and finish 9..16.
  mixed = str(tmp_path / "mixed")
  _one(mixed, "--config.train.steps=8")
  _two(mixed, "--config.train.steps=16")
  one, got = _losses(runs / "one"), _losses(mixed)
  for s in range(9, 17):
    assert got[s] == pytest.approx(one[s], rel=1e-4), s
  # A 2-process checkpoint evaluates in 1 process (this one: 1 device).
  out = helpers.llmlab("eval", f"--workdir={runs / 'two'}")
  assert json.loads(out.stdout)["step"] == 16


@pytest.mark.integration  # 2 more processes, ~17 s
def test_dcn_data_axis_across_processes(runs, tmp_path):
  """Each process plays one slice (dcn_data=2): a data axis over the
  network with fsdp inside each process trains like the 1-process run."""
  dcn = str(tmp_path / "dcn")
  _two(dcn, "--config.train.steps=4", "--config.mesh.dcn_data=2",
       "--config.mesh.fsdp=2")
  config = json.load(open(os.path.join(dcn, "config.json")))
  assert config["mesh_shape"] == {"data": 2, "fsdp": 2, "context": 1, "tensor": 1}
  one, got = _losses(runs / "one"), _losses(dcn)
  for s in range(1, 5):
    assert got[s] == pytest.approx(one[s], rel=1e-4), s
