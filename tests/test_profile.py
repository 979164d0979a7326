"""train.profile_steps: a tiny real run writes a jax.profiler trace where
TensorBoard's profile plugin reads it (WORKDIR/tensorboard/plugins/profile),
and bad ranges are refused before anything runs."""

import glob
import os

import pytest

from llmlab import config as config_lib
from llmlab import train


def _config(**overrides):
  c = config_lib.base()
  c.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2,
                 mlp_dim=64)
  c.train.update(steps=4, batch_size=2, seq_len=16, log_every=1,
                 eval_tokens=64)
  c.data.update(source="synthetic")
  c.data.synthetic.update(num_docs=50, doc_len=64)
  c.guard.update(preflight=False)
  return config_lib.with_overrides(c, overrides)


def test_profile_steps_write_a_trace(tmp_path):
  workdir = str(tmp_path / "run")
  out = train.train(_config(**{"train.profile_steps": "2:3"}), workdir)
  assert out["step"] == 4
  traces = glob.glob(os.path.join(workdir, "tensorboard", "plugins",
                                  "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1, traces
  with open(traces[0], "rb") as f:
    assert b"guarded" in f.read()  # the train step's executions are in it


@pytest.mark.parametrize("bad", ["1:3", "3:2", "5", "a:b", "2:"])
def test_bad_profile_steps_are_refused(bad):
  with pytest.raises(config_lib.ConfigError, match="train.profile_steps"):
    config_lib.validate(_config(**{"train.profile_steps": bad}))
