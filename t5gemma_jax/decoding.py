"""Autoregressive decoding with caches: encode once, the encoder's K/V projected once per
decoder layer, and a self-attention KV cache per decoder layer (a ring of `sliding_window`
slots for sliding layers). T5Gemma 2's merged attention attends over [ring | encoder K/V] in one
softmax, the encoder part being the layer's own k/v (and k_norm) applied to the encoder output.

    tokens = decoding.generate(params, cfg, encoder_input_tokens, max_new_tokens=32)

The whole loop is one jitted `lax.while_loop` that stops as soon as every row has emitted EOS.
The per-token math uses the same functions as the model (`rms_norm`, `geglu`, `apply_rope`,
`embed_tokens`, `dot_product_attention`), and tests pin it to the teacher-forced forward pass.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from t5gemma_jax.config import SLIDING, T5GemmaConfig
from t5gemma_jax.model import T5Gemma, layout
from t5gemma_jax.model.attention import dot_product_attention
from t5gemma_jax.model.layers import apply_rope, embed_tokens, embedding_logits, geglu, rms_norm

Array = jax.Array
STRATEGIES = ("greedy", "sample", "beam")
_NEG = -1.0e9  # the "impossible" score of transformers' beam search, kept for parity


def _dense(eqn: str, x: Array, kernel: Array, dtype) -> Array:
  return jnp.einsum(eqn, x.astype(dtype), kernel.astype(dtype))


def _cache_sizes(cfg: T5GemmaConfig, max_len: int) -> list[int]:
  m = cfg.decoder
  return [min(m.sliding_window, max_len) if t == SLIDING else max_len for t in m.layer_types]


def _decoder_embedding(params: dict, cfg: T5GemmaConfig) -> dict:
  """The embedder params the decoder reads: its own, or the encoder's shared table."""
  return params["encoder" if cfg.shared_embedding else "decoder"]["embedder"]


def _keys_values(attn: dict, cfg: T5GemmaConfig, x: Array) -> tuple[Array, Array]:
  """[B, S, D] -> keys (k_norm applied, no RoPE) and values [B, S, K, Dh] of `attn`'s kernels.

  For the encoder output (computed once per input) `attn` is the layer's cross_attn params or,
  with merged attention, its self_attn params (the encoder keys reuse the self-attention k/v
  kernels and k_norm, without RoPE).
  """
  m, dt = cfg.decoder, cfg.activation_dtype
  k = _dense("bsd,dkh->bskh", x, attn["k"]["kernel"], dt)
  if m.qk_norm:
    k = rms_norm(k, attn["k_norm"]["scale"], m.rms_norm_eps)
  return k, _dense("bsd,dkh->bskh", x, attn["v"]["kernel"], dt)


def init_cache(params: dict, cfg: T5GemmaConfig, encoded: Array, max_len: int) -> list[dict]:
  """Per decoder layer: empty self-attention K/V slots and the encoder K/V.

  Args:
    params: unscanned model params.
    encoded: [B, S, D_enc] encoder output.
    max_len: decoder positions to hold (BOS + generated tokens).

  Returns:
    A list of {"k", "v": [B, slots, K, Dh], "pos": int32 [slots] (-1 = empty),
    "cross_k", "cross_v": [B, S, K, Dh]} (for merged attention, the encoder part of the
    layer's keys and values; absent on layers that do not read the encoder).
  """
  m, dt = cfg.decoder, cfg.activation_dtype
  b = encoded.shape[0]
  cache = []
  for i, (slots, layer_type) in enumerate(zip(_cache_sizes(cfg, max_len), m.layer_types)):
    c = {"k": jnp.zeros((b, slots, m.num_kv_heads, m.head_dim), dt),
         "v": jnp.zeros((b, slots, m.num_kv_heads, m.head_dim), dt),
         "pos": jnp.full((slots,), -1, jnp.int32)}
    if cfg.reads_encoder(layer_type):
      layer = params["decoder"][f"layers_{i}"]
      c["cross_k"], c["cross_v"] = _keys_values(
          layer["self_attn" if cfg.merged_attention else "cross_attn"], cfg, encoded)
    cache.append(c)
  return cache


def _queries(attn: dict, cfg: T5GemmaConfig, h: Array) -> Array:
  m = cfg.decoder
  q = _dense("btd,dnh->btnh", h, attn["q"]["kernel"], cfg.activation_dtype)
  return rms_norm(q, attn["q_norm"]["scale"], m.rms_norm_eps) if m.qk_norm else q


def _self_attention(sa: dict, cfg: T5GemmaConfig, c: dict, h: Array, t: Array,
                    layer_type: str, encoder_mask: Array) -> tuple[Array, dict]:
  """One position's self-attention (merged with the encoder keys for T5Gemma 2).

  Args:
    sa: the layer's self_attn params; c: its cache; h: normed input [B, 1, D]; t: position;
    encoder_mask: bool [B, S] (real encoder tokens).

  Returns:
    (attention output [B, 1, H, Dh], updated cache).
  """
  m = cfg.decoder
  b = h.shape[0]
  theta, factor = m.rope_for(layer_type)
  positions = jnp.full((b, 1), t, jnp.int32)
  q = apply_rope(_queries(sa, cfg, h), positions, theta, factor)
  k, v = _keys_values(sa, cfg, h)
  k = apply_rope(k, positions, theta, factor)
  slots = c["pos"].shape[0]
  slot = t % slots  # full layers never wrap; sliding layers keep their last `window` keys
  c = dict(c, k=jax.lax.dynamic_update_slice_in_dim(c["k"], k, slot, axis=1),
           v=jax.lax.dynamic_update_slice_in_dim(c["v"], v, slot, axis=1),
           pos=c["pos"].at[slot].set(t))
  valid = (c["pos"] >= 0) & (c["pos"] <= t)
  if layer_type == SLIDING:
    valid &= c["pos"] > t - m.sliding_window
  mask = jnp.broadcast_to(valid[None, None, :], (b, 1, slots))
  keys, values = c["k"], c["v"]
  if cfg.merged_attention and "cross_k" in c:
    # One softmax over [cached decoder keys | encoder keys], as the teacher-forced model.
    keys = jnp.concatenate([keys, c["cross_k"]], axis=1)
    values = jnp.concatenate([values, c["cross_v"]], axis=1)
    mask = jnp.concatenate([mask, encoder_mask[:, None, :]], axis=-1)
  out = dot_product_attention(q, keys, values, mask, scale=m.query_pre_attn_scalar ** -0.5,
                              softcap=m.attn_logit_softcapping)
  return out, c


def decode_step(params: dict, cfg: T5GemmaConfig, cache: list[dict], tokens: Array, t: Array,
                encoder_mask: Array) -> tuple[Array, list[dict]]:
  """One decoder position for every row.

  Args:
    params: unscanned params; cache: from `init_cache`; tokens: int32 [B] at position t;
    t: int32 scalar position; encoder_mask: bool [B, S] (real encoder tokens).

  Returns:
    (float32 logits [B, V] softcapped as the model's, updated cache).
  """
  m, dt = cfg.decoder, cfg.activation_dtype
  dec = params["decoder"]
  embedder = _decoder_embedding(params, cfg)
  emb = embedder["embedding"]
  x = embed_tokens(emb, tokens[:, None], dt, cfg.eoi_id, embedder.get("eoi_embedding"))
  new_cache = []
  for i, (layer_type, c) in enumerate(zip(m.layer_types, cache)):
    p = dec[f"layers_{i}"]
    norm = lambda name, h, p=p: rms_norm(h, p[name]["scale"], m.rms_norm_eps)
    sa = p["self_attn"]
    out, c = _self_attention(sa, cfg, c, norm("pre_self_attn_norm", x), t, layer_type,
                             encoder_mask)
    x = x + norm("post_self_attn_norm", _dense("btnh,nhd->btd", out, sa["o"]["kernel"], dt))
    if not cfg.merged_attention and "cross_k" in c:
      ca = p["cross_attn"]
      q = _queries(ca, cfg, norm("pre_cross_attn_norm", x))
      out = dot_product_attention(q, c["cross_k"], c["cross_v"], encoder_mask[:, None, :],
                                  scale=m.query_pre_attn_scalar ** -0.5,
                                  softcap=m.attn_logit_softcapping)
      x = x + norm("post_cross_attn_norm", _dense("btnh,nhd->btd", out, ca["o"]["kernel"], dt))
    mlp = p["mlp"]
    h = norm("pre_ffw_norm", x)
    h = geglu(_dense("btd,df->btf", h, mlp["gate"]["kernel"], dt),
              _dense("btd,df->btf", h, mlp["up"]["kernel"], dt))
    x = x + norm("post_ffw_norm", _dense("btf,fd->btd", h, mlp["down"]["kernel"], dt))
    new_cache.append(c)
  x = rms_norm(x, dec["final_norm"]["scale"], m.rms_norm_eps)
  logits = embedding_logits(emb, x, dt)
  if m.final_logit_softcapping is not None:
    cap = m.final_logit_softcapping
    logits = cap * jnp.tanh(logits / cap)
  return logits[:, 0], new_cache


def _choose(logits: Array, rng: Array, strategy: str, temperature: float, top_k: int,
            top_p: float) -> Array:
  """Next token per row: argmax, or a sample from the temperature / top-k / top-p filtered
  distribution (the filters of HF's logits warpers)."""
  if strategy == "greedy":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  neg = jnp.finfo(logits.dtype).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass before it is below top_p (the first token always stays).
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, neg)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _beam_search(params, cfg: T5GemmaConfig, encoded: Array, encoder_mask: Array,
                 max_new_tokens: int, num_beams: int, length_penalty: float) -> Array:
  """Beam search with transformers' semantics (early_stopping=False): 2K candidates per step,
  finished hypotheses scored by sum log-prob / generated_length ** length_penalty, and a row
  stops once its best running beam cannot beat its worst finished one at the current length.

  Returns:
    int32 [B, max_new_tokens]: each row's best hypothesis, padded.
  """
  b, k, n = encoded.shape[0], num_beams, max_new_tokens
  encoded = jnp.repeat(encoded, k, axis=0)  # [B*K, S, D]: rows then beams
  encoder_mask = jnp.repeat(encoder_mask, k, axis=0)
  cache = init_cache(params, cfg, encoded, n)
  seqs = jnp.full((b, k, n), cfg.pad_id, jnp.int32)
  running_scores = jnp.tile(jnp.array([0.0] + [_NEG] * (k - 1), jnp.float32), (b, 1))
  start = dict(t=jnp.int32(0), tokens=jnp.full((b * k,), cfg.bos_id, jnp.int32), cache=cache,
               running=seqs, running_scores=running_scores, finished=seqs,
               finished_scores=jnp.full((b, k), _NEG, jnp.float32),
               is_finished=jnp.zeros((b, k), bool), open=jnp.ones((b,), bool),
               all_hit=jnp.array(False))
  rows = jnp.arange(b)[:, None]

  def cond(st):
    return (st["t"] < n) & jnp.any(st["open"]) & ~st["all_hit"]

  def body(st):
    t = st["t"]
    logits, cache = decode_step(params, cfg, st["cache"], st["tokens"], t, encoder_mask)
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, vocab)
    total = (log_probs + st["running_scores"][:, :, None]).reshape(b, k * vocab)
    top_scores, top_index = jax.lax.top_k(total, 2 * k)
    top_beam, top_token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    top_seqs = st["running"][rows, top_beam].at[:, :, t].set(top_token)  # [B, 2K, N]
    hits = (top_token == cfg.eos_id) | (t + 1 >= n)

    # The best K candidates that did not stop keep running.
    keep_scores, keep = jax.lax.top_k(top_scores + hits * _NEG, k)
    running = top_seqs[rows, keep]
    parent = jnp.take_along_axis(top_beam, keep, axis=1)  # [B, K] beam each came from
    flat_parent = (rows * k + parent).reshape(-1)
    cache = [dict(c, k=c["k"][flat_parent], v=c["v"][flat_parent]) for c in cache]

    # Stopped candidates among the top K join the finished set if they score better.
    first_k = jnp.arange(2 * k) < k
    just_done = hits & first_k[None, :]
    scored = top_scores / ((t + 1).astype(jnp.float32) ** length_penalty)
    scored = scored + (~st["open"])[:, None] * _NEG + (~just_done) * _NEG
    merged_scores = jnp.concatenate([st["finished_scores"], scored], axis=1)
    best_scores, best = jax.lax.top_k(merged_scores, k)
    finished = jnp.concatenate([st["finished"], top_seqs], axis=1)[rows, best]
    is_finished = jnp.concatenate([st["is_finished"], just_done], axis=1)[rows, best]

    # transformers' early-stop heuristic at the new length.
    length = (t + 1).astype(jnp.float32)
    best_possible = keep_scores[:, :1] / (length ** length_penalty)
    worst = jnp.where(is_finished, jnp.min(best_scores, axis=1, keepdims=True), _NEG)
    still_open = st["open"] & jnp.any(best_possible > worst, axis=1)
    return dict(t=t + 1, tokens=running[:, :, t].reshape(-1), cache=cache, running=running,
                running_scores=keep_scores, finished=finished, finished_scores=best_scores,
                is_finished=is_finished, open=still_open, all_hit=jnp.all(hits))

  final = jax.lax.while_loop(cond, body, start)
  return final["finished"][:, 0]


@functools.lru_cache(maxsize=32)
def _compiled(cfg: T5GemmaConfig, strategy: str, max_new_tokens: int, temperature: float,
              top_k: int, top_p: float, num_beams: int, length_penalty: float):
  return jax.jit(generate_function(cfg, strategy, max_new_tokens, temperature, top_k, top_p,
                                   num_beams, length_penalty))


def generate_function(cfg: T5GemmaConfig, strategy: str = "greedy", max_new_tokens: int = 32,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      num_beams: int = 4, length_penalty: float = 0.6):
  """The whole decoding loop, not yet jitted: `run(params, encoder_input_tokens, rng)` ->
  int32 [B, max_new_tokens], for params and config in `decoding_layout`. `generate` jits it;
  `t5gemma compile` lowers it for a TPU topology."""
  net = T5Gemma(cfg)

  def run(params, encoder_input_tokens, rng):
    b = encoder_input_tokens.shape[0]
    encoded = net.apply({"params": params}, encoder_input_tokens, method=net.encode)
    encoder_mask = encoder_input_tokens != cfg.pad_id
    if strategy == "beam":
      return _beam_search(params, cfg, encoded, encoder_mask, max_new_tokens, num_beams,
                          length_penalty)
    cache = init_cache(params, cfg, encoded, max_new_tokens)
    out = jnp.full((b, max_new_tokens), cfg.pad_id, jnp.int32)
    start = (jnp.int32(0), jnp.full((b,), cfg.bos_id, jnp.int32), out,
             jnp.zeros((b,), bool), cache, rng)

    def cond(state):
      t, _, _, done, _, _ = state
      return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
      t, tokens, out, done, cache, rng = state
      logits, cache = decode_step(params, cfg, cache, tokens, t, encoder_mask)
      rng, sub = jax.random.split(rng)
      nxt = _choose(logits, sub, strategy, temperature, top_k, top_p)
      nxt = jnp.where(done, cfg.pad_id, nxt)  # finished rows only emit padding
      out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t, axis=1)
      return t + 1, nxt, out, done | (nxt == cfg.eos_id), cache, rng

    return jax.lax.while_loop(cond, body, start)[2]

  return run


def decoding_layout(params: Any, cfg: T5GemmaConfig) -> tuple[Any, T5GemmaConfig]:
  """(params, config) as `generate_function` takes them: unscanned, and with `share_blocks`
  decoder layer i holding the encoder's layer i; decoding runs the layers one by one and
  without remat (which only matters for gradients). Works on arrays and under jit."""
  return layout.untie_blocks(layout.unscan_params(params, cfg), cfg), decoding_config(cfg)


def decoding_config(cfg: T5GemmaConfig) -> T5GemmaConfig:
  """The config half of `decoding_layout`."""
  return cfg.replace(scan_layers=False, remat_policy="none")


def generate(params: Any, cfg: T5GemmaConfig, encoder_input_tokens: Array, *,
             max_new_tokens: int, strategy: str = "greedy", num_beams: int = 4,
             length_penalty: float = 0.6, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, mesh=None) -> Array:
  """Decodes every row of a batch.

  Args:
    params: model params (scanned or not).
    cfg: the model config.
    encoder_input_tokens: int32 [B, S], 0 = padding (rows may have different lengths).
    max_new_tokens: decoder steps at most.
    strategy: "greedy", "sample" or "beam".
    num_beams, length_penalty: beam search width and alpha (score / length ** alpha).
    temperature, top_k, top_p: sampling filters (top_k=0 and top_p=1 disable them).
    seed: sampling seed.
    mesh: decode with the batch sharded over this mesh's (data, fsdp) axes, as in training
      (params should already be placed on it, e.g. a training state's params).

  Returns:
    int32 [B, max_new_tokens]: generated tokens (BOS excluded), EOS then padding.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown decoding strategy {strategy!r}; known: {STRATEGIES}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if strategy == "beam" and num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  if strategy == "sample" and temperature <= 0:
    raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
  params, cfg = decoding_layout(params, cfg)
  fn = _compiled(cfg, strategy, int(max_new_tokens), float(temperature), int(top_k),
                 float(top_p), int(num_beams), float(length_penalty))
  tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
  if mesh is None:
    return fn(params, tokens, jax.random.PRNGKey(seed))
  from t5gemma_jax import sharding
  rows, parallel = tokens.shape[0], sharding.data_parallel_size(mesh)
  if rows % parallel:
    raise ValueError(f"a batch of {rows} rows does not split over the mesh's {parallel} "
                     "data-parallel devices")
  tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    return fn(params, tokens, jax.random.PRNGKey(seed))
