"""Parameter counts from a config's fields alone (no model code): what the model must build."""

from __future__ import annotations


def _attention(m, kv_input: int) -> int:
  """q, k, v, o kernels (no biases) and the optional q/k RMSNorm scales over head_dim."""
  q_and_o = 2 * m.hidden_size * m.num_heads * m.head_dim
  k_and_v = 2 * kv_input * m.num_kv_heads * m.head_dim
  return q_and_o + k_and_v + (2 * m.head_dim if m.qk_norm else 0)


def _block(m) -> int:
  """Self-attention, the gated MLP (gate, up, down) and four RMSNorms (pre/post attn, ffw)."""
  return _attention(m, m.hidden_size) + 3 * m.hidden_size * m.intermediate_size + \
      4 * m.hidden_size


def expected_param_count(cfg) -> int:
  """Total parameters of a `T5GemmaConfig`: embedding table(s) (the decoder's tied to the
  output; one table for both stacks with `shared_embedding`), T5Gemma 2's eoi embedding, each
  stack's final norm, encoder blocks, decoder blocks with a cross-attention (queries from the
  decoder, keys/values from the encoder's width) and its two norms on the layers that read
  the encoder unless attention is merged."""
  enc, dec = cfg.encoder, cfg.decoder
  n = enc.vocab_size * enc.hidden_size + enc.hidden_size + enc.num_layers * _block(enc)
  if not cfg.shared_embedding:
    n += dec.vocab_size * dec.hidden_size
  if cfg.eoi_id is not None:
    n += enc.hidden_size
  n += dec.hidden_size
  for layer_type in dec.layer_types:
    n += _block(dec)
    if not cfg.merged_attention and cfg.reads_encoder(layer_type):
      n += _attention(dec, enc.hidden_size) + 2 * dec.hidden_size
  return n
