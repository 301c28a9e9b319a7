"""Tokenizer files for a Hugging Face export that reproduce our seqio SentencePiece preprocessing.

`write_tokenizer_files(vocab, folder)` writes:

* `tokenizer.model`: the SentencePiece model without seqio's extra ids (as T5 ships
  `spiece.model`; `seqio.SentencePieceVocabulary(path, extra_ids=N)` rebuilds `vocab`);
* `tokenizer_config.json`, `special_tokens_map.json`: class `PreTrainedTokenizerFast`
  (transformers 5 maps it to `TokenizersBackend`), pad/eos/bos/unk pieces read from the model,
  EOS appended and no BOS (seqio's `add_eos=True`), sentinels `<extra_id_k>` listed in id order;
* `tokenizer.json`, when the `tokenizers` package is importable: the whole pipeline, which
  `AutoTokenizer.from_pretrained(folder)` loads verbatim, with the sentinels at their seqio ids.

One generic class serves both model types (tokenizer.json holds a Unigram or a BPE model):
the model-specific classes rebuild the pipeline in `__init__` and discard ours. `T5Tokenizer`
hard-codes unk id 2 (our BOS) and no byte fallback, so Cyrillic encodes as BOS; `GemmaTokenizer`
has no charsmap or dummy prefix (unfit for unigram models) and appends a `<mask>` token.
Without tokenizer.json, transformers converts tokenizer.model with its generic converter: the
special and sentinel ids are right, but for our unigram vocabulary it drops the dummy prefix and
nearly every text segments differently (a Gemma-style BPE model converts almost exactly).

How tokenizer.json mirrors `SentencePieceProcessor.EncodeAsIds`:

* normalizer: the model's precompiled charsmap (NFKC etc.); then, as SentencePiece does, space
  runs collapsed and edge spaces dropped (`remove_extra_whitespaces`), "▁" prepended
  (`add_dummy_prefix`) and spaces escaped; no pre-tokenizer: the model sees the whole text;
* unigram: pieces and scores; user-defined pieces (mode tokens) get the score SentencePiece's
  lattice gives them; pieces it never matches in text (control, byte, unused) get the lowest
  normal score, which leaves the unknown-piece penalty (lowest score - 10) unchanged;
* BPE: a merge for every split of a normal piece into two normal pieces, ranked by the merged
  piece's score; user-defined pieces are added tokens matched on the normalized text, as
  SentencePiece's longest-prefix matcher freezes them before merging;
* sentinels: special added tokens `<extra_id_k>` matched on the normalized text, where the
  normalizer's dummy prefix makes the pattern seqio's piece `▁<extra_id_k>`; decoding gives
  `<extra_id_k>` that piece's space back;
* post-processor `$A </s>`; decoder: unescape, byte fallback, strip the dummy prefix's space.

Known differences, checked by tests/test_tokenizer_files.py:

* Unigram ties: two segmentations using the same pieces in another order ("000"+"0" and
  "0"+"000") score the same. SentencePiece keeps path scores in float32 and rounding picks the
  winner; tokenizers keeps float64 scores and the first path. 34 of 3800 python_text texts
  (4 of the 804 validation ones), all long, differ so, in runs of a repeated character ("0000",
  "====", "))"); the ids differ in order only and decode to the same text.
* Literal "</s>", "<s>", "<pad>", "<unk>" in the input become special ids in transformers and
  plain text in SentencePiece; a literal byte-piece name ("<0x41>") can match the byte piece.
* Sentinels as tokens: tokenizers (0.23) names a normalized added token by its normalized form,
  so `convert_ids_to_tokens` gives seqio's piece `▁<extra_id_k>` (`convert_tokens_to_ids`
  takes `<extra_id_k>`), and `decode(..., skip_special_tokens=True)` keeps sentinels, as seqio's
  `decode` does. seqio stops decoding at the first EOS and renders control tokens as "";
  transformers does neither (with `skip_special_tokens=True` it drops the control tokens).
* Not our vocabularies: without `add_dummy_prefix`, sentinels match `<extra_id_k>` anywhere in
  the raw text and absorb all spaces before it (SentencePiece wants exactly one); BPE with
  `add_dummy_prefix` may lose the "▁" before a user-defined piece (a warning is logged); BPE
  merges that yield the same piece tie by rank, not position; unused pieces; user-defined
  pieces the charsmap would change; `treat_whitespace_as_suffix` is not supported.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import struct
from typing import Any

import seqio
from sentencepiece import sentencepiece_model_pb2

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# transformers 4's name for the tokenizers-backed class; transformers 5 maps it to
# `TokenizersBackend`, which loads tokenizer.json verbatim.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
_SPACE = "\u2581"  # SentencePiece's escaped space
# SentencePiece's lattice scores a user-defined piece `length * max_score_ - 0.1` with
# `max_score_` starting at FLT_MIN, i.e. about -0.1 in float32 whatever the length.
_USER_DEFINED_SCORE = struct.unpack("<f", struct.pack("<f", -0.1))[0]


def write_tokenizer_files(vocab: seqio.SentencePieceVocabulary, out_dir: str) -> list[str]:
  """Writes the tokenizer files of `vocab` into the existing folder `out_dir`.

  Args:
    vocab: a seqio SentencePiece vocabulary (its extra ids become `<extra_id_k>` sentinels).
    out_dir: destination folder; files of the same names are overwritten.

  Returns:
    The names of the files written, sorted.
  """
  proto = sentencepiece_model_pb2.ModelProto.FromString(vocab.sp_model)
  sentinels = _remove_sentinels(proto, vocab.extra_ids)
  specials = _special_pieces(proto)
  files = {
      TOKENIZER_MODEL: proto.SerializeToString(deterministic=True),
      TOKENIZER_CONFIG: _json_bytes(_tokenizer_config(specials, sentinels)),
      SPECIAL_TOKENS_MAP: _json_bytes(_special_tokens_map(specials, sentinels)),
  }
  try:
    importlib.import_module("tokenizers")
  except ImportError:
    logging.warning("the `tokenizers` package is not installed: writing %s without %s; "
                    "transformers will convert %s when loading, which may not segment exactly "
                    "like SentencePiece", out_dir, TOKENIZER_JSON, TOKENIZER_MODEL)
  else:
    tok = build_tokenizer(proto, specials, _added_tokens(proto, specials, sentinels))
    files[TOKENIZER_JSON] = _json_bytes(json.loads(tok.to_str()))
  for name, data in sorted(files.items()):
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(data)
  return sorted(files)


def _json_bytes(obj: Any) -> bytes:
  return (json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _remove_sentinels(proto, extra_ids: int) -> list[tuple[int, str]]:
  """Strips seqio's extra-id pieces off `proto`; returns (id, "<extra_id_k>") for each."""
  first = len(proto.pieces) - extra_ids
  sentinels = []
  for i in range(first, len(proto.pieces)):
    piece = proto.pieces[i]
    if piece.type != _Piece.USER_DEFINED or not piece.piece.startswith(_SPACE + "<extra_id_"):
      raise ValueError(f"piece {i} ({piece.piece!r}) is not one of seqio's extra ids")
    sentinels.append((i, piece.piece[len(_SPACE):]))
  del proto.pieces[first:]
  return sentinels


def _special_pieces(proto) -> dict[str, tuple[int, str]]:
  """{"pad_token": (id, piece), ...} for the special ids the model defines (id >= 0)."""
  spec = proto.trainer_spec
  ids = {"pad_token": spec.pad_id, "eos_token": spec.eos_id, "bos_token": spec.bos_id,
         "unk_token": spec.unk_id}
  return {name: (i, proto.pieces[i].piece) for name, i in ids.items() if i >= 0}


def _added_tokens(proto, specials, sentinels) -> dict[int, dict]:
  """tokenizer.json's added tokens by id: {id: AddedToken fields}.

  Special pieces match the raw text, as in every HF tokenizer. Sentinels and BPE user-defined
  pieces match the normalized text, where SentencePiece matches them; the normalizer then turns
  `<extra_id_k>` into seqio's piece `▁<extra_id_k>`. Without a dummy prefix that cannot happen,
  so sentinels match the raw text and take the spaces before them; with one, BPE user-defined
  pieces would get a "▁" in their pattern, so they match the raw text too.
  """
  def entry(content: str, normalized: bool, special: bool, lstrip: bool = False) -> dict:
    return {"content": content, "lstrip": lstrip, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": special}

  dummy_prefix = proto.normalizer_spec.add_dummy_prefix
  added = {i: entry(piece, False, True) for i, piece in specials.values()}
  if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
    user_defined = [(i, p.piece) for i, p in enumerate(proto.pieces)
                    if p.type == _Piece.USER_DEFINED]
    if user_defined and dummy_prefix:
      logging.warning("BPE model with add_dummy_prefix and user-defined pieces: the exported "
                      "tokenizer may drop the dummy-prefix piece next to them")
    added.update((i, entry(piece, not dummy_prefix, False)) for i, piece in user_defined)
  added.update((i, entry(content, dummy_prefix, True, lstrip=not dummy_prefix))
               for i, content in sentinels)
  return dict(sorted(added.items()))


def _tokenizer_config(specials, sentinels) -> dict:
  # No `added_tokens_decoder`: tokenizer.json holds the added tokens, and transformers 5 fails to
  # convert a unigram tokenizer.model (when tokenizer.json is missing) if it is given one. The
  # sentinels are listed in id order, so that conversion appends them at their seqio ids.
  config = {
      "tokenizer_class": TOKENIZER_CLASS,
      "add_bos_token": False,
      "add_eos_token": True,
      "additional_special_tokens": [content for _, content in sentinels],
      "clean_up_tokenization_spaces": False,
      "padding_side": "right",
  }
  config.update((name, piece) for name, (_, piece) in specials.items())
  return config


def _special_tokens_map(specials, sentinels) -> dict:
  tokens = {name: piece for name, (_, piece) in specials.items()}
  tokens["additional_special_tokens"] = [content for _, content in sentinels]
  return tokens


def build_tokenizer(proto, specials: dict[str, tuple[int, str]], added: dict[int, dict]):
  """The `tokenizers.Tokenizer` equivalent to SentencePiece model `proto` (extra ids removed).

  Args:
    proto: the SentencePiece ModelProto, without seqio's extra-id pieces.
    specials: `_special_pieces(proto)`.
    added: `_added_tokens(...)`; ids past the model's pieces are appended in id order.

  Returns:
    A tokenizers.Tokenizer whose ids match SentencePiece's, plus EOS.
  """
  # pylint: disable=import-outside-toplevel
  from tokenizers import AddedToken, Tokenizer, processors

  trainer = proto.trainer_spec
  if trainer.treat_whitespace_as_suffix:
    raise NotImplementedError("SentencePiece models with treat_whitespace_as_suffix")
  if trainer.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
    tok = Tokenizer(_unigram_model(proto))
  elif trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
    tok = Tokenizer(_bpe_model(proto))
  else:
    raise NotImplementedError(f"SentencePiece model type {trainer.model_type}")
  tok.normalizer = _normalizer(proto.normalizer_spec)
  has_sentinels = any(i >= len(proto.pieces) for i in added)
  tok.decoder = _decoder(proto.normalizer_spec, has_sentinels)
  # One at a time, in id order: a token the model lacks takes the next free id.
  for i, token in added.items():
    fields = dict(token)
    content = fields.pop("content")
    tok.add_tokens([AddedToken(content, **fields)])
    if tok.token_to_id(content) != i:
      raise AssertionError(f"added token {content!r} got id {tok.token_to_id(content)}, "
                           f"expected {i}")
  if "eos_token" in specials:
    eos_id, eos = specials["eos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
        special_tokens=[(eos, eos_id)])
  return tok


def _normalizer(spec):
  """SentencePiece's normalizer: charsmap, whitespace clean-up, dummy prefix, escaping."""
  from tokenizers import Regex, normalizers  # pylint: disable=import-outside-toplevel

  steps = []
  if spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:
    # After the charsmap, as SentencePiece collapses spaces in its normalized output (tabs and
    # newlines are spaces by then).
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    steps.append(normalizers.Replace(Regex("^ | $"), ""))
  space = _SPACE if spec.escape_whitespaces else " "
  if spec.add_dummy_prefix:
    steps.append(normalizers.Prepend(space))  # no-op on empty text, as in SentencePiece
  if spec.escape_whitespaces:
    steps.append(normalizers.Replace(" ", _SPACE))
  return normalizers.Sequence(steps)


def _decoder(spec, has_sentinels: bool):
  """SentencePiece's decoding: unescape, bytes to text, drop the dummy prefix's space."""
  from tokenizers import Regex, decoders  # pylint: disable=import-outside-toplevel

  steps = []
  if has_sentinels:
    # seqio's sentinel pieces are "▁<extra_id_k>": they decode with a leading space.
    steps.append(decoders.Replace(Regex("^<extra_id_"), _SPACE + "<extra_id_"))
  if spec.escape_whitespaces:
    steps.append(decoders.Replace(_SPACE, " "))
  steps += [decoders.ByteFallback(), decoders.Fuse()]
  if spec.add_dummy_prefix or spec.remove_extra_whitespaces:
    steps.append(decoders.Strip(" ", 1, 0))
  return decoders.Sequence(steps)


def _unigram_model(proto):
  from tokenizers import models  # pylint: disable=import-outside-toplevel

  lowest = min((p.score for p in proto.pieces if p.type == _Piece.NORMAL), default=0.0)
  vocab = []
  for p in proto.pieces:
    if p.type == _Piece.NORMAL:
      score = p.score
    elif p.type == _Piece.USER_DEFINED:
      score = _USER_DEFINED_SCORE
    else:
      # tokenizers puts every piece in its trie; SentencePiece never matches these in text.
      score = lowest
    vocab.append((p.piece, score))
  return models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id,
                        byte_fallback=proto.trainer_spec.byte_fallback)


def _bpe_model(proto):
  from tokenizers import models  # pylint: disable=import-outside-toplevel

  # SentencePiece merges adjacent symbols into the piece that scores highest. User-defined
  # pieces are frozen before merging, so they neither merge nor come out of a merge.
  normal = {p.piece for p in proto.pieces if p.type == _Piece.NORMAL}
  ranked = []
  for i, p in enumerate(proto.pieces):
    if p.type == _Piece.NORMAL:
      ranked += [(-p.score, i, cut) for cut in range(1, len(p.piece))
                 if p.piece[:cut] in normal and p.piece[cut:] in normal]
  ranked.sort()
  merges = [(proto.pieces[i].piece[:cut], proto.pieces[i].piece[cut:]) for _, i, cut in ranked]
  unk_id = proto.trainer_spec.unk_id
  return models.BPE(vocab={p.piece: i for i, p in enumerate(proto.pieces)}, merges=merges,
                    unk_token=proto.pieces[unk_id].piece if unk_id >= 0 else None,
                    fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback)
