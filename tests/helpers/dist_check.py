"""One process of a launch/local.py job: joins via llmlab.distributed and checks a global computation.

Each process contributes rows filled with (process_index + 1); the jitted sum over the global array
must equal what every process can compute alone, proving the processes really share one array.
Results go to stderr in one write per line: gloo prints its own connection messages to stdout from
background threads, in pieces, so stdout lines may be interleaved mid-line.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llmlab import distributed

distributed.initialize()
distributed.initialize()  # idempotent
info = distributed.process_info()


def say(line: str) -> None:
  sys.stderr.write(line + "\n")  # one write: atomic on a pipe


say("info " + " ".join(f"{k}={v}" for k, v in sorted(info.items()) if k != "hostname"))

rows_per_device, width = 2, 3
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
local_RxW = np.full((rows_per_device * jax.local_device_count(), width), jax.process_index() + 1.0, np.float32)
global_BxW = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_RxW)
total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(global_BxW))
expected = sum((p + 1.0) * rows_per_device * width * jax.local_device_count() for p in range(jax.process_count()))
distributed.sync("after_sum")
say(f"shape={global_BxW.shape} sum={total:g} expected={expected:g} primary={distributed.is_primary()}")
if total != expected:
  raise SystemExit(f"sum mismatch: {total} != {expected}")
