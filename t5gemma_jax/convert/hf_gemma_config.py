"""One Gemma decoder stack's Hugging Face sub-config -> our `ModuleConfig`.

Every checkpoint we read describes its stacks with the same Gemma fields: a T5Gemma folder's
`encoder` / `decoder` and a Gemma 2 `config.json` in the Gemma 2 spelling
(`module_from_hf`), a T5Gemma 2 folder's text configs and a Gemma 3 text config in the
Gemma 3 spelling (`text_module_from_hf`: q/k norms, two RoPE tables, defaults for missing
fields). This module sits below every reader, writer and adapter, so each of them can build a
stack config without importing another.
"""

from __future__ import annotations

from typing import Any

from t5gemma_jax.config import FULL, SLIDING, ModuleConfig

# transformers' T5Gemma2TextConfig defaults, for fields a config.json may leave out.
TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                     num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                     head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                     rms_norm_eps=1e-6, final_logit_softcapping=None)
_DEFAULT_THETA = {"full": 1_000_000.0, "local": 10_000.0}
_SLIDING_PERIOD = 6  # HF default layer_types: every 6th layer is full attention


def first_id(value: Any) -> int:
  """A token id that HF may store as a list (e.g. several EOS ids): the first one.

  Args:
    value: an int, or a list / tuple of ints.

  Returns:
    The int id.
  """
  return int(value[0] if isinstance(value, (list, tuple)) else value)


def check_supported(m: dict, where: str) -> None:
  """Refuses sub-config options our Gemma blocks do not implement (either model type).

  Args:
    m: one stack's sub-config dict.
    where: what it is, for error messages.

  Raises:
    ValueError: an activation other than tanh-approximated GELU, or attention biases.
  """
  act = m.get("hidden_activation", "gelu_pytorch_tanh")
  if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise ValueError(f"{where}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
  if m.get("attention_bias", False):
    raise ValueError(f"{where}: attention_bias=true is not supported")


def _dropout(m: dict, top: dict) -> dict:
  # T5Gemma puts dropout on the top-level config; a stack's own value is the fallback.
  return dict(dropout_rate=float(top.get("dropout_rate", m.get("dropout_rate", 0.0))),
              attention_dropout=float(top.get("attention_dropout",
                                              m.get("attention_dropout", 0.0))))


def module_from_hf(m: dict, top: dict, where: str) -> ModuleConfig:
  """A T5Gemma (or Gemma 2) stack: one RoPE theta, every field given.

  Args:
    m: the stack's sub-config (T5Gemma's `encoder` / `decoder`, or a whole Gemma 2 config).
    top: the top-level config, whose dropout fields win over the stack's.
    where: what `m` is, for error messages.

  Returns:
    The stack's `ModuleConfig`.

  Raises:
    ValueError: a missing field or an option we do not implement.
  """
  check_supported(m, where)
  rope = m.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"{where}: rope_type {rope.get('rope_type')!r} is not supported")
  theta = rope.get("rope_theta", m.get("rope_theta", 10000.0))
  try:
    return ModuleConfig(
        hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_layers=m["num_hidden_layers"], num_heads=m["num_attention_heads"],
        num_kv_heads=m["num_key_value_heads"], head_dim=m["head_dim"],
        query_pre_attn_scalar=m["query_pre_attn_scalar"], vocab_size=m["vocab_size"],
        attn_logit_softcapping=m.get("attn_logit_softcapping"),
        final_logit_softcapping=m.get("final_logit_softcapping"),
        sliding_window=m.get("sliding_window"), layer_types=m.get("layer_types"),
        rope_theta=float(theta), rms_norm_eps=float(m.get("rms_norm_eps", 1e-6)),
        **_dropout(m, top))
  except KeyError as e:
    raise ValueError(f"{where}: missing field {e.args[0]!r}") from None


def _rope_from_hf(m: dict, where: str) -> tuple[float, float, float]:
  """(full theta, sliding theta, full linear factor) from either rope spelling."""
  rope = m.get("rope_parameters")
  if isinstance(rope, dict) and (FULL in rope or SLIDING in rope):
    full, local = rope.get(FULL) or {}, rope.get(SLIDING) or {}
  else:  # Gemma-3 style keys; a legacy rope_scaling applies to full layers only
    full = dict(m.get("rope_scaling") or {}, rope_theta=m.get("rope_theta",
                                                               _DEFAULT_THETA["full"]))
    local = {"rope_theta": m.get("rope_local_base_freq", _DEFAULT_THETA["local"])}
  if local.get("rope_type", "default") != "default":
    raise ValueError(f"{where}: sliding-layer rope_type {local.get('rope_type')!r} is not "
                     "supported (default)")
  full_type = full.get("rope_type", full.get("type", "default"))
  if full_type not in ("default", "linear"):
    raise ValueError(f"{where}: full-layer rope_type {full_type!r} is not supported "
                     "(default, linear)")
  factor = float(full.get("factor", 1.0)) if full_type == "linear" else 1.0
  return (float(full.get("rope_theta", _DEFAULT_THETA["full"])),
          float(local.get("rope_theta", _DEFAULT_THETA["local"])), factor)


def text_module_from_hf(m: dict, top: dict, where: str) -> ModuleConfig:
  """A T5Gemma 2 (or Gemma 3) text stack: q/k norms, separate sliding and full RoPE, the split
  encoder window; fields left out take transformers' defaults (`TEXT_DEFAULTS`).

  Args:
    m: the text sub-config (T5Gemma 2's `encoder.text_config` / `decoder`, or Gemma 3's).
    top: the top-level config, whose dropout fields win over the stack's.
    where: what `m` is, for error messages.

  Returns:
    The stack's `ModuleConfig`.

  Raises:
    ValueError: attention softcapping (transformers' T5Gemma 2 ignores it), bidirectional
      attention, or an option we do not implement.
  """
  check_supported(m, where)
  if m.get("attn_logit_softcapping") is not None:
    raise ValueError(f"{where}: attn_logit_softcapping={m['attn_logit_softcapping']} is set, "
                     "but transformers' T5Gemma 2 never applies it; refusing an ambiguous model")
  if m.get("use_bidirectional_attention"):
    raise ValueError(f"{where}: use_bidirectional_attention=true (transformers then saves a "
                     "doubled sliding_window); refusing an ambiguous window")
  f = dict(TEXT_DEFAULTS, **{k: v for k, v in m.items() if v is not None or k in
                             ("final_logit_softcapping",)})
  layer_types = m.get("layer_types") or [
      FULL if (i + 1) % _SLIDING_PERIOD == 0 else SLIDING for i in range(f["num_hidden_layers"])]
  full_theta, local_theta, factor = _rope_from_hf(m, where)
  return ModuleConfig(
      hidden_size=f["hidden_size"], intermediate_size=f["intermediate_size"],
      num_layers=f["num_hidden_layers"], num_heads=f["num_attention_heads"],
      num_kv_heads=f["num_key_value_heads"], head_dim=f["head_dim"],
      query_pre_attn_scalar=f["query_pre_attn_scalar"], vocab_size=f["vocab_size"],
      attn_logit_softcapping=None, final_logit_softcapping=f["final_logit_softcapping"],
      sliding_window=f["sliding_window"], layer_types=layer_types, rope_theta=full_theta,
      rms_norm_eps=float(f["rms_norm_eps"]), **_dropout(m, top),
      qk_norm=True, rope_local_theta=local_theta, rope_scaling_factor=factor,
      encoder_window="split")


# --------------------------------------------------------------------- our stack -> HF fields


def gemma2_stack_to_hf(m: ModuleConfig) -> dict:
  """The Gemma 2 fields of one stack (a T5Gemma module, or a whole Gemma2ForCausalLM config),
  which `module_from_hf` reads back into `m`."""
  return {
      "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
      "query_pre_attn_scalar": m.query_pre_attn_scalar, "vocab_size": m.vocab_size,
      "attn_logit_softcapping": m.attn_logit_softcapping,
      "final_logit_softcapping": m.final_logit_softcapping,
      "sliding_window": m.sliding_window, "layer_types": list(m.layer_types),
      "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
      "rms_norm_eps": m.rms_norm_eps, "hidden_activation": "gelu_pytorch_tanh",
      "attention_bias": False, "dropout_rate": m.dropout_rate,
      "attention_dropout": m.attention_dropout, "tie_word_embeddings": True}


def gemma3_stack_to_hf(m: ModuleConfig) -> dict:
  """The Gemma 3 text fields of one stack (a T5Gemma 2 text config, or a Gemma3ForCausalLM
  config), which `text_module_from_hf` reads back (but for `encoder_window`)."""
  theta, factor = m.rope_for(FULL)
  full = {"rope_type": "default", "rope_theta": theta}
  if factor != 1.0:
    full = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
  return dict(gemma2_stack_to_hf(m), attn_logit_softcapping=None, rope_parameters={
      SLIDING: {"rope_type": "default", "rope_theta": m.rope_for(SLIDING)[0]}, FULL: full})


def fill_layer_types(text: dict) -> dict:
  """A Gemma 3 text config with `layer_types` filled in: configs from before that field name
  only the period (every N-th layer is global)."""
  if text.get("layer_types"):
    return text
  period = (text.get("sliding_window_pattern") or text.get("_sliding_window_pattern")
            or _SLIDING_PERIOD)
  n = text.get("num_hidden_layers", TEXT_DEFAULTS["num_hidden_layers"])
  return dict(text, layer_types=[FULL if (i + 1) % int(period) == 0 else SLIDING
                                 for i in range(n)])
