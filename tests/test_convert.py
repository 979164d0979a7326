"""HF Llama-family import/export (`llmlab convert`).

The reference is `transformers` on CPU torch (test extra only; those tests
skip without it): small random models of each supported family are saved
with `save_pretrained`, converted, and must give the same logits; exporting
back must reproduce every tensor bit for bit, and `transformers` must load
the export. The safetensors reader/writer and the config mapping are tested
without torch.
"""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

import llmlab
from llmlab import runs
from llmlab import steps as steps_lib
from llmlab import sharding as shd
from llmlab.commands import convert as convert_cmd
from llmlab.convert import hf as hf_lib
from llmlab.convert import hf_config
from llmlab.convert import safetensors_io as st

VOCAB = 96

# ----------------------------------------------------------------------------
# safetensors format (no torch).
# ----------------------------------------------------------------------------


def _tensors(rng):
  return {
      "f32": rng.normal(size=(3, 4)).astype(np.float32),
      "bf16": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
      "f16": rng.normal(size=(2, 2, 2)).astype(np.float16),
      "i64": rng.integers(-9, 9, (3,)).astype(np.int64),
      "scalar": np.array(2.5, np.float32),
  }


def _write(directory, arrays, max_shard_bytes=1 << 30):
  os.makedirs(directory, exist_ok=True)
  return st.write_checkpoint(
      str(directory), [(k, v.shape, v.dtype, lambda v=v: v)
                       for k, v in arrays.items()],
      max_shard_bytes, metadata={"format": "pt"})


@pytest.mark.parametrize("shard_bytes", [1 << 30, 40])
def test_safetensors_roundtrip(tmp_path, shard_bytes):
  arrays = _tensors(np.random.default_rng(0))
  files = _write(tmp_path, arrays, shard_bytes)
  assert (len(files) > 1) == (shard_bytes == 40)
  assert os.path.exists(tmp_path / st.INDEX_NAME) == (len(files) > 1)
  ckpt = st.Checkpoint(str(tmp_path))
  assert sorted(ckpt.names()) == sorted(arrays)
  for name, want in arrays.items():
    got = ckpt.get(name)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
  # An independent reader agrees on the bytes, where installed.
  safetensors_np = pytest.importorskip("safetensors.numpy")
  for f in files:
    for name, arr in safetensors_np.load_file(str(tmp_path / f)).items():
      if name != "bf16":  # numpy has no bfloat16; checked above
        np.testing.assert_array_equal(arr, arrays[name])


def test_safetensors_errors_name_the_file(tmp_path):
  _write(tmp_path / "ok", {"w": np.ones((4, 4), np.float32)})
  data = (tmp_path / "ok" / st.SINGLE_NAME).read_bytes()
  (tmp_path / "cut").mkdir()
  (tmp_path / "cut" / st.SINGLE_NAME).write_bytes(data[:-8])
  with pytest.raises(st.SafetensorsError,
                     match=r"model.safetensors: tensor 'w'.*truncated"):
    st.Checkpoint(str(tmp_path / "cut"))
  (tmp_path / "junk").mkdir()
  header_len = (5).to_bytes(8, "little")
  (tmp_path / "junk" / st.SINGLE_NAME).write_bytes(header_len + b"{nope")
  with pytest.raises(st.SafetensorsError, match="header is not JSON"):
    st.Checkpoint(str(tmp_path / "junk"))
  (tmp_path / "idx").mkdir()
  (tmp_path / "idx" / st.INDEX_NAME).write_text(
      json.dumps({"weight_map": {"w": "gone.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="gone.safetensors"):
    st.Checkpoint(str(tmp_path / "idx"))


# ----------------------------------------------------------------------------
# Config mapping (no torch).
# ----------------------------------------------------------------------------

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
         "rope_theta": 500000.0, "rope_scaling": None, "hidden_act": "silu",
         "tie_word_embeddings": False, "attention_bias": False,
         "mlp_bias": False, "max_position_embeddings": 2048,
         "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def test_config_4x_and_5x_layouts_agree():
  v4 = hf_config.parse(dict(LLAMA))
  v5 = dict(LLAMA, rope_parameters={"rope_type": "default",
                                    "rope_theta": 500000.0})
  del v5["rope_theta"], v5["rope_scaling"]
  assert hf_config.parse(v5).model == v4.model
  assert v4.model == {"vocab_size": VOCAB, "d_model": 32, "mlp_dim": 48,
                      "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                      "head_dim": 0, "norm_eps": 1e-5, "tie_embeddings": False,
                      "rope_theta": 500000.0, "qk_norm": False,
                      "attn_bias": False}
  wide = hf_config.parse(dict(LLAMA, head_dim=16)).model
  assert wide["head_dim"] == 16
  qwen2 = hf_config.parse(dict(LLAMA, architectures=["Qwen2ForCausalLM"],
                               model_type="qwen2", use_sliding_window=False,
                               sliding_window=4096, attention_bias=None))
  assert qwen2.model["attn_bias"] and not qwen2.model["qk_norm"]


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}),
    ("hidden_act", "gelu"),
    ("mlp_bias", True),
    ("attention_bias", True),
    ("partial_rotary_factor", 0.5),
    ("quantization_config", {"quant_method": "gptq"}),
    ("architectures", ["GemmaForCausalLM"]),
    ("num_hidden_layers", None),
    ("layer_types", ["full_attention", "sliding_attention"]),
])
def test_unsupported_fields_are_named(field, value):
  with pytest.raises(hf_config.UnsupportedConfig, match=field):
    hf_config.parse(dict(LLAMA, **{field: value}), "x/config.json")


def test_sliding_window_refused_only_when_it_binds():
  mistral = dict(LLAMA, architectures=["MistralForCausalLM"],
                 model_type="mistral", sliding_window=4096,
                 max_position_embeddings=32768)
  del mistral["attention_bias"], mistral["mlp_bias"]
  with pytest.raises(hf_config.UnsupportedConfig, match="sliding_window=4096"):
    hf_config.parse(mistral)
  hf_config.parse(dict(mistral, sliding_window=None))
  hf_config.parse(dict(mistral, sliding_window=32768))


def test_ignore_fields_and_export_family():
  odd = dict(LLAMA, my_flag=1)
  with pytest.raises(hf_config.UnsupportedConfig,
                     match="--ignore_fields=my_flag"):
    hf_config.parse(odd)
  assert hf_config.parse(odd, ignore_fields=["my_flag"]).architecture == (
      "LlamaForCausalLM")
  assert hf_config.family_for({"attn_bias": True}) == "qwen2"
  assert hf_config.family_for({"qk_norm": True}) == "qwen3"
  assert hf_config.family_for({}, "mistral") == "mistral"
  with pytest.raises(hf_config.UnsupportedConfig, match="attn_bias"):
    hf_config.family_for({"attn_bias": True, "qk_norm": True})


# ----------------------------------------------------------------------------
# Against transformers.
# ----------------------------------------------------------------------------


def _tf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return torch, transformers


def _make_hf(path, family, dtype="float32", max_shard_size=None, **kw):
  """A random `family` model saved by save_pretrained; (tokens, logits)."""
  torch, tf = _tf()
  classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
             "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
             "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
             "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}
  config_cls, model_cls = classes[family]
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4)
  torch.manual_seed(0)
  model = model_cls(config_cls(**{**base, **kw})).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():  # norms and biases too
      noise = 0.2 * torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
      p.copy_(p.to(getattr(torch, dtype)).float())  # exact in `dtype`
  tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 11))
  with torch.no_grad():  # float32 reference (rope buffers stay float32)
    logits = model(torch.tensor(tokens)).logits.numpy()
  save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.to(getattr(torch, dtype)).save_pretrained(str(path), **save_kw)
  return tokens, logits


def _hf_tensors(directory):
  torch, _ = _tf()
  from safetensors.torch import load_file
  out = {}
  for f in sorted(os.listdir(directory)):
    if f.endswith(".safetensors"):
      out.update(load_file(os.path.join(directory, f)))
  return out


def _hf_logits(directory, tokens):
  torch, tf = _tf()
  model = tf.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
  with torch.no_grad():
    return type(model).__name__, model.float()(
        torch.tensor(tokens)).logits.numpy()


def _convert(*args):
  assert convert_cmd.main([str(a) for a in args]) == 0


CASES = {
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2, rope_theta=5e5,
                                       rms_norm_eps=1e-5)),
    "llama_tied_wide_heads": ("llama", dict(num_key_value_heads=4, head_dim=16,
                                            tie_word_embeddings=True)),
    "mistral_mqa": ("mistral", dict(num_key_value_heads=1, sliding_window=None,
                                    rope_theta=1e6)),
    "qwen2_bias_tied": ("qwen2", dict(num_key_value_heads=2, rope_theta=1e6,
                                      tie_word_embeddings=True)),
    "qwen3_qk_norm": ("qwen3", dict(num_key_value_heads=2, head_dim=8,
                                    rope_theta=2e4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers_and_exports_exactly(tmp_path, case):
  family, kw = CASES[case]
  src, run, back = tmp_path / "hf", tmp_path / "run", tmp_path / "back"
  tokens, ref = _make_hf(src, family, **kw)
  _convert(f"--from_hf={src}", f"--workdir={run}")

  loaded = llmlab.load(str(run))
  assert loaded.step == 0
  np.testing.assert_allclose(np.asarray(loaded.logits(tokens)), ref,
                             atol=1e-4, rtol=0)
  info = json.loads((run / "config.json").read_text())
  assert info["model"]["attn_bias"] == (family == "qwen2")
  assert info["model"]["qk_norm"] == (family == "qwen3")
  assert info["model_info"]["vocab_size"] == VOCAB

  _convert("--to_hf", f"--workdir={run}", f"--out={back}")
  want, got = _hf_tensors(src), _hf_tensors(back)
  assert info["model_info"]["params_total"] == sum(
      t.numel() for t in want.values())
  assert sorted(got) == sorted(want)
  for name, tensor in want.items():
    assert got[name].dtype == tensor.dtype, name
    assert bool((got[name] == tensor).all()), name
  arch, logits = _hf_logits(back, tokens)
  source = json.loads((src / "config.json").read_text())
  assert arch == source["architectures"][0]
  np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)


def test_bf16_sharded_checkpoint_and_bf16_export(tmp_path):
  torch, _ = _tf()
  src, run, back = tmp_path / "hf", tmp_path / "run", tmp_path / "back"
  tokens, ref = _make_hf(src, "llama", dtype="bfloat16", max_shard_size="20KB",
                         num_key_value_heads=2)
  assert (src / st.INDEX_NAME).exists()
  _convert(f"--from_hf={src}", f"--workdir={run}")  # float32 params
  loaded = llmlab.load(str(run))
  assert loaded.params["embedding"].dtype == np.float32
  np.testing.assert_allclose(np.asarray(loaded.logits(tokens)), ref,
                             atol=1e-4, rtol=0)
  _convert("--to_hf", f"--workdir={run}", f"--out={back}", "--dtype=bfloat16",
           "--max_shard_gb=0.00002")
  assert (back / st.INDEX_NAME).exists()
  want, got = _hf_tensors(src), _hf_tensors(back)
  assert sorted(got) == sorted(want)
  for name, tensor in want.items():
    assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor)


def test_converted_run_feeds_init_from_and_copies_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  src, run = tmp_path / "hf", tmp_path / "run"
  _make_hf(src, "qwen2", num_key_value_heads=2)
  words = ["<unk>", "<s>", "</s>", "<pad>"]
  words += [f"w{i}" for i in range(VOCAB - len(words))]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(src / "tokenizer.json"))
  summary = hf_lib.from_hf(str(src), str(run))
  assert summary["warnings"] == []
  cfg, raw = runs.read_config(str(run))
  assert cfg.data.tokenizer == str(run / "tokenizer.json")
  assert raw["data_info"]["tokenizer"]["vocab_size"] == VOCAB
  assert raw["hf_source"]["architecture"] == "Qwen2ForCausalLM"
  # A fresh run with the same model keys passes init_from's shape checks.
  mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = steps_lib.build(cfg, raw["model_info"]["vocab_size"], mesh)
  params = runs.restore_params(str(run), setup)
  jax.tree.map(np.testing.assert_array_equal, params,
               hf_lib.load(str(src)).params)
  bias = _hf_tensors(src)["model.layers.1.self_attn.q_proj.bias"].numpy()
  np.testing.assert_array_equal(params["layers"]["attn"]["bq"][1],
                                bias.reshape(4, 8))


def _load_sharded(src, run):
  """In the `devices(8)` process: load HF dir `src` onto every device
  (data 2 x fsdp 2 x tensor 2), write run `run` (and the arrays to
  run.npz) -> each attention param's (spec, per-device shape)."""
  got = hf_lib.load(src, mesh_axes={"fsdp": 2, "tensor": 2})
  assert got.setup.mesh.devices.size == 8
  attn = got.params["layers"]["attn"]
  report = {k: [list(v.sharding.spec), list(v.sharding.shard_shape(v.shape))]
            for k, v in attn.items()}
  np.savez(run + ".npz", wq=np.asarray(attn["wq"]), wo=np.asarray(attn["wo"]),
           emb=np.asarray(got.params["embedding"]))
  hf_lib.write_run(got, run)
  return report


def test_converts_directly_onto_a_sharded_mesh(tmp_path, devices):
  src, run = tmp_path / "hf", tmp_path / "run"
  tokens, ref = _make_hf(src, "llama", num_key_value_heads=2)
  report = devices(8).call("tests.test_convert:_load_sharded", str(src),
                           str(run), timeout=120)
  # [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor.
  assert report["wq"] == [[None, "fsdp", "tensor", None], [2, 16, 2, 8]]
  assert report["wo"] == [[None, "tensor", None, "fsdp"], [2, 2, 8, 16]]
  hf_w = _hf_tensors(src)
  arrays = np.load(str(run) + ".npz")
  q0 = hf_w["model.layers.0.self_attn.q_proj.weight"].numpy()  # [H*E, D]
  np.testing.assert_array_equal(arrays["wq"][0],
                                q0.reshape(4, 8, 32).transpose(2, 0, 1))
  np.testing.assert_array_equal(arrays["emb"],
                                hf_w["model.embed_tokens.weight"].numpy())
  # Written from 8 devices, restored onto 1.
  np.testing.assert_allclose(np.asarray(llmlab.load(str(run)).logits(tokens)),
                             ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------
# Refusals with clear errors.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  _make_hf(path, "llama", num_key_value_heads=2)
  return path


def _variant(tmp_path, src, config=None, add=None, drop=()):
  """A copy of HF dir `src` with config edits and tensors added/dropped."""
  dst = tmp_path / "variant"
  ckpt = st.Checkpoint(str(src))
  arrays = {n: ckpt.get(n) for n in ckpt.names() if n not in drop}
  arrays.update(add or {})
  _write(dst, arrays)
  cfg = json.loads((src / "config.json").read_text())
  cfg.update(config or {})
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


def _fails(capsys, *args):
  assert convert_cmd.main([str(a) for a in args]) == 2
  return capsys.readouterr().err


def test_cli_refuses_unsupported_config(tmp_path, llama_dir, capsys):
  src = _variant(tmp_path, llama_dir, config={
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
  err = _fails(capsys, f"--from_hf={src}", f"--workdir={tmp_path / 'o'}")
  assert "rope_scaling" in err and "llama3" in err
  assert not (tmp_path / "o").exists()


def test_cli_refuses_tensors_that_do_not_fit(tmp_path, llama_dir, capsys):
  out = tmp_path / "o"
  extra = {"model.layers.1.self_attn.o_proj.bias": np.zeros(32, np.float32)}
  err = _fails(capsys, f"--from_hf={_variant(tmp_path, llama_dir, add=extra)}",
               f"--workdir={out}")
  assert "model.layers.1.self_attn.o_proj.bias" in err
  no_norm = _variant(tmp_path, llama_dir, drop=["model.norm.weight"])
  err = _fails(capsys, f"--from_hf={no_norm}", f"--workdir={out}")
  assert "'model.norm.weight' is missing" in err
  narrow = _variant(tmp_path, llama_dir, config={"intermediate_size": 40})
  err = _fails(capsys, f"--from_hf={narrow}", f"--workdir={out}")
  assert "gate_proj.weight" in err and "[48, 32]" in err and "[40, 32]" in err
  head = np.ones((VOCAB, 32), np.float32)
  tied = _variant(tmp_path, llama_dir, config={"tie_word_embeddings": True},
                  add={"lm_head.weight": head})
  err = _fails(capsys, f"--from_hf={tied}", f"--workdir={out}")
  assert "lm_head.weight differs" in err


def test_cli_refuses_to_overwrite_a_run(tmp_path, llama_dir, capsys):
  (tmp_path / "o").mkdir()
  (tmp_path / "o" / "config.json").write_text("{}")
  err = _fails(capsys, f"--from_hf={llama_dir}", f"--workdir={tmp_path / 'o'}")
  assert "refusing to overwrite" in err
