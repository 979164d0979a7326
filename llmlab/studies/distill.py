"""The distillation experiment: teacher, then students at equal tokens.

    python -m llmlab.studies.distill --config=configs/distill_quick.py \
        --workdir=DIR

1. DIR/teacher: train the teacher (config `teacher_model`, `teacher_steps`,
   `teacher_batch_size` on the student's data and sequence length).
2. DIR/teacher_logits: store its top-k for the students' batches
   (`llmlab/teacher_logits.py`), once for every offline student.
3. DIR/<student>: train each student in `students` from the same base
   config, differing only in the objective:
     next_token   cross-entropy
     distill      online: objective.teacher=DIR/teacher
     offline      objective.teacher_logits=DIR/teacher_logits
4. DIR/results.json and DIR/table.md: held-out loss and bits per byte of
   each run on the same validation rows, tokens, wall time.

Every run logs to DIR/<run>/tensorboard, so `tensorboard --logdir=DIR`
overlays all curves. Re-running resumes: finished runs are skipped (their
numbers are read back from their directories), a complete teacher-logits
store is reused.
"""

from __future__ import annotations

import logging
import os

from llmlab import config as config_lib
from llmlab import experiment
from llmlab import report_notes
from llmlab import teacher_logits

log = logging.getLogger("llmlab")

OBJECTIVES = ("next_token", "distill", "offline")
SUMMARY_KEYS = ("step", "eval_loss", "eval_bpb", "loss", "wall_s",
                "tokens_per_s", "params_nonembed", "params_total",
                "tokens_per_step", "objective_aux")


def teacher_config(scfg):
  return experiment.derive(scfg.student, {
      "name": "teacher", "model": dict(scfg.teacher_model),
      "train": {"steps": int(scfg.teacher_steps),
                "batch_size": int(scfg.teacher_batch_size)}})


def student_config(scfg, kind: str, workdir: str):
  """The shared student config with objective `kind`."""
  if kind not in OBJECTIVES:
    raise config_lib.ConfigError(
        f"config.students: unknown student {kind!r}; known: {OBJECTIVES}")
  objective = {}
  if kind != "next_token":
    objective = dict(scfg.distill, name="distill")
  if kind == "distill":
    objective["teacher"] = os.path.join(workdir, "teacher")
  if kind == "offline":
    objective["teacher_logits"] = os.path.join(workdir, "teacher_logits")
  return experiment.derive(scfg.student, {"name": kind,
                                          "objective": objective})


def run(scfg, workdir: str, train_fn=None) -> dict:
  ex = experiment.Experiment(workdir, train_fn)
  ex.start(scfg, "distill_config.json")
  ex.expect([(teacher_config(scfg), os.path.join(workdir, "teacher"))] +
            [(student_config(scfg, k, workdir), os.path.join(workdir, k))
             for k in scfg.students])
  results = {"teacher": _train(ex, teacher_config(scfg),
                               os.path.join(workdir, "teacher"))}
  if "offline" in scfg.students:
    store = teacher_logits.write(
        os.path.join(workdir, "teacher"),
        student_config(scfg, "next_token", workdir),
        os.path.join(workdir, "teacher_logits"),
        top_k=int(scfg.offline_top_k))
    results["teacher_logits"] = store
    log.info("teacher logits: %s", store)
  for kind in scfg.students:
    results[kind] = _train(ex, student_config(scfg, kind, workdir),
                           os.path.join(workdir, kind))
  wall = ex.wall_time()
  results["wall_s"] = wall["wall_time_this_run_s"]  # as it always was
  results.update(wall)
  experiment.write_json(ex.path("results.json"), results)
  experiment.write_text(ex.path("table.md"),
                        markdown_table(results, scfg) + "\n")
  return results


def _train(ex, cfg, workdir: str) -> dict:
  """Trains the run unless finished; its summary as read back from its
  directory, the same whether it trained now or in an earlier invocation
  (`wall_s`: seconds spent on it over all invocations)."""
  ex.train(cfg, workdir)
  s = ex.summary(cfg, workdir)
  return {k: s.get(k) for k in SUMMARY_KEYS}


def _seconds(x) -> str:
  return "-" if x is None else f"{x:.0f}"


def markdown_table(results: dict, scfg) -> str:
  rows = [*report_notes.note(scfg),
          "| run | objective | N (non-emb.) | train tokens | eval loss "
          "(nats/token) | eval bpb | wall (s) |",
          "|---|---|---:|---:|---:|---:|---:|"]
  what = {"teacher": "next_token (teacher)", "next_token": "next_token",
          "distill": "distill, online teacher",
          "offline": f"distill, stored top-{scfg.offline_top_k}"}
  for name in ["teacher", *scfg.students]:
    r = results[name]
    tokens = r["step"] * r["tokens_per_step"]
    rows.append(f"| {name} | {what[name]} | {r['params_nonembed']:,} | "
                f"{tokens:,} | {r['eval_loss']:.4f} | {r['eval_bpb']:.4f} | "
                f"{_seconds(r['wall_s'])} |")
  d = scfg.distill
  return ("\n".join(rows) + f"\n\ndistill: alpha={d.alpha}, "
          f"T={d.temperature}, {d.kl} KL; teacher-logits pass "
          f"{results.get('teacher_logits', {}).get('wall_s', 0):.0f} s; "
          f"total {results['wall_time_total_s']:.0f} s over all invocations "
          f"({results['wall_s']:.0f} s this one)")
