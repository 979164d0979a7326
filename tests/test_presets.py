"""Pod-sized presets are validated without allocating: abstract state
shardings on simulated meshes, bytes per device, and an AOT compile of the
smallest one's train step."""

import pytest

GB = 1024 ** 3


@pytest.fixture
def run(devices):
  def _run(n, *variants, mode=""):
    """presets_worker.main in the session's process with `n` simulated
    devices."""
    return devices(n).call("tests.presets_worker:main", variants, mode)
  return _run


def test_presets_fit_their_devices(run):
  rows = run(8, "125m_v5e8", "1b_gpu8", "7b_gpu8")
  # Params + Adam moments in float32 = 12 bytes/param, split by fsdp*tensor.
  assert rows["7b_gpu8"]["state_bytes_per_device"] < 12 * 7.3e9 / 8 * 1.05
  assert rows["7b_gpu8"]["state_bytes_per_device"] < 80 * GB  # an H100
  assert rows["1b_gpu8"]["param_bytes_per_device"] < rows["125m_v5e8"]["param_bytes_per_device"] * 3
  # a v5p-128 slice: 64 chips, one device each
  rows = run(64, "7b_v5p128", "7b_v5p128_s131072")
  assert rows["7b_v5p128"]["state_bytes_per_device"] < 95 * GB / 8  # v5p HBM, plenty left
  # mesh.context=4 replicates the state over the sequence shards: fsdp 16.
  ctx = rows["7b_v5p128_s131072"]["state_bytes_per_device"]
  assert 12 * 7.2e9 / 16 < ctx < 12 * 7.3e9 / 16 * 1.05


def test_smallest_preset_compiles_ahead_of_time(run):
  rows = run(8, "125m_v5e8", mode="compile")
  # XLA's own memory analysis of the compiled step: temporaries must fit a
  # v5e chip's 16 GiB next to the 1.6 GB of state (remat=full makes it so;
  # without remat the same step needs ~250 GB per device).
  row = rows["125m_v5e8"]
  assert 0 < row["temp_bytes_per_device"] + row["state_bytes_per_device"] < 16 * GB
