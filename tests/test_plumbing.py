"""Issue 31, items 10-12: plumbing variants say what they are in every
report (and leave out a law fewer points than parameters cannot support),
resume hints that lead somewhere, failed starts that leave nothing behind,
and a study that is quiet by default."""

import importlib.util
import os
import time

import pytest

from llmlab import report_notes
from tests.helpers import ROOT

CLAIM = "makes no scientific claim"


def _config(spec: str):
  name, _, arg = spec.partition(":")
  path = os.path.join(ROOT, "configs", name + ".py")
  s = importlib.util.spec_from_file_location("cfg_" + name, path)
  module = importlib.util.module_from_spec(s)
  s.loader.exec_module(module)
  return module.get_config(arg or None)


# ---------------------------------------------------------------- item 11


@pytest.mark.parametrize("spec,variant", [
    ("study_quick", ""), ("study_quick:smoke", "smoke"),
    ("study_quick:test", "test"), ("study_synthetic:test", "test"),
    ("study_synthetic", ""), ("study_repeat:smoke", "smoke"),
    ("overtrain_quick", ""), ("overtrain_quick:smoke", "smoke"),
    ("overtrain_quick:test", "test"), ("compress_quick", ""),
    ("compress_quick:smoke", "smoke"), ("distill_quick", ""),
    ("distill_quick:smoke", "smoke")])
def test_study_configs_name_their_variant(spec, variant):
  cfg = _config(spec)
  assert cfg.variant == variant
  assert report_notes.variant(cfg) == variant
  assert bool(report_notes.note(cfg)) == bool(variant)


def test_note_and_point_count():
  assert report_notes.note("") == [] and report_notes.note({}) == []
  (line, blank) = report_notes.note({"variant": "test"})
  assert "`:test` variant" in line and CLAIM in line and blank == ""
  five = dict(A=1, B=1, E=1, alpha=1, beta=1)
  assert report_notes.too_few_points(dict(n_points=5, params=five)) is None
  why = report_notes.too_few_points(dict(n_points=4, params=five,
                                         form="chinchilla"))
  assert "chinchilla fit has 4 points for 5 parameters" in why
  assert report_notes.too_few_points(None) is None
  assert report_notes.too_few_points({"params": five}) is None


def _study_result(variant: str, n_points: int) -> dict:
  """A branches-design study.json as llmlab/scaling/study.py writes it."""
  return {
      "variant": variant, "fit_on": "branches", "design": "WSD branches.",
      "form": "chinchilla", "n_points": n_points,
      "params": dict(E=2.4, A=300.0, alpha=0.55, B=2e4, beta=1.46),
      "target": {"name": "t_target", "params": 135792.0,
                 "ratio_to_largest_fitted": 4.1},
      "are": 0.084, "naive_are": 0.077, "skill": -0.099,
      "are_rule": {"min_fraction": 0.5, "final_only": False},
      "wall_time_total_s": 150.0, "wall_time_s": 150.0,
      "predictions": [{"params": 135792.0, "tokens": 2560.0,
                       "loss_hat": 3.146, "lo": 3.05, "hi": 3.18,
                       "loss": 3.436}],
      "coverage_95": {"curve": {"all": 0.0, "late": 0.0}},
      "compute_optimal": {"a": 0.73, "b": 0.27, "G": 0.074,
                          "compute": [1e11], "params": [2e6],
                          "tokens": [8.3e3], "tokens_per_param": [0.0041]},
      "timing": {"main_wall_s": 75.0, "main_cpu_s": 35.0}}


def test_study_report_note_first_and_thin_fit_left_out(tmp_path):
  from llmlab.scaling import study_report as study  # noqa: PLC0415
  study.write_report(_study_result("test", 7), str(tmp_path))
  report = (tmp_path / "report.md").read_text().splitlines()
  assert report[0] == "# Scaling study" and CLAIM in report[2]
  text = "\n".join(report)
  assert "| skill = 1 - ARE/naive | -0.099 |" in text
  assert "| compute C (FLOPs) | params N* |" in text

  study.write_report(_study_result("", 4), str(tmp_path))
  text = (tmp_path / "report.md").read_text()
  assert CLAIM not in text
  assert "fit has 4 points for 5 parameters" in text
  for left_out in ("| skill", "compute C (FLOPs)", "95% interval", "L(N,D)",
                   "-0.099"):
    assert left_out not in text, left_out
  assert "## Time" in text  # what does not rest on the law stays


def test_repeat_report_note_and_thin_law():
  from llmlab.studies import repeat_report  # noqa: PLC0415
  hold = {"are": 0.01, "naive_are": 0.02, "skill": 0.5,
          "by_repetitions": {"1": {"are": 0.01, "naive_are": 0.02}}}
  law = lambda n, p: {"objective": 0.1, "n_points": n, "holdout": hold,  # noqa: E731
                      "params": {f"p{i}": 1.0 for i in range(p)}}
  result = {"variant": "smoke", "tokens": 16384.0,
            "n_records": {"family": 24, "target": 8},
            "target": {"name": "s_target", "params": 3e4,
                       "ratio_to_largest_fitted": 3.0},
            "are_fraction": 0.5, "threshold": 0.01,
            "laws": {"chinchilla": law(24, 5), "data_repeat": law(6, 7)},
            "repetitions_at_1pct": {"chinchilla": None, "data_repeat": 3.0},
            "measured_repetitions_at_1pct": {},
            "holdout": dict(hold, form="data_repeat"),
            "wall_time_total_s": 60.0, "wall_time_this_run_s": 60.0}
  text = repeat_report.markdown(result)
  lines = text.splitlines()
  assert lines[0].startswith("# Repetition study") and CLAIM in lines[2]
  assert "| chinchilla |" in text and "- chinchilla: p0=1" in text
  assert "data_repeat fit has 6 points for 7 parameters" in text
  assert "| data_repeat |" not in text and "- data_repeat:" not in text
  assert "Best law" not in text
  result["variant"] = ""
  assert CLAIM not in repeat_report.markdown(result)


def test_compress_overtrain_distill_reports_start_with_the_note(tmp_path):
  from llmlab.compress import report as compress_report  # noqa: PLC0415
  from llmlab.studies import distill  # noqa: PLC0415
  from llmlab.studies import overtrain_report  # noqa: PLC0415
  compress_report.write_report(
      {"variant": "smoke", "source_model": {}, "target_model": {},
       "wall_time_total_s": 60.0, "wall_time_s": 60.0, "timings": {}},
      "| run |", str(tmp_path))
  lines = (tmp_path / "report.md").read_text().splitlines()
  assert lines[0] == "# Compression and continual training"
  assert CLAIM in lines[2]

  ck = {"step": 10, "tokens": 100, "tokens_per_param": 0.01,
        "pretrain_loss": 3.0, "target_loss_zero_shot": 3.5,
        "best_learning_rate": 1e-3, "best_target_loss": 3.2,
        "best_target_loss_90": [3.1, 3.3], "change_vs_previous": None,
        "forgetting_at_best_lr": 0.1, "sensitivity": {"0.1": {"mean": 3.0}}}
  result = {"variant": "test", "checkpoints": [ck],
            "inflection": {"estimate": None}}
  assert CLAIM in overtrain_report.table(result).splitlines()[0]
  result["variant"] = ""
  assert CLAIM not in overtrain_report.table(result)

  scfg = _config("distill_quick:smoke")
  r = {"step": 8, "tokens_per_step": 1024, "params_nonembed": 1000,
       "eval_loss": 3.0, "eval_bpb": 4.0, "wall_s": 1.0}
  results = dict({n: r for n in ["teacher", *scfg.students]},
                 wall_time_total_s=10.0, wall_s=10.0)
  assert CLAIM in distill.markdown_table(results, scfg).splitlines()[0]
  assert CLAIM not in distill.markdown_table(results, _config("distill_quick"))


# ---------------------------------------------------------------- item 12

SMALL = {"model.num_layers": 1, "model.d_model": 32, "model.num_heads": 4,
         "model.num_kv_heads": 2, "model.mlp_dim": 64, "train.steps": 2,
         "train.batch_size": 2, "train.seq_len": 16, "train.log_every": 1,
         "train.eval_every": 0, "train.eval_tokens": 256,
         "checkpoint.every_steps": 0, "guard.preflight": False}


def _tiny(**extra):
  from llmlab import config as config_lib  # noqa: PLC0415
  return config_lib.with_overrides(_config("tiny:smoke"), {**SMALL, **extra})


def test_failed_start_leaves_no_lock_or_empty_checkpoints(tmp_path):
  from llmlab import errors  # noqa: PLC0415
  from llmlab import train as train_lib  # noqa: PLC0415
  from llmlab import workdir_lock  # noqa: PLC0415
  bad = _tiny(init_from=str(tmp_path / "no_such_run"))
  fresh = tmp_path / "fresh"  # made by the start: removed with it
  with pytest.raises(errors.ConfigError, match="init_from"):
    train_lib.train(bad, str(fresh))
  assert not fresh.exists()
  there = tmp_path / "there"  # existed before: stays, empty as it was
  there.mkdir()
  with pytest.raises(errors.ConfigError, match="init_from"):
    train_lib.train(bad, str(there))
  assert sorted(os.listdir(there)) == []
  # The same start with nothing wrong leaves the (emptied) lock file and
  # the checkpoints, as before.
  train_lib.train(_tiny(), str(there))
  assert (there / workdir_lock.LOCK_NAME).read_text() == ""
  assert os.listdir(there / "checkpoints")


def test_lock_file_removed_by_its_holder_is_not_shared(tmp_path):
  from llmlab import workdir_lock  # noqa: PLC0415
  a = workdir_lock.Lock(str(tmp_path))
  a.acquire()
  # b opened the file before a removed it; it must not lock the orphan.
  fd = os.open(a.path, os.O_RDWR)
  a.discard()
  a.release()
  b = workdir_lock.Lock(str(tmp_path))
  b.acquire()
  assert os.path.exists(b.path)
  with pytest.raises(workdir_lock.WorkdirLocked):
    workdir_lock.Lock(str(tmp_path)).acquire()
  b.release()
  os.close(fd)


def test_resume_hint_for_another_shape_works(tmp_path):
  """The refused resume names `llmlab prune`, and following the hint
  trains the smaller model from the old run's params."""
  from llmlab import errors  # noqa: PLC0415
  from llmlab import train as train_lib  # noqa: PLC0415
  from llmlab import workdir_lock  # noqa: PLC0415
  from llmlab.compress import prune as prune_lib  # noqa: PLC0415
  old, pruned, new = (str(tmp_path / n) for n in ("old", "pruned", "new"))
  train_lib.train(_tiny(), old)
  small = {"model.mlp_dim": 32}
  with pytest.raises(errors.ConfigError) as e:
    train_lib.train(_tiny(**small), old)
  msg = str(e.value)
  assert "model.mlp_dim: checkpoint 64 != config 32" in msg
  assert "llmlab prune --from=OLD_WORKDIR" in msg
  assert "--config.init_from=PRUNED" in msg
  assert (tmp_path / "old" / workdir_lock.LOCK_NAME).read_text() == ""
  with pytest.raises(errors.ConfigError, match="llmlab prune --from="):
    train_lib.train(_tiny(init_from=old, **small), new)
  assert not os.path.exists(new)
  # Following the hint works.
  prune_lib.prune(old, _tiny(**small), pruned)
  out = train_lib.train(_tiny(init_from=pruned, **small), new)
  assert out["step"] == 2
  # Only the objective differs: init_from (same shape) is the hint.
  with pytest.raises(errors.ConfigError) as e:
    train_lib.train(_tiny(**{"objective.name": "distill",
                             "objective.teacher": old}), old)
  assert "--config.init_from=OLD_WORKDIR" in str(e.value)
  assert "prune" not in str(e.value)


# ---------------------------------------------------------------- item 10


@pytest.fixture
def quiet_state():
  from llmlab import runtime  # noqa: PLC0415
  yield runtime
  runtime.set_verbose(False)


def test_study_runs_are_quiet_unless_verbose(tmp_path, capsys, caplog,
                                             quiet_state):
  """Inside a study a run's INFO and progress lines are left out (its
  warnings are not); the study's own progress stays; --verbose shows all."""
  import logging  # noqa: PLC0415
  from llmlab import config as config_lib  # noqa: PLC0415
  from llmlab import experiment  # noqa: PLC0415
  from llmlab import metrics  # noqa: PLC0415
  log = logging.getLogger("llmlab")

  def chatty(cfg, workdir):
    log.info("model: N=4,144 (run detail)")
    log.warning("resuming with different data (a warning)")
    metrics.Progress(20).eval(20, 4.43, 6.39, 1983)
    os.makedirs(workdir, exist_ok=True)
    return {"preempted": False, "step": 20, "eval_loss": 4.43}

  cfg = experiment.derive(config_lib.base(), {"train": {"steps": 20}})
  caplog.set_level(logging.INFO, logger="llmlab")
  for verbose in (False, True):
    quiet_state.set_verbose(verbose)
    caplog.clear()
    ex = experiment.Experiment(str(tmp_path / str(verbose)), chatty)
    ex.start(config_lib.base(), "study_config.json")
    ex.train(cfg, str(tmp_path / str(verbose) / "runs" / "a"))
    text, err = caplog.text, capsys.readouterr().err
    assert "study: 0/1 runs" in text and "finished runs/a" in text
    assert "a warning" in text
    assert ("run detail" in text) == verbose
    assert ("eval loss 4.4300" in err) == verbose
  # Outside a study (llmlab train) nothing changes.
  quiet_state.set_verbose(False)
  caplog.clear()
  chatty(cfg, str(tmp_path / "plain"))
  assert "run detail" in caplog.text
  assert "eval loss 4.4300" in capsys.readouterr().err


def test_read_only_checkpoints_and_diverged_refits_say_nothing(tmp_path,
                                                               caplog):
  """orbax's read-only notice, and numpy's overflow warnings from a
  bootstrap refit gone to inf, were 24 of the :test study's lines."""
  import logging  # noqa: PLC0415
  import warnings  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from llmlab import checkpoints as ckpt_lib  # noqa: PLC0415
  from llmlab import config as config_lib  # noqa: PLC0415
  from llmlab.scaling import fit as fit_lib  # noqa: PLC0415
  from llmlab.scaling import fitting  # noqa: PLC0415
  from llmlab.scaling import forms  # noqa: PLC0415
  ck = config_lib.base().checkpoint
  ckpt_lib.Manager(str(tmp_path), ck, 10).close()
  caplog.set_level(logging.INFO)
  ckpt_lib.Manager(str(tmp_path), ck, 10, read_only=True).close()
  assert "setting save_interval_steps=0" not in caplog.text
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    form = forms.get_form("chinchilla")
    theta = np.full((4, len(form.params)), 800.0)  # exp overflows
    params = forms.natural_params(form, theta)
    assert np.isinf(params["A"]).all()
    boot = fit_lib.BootstrapResult("chinchilla", theta, np.zeros(4), params,
                                   "runs", np.ones(4, bool))
    assert len(boot.intervals()["A"]) == 2
    samples = np.array([[1.0, np.inf], [2.0, np.inf], [np.inf, 3.0]])
    assert fitting._interval(samples).shape == (2, 2)  # pylint: disable=protected-access


def test_spools_of_killed_runs_are_swept_kept_ones_stay(tmp_path):
  """A gs:// run killed with -9 leaves its local spool behind; the next
  spool removes it, but not a live process's, nor one kept after a failed
  upload (its path was named to the user), nor a name without a pid."""
  from llmlab import storage
  with open("/proc/sys/kernel/pid_max") as f:
    dead = int(f.read()) + 1  # no process can have it
  names = {"stale": f"{storage.SPOOL_PREFIX}{dead}-a1",
           "live": f"{storage.SPOOL_PREFIX}{os.getpid()}-b2",
           "kept": f"{storage.SPOOL_PREFIX}{dead}-c3",
           "no_pid": f"{storage.SPOOL_PREFIX}x7k2",
           "other": "not-a-spool"}
  for name in names.values():
    os.makedirs(tmp_path / name / "tensorboard")
  (tmp_path / names["kept"] / storage.KEPT).write_text("gs://b/run\n")
  (tmp_path / names["stale"] / "metrics.jsonl").write_text("{}\n")
  # Written to a minute ago: maybe a live process in another pid namespace.
  assert storage.sweep_spools(str(tmp_path)) == []
  old = time.time() - 7200
  for root, dirs, files in os.walk(tmp_path):
    for n in dirs + files + [""]:
      os.utime(os.path.join(root, n), (old, old))
  assert storage.sweep_spools(str(tmp_path)) == [str(tmp_path / names["stale"])]
  assert sorted(os.listdir(tmp_path)) == sorted(
      v for k, v in names.items() if k != "stale")

