"""usage: llmlab study --config=FILE.py[:ARG] --workdir=DIR
           [--config.KEY=VALUE ...]

The scaling study (llmlab/scaling/study.py): trains the config's models,
sweeps their checkpoints, fits the law and predicts the held-out target;
prints are, naive_are, skill and wall_time_s as one JSON line (the rest is
in DIR/study.json and DIR/report.md). Re-running resumes.
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common
from llmlab import runtime

CONFIG = cli_common.Config(lock=True, example="fit.bootstrap=50")
SUMMARY_KEYS = ("are", "naive_are", "skill", "wall_time_s")


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Study directory.", flag_values=fv)
  cli_common.define_distributed(fv)


def body(fv: flags.FlagValues) -> dict:
  with runtime.simulated_cpu_devices(int(fv.config.get("parallel", 1) or 1)):
    cli_common.init_distributed(fv)
    import jax  # noqa: PLC0415
    jax.devices()  # the backends start here, with the devices asked for
  from llmlab.scaling import study  # noqa: PLC0415 (jax; --help stays fast)
  result = study.run_study(fv.config, fv.workdir)
  return {k: result.get(k) for k in SUMMARY_KEYS}


def main(argv: list[str]) -> int:
  """`llmlab study` (argv excludes the program and the command)."""
  return cli_common.run("study", argv, define, body, doc=__doc__,
                        config=CONFIG, required=("workdir",))
