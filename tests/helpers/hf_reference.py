"""Builds Hugging Face T5Gemma reference models with every weight random (norms included)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration, T5GemmaModuleConfig


def module_config(**kw) -> T5GemmaModuleConfig:
  base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16,
              sliding_window=5, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
  base.update(kw)
  return T5GemmaModuleConfig(**base)


def random_model(encoder: dict, decoder: dict, seed: int = 0) -> T5GemmaForConditionalGeneration:
  """An eager-attention float32 T5Gemma whose weights are all drawn at random.

  Linear weights get std 1.5 / sqrt(fan_in) so attention scores are large enough for the softcap
  to matter; norm weights get std 0.5 around 0 (HF initialises them at exactly 0, which would
  hide a wrong `1 + w`); embeddings get std 2 / sqrt(d) so logits are O(1) and softcaps bite.
  """
  cfg = T5GemmaConfig(encoder=module_config(**encoder), decoder=module_config(**decoder),
                      vocab_size=encoder.get("vocab_size", 512), attn_implementation="eager")
  torch.manual_seed(seed)
  return randomize_(T5GemmaForConditionalGeneration(cfg).eval())


def randomize_(model):
  """Draws every weight of a torch model in place (see `random_model` for the scales); tied
  weights are drawn once. Returns the model."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.normal_(0.0, 0.5)
      elif "embed_tokens" in name:
        p.normal_(0.0, 2.0 / np.sqrt(p.shape[1]))
      else:
        p.normal_(0.0, 1.5 / np.sqrt(p.shape[1]))
  return model


def logits(model, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
  """float32 [B, T, V] logits, always passing both attention masks (see DESIGN.md pitfalls)."""
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(enc).long(),
                attention_mask=torch.from_numpy(enc != 0).long(),
                decoder_input_ids=torch.from_numpy(dec).long(),
                decoder_attention_mask=torch.from_numpy(dec != 0).long())
  return out.logits.float().numpy()


def padded_batch(rng: np.random.Generator, vocab: int, batch: int, enc_len: int, dec_len: int):
  """Random token rows with differing right padding; decoder rows start with BOS (2)."""
  enc = rng.integers(3, vocab, size=(batch, enc_len)).astype(np.int32)
  dec = rng.integers(3, vocab, size=(batch, dec_len)).astype(np.int32)
  dec[:, 0] = 2
  for b in range(1, batch):
    enc[b, enc_len - 3 * b:] = 0
    dec[b, dec_len - 2 * b:] = 0
  return enc, dec


# ------------------------------------------------------------------------------ T5Gemma 2

T5GEMMA2_EOI = 250  # inside the tiny vocabulary, so the unscaled eoi embedding is exercised


def random_t5gemma2_model(encoder: dict, decoder: dict, seed: int = 0):
  """An eager float32 `T5Gemma2ForConditionalGeneration` with every weight random (norms, q/k
  norms and eoi_embedding included) and a throwaway one-layer SigLIP tower.

  `encoder` / `decoder` override the text fields of a tiny base config (hidden 32, 4 heads,
  2 KV heads, head_dim 16, qpas 12, window 4, vocab 256, RoPE 1e4 local / 1e6 linear x8 global).
  """
  from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration

  base = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              query_pre_attn_scalar=12, sliding_window=4, max_position_embeddings=64,
              rope_parameters={
                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                  "full_attention": {"rope_type": "linear", "factor": 8.0,
                                     "rope_theta": 1000000.0}})
  vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
  cfg = T5Gemma2Config(
      encoder=dict(text_config=dict(base, **encoder), vision_config=vision,
                   mm_tokens_per_image=4, eoi_token_index=T5GEMMA2_EOI,
                   boi_token_index=T5GEMMA2_EOI - 1),
      decoder=dict(base, **decoder), attn_implementation="eager", dtype="float32")
  torch.manual_seed(seed)
  model = T5Gemma2ForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # tied tensors appear once
    for _, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.2))
  return model
