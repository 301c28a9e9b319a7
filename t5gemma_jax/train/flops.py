"""Model FLOPs of a T5Gemma training step, and MFU against the accelerator's bf16 peak.

The count is written out per matmul family (MaxText style) so that each term can be checked by
hand. Conventions:

* A matmul of [m, k] by [k, n] costs 2 * m * n * k FLOPs (one multiply and one add per term).
* Training costs 3x the forward pass: the backward pass does two matmuls of the forward's size
  per forward matmul (gradient of the input and of the weight). Recomputation under remat is
  not counted: these are model FLOPs, the work the model needs, not the work the program does.
* Attention scores and values count only the (query, key) pairs the mask lets through: the full
  S x S for bidirectional layers, T (T + 1) / 2 for causal ones, the window for sliding layers.
  Our attention computes the dense masked product, so hardware FLOPs are higher than this.
* Embedding lookups, norms, RoPE, softmax, softcaps and the GeGLU gating are not matmuls and
  count 0. The tied LM head is a matmul (d -> vocab at every decoder position).
* Padding is counted: the step's work is set by the padded shapes (batch, lengths).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax

from t5gemma_jax.chips import CHIPS
from t5gemma_jax.config import DecoderOnlyConfig, ModelConfig, ModuleConfig, is_decoder_only
from t5gemma_jax.model.masks import layer_offsets, layer_window, window_offsets

# Dense (not 2:4 sparse) bf16 matmul peak per chip in FLOP/s. Keys are `device_kind` strings.
# TPUs come from `chips.CHIPS` (figures and sources there), also under "TPU v5e"-style names.
PEAK_BF16_FLOPS = {
    **{chip.device_kind: chip.peak_bf16_flops for chip in CHIPS.values()},
    **{f"TPU {chip.generation}": chip.peak_bf16_flops for chip in CHIPS.values()},
    "NVIDIA A100": 312e12,  # A100 datasheet: 312 TFLOPS bf16 dense (624 sparse), SXM and PCIe.
    "NVIDIA H100": 989e12,  # H100 SXM datasheet: 1979 TFLOPS bf16 with sparsity, half dense.
    "NVIDIA H100 PCIe": 756e12,  # H100 PCIe datasheet: 1513 sparse, half dense.
    "NVIDIA H100 NVL": 835e12,  # H100 NVL datasheet: 1671 sparse, half dense.
    "NVIDIA H200": 989e12,  # H200 SXM datasheet: 1979 TFLOPS bf16 with sparsity, half dense.
    "NVIDIA H200 NVL": 835e12,  # H200 NVL datasheet: 1671 sparse, half dense.
}

# GPU kinds carry memory and form-factor suffixes ("NVIDIA H100 80GB HBM3") and match by
# prefix. TPU kinds must match exactly: "TPU v4 lite" is the inference v4i, not a v4.
_PREFIX_MATCHED = ("nvidia ",)


# ------------------------------------------------------------------------------ key counts


def window_pairs(q_length: int, kv_length: int, lo: Optional[int], hi: Optional[int]) -> int:
  """(query, key) pairs with lo <= j - i <= hi (None: unbounded) for i < q_length, j < kv_length.

  Returns:
    The sum over queries of the keys inside the window (clipped at the sequence ends).
  """
  total = 0
  for i in range(q_length):
    first = 0 if lo is None else max(0, i + lo)
    last = kv_length - 1 if hi is None else min(kv_length - 1, i + hi)
    total += max(0, last - first + 1)
  return total


def layer_pairs(module: ModuleConfig, layer_type: str, length: int, causal: bool,
                dense: bool = False) -> int:
  """Pairs one self-attention layer of `module` computes on a sequence of `length`.

  Args:
    causal: decoder self-attention (else the encoder's bidirectional attention).
    dense: count what the XLA path executes, the full length x length score matrix (the mask
      is applied to it, not used to skip work), instead of the pairs the mask lets through.
  """
  if dense:
    return length * length
  return window_pairs(length, length, *layer_offsets(module, layer_type, causal))


def bidirectional_pairs(length: int, window: Optional[int] = None, split: bool = False) -> int:
  """Pairs of an encoder self-attention layer: S * S, or the keys inside the window
  (|i - j| <= W; with `split`, T5Gemma 2's W-key window)."""
  return window_pairs(length, length, *window_offsets(window, False, split))


def causal_pairs(length: int, window: Optional[int] = None) -> int:
  """Pairs of a decoder self-attention layer: T (T + 1) / 2, or sum_i min(i + 1, W)."""
  return window_pairs(length, length, *window_offsets(window, True))


# ------------------------------------------------------------------- forward FLOPs per family


def matmul_flops(m: int, k: int, n: int) -> int:
  """Forward FLOPs of an [m, k] x [k, n] matmul: 2 * m * k * n."""
  return 2 * m * k * n


def qo_projection_flops(module: ModuleConfig, tokens: int) -> int:
  """Query (d -> heads * head_dim) and output (heads * head_dim -> d) projections."""
  width = module.num_heads * module.head_dim
  return 2 * matmul_flops(tokens, module.hidden_size, width)


def kv_projection_flops(module: ModuleConfig, tokens: int, source_width: int) -> int:
  """Key and value projections, source_width -> kv_heads * head_dim each (GQA-sized).

  For cross-attention `tokens` are encoder positions and `source_width` the encoder width.
  """
  return 2 * matmul_flops(tokens, source_width, module.num_kv_heads * module.head_dim)


def attention_flops(module: ModuleConfig, pairs: int) -> int:
  """Scores (q . k) and weighted values (p . v) over `pairs` (query, key) pairs, all heads.

  Each pair costs head_dim multiply-adds per query head in each of the two matmuls; GQA does not
  change this (every query head still attends).
  """
  return 2 * 2 * pairs * module.num_heads * module.head_dim


def mlp_flops(module: ModuleConfig, tokens: int) -> int:
  """GeGLU MLP: gate and up (d -> f) then down (f -> d)."""
  return 3 * matmul_flops(tokens, module.hidden_size, module.intermediate_size)


def lm_head_flops(cfg: ModelConfig, tokens: int) -> int:
  """Output layer d -> vocab. Tied to the decoder embedding, but still one full matmul."""
  return matmul_flops(tokens, cfg.decoder.hidden_size, cfg.vocab_size)


# --------------------------------------------------------------------------------- totals


def flops_breakdown(cfg: ModelConfig, batch: int, inputs_length: int, targets_length: int,
                    training: bool = True, dense_attention: bool = False) -> dict[str, float]:
  """FLOPs of one step on a [batch, inputs_length] -> [batch, targets_length] batch, by family.

  A decoder-only model reads each row as one sequence of inputs_length + targets_length tokens
  (`pipeline.feature_converter`): its families are the decoder's and the LM head (at every
  position), the encoder and cross-attention ones are 0. PrefixLM adds the pairs above the
  diagonal inside a prefix of inputs_length tokens.

  Args:
    cfg: the model config.
    batch: global batch size (rows, packed or not).
    inputs_length: encoder length S.
    targets_length: decoder length T.
    training: 3x forward (forward + backward) when True, the forward pass alone when False.
    dense_attention: count every score of the [T, S] matrices, as the XLA attention path
      executes them, instead of the pairs the masks let through (the model FLOPs).

  Returns:
    FLOPs keyed by encoder_projections, encoder_attention, encoder_mlp, decoder_projections,
    decoder_self_attention, cross_attention_projections, cross_attention, decoder_mlp and
    lm_head; they sum to the step's total.
  """
  if is_decoder_only(cfg):
    return _decoder_only_breakdown(cfg, batch, inputs_length, targets_length, training,
                                   dense_attention)
  enc, dec = cfg.encoder, cfg.decoder
  s, t = inputs_length, targets_length
  enc_tokens, dec_tokens = batch * s, batch * t
  enc_pairs = sum(layer_pairs(enc, lt, s, False, dense_attention) for lt in enc.layer_types)
  dec_pairs = sum(layer_pairs(dec, lt, t, True, dense_attention) for lt in dec.layer_types)
  cross_layers = sum(cfg.reads_encoder(lt) for lt in dec.layer_types)
  forward = {
      "encoder_projections": enc.num_layers * (
          qo_projection_flops(enc, enc_tokens)
          + kv_projection_flops(enc, enc_tokens, enc.hidden_size)),
      "encoder_attention": batch * attention_flops(enc, enc_pairs),
      "encoder_mlp": enc.num_layers * mlp_flops(enc, enc_tokens),
      "decoder_projections": dec.num_layers * (
          qo_projection_flops(dec, dec_tokens)
          + kv_projection_flops(dec, dec_tokens, dec.hidden_size)),
      "decoder_self_attention": batch * attention_flops(dec, dec_pairs),
      # Queries come from the decoder; keys and values from every encoder position. Merged
      # attention reuses the self-attention queries and output projection.
      "cross_attention_projections": cross_layers * (
          (0 if cfg.merged_attention else qo_projection_flops(dec, dec_tokens))
          + kv_projection_flops(dec, enc_tokens, enc.hidden_size)),
      "cross_attention": cross_layers * batch * attention_flops(dec, t * s),
      "decoder_mlp": dec.num_layers * mlp_flops(dec, dec_tokens),
      "lm_head": lm_head_flops(cfg, dec_tokens),
  }
  factor = 3 if training else 1
  return {name: float(factor * value) for name, value in forward.items()}


def _decoder_only_breakdown(cfg: DecoderOnlyConfig, batch: int, inputs_length: int,
                            targets_length: int, training: bool,
                            dense_attention: bool) -> dict[str, float]:
  dec, length = cfg.decoder, inputs_length + targets_length
  tokens = batch * length
  pairs = sum(layer_pairs(dec, lt, length, True, dense_attention) for lt in dec.layer_types)
  if cfg.prefix_lm and not dense_attention:
    for lt in dec.layer_types:  # prefix token i also sees later prefix tokens j (j - i < W)
      window = layer_window(dec, lt)
      pairs += window_pairs(inputs_length, inputs_length, 1, None if window is None
                            else window - 1)
  forward = dict.fromkeys(_LAYER_FAMILIES, 0)
  forward.update({
      "decoder_projections": dec.num_layers * (
          qo_projection_flops(dec, tokens) + kv_projection_flops(dec, tokens, dec.hidden_size)),
      "decoder_self_attention": batch * attention_flops(dec, pairs),
      "decoder_mlp": dec.num_layers * mlp_flops(dec, tokens),
      "lm_head": lm_head_flops(cfg, tokens)})
  factor = 3 if training else 1
  return {name: float(factor * value) for name, value in forward.items()}


def training_flops_per_step(cfg: ModelConfig, batch: int, inputs_length: int,
                            targets_length: int, dense_attention: bool = False) -> float:
  """Model FLOPs of one training step (forward + backward = 3x forward).

  Args:
    cfg: the model config.
    batch: global batch size.
    inputs_length: encoder length S.
    targets_length: decoder length T.
    dense_attention: see `flops_breakdown`.

  Returns:
    The sum of `flops_breakdown(..., training=True)`.
  """
  return sum(flops_breakdown(cfg, batch, inputs_length, targets_length,
                             dense_attention=dense_attention).values())


_LAYER_FAMILIES = ("encoder_projections", "encoder_attention", "encoder_mlp",
                   "decoder_projections", "decoder_self_attention",
                   "cross_attention_projections", "cross_attention", "decoder_mlp")
_ATTENTION_FAMILIES = ("encoder_attention", "decoder_self_attention", "cross_attention")


def executed_flops_per_step(cfg: ModelConfig, batch: int, inputs_length: int,
                            targets_length: int, remat_policy: str = "none") -> float:
  """Matmul FLOPs the XLA program of one training step executes (what the chip must do).

  Model FLOPs (`training_flops_per_step`) plus what the program does beyond the model's need:
    * dense attention: every score of the [T, S] matrices, masked or not;
    * rematerialisation (`remat_policy`, as `RunOptions`), recomputed in the backward pass:
      "full" runs every layer's forward
      again; "minimal" keeps the projections, the attention output and the MLP activations
      (`model.transformer.SAVED_NAMES`) and recomputes only the attention scores and values.
  Elementwise work (norms, softmax, activations) is not counted, as it is not in model FLOPs.
  """
  train = flops_breakdown(cfg, batch, inputs_length, targets_length, dense_attention=True)
  forward = flops_breakdown(cfg, batch, inputs_length, targets_length, training=False,
                            dense_attention=True)
  total = sum(train.values())
  if remat_policy == "full":
    total += sum(forward[k] for k in _LAYER_FAMILIES)
  elif remat_policy == "minimal":
    total += sum(forward[k] for k in _ATTENTION_FAMILIES)
  return total


# ------------------------------------------------------------------------------------ MFU


def peak_flops(device: Union[None, str, Any] = None,
               override: Optional[float] = None) -> Optional[float]:
  """Dense bf16 peak FLOP/s of one device, or None when it is not known.

  Args:
    device: a `jax.Device`, a `device_kind` string, or None for `jax.devices()[0]`.
    override: a peak given by the user (a gin flag); returned as is when set.

  Returns:
    FLOP/s per device, or None for unknown kinds such as CPUs: callers then report MFU as
    unavailable instead of inventing a number.
  """
  if override is not None:
    if override <= 0:
      raise ValueError(f"peak_flops override must be positive, got {override}")
    return float(override)
  if device is None:
    device = jax.devices()[0]
  kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
  kind = " ".join(kind.lower().split())
  table = {name.lower(): value for name, value in PEAK_BF16_FLOPS.items()}
  if kind in table:
    return table[kind]
  # The longest prefix wins so that "NVIDIA H100 PCIe" is not read as an SXM H100.
  matches = [name for name in table
             if name.startswith(_PREFIX_MATCHED) and kind.startswith(name)]
  return table[max(matches, key=len)] if matches else None


def tflops_per_device(flops_per_step: float, step_seconds: float, num_devices: int) -> float:
  """Achieved model TFLOP/s per device.

  Args:
    flops_per_step: model FLOPs of one step over all devices (`training_flops_per_step`).
    step_seconds: wall time of one step.
    num_devices: devices that share the step.

  Returns:
    flops_per_step / step_seconds / num_devices / 1e12.
  """
  return _flops_per_device_second(flops_per_step, step_seconds, num_devices) / 1e12


def model_flops_utilization(flops_per_step: float, step_seconds: float, num_devices: int,
                            peak_flops_per_device: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' combined peak.

  Args:
    flops_per_step: model FLOPs of one step over all devices.
    step_seconds: wall time of one step.
    num_devices: devices that share the step.
    peak_flops_per_device: from `peak_flops`.

  Returns:
    A fraction (0.4 means 40% MFU).
  """
  if peak_flops_per_device <= 0:
    raise ValueError(f"peak_flops_per_device must be positive, got {peak_flops_per_device}")
  achieved = _flops_per_device_second(flops_per_step, step_seconds, num_devices)
  return achieved / peak_flops_per_device


def _flops_per_device_second(flops_per_step: float, step_seconds: float,
                             num_devices: int) -> float:
  if step_seconds <= 0 or num_devices <= 0:
    raise ValueError(f"step_seconds ({step_seconds}) and num_devices ({num_devices}) must be "
                     "positive")
  return flops_per_step / step_seconds / num_devices
