"""Where numbers go: metrics.jsonl, TensorBoard and the console.

Only the primary process (index 0) writes; the others get a no-op writer.
TensorBoard events are written with tensorboardX (pure Python, no
TensorFlow); TensorBoard reads them as usual.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time

from etils import epath

from llmlab import errors
from llmlab import runtime
from llmlab import storage


class Writer:
  """Appends metric rows to `metrics.jsonl` and TensorBoard scalars.

  On an object store (a gs:// workdir) both are spooled locally and
  uploaded whole (llmlab/storage.py) at the flush points: every eval and
  checkpoint save (`flush()`, called by the train loop), the end of the run
  (`close()`), and at least every `sync_every_s` seconds while rows are
  written. A `kill -9` loses at most the rows since the last flush point;
  a resume first drops rows past its checkpoint (`truncate_after`), as on
  a local disk, where every row is flushed as it is written.
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0,
               sync_every_s: float = 60.0, wandb: str = "",
               run_config: dict | None = None):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._wandb = None
    self._sync_every = sync_every_s
    if enabled:
      self._spool = storage.Spool(workdir)
      self._jsonl = open(self._spool.fetch("metrics.jsonl"), "a")
      # On resume, TensorBoard drops events a killed run wrote past the
      # checkpoint we restart from (purge_step), so curves are not doubled.
      self._tb = tensorboard_writer(self._spool,
                                    start_step + 1 if start_step else None)
      self._synced = time.time()
      if wandb:
        self._wandb = _wandb_run(wandb, workdir, self._spool, run_config)

  def row(self, row: dict, tb_tags: dict[str, str]) -> None:
    """One JSON line; `tb_tags` maps row keys to TensorBoard tags."""
    if not self.enabled:
      return
    row = storage.json_safe(row)  # NaN -> null, the one JSON policy
    self._jsonl.write(storage.dumps(row) + "\n")
    self._jsonl.flush()
    scalars = {tag: row[key] for key, tag in tb_tags.items()
               if key in row and isinstance(row[key], (int, float))}
    for tag, value in scalars.items():
      self._tb.add_scalar(tag, value, global_step=row["step"])
    if self._wandb is not None:
      self._wandb.log(scalars, step=row["step"])
    if self._spool.remote and time.time() - self._synced > self._sync_every:
      self.flush()

  def hparams(self, hparams: dict, metric_tags: list[str]) -> None:
    """The run's hyper-parameters for TensorBoard's HParams dashboard, in
    this run's own event file (not a run of its own), so a study's runs
    sort by N, tokens and LR against the last value of `metric_tags`."""
    if not self.enabled:
      return
    from tensorboardX.summary import hparams as hparams_summary
    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
              for k, v in hparams.items()}
    for summary in hparams_summary(values, {t: 0.0 for t in metric_tags}):
      self._tb._get_file_writer().add_summary(summary)  # pylint: disable=protected-access

  def text(self, tag: str, text: str, step: int = 0) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, global_step=step)

  def image(self, tag: str, png_path: str, step: int = 0) -> None:
    if self.enabled:
      import matplotlib.image as mpimg  # matplotlib: only for report images
      img = mpimg.imread(io.BytesIO(epath.Path(png_path).read_bytes()),
                         format="png")
      self._tb.add_image(tag, img[..., :3], global_step=step, dataformats="HWC")

  def flush(self) -> None:
    """A flush point: everything written so far reaches the workdir."""
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()
      self._spool.sync()
      self._synced = time.time()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()
      self._spool.close()


def tensorboard_writer(spool: storage.Spool, purge_step: int | None = None):
  """A tensorboardX writer on the run's `tensorboard/` (one TensorBoard run
  per model: training, evals and sweeps each use their own tags)."""
  from tensorboardX import SummaryWriter  # imported with the first writer
  return SummaryWriter(spool.path("tensorboard"), flush_secs=10,
                       purge_step=purge_step)


def _wandb_run(spec: str, workdir: str, spool: storage.Spool,
               run_config: dict | None):
  """A Weights & Biases run (`train.wandb=project[/entity]`; wandb is the
  optional extra `llmlab[wandb]`; WANDB_MODE=offline works without a
  network). Its id is derived from the workdir, so a resumed run continues
  the same W&B run."""
  try:
    import wandb  # optional dependency
  except ImportError as e:
    raise errors.ConfigError(f"config.train.wandb={spec!r}: wandb is not installed; "
                     'pip install "llmlab[wandb]"') from e
  project, _, entity = spec.partition("/")
  run_id = hashlib.sha256(str(workdir).encode()).hexdigest()[:16]
  return wandb.init(project=project, entity=entity or None, id=run_id,
                    name=os.path.basename(str(workdir).rstrip("/")),
                    dir=spool.local, config=run_config, resume="allow")


def truncate_after(workdir: str, step: int) -> None:
  """Drop metric rows past `step` (they belong to a run we are replaying).

  After a crash the log may hold rows past the checkpoint we resume from;
  rewriting the file atomically keeps one row per step, as if uninterrupted.
  """
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return
  keep = [r for r in storage.jsonl_rows(path) if r.get("step", 0) <= step]
  storage.write_text(path, "".join(storage.dumps(r) + "\n" for r in keep))


class Progress:
  """A one-line console progress report: step/total, loss, tokens/s, MFU, ETA."""

  def __init__(self, total: int, enabled: bool = True):
    self.total, self.enabled = total, enabled
    self.t0 = time.time()

  def update(self, step: int, loss: float, tokens_per_s: float, mfu: float,
             eta_s: float, extra: str = "") -> None:
    if not self.enabled or runtime.quiet():
      return
    eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0)))
    print(f"step {step}/{self.total}  loss {loss:.4f}  "
          f"{tokens_per_s:,.0f} tok/s  MFU {100 * mfu:.1f}%  ETA {eta}{extra}",
          file=sys.stderr, flush=True)

  def eval(self, step: int, loss: float, bpb: float, tokens: int) -> None:
    """An eval row as it happens (held-out `tokens`: the budget it used)."""
    if self.enabled and not runtime.quiet():
      print(f"step {step}/{self.total}  eval loss {loss:.4f}  bpb {bpb:.4f}  "
            f"({tokens:,} held-out targets)", file=sys.stderr, flush=True)
