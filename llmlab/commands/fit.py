"""`llmlab fit`: fit a scaling law to loss records, predict a target, write
fit.json. Its flags stay an argparse parser (llmlab/scaling/fit_cli.py;
it takes no config), run under the same help/exit contract as the others.
"""

from __future__ import annotations

from llmlab import cli_common
from llmlab.scaling import fit_cli


def main(argv: list[str]) -> int:
  """`llmlab fit` (argv excludes the program and the command)."""
  parser = fit_cli._parser()  # pylint: disable=protected-access
  return cli_common.run_argparse("fit", list(argv), parser, fit_cli.main)
