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
overlays all curves. Re-running resumes: finished runs only re-evaluate,
and a complete teacher-logits store is reused.
"""

from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from llmlab import config as config_lib

log = logging.getLogger("llmlab")

OBJECTIVES = ("next_token", "distill", "offline")


def teacher_config(scfg):
  c = config_lib.merge_defaults(
      ml_collections.ConfigDict(scfg.student.to_dict()))
  c.name = "teacher"
  c.model.update(dict(scfg.teacher_model))
  c.train.steps = int(scfg.teacher_steps)
  c.train.batch_size = int(scfg.teacher_batch_size)
  return c


def student_config(scfg, kind: str, workdir: str):
  """The shared student config with objective `kind`."""
  if kind not in OBJECTIVES:
    raise config_lib.ConfigError(
        f"config.students: unknown student {kind!r}; known: {OBJECTIVES}")
  c = config_lib.merge_defaults(
      ml_collections.ConfigDict(scfg.student.to_dict()))
  c.name = kind
  if kind != "next_token":
    c.objective.update(dict(scfg.distill), name="distill")
  if kind == "distill":
    c.objective.teacher = os.path.join(workdir, "teacher")
  if kind == "offline":
    c.objective.teacher_logits = os.path.join(workdir, "teacher_logits")
  return c


def run(scfg, workdir: str) -> dict:
  from llmlab import teacher_logits
  from llmlab import train
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  results = {}
  results["teacher"] = _summary(train.train(teacher_config(scfg),
                                            os.path.join(workdir, "teacher")))
  if "offline" in scfg.students:
    store = teacher_logits.write(
        os.path.join(workdir, "teacher"),
        student_config(scfg, "next_token", workdir),
        os.path.join(workdir, "teacher_logits"),
        top_k=int(scfg.offline_top_k))
    results["teacher_logits"] = store
    log.info("teacher logits: %s", store)
  for kind in scfg.students:
    cfg = student_config(scfg, kind, workdir)
    results[kind] = _summary(train.train(cfg, os.path.join(workdir, kind)))
  results["wall_s"] = time.time() - t0
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  table = markdown_table(results, scfg)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table + "\n")
  return results


def _summary(s: dict) -> dict:
  keys = ("step", "eval_loss", "eval_bpb", "loss", "wall_s", "tokens_per_s",
          "params_nonembed", "params_total", "tokens_per_step",
          "objective_aux")
  return {k: s.get(k) for k in keys}


def markdown_table(results: dict, scfg) -> str:
  rows = ["| run | objective | N (non-emb.) | train tokens | eval loss "
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
                f"{r['wall_s']:.0f} |")
  d = scfg.distill
  return ("\n".join(rows) + f"\n\ndistill: alpha={d.alpha}, "
          f"T={d.temperature}, {d.kl} KL; teacher-logits pass "
          f"{results.get('teacher_logits', {}).get('wall_s', 0):.0f} s; "
          f"total {results['wall_s']:.0f} s")
