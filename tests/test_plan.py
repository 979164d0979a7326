"""`llmlab plan --target=SLICE`: slice names, bad input in one line, and
the TPU compiler (libtpu) compiling real train steps for slices on this CPU
machine. Compiles run as commands in subprocesses (a compile-only TPU
backend and no persistent cache there); the presets' compiles are slow
(minutes) and in the integration tier."""

import json
import os

import pytest

from configs import presets
from llmlab import config as config_lib
from llmlab import plan as plan_lib
from llmlab import slices
from llmlab.commands import plan as plan_cmd
from tests import helpers
from tests.helpers import ROOT

GiB = 1024 ** 3
CONTRACT = ("target", "devices", "fits", "hbm_bytes", "bytes_per_device",
            "temp_bytes", "flops_per_step", "estimated_step_s",
            "estimated_mfu")
needs_libtpu = pytest.mark.skipif(
    not slices.have_libtpu(),
    reason='libtpu (the TPU compiler) is not installed: pip install '
           '"llmlab[tpu]" (the test extra and .ci/run install it)')


def test_slice_names_and_topologies():
  sl = slices.parse("v5p-128")
  assert (sl.name, sl.chips, sl.devices_per_slice) == ("v5p-128", 64, 64)
  kw = sl.topology_kwargs()
  assert (kw["topology_name"], kw["chip_config_name"], kw["wrap"]) == (
      "v5:4x4x4", "megacore", (True, True, True))
  assert slices.parse("v5p-32").devices_per_slice == 16
  assert slices.parse("v4-32").topology_kwargs()["topology_name"] == "v4:2x2x4"
  assert slices.parse("v4-32").topology_kwargs()["wrap"] == (False,) * 3
  assert slices.parse("v5litepod-16").name == "v5e-16"
  assert slices.parse("v5e-256").topology_kwargs()["wrap"] == (True, True,
                                                              False)
  assert slices.parse("v6e-8").topology_kwargs()["topology_name"] == "v6e:2x4"
  with pytest.raises(ValueError) as e:
    slices.parse("v5p-100")
  assert "unknown TPU slice" in str(e.value)
  assert "v5p-{8,16,32,64,128," in str(e.value) and "v6e-{1,4,8" in str(e.value)


def test_every_tpu_preset_fills_its_slice():
  for name, target in presets.TARGETS.items():
    sl = slices.parse(target)
    cfg = config_lib.merge_defaults(presets.get_config(name))
    plan_lib.check_mesh(cfg, sl)  # raises if the mesh does not fill it
    config_lib.validate(cfg, sl.devices_per_slice)


def test_bad_input_is_one_line(capsys, monkeypatch):
  run = lambda *a: plan_cmd.main([f"--config={ROOT}/configs/presets.py:"
                                  "7b_v5p128", *a])
  assert run("--target=v5p-100") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "unknown TPU slice; known: v4-{8" in err
  # The old 7B mesh (1 x 64 x 2 = 128 devices) on a v5p-128's 64 chips.
  assert run("--target=v5p-128", "--config.mesh.tensor=2") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert "v5p-128 has 64 devices (one per chip)" in err
  assert "Try --config.mesh.data=1 --config.mesh.fsdp=32 " \
         "--config.mesh.tensor=2" in err
  assert run("--target=v5p-128", "--num_slices=2") == 2
  assert "--config.mesh.dcn_data=2" in capsys.readouterr().err
  assert run("--target=v5p-128", "--devices=8") == 2
  assert "--target names the devices" in capsys.readouterr().err
  monkeypatch.setattr(slices, "have_libtpu", lambda: False)
  assert run("--target=v5p-128") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and 'pip install "llmlab[tpu]"' in err


def _plan(*args, timeout=900):
  """`llmlab plan --json ...` in a fresh process (a compile-only TPU
  backend) -> (exit status, JSON)."""
  out = helpers.llmlab_process("plan", "--json", *args, check=False,
                               timeout=timeout)
  assert out.returncode in (0, 1), out.stderr[-3000:]
  return out.returncode, json.loads(out.stdout)


@needs_libtpu
@pytest.mark.parametrize("slices_, mesh", [
    (1, ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]),
    (2, ["--config.mesh.dcn_data=2", "--config.mesh.data=-1",
         "--recipe_flags"])])
def test_tiny_step_compiles_for_a_v5e_slice(slices_, mesh):
  # attention=xla: the flops check below needs every product visible to
  # XLA's cost model, which books a Pallas kernel (auto -> splash on TPU)
  # at ~0 flops.
  rc, res = _plan(f"--config={ROOT}/configs/tiny.py", "--target=v5e-4",
                  f"--num_slices={slices_}", "--config.model.logits_chunk=32",
                  "--config.model.attention=xla", *mesh)
  assert rc == 0 and all(k in res for k in CONTRACT)
  assert (res["target"], res["devices"], res["fits"]) == ("v5e-4",
                                                          4 * slices_, True)
  assert res["device_kind"] == "TPU v5 lite" and res["hbm_bytes"] == 16 * GiB
  if "LIBTPU_INIT_ARGS" not in os.environ:  # launch/tpu.sh's, if asked
    assert res["libtpu_init_args"] == (slices.libtpu_args("v5e")
                                       if "--recipe_flags" in mesh else "")
  assert 0 < res["bytes_per_device"] < GiB
  assert res["estimate"]["loops_left"] == 0
  # The model's FLOPs plus what XLA adds (full attention square, the
  # chunked loss's recomputed projection, the optimizer).
  assert res["model_flops_per_step"] < res["flops_per_step"] < \
      2 * res["model_flops_per_step"]
  assert res["estimated_step_s"] > 0 and 0 < res["estimated_mfu"] < 1


def _preset(name, *extra):
  return _plan(f"--config={ROOT}/configs/presets.py:{name}",
               f"--target={presets.TARGETS[name]}", "--vocab_size=32000",
               "--suggest=false", *extra, timeout=1800)


@pytest.mark.integration
@needs_libtpu
@pytest.mark.parametrize("name, hbm_gib", [("125m_v5e8", 16),
                                           ("1b_v5p32", 95)])
def test_presets_compile_for_their_slices(name, hbm_gib):
  rc, res = _preset(name)
  assert rc == 0 and res["fits"], res
  assert res["hbm_bytes"] == hbm_gib * GiB
  assert res["temp_bytes"] < res["bytes_per_device"] <= res["hbm_bytes"]
  assert res["estimate"]["loops_left"] == 0
  assert 0.05 < res["estimated_mfu"] < 0.9, res["estimated_mfu"]
  # auto -> splash on TPU: the kernel XLA cannot cost is priced apart, and
  # with it the step's FLOPs cover the model's.
  assert res["estimate"]["kernel"]["name"] == "splash"
  assert res["model_flops_per_step"] < res["flops_per_step"] < \
      2 * res["model_flops_per_step"]


@pytest.mark.integration
@needs_libtpu
def test_context_parallel_7b_preset_fits_seq_131072_on_v5p128():
  """The 7B at seq 131,072 (fsdp 16, context 4) compiles for its slice and
  fits (the step only: the cost-model estimate of a 7B step takes another
  5-9 min on 2 cores; `benchmarks/plan_presets.py` prints it)."""
  rc, res = _preset("7b_v5p128_s131072", "--estimate=false")
  assert rc == 0 and res["fits"], res
  assert res["mesh"]["context"] == 4 and res["hbm_bytes"] == 95 * GiB
  assert res["temp_bytes"] < res["bytes_per_device"] <= res["hbm_bytes"]


def test_splash_is_priced_apart_from_the_cost_model():
  """XLA books a Pallas kernel at ~0: its FLOPs are the causal attention
  matmuls x passes, timed at the rate of the rest of the step."""
  import types
  from llmlab import model as model_lib
  cfg = config_lib.merge_defaults(presets.get_config("7b_v5p128"))
  mcfg = model_lib.ModelConfig.from_config(cfg.model, 32000)
  tpu = [types.SimpleNamespace(platform="tpu")] * 64
  est = {"flops": 1e15, "seconds": 2.0}
  k = plan_lib.kernel_estimate(cfg, mcfg, tpu, est)
  per_token = model_lib.flops_per_token(mcfg, cfg.train.seq_len)
  attn_forward = per_token["forward"] - 2 * (
      model_lib.param_counts(mcfg)["non_embedding"] +
      mcfg.d_model * mcfg.vocab_size)
  tokens = cfg.train.batch_size * cfg.train.seq_len
  assert k["flops"] * 64 == pytest.approx(attn_forward * tokens * 5.5)
  assert k["seconds"] == pytest.approx(k["flops"] / 5e14)
  xla = config_lib.with_overrides(cfg, {"model.attention": "xla"})
  assert plan_lib.kernel_estimate(
      xla, model_lib.ModelConfig.from_config(xla.model, 32000), tpu,
      est) is None


@needs_libtpu
def test_context_parallel_splash_compiles_for_a_v5e_slice():
  """mesh.context=2 with splash (auto: 512 positions = 4 chunks of 128):
  the sharded block tables and load-balanced query order lower through
  Mosaic for a real TPU, next to fsdp."""
  rc, res = _plan(f"--config={ROOT}/configs/tiny.py", "--target=v5e-4",
                  "--config.train.seq_len=512", "--config.mesh.data=1",
                  "--config.mesh.fsdp=2", "--config.mesh.context=2",
                  "--estimate=false")
  assert rc == 0 and res["fits"] and res["compile_error"] is None, res
  assert res["mesh"] == {"data": 1, "fsdp": 2, "context": 2, "tensor": 1}
