"""Search over a decoding step: greedy, sampling (temperature, top-k, top-p) and beam search.

    tokens = decoding.generate(params, cfg, encoder_input_tokens, max_new_tokens=32)

No model math lives here. A decoder-only model (`model.decoder_only`) reads BOS + the inputs
as its prompt (`DecoderOnly.start_decode`) and continues each row from its own last token.
The encoder-decoder decodes through its own modules: `T5Gemma.start_decode`
runs BOS through the decoder and builds the cache (every layer's encoder keys and values
projected once, a self-attention ring per layer, stacked on the layer axis when the params are
scanned), `T5Gemma.decode_step` runs one position through the same (scanned) layers as
training. The searches below see only `tokens_to_logits(tokens, cache) -> (logits, cache)`.
The whole loop is one jitted `lax.while_loop` that stops as soon as every row has emitted EOS.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from t5gemma_jax.config import ModelConfig, is_decoder_only
from t5gemma_jax.model import from_config, layout, masks
from t5gemma_jax.run_options import RunOptions

Array = jax.Array
Cache = Any
# tokens int32 [B], cache -> (float32 logits [B, V], cache)
TokensToLogits = Callable[[Array, Cache], tuple[Array, Cache]]
STRATEGIES = ("greedy", "sample", "beam")
_NEG = -1.0e9  # the "impossible" score of transformers' beam search, kept for parity


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


def _forbid_eos(scores: Array, t: Array, min_new_tokens: int, eos_id: int) -> Array:
  """[B, V] scores with EOS impossible while fewer than `min_new_tokens` tokens exist (HF's
  `min_new_tokens`: applied to whatever scores the search ranks)."""
  if min_new_tokens <= 0 or not 0 <= eos_id < scores.shape[-1]:
    return scores
  early = (t < min_new_tokens) & (jnp.arange(scores.shape[-1]) == eos_id)
  return jnp.where(early, -jnp.inf, scores)


def sample_search(logits: Array, cache: Cache, tokens_to_logits: TokensToLogits, *,
                  max_new_tokens: int, eos_id: int, pad_id: int, rng: Array,
                  strategy: str = "greedy", temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, min_new_tokens: int = 0) -> Array:
  """Greedy or sampled decoding, one token per row per step.

  Args:
    logits: float32 [B, V] for the first new token; cache: the step's state after it.
    tokens_to_logits: the next position's logits (and cache) given the chosen tokens.
    max_new_tokens: tokens per row; the step runs max_new_tokens - 1 times at most.
    rng: sampling key, split once per token.
    min_new_tokens: EOS cannot be chosen before this many tokens.

  Returns:
    int32 [B, max_new_tokens]: tokens, EOS then padding.
  """
  b = logits.shape[0]
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

  def pick(t, logits, out, done, rng):
    rng, sub = jax.random.split(rng)
    nxt = _choose(_forbid_eos(logits, t, min_new_tokens, eos_id), sub, strategy, temperature,
                  top_k, top_p)
    nxt = jnp.where(done, pad_id, nxt)  # finished rows only emit padding
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t, axis=1)
    return nxt, out, done | (nxt == eos_id), rng

  def cond(state):
    t, _, _, done, _, _ = state
    return (t < max_new_tokens - 1) & ~jnp.all(done)

  def body(state):
    t, logits, out, done, cache, rng = state
    nxt, out, done, rng = pick(t, logits, out, done, rng)
    logits, cache = tokens_to_logits(nxt, cache)
    return t + 1, logits, out, done, cache, rng

  start = (jnp.int32(0), logits, out, jnp.zeros((b,), bool), cache, rng)
  t, logits, out, done, _, rng = jax.lax.while_loop(cond, body, start)
  # The last token needs no step after it (nor does a row that is already done).
  return pick(t, logits, out, done, rng)[1]


def beam_search(logits: Array, cache: Cache, tokens_to_logits: TokensToLogits,
                select_beams: Callable[[Cache, Array], Cache], *, num_beams: int,
                max_new_tokens: int, eos_id: int, pad_id: int, length_penalty: float,
                min_new_tokens: int = 0) -> Array:
  """Beam search with transformers' semantics (early_stopping=False): 2K candidates per step,
  finished hypotheses scored by sum log-prob / generated_length ** length_penalty, and a row
  stops once its best running beam cannot beat its worst finished one at the current length.

  Args:
    logits: float32 [B * K, V] for the first token (rows, then beams: each row's K copies);
      cache: the step's state after it, same rows.
    select_beams: the cache with its rows gathered (`layout.select_beams`).
    min_new_tokens: EOS cannot end a hypothesis before this many tokens.

  Returns:
    int32 [B, max_new_tokens]: each row's best hypothesis, padded.
  """
  k, n = num_beams, max_new_tokens
  b = logits.shape[0] // k
  seqs = jnp.full((b, k, n), pad_id, jnp.int32)
  running_scores = jnp.tile(jnp.array([0.0] + [_NEG] * (k - 1), jnp.float32), (b, 1))
  start = dict(t=jnp.int32(0), logits=logits, cache=cache, running=seqs,
               running_scores=running_scores, finished=seqs,
               finished_scores=jnp.full((b, k), _NEG, jnp.float32),
               is_finished=jnp.zeros((b, k), bool), open=jnp.ones((b,), bool),
               all_hit=jnp.array(False))
  rows = jnp.arange(b)[:, None]

  def cond(st):
    return (st["t"] < n) & jnp.any(st["open"]) & ~st["all_hit"]

  def body(st):
    t = st["t"]
    vocab = st["logits"].shape[-1]
    log_probs = _forbid_eos(jax.nn.log_softmax(st["logits"], axis=-1), t, min_new_tokens,
                            eos_id).reshape(b, k, vocab)
    total = (log_probs + st["running_scores"][:, :, None]).reshape(b, k * vocab)
    top_scores, top_index = jax.lax.top_k(total, 2 * k)
    top_beam, top_token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    top_seqs = st["running"][rows, top_beam].at[:, :, t].set(top_token)  # [B, 2K, N]
    hits = (top_token == eos_id) | (t + 1 >= n)

    # The best K candidates that did not stop keep running.
    keep_scores, keep = jax.lax.top_k(top_scores + hits * _NEG, k)
    running = top_seqs[rows, keep]
    parent = jnp.take_along_axis(top_beam, keep, axis=1)  # [B, K] beam each came from

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
    # The next position's logits (after the last position: one step that goes unused).
    cache = select_beams(st["cache"], (rows * k + parent).reshape(-1))
    logits, cache = tokens_to_logits(running[:, :, t].reshape(-1), cache)
    return dict(t=t + 1, logits=logits, cache=cache, running=running,
                running_scores=keep_scores, finished=finished, finished_scores=best_scores,
                is_finished=is_finished, open=still_open, all_hit=jnp.all(hits))

  final = jax.lax.while_loop(cond, body, start)
  return final["finished"][:, 0]


@functools.lru_cache(maxsize=32)
def _compiled(cfg: ModelConfig, run: RunOptions, strategy: str, max_new_tokens: int,
              temperature: float, top_k: int, top_p: float, num_beams: int,
              length_penalty: float, min_new_tokens: int):
  return jax.jit(generate_function(cfg, strategy, max_new_tokens, temperature, top_k, top_p,
                                   num_beams, length_penalty, min_new_tokens, run=run))


def generate_function(cfg: ModelConfig, strategy: str = "greedy", max_new_tokens: int = 32,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      num_beams: int = 4, length_penalty: float = 0.6,
                      min_new_tokens: int = 0, run: RunOptions = RunOptions()):
  """The whole decoding loop, not yet jitted: `run(params, encoder_input_tokens, rng)` ->
  int32 [B, max_new_tokens], for params in the layout `run.scan_layers` says. `generate`
  jits it; `t5gemma compile` lowers it for a TPU topology."""
  net = from_config(cfg, run)
  beams = num_beams if strategy == "beam" else 1

  def decode(params, encoder_input_tokens, rng):
    variables = {"params": params}
    tokens = jnp.repeat(encoder_input_tokens, beams, axis=0)  # rows, then beams
    logits, cache = _start(net, cfg, variables, tokens, max_new_tokens)

    def tokens_to_logits(step_tokens, cache):
      logits, cache = net.apply(variables, step_tokens[:, None], cache,
                                method=net.decode_step)
      return logits[:, 0], cache

    ids = dict(max_new_tokens=max_new_tokens, eos_id=cfg.eos_id, pad_id=cfg.pad_id,
               min_new_tokens=min_new_tokens)
    if strategy == "beam":
      out = beam_search(logits, cache, tokens_to_logits, layout.select_beams,
                        num_beams=num_beams, length_penalty=length_penalty, **ids)
    else:
      out = sample_search(logits, cache, tokens_to_logits, rng=rng, strategy=strategy,
                          temperature=temperature, top_k=top_k, top_p=top_p, **ids)
    if not jax.sharding.get_abstract_mesh().empty:
      # Under a mesh (training's, with its rules) the rows come out sharded like the batch;
      # the few tokens are replicated so that every process can read them all.
      out = jax.lax.with_sharding_constraint(out, jax.sharding.PartitionSpec())
    return out

  return decode


def _start(net, cfg: ModelConfig, variables: dict, tokens: Array,
           max_new_tokens: int) -> tuple[Array, Cache]:
  """The first new token's float32 logits [B, V] and the cache after the prompt.

  Encoder-decoder: `tokens` int32 [B, S] are encoded and the decoder starts from BOS. Decoder-
  only: the prompt is BOS then `tokens` (right-padded; PrefixLM attends to it both ways) and
  each row continues after its own last token.
  """
  if is_decoder_only(cfg):
    prompt = jnp.concatenate([jnp.full((tokens.shape[0], 1), cfg.bos_id, jnp.int32), tokens],
                             axis=1)
    logits, cache = net.apply(variables, prompt, prompt.shape[1] + max_new_tokens,
                              method=net.start_decode)
    last = (cache["index"] - 1)[:, None, None]
    return jnp.take_along_axis(logits, last, axis=1)[:, 0], cache
  encoder_segment_ids = masks.segment_ids_from_tokens(tokens, cfg.pad_id)
  encoded = net.apply(variables, tokens, method=net.encode)
  bos = jnp.full((tokens.shape[0], 1), cfg.bos_id, jnp.int32)
  logits, cache = net.apply(variables, encoded, encoder_segment_ids, bos, max_new_tokens,
                            method=net.start_decode)
  return logits[:, 0], cache


def generate(params: Any, cfg: ModelConfig, encoder_input_tokens: Array, *,
             max_new_tokens: int, strategy: str = "greedy", num_beams: int = 4,
             length_penalty: float = 0.6, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, min_new_tokens: int = 0,
             mesh=None, run: RunOptions = RunOptions()) -> Array:
  """Decodes every row of a batch.

  Args:
    params: model params (scanned or not).
    cfg: the architecture.
    encoder_input_tokens: int32 [B, S], 0 = padding (rows may have different lengths); for a
      decoder-only model the prompt after BOS.
    max_new_tokens: decoder steps at most.
    strategy: "greedy", "sample" or "beam".
    num_beams, length_penalty: beam search width and alpha (score / length ** alpha).
    temperature, top_k, top_p: sampling filters (top_k=0 and top_p=1 disable them).
    seed: sampling seed.
    min_new_tokens: EOS is impossible before this many tokens (transformers' min_new_tokens).
    mesh: decode with the batch sharded over this mesh's (data, fsdp) axes, as in training
      (params should already be placed on it, e.g. a training state's params).
    run: dtypes and attention kernel; the layer layout is read from `params`.

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
  # Decode the params as they are stored (options that say otherwise are corrected here).
  run = layout.options_for(params, run)
  fn = _compiled(cfg, run, strategy, int(max_new_tokens), float(temperature), int(top_k),
                 float(top_p), int(num_beams), float(length_penalty), int(min_new_tokens))
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
