"""Hugging Face `config.json` <-> llmlab `model.*` keys, refusing what differs.

Every field of the HF config is either mapped onto a `model.*` key, checked
to have the one value llmlab's architecture computes (e.g. `hidden_act` must
be silu, `rope_scaling` absent), or listed in `METADATA` as not affecting the
forward pass (token ids, dtype, cache flags). Any other field raises
`UnsupportedConfig` naming it: a field we do not understand may change the
model, and a silently different model is worse than a refusal. A caller who
knows better can pass the field in `ignore_fields`.

Both the transformers 4.x layout (`rope_theta`, `rope_scaling` at the top)
and the 5.x one (`rope_parameters`, `layer_types`) are read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmlab import errors
from llmlab import storage

# HF architecture -> model_type. Qwen2 adds q/k/v biases, Qwen3 QK-norm.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}

# Fields that do not change the function the checkpoint computes.
METADATA = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version",
    "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id",
    "use_cache", "initializer_range", "max_position_embeddings",
    "pretraining_tp",  # a tensor-parallel split of the same matmuls
    "tokenizer_class", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "problem_type", "is_decoder",
    "chunk_size_feed_forward", "tie_encoder_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "is_encoder_decoder", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "finetuning_task", "torchscript", "pruned_heads", "tf_legacy_loss",
    "use_bfloat16", "output_scores", "return_dict_in_generate",
})

_SHAPE = {"hidden_size": "d_model", "intermediate_size": "mlp_dim",
          "num_hidden_layers": "num_layers",
          "num_attention_heads": "num_heads", "vocab_size": "vocab_size"}


class UnsupportedConfig(errors.UserError):
  """The HF config asks for something llmlab's model does not compute."""


@dataclasses.dataclass
class HFModel:
  """A parsed HF config: llmlab model keys plus what export wants back."""

  architecture: str
  model: dict[str, Any]  # model.* keys, plus vocab_size
  extras: dict[str, Any]  # max_position_embeddings, token ids, dtype
  raw: dict[str, Any]
  directory: str = ""  # where config.json was read from


def read(hf_dir: str, ignore_fields=()) -> HFModel:
  path = storage.join(hf_dir, "config.json")
  if not storage.exists(path):
    raise errors.NotFound(f"{hf_dir}: no config.json (not a Hugging Face "
                            "model directory)")
  try:
    raw = storage.read_json(path)
  except errors.DataError as e:  # not JSON
    raise UnsupportedConfig(f"{path}: not JSON: {e.__cause__}") from None
  return dataclasses.replace(parse(raw, path, ignore_fields), directory=hf_dir)


def parse(raw: dict, where: str = "config.json", ignore_fields=()) -> HFModel:
  """Map one HF config dict; `where` prefixes every error message."""
  arch = _architecture(raw, where)
  family = ARCHITECTURES[arch]
  seen = set(METADATA) | set(ignore_fields)
  get = _Getter(raw, where, seen)

  m = {mine: get.required(theirs, int) for theirs, mine in _SHAPE.items()}
  m["num_kv_heads"] = get.optional("num_key_value_heads", int, m["num_heads"])
  default_head = m["d_model"] // m["num_heads"]
  head_dim = get.optional("head_dim", int, None) or default_head
  exact = m["d_model"] % m["num_heads"] == 0 and head_dim == default_head
  m["head_dim"] = 0 if exact else head_dim
  m["norm_eps"] = get.optional("rms_norm_eps", float, 1e-6)
  m["tie_embeddings"] = get.optional("tie_word_embeddings", bool, False)
  m["rope_theta"] = _rope_theta(raw, where, get)
  m["qk_norm"] = family == "qwen3"
  m["attn_bias"] = family == "qwen2"  # Qwen2 always has q/k/v biases

  act = get.optional("hidden_act", str, "silu")
  if act not in ("silu", "swish"):
    raise UnsupportedConfig(f"{where}: hidden_act={act!r}: llmlab's MLP is "
                            "SwiGLU (silu) only")
  _must(get, "mlp_bias", False, "llmlab's MLP has no biases")
  _must(get, "attention_dropout", 0.0, "llmlab has no attention dropout")
  if family == "qwen2":
    get.optional("attention_bias", bool, True)  # transformers' Qwen2 ignores it
  else:
    _must(get, "attention_bias", False,
          "it adds an o_proj bias as well, which llmlab's attention lacks")
  _must(get, "partial_rotary_factor", 1.0, "llmlab rotates the full head")
  _sliding_window(raw, where, family, get)

  unknown = sorted(set(raw) - get.seen)
  if unknown:
    shown = ", ".join(f"{k}={raw[k]!r}" for k in unknown)
    raise UnsupportedConfig(
        f"{where}: unsupported config field(s) {shown}: llmlab cannot tell "
        "whether they change the model. If they do not, pass "
        f"--ignore_fields={','.join(unknown)}")
  extras = {k: raw[k] for k in ("max_position_embeddings", "bos_token_id",
                                "eos_token_id", "pad_token_id") if k in raw}
  extras["torch_dtype"] = raw.get("torch_dtype", raw.get("dtype"))
  return HFModel(arch, m, extras, raw)


class _Getter:
  """Typed reads of config fields that remember which fields were used."""

  def __init__(self, raw: dict, where: str, seen: set):
    self.raw, self.where, self.seen = raw, where, seen

  def optional(self, key: str, typ, default):
    self.seen.add(key)
    value = self.raw.get(key)
    if value is None:
      return default
    return self._cast(key, value, typ)

  def required(self, key: str, typ):
    if self.raw.get(key) is None:
      raise UnsupportedConfig(f"{self.where}: missing required field {key!r}")
    return self.optional(key, typ, None)

  def _cast(self, key, value, typ):
    if typ in (int, float):  # JSON has one number type; bools are not ints
      ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (typ is float or float(value).is_integer()))
    else:
      ok = isinstance(value, typ)
    if not ok:
      raise UnsupportedConfig(f"{self.where}: {key}={value!r} is not a "
                              f"{typ.__name__}")
    return typ(value)


def _must(get: _Getter, key: str, want, why: str) -> None:
  value = get.optional(key, type(want), want)
  if value != want:
    raise UnsupportedConfig(f"{get.where}: {key}={get.raw[key]!r} is not "
                            f"supported ({why}); only {want!r} is")


def _architecture(raw: dict, where: str) -> str:
  archs = raw.get("architectures")
  if archs:
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
      raise UnsupportedConfig(f"{where}: architectures={archs!r} is not "
                              f"supported; supported: {sorted(ARCHITECTURES)}")
    arch = archs[0]
    mt = raw.get("model_type")
    if mt is not None and mt != ARCHITECTURES[arch]:
      raise UnsupportedConfig(f"{where}: model_type={mt!r} does not match "
                              f"architectures={archs!r}")
    return arch
  mt = raw.get("model_type")
  if mt not in MODEL_TYPES:
    raise UnsupportedConfig(f"{where}: model_type={mt!r} (no architectures "
                            f"field) is not supported; supported: "
                            f"{sorted(MODEL_TYPES)}")
  return MODEL_TYPES[mt]


def _rope_theta(raw: dict, where: str, get: _Getter) -> float:
  """theta from 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`."""
  theta = get.optional("rope_theta", float, None)
  for key in ("rope_scaling", "rope_parameters"):
    params = get.optional(key, dict, None)
    if params is None:
      continue
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
      raise UnsupportedConfig(
          f"{where}: {key}={params!r}: RoPE type {kind!r} is not supported "
          "(llmlab's rope has no scaling); only 'default'")
    extra = set(params) - {"rope_type", "type", "rope_theta"}
    if extra:
      raise UnsupportedConfig(f"{where}: {key} has unsupported entries "
                              f"{sorted(extra)} ({params!r})")
    if "rope_theta" in params:
      inner = float(params["rope_theta"])
      if theta is not None and inner != theta:
        raise UnsupportedConfig(f"{where}: rope_theta={theta} disagrees with "
                                f"{key}.rope_theta={inner}")
      theta = inner
  return 10_000.0 if theta is None else theta


def _sliding_window(raw: dict, where: str, family: str, get: _Getter) -> None:
  """Refuse a sliding window that can actually drop keys."""
  window = get.optional("sliding_window", int, None)
  used = get.optional("use_sliding_window", bool, family == "mistral")
  get.optional("max_window_layers", int, None)  # only read with the window
  layer_types = get.optional("layer_types", list, None)
  if layer_types is not None:
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
      raise UnsupportedConfig(f"{where}: layer_types has {other}: llmlab "
                              "layers use full causal attention only")
    if len(layer_types) != raw.get("num_hidden_layers"):
      raise UnsupportedConfig(f"{where}: layer_types has {len(layer_types)} "
                              f"entries for {raw.get('num_hidden_layers')} "
                              "layers")
    return
  max_pos = raw.get("max_position_embeddings")
  if used and window is not None and (max_pos is None or window < max_pos):
    raise UnsupportedConfig(
        f"{where}: sliding_window={window} (< max_position_embeddings="
        f"{max_pos}) limits attention to a window, which llmlab does not "
        "implement; set it to null if the model never attends that far")


def to_hf(model: dict, vocab_size: int, family: str, extras: dict,
          dtype: str) -> dict:
  """An HF config.json dict for llmlab `model.*` keys (see `family_for`)."""
  d, h = int(model["d_model"]), int(model["num_heads"])
  head_dim = int(model.get("head_dim") or 0) or d // h
  out = {
      "architectures": [MODEL_TYPES[family]], "model_type": family,
      "vocab_size": int(vocab_size), "hidden_size": d,
      "intermediate_size": int(model["mlp_dim"]),
      "num_hidden_layers": int(model["num_layers"]),
      "num_attention_heads": h,
      "num_key_value_heads": int(model["num_kv_heads"]),
      "head_dim": head_dim, "hidden_act": "silu",
      "rms_norm_eps": float(model["norm_eps"]),
      "rope_theta": float(model["rope_theta"]), "rope_scaling": None,
      "tie_word_embeddings": bool(model["tie_embeddings"]),
      "attention_dropout": 0.0, "use_cache": True, "torch_dtype": dtype,
      "max_position_embeddings": int(extras.get("max_position_embeddings",
                                                2048)),
  }
  if family in ("llama", "qwen3"):
    out["attention_bias"] = False
  if family == "llama":
    out["mlp_bias"] = False
  if family in ("mistral", "qwen2", "qwen3"):
    out["sliding_window"] = None
  if family in ("qwen2", "qwen3"):
    out["use_sliding_window"] = False
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    if extras.get(key) is not None:
      out[key] = extras[key]
  return out


def family_for(model: dict, preferred: str | None = None) -> str:
  """The HF family that computes exactly this llmlab model.

  q/k/v biases need Qwen2, QK-norm needs Qwen3; a plain model is Llama (or
  Mistral, when it came from one: both compute the same function here).
  """
  bias, qk = bool(model.get("attn_bias")), bool(model.get("qk_norm"))
  if bias and qk:
    raise UnsupportedConfig(
        "model.attn_bias=True together with model.qk_norm=True has no "
        "Hugging Face Llama-family equivalent (Qwen2 has biases without "
        "QK-norm, Qwen3 QK-norm with an output bias as well)")
  if bias:
    return "qwen2"
  if qk:
    return "qwen3"
  return preferred if preferred in ("llama", "mistral") else "llama"
