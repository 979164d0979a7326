"""usage: llmlab sample --workdir=DIR --prompt="def " [--max_new_tokens=200
        --temperature=0.8 --top_k=0 --top_p=1.0 --seed=0 --step=N
        --num_samples=1 --quantize=int8]

Continues a prompt with a trained run (KV-cache decoding of
llmlab/decode.py); prints each continuation after the prompt.
"""

from __future__ import annotations

import logging

import jax
from absl import flags

from llmlab import api
from llmlab import cli_common
from llmlab import errors
from llmlab import model as model_lib
from llmlab.compress import quantize as quantize_lib
from llmlab.data import tokenizer as tokenizer_lib
from llmlab.decode import left_pad, make_sampler

log = logging.getLogger("llmlab")


def define(fv) -> None:
  flags.DEFINE_string("workdir", None, "Run directory (DIR or DIR:STEP).",
                      flag_values=fv)
  flags.DEFINE_string("prompt", "", "Text to continue (after BOS).",
                      flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.",
                       flag_values=fv)
  flags.DEFINE_float("temperature", 0.8, "0 = greedy.", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "Sample from the k most likely (0 = all).",
                       flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "Nucleus probability (1 = all).",
                     flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).",
                       flag_values=fv)
  flags.DEFINE_integer("num_samples", 1, "Continuations of the prompt.",
                       flag_values=fv)
  flags.DEFINE_enum("quantize", None, ["int8"],
                    "Sample from int8 weight-only quantized params.",
                    flag_values=fv)


def _check(fv) -> None:
  checks = [(fv.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
            (fv.temperature >= 0, "temperature", "must be >= 0"),
            (fv.top_k >= 0, "top_k", "must be >= 0"),
            (0 < fv.top_p <= 1, "top_p", "must be in (0, 1]"),
            (fv.num_samples >= 1, "num_samples", "must be >= 1")]
  for ok, name, why in checks:
    if not ok:
      raise errors.UsageError(f"--{name}={fv[name].value}: {why}")


def sample_run(workdir: str, prompt: str, *, max_new_tokens: int = 200,
               temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0, step: int | None = None,
               num_samples: int = 1, quantize: str | None = None) -> list[str]:
  """Continuations (text) of `prompt` by the run in `workdir` (with
  `quantize="int8"`, by its int8 weight-only quantized params)."""
  run = api.load(workdir, step=step)
  tok = tokenizer_lib.load(str(run.config.data.tokenizer))
  vocab = run.info.get("model_info", {}).get("vocab_size", tok.vocab_size)
  if tok.vocab_size != vocab:
    raise errors.DataError(f"{workdir}: tokenizer {run.config.data.tokenizer!r} "
                     f"has {tok.vocab_size} ids, the model {vocab}")
  model = model_lib.Transformer(
      model_lib.ModelConfig.from_config(run.config.model, vocab))
  params = run.params
  if quantize:
    params, _ = quantize_lib.roundtrip(params, quantize)
  ids = [tok.bos_id] + list(tok.encode(prompt))
  trained = int(run.config.train.seq_len)
  if len(ids) + max_new_tokens > trained:
    log.warning("sampling past the trained context: %d prompt + %d new "
                "tokens > train.seq_len=%d; positions beyond %d were never "
                "trained (RoPE extrapolates), expect degraded text there",
                len(ids), max_new_tokens, trained, trained)
  sampler = make_sampler(model, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_id=tok.eos_id, pad_id=tok.pad_id)
  out = jax.device_get(sampler(params, left_pad([ids] * num_samples,
                                                    tok.pad_id),
                               jax.random.key(seed)))
  return [tok.decode(row[:n]) for row, n in zip(out["tokens"],
                                                 out["lengths"])]


def body(fv) -> None:
  _check(fv)
  texts = sample_run(fv.workdir, fv.prompt, max_new_tokens=fv.max_new_tokens,
                     temperature=fv.temperature, top_k=fv.top_k,
                     top_p=fv.top_p, seed=fv.seed, step=fv.step,
                     num_samples=fv.num_samples, quantize=fv.quantize)
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f"--- sample {i}")
    print(fv.prompt + text)


def main(argv) -> int:
  """`llmlab sample` (argv excludes the program and subcommand)."""
  return cli_common.run("sample", argv, define, body, doc=__doc__,
                        required=("workdir",))
