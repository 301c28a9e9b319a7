"""Vocabularies: Gemma's SentencePiece model, or one trained offline on a text corpus.

Both are seqio `SentencePieceVocabulary` objects with Gemma's special ids (pad 0, eos 1, bos 2).
The objectives' special tokens come from the vocabulary itself (`special_tokens`):
- sentinels: seqio "extra ids" on top of the vocabulary (`<extra_id_0>` is the highest id and
  they count down, as in T5), or a configured list of existing pieces (Gemma's `<unused*>`);
- mode tokens ("[NLU]", "[NLG]", "[S2S]" for UL2): single pieces of the vocabulary (the offline
  vocabulary is trained with them as user-defined symbols).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
from typing import Callable, Iterable, Mapping, Optional, Sequence

import seqio
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from t5gemma_jax import atomic, cache_root, storage

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
# Bump when training options change, so cached models are rebuilt.
TRAINER_VERSION = 1


def default_cache_dir() -> str:
  """`cache_root.cache_root()`: `$T5GEMMA_CACHE`, else `~/.cache/t5gemma_jax`."""
  return cache_root.cache_root()


def gemma_vocabulary(path: str, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
  """Gemma's `tokenizer.model` as a seqio vocabulary.

  Args:
    path: the SentencePiece model file (from a Gemma or T5Gemma release).
    extra_ids: sentinels to add on top (0 for the released 256000-token models, whose
      embedding has no room for more; configure sentinel pieces instead).
  """
  if not storage.isfile(path):
    raise FileNotFoundError(f"SentencePiece model not found: {path} (point "
                            "--gin.data_settings.gemma_tokenizer at a Gemma tokenizer.model)")
  vocab = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  _check_special_ids(vocab, path)
  return vocab


def _check_special_ids(vocab: seqio.SentencePieceVocabulary, where: str) -> None:
  tok = vocab.tokenizer
  found = (tok.pad_id(), tok.eos_id(), tok.bos_id())
  if found != (PAD_ID, EOS_ID, BOS_ID):
    raise ValueError(f"{where}: pad/eos/bos ids are {found}, expected Gemma's "
                     f"{(PAD_ID, EOS_ID, BOS_ID)}")


def train_sentencepiece(texts: Iterable[str], vocab_size: int,
                        user_symbols: Sequence[str] = MODE_TOKENS,
                        cache_dir: Optional[str] = None) -> str:
  """Trains (or finds in the cache) a unigram SentencePiece model with Gemma's special ids.

  The cache key is a hash of the training text and every option, so the same corpus always
  maps to the same file and a changed corpus never reuses a stale model.

  Args:
    texts: training sentences; each is one SentencePiece sentence (keep them under 4 KB).
    vocab_size: number of pieces (byte fallback takes 256 of them).
    user_symbols: strings that must stay single pieces (mode tokens).
    cache_dir: where models are kept (default: $T5GEMMA_CACHE or ~/.cache/t5gemma_jax).

  Returns:
    Path of the .model file.
  """
  cache_dir = cache_dir or default_cache_dir()
  os.makedirs(cache_dir, exist_ok=True)
  digest = hashlib.sha256(repr((TRAINER_VERSION, vocab_size, tuple(user_symbols))).encode())
  with tempfile.NamedTemporaryFile("w", dir=cache_dir, suffix=".txt", delete=False,
                                   encoding="utf-8") as f:
    corpus_path = f.name
    for text in texts:
      line = " ".join(text.split())
      if line:
        f.write(line + "\n")
        digest.update(line.encode() + b"\n")
  try:
    path = os.path.join(cache_dir, f"spm-{vocab_size}-{digest.hexdigest()[:16]}.model")
    if not os.path.isfile(path):
      model = io.BytesIO()
      # One thread and no input shuffling: the trainer has no seed, and this keeps the model a
      # pure function of the corpus.
      spm.SentencePieceTrainer.train(
          input=corpus_path, model_writer=model, vocab_size=vocab_size, model_type="unigram",
          pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
          user_defined_symbols=list(user_symbols), byte_fallback=True,
          character_coverage=0.9995, shuffle_input_sentence=False, num_threads=1,
          max_sentence_length=8192, minloglevel=2)
      proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
      del proto.trainer_spec.input[:]  # a temp path: would make identical models differ
      atomic.write_bytes(path, proto.SerializeToString(deterministic=True))
    return path
  finally:
    os.unlink(corpus_path)


class TrainedVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary trained on first use from a corpus, plus T5-style sentinels.

  Training is deferred until a token is needed, so registering tasks costs nothing. The total
  size is `vocab_size`: `vocab_size - num_sentinels` trained pieces, then the sentinels on top.
  """

  def __init__(self, texts_fn: Callable[[], Iterable[str]], vocab_size: int,
               num_sentinels: int, user_symbols: Sequence[str] = MODE_TOKENS,
               cache_dir: Optional[str] = None):
    super().__init__("", extra_ids=num_sentinels)
    self._texts_fn = texts_fn
    self._user_symbols = tuple(user_symbols)
    self._cache_dir = cache_dir
    self.configure(vocab_size, num_sentinels)

  def configure(self, vocab_size: int, num_sentinels: int) -> None:
    """Sets the sizes; allowed until the model is first used (gin binds them at start-up)."""
    if self._model is not None or self._sentencepiece_model_file:
      if (vocab_size - num_sentinels, num_sentinels) == (self._trained_size, self._extra_ids):
        return
      raise RuntimeError("TrainedVocabulary.configure() with new sizes after the vocabulary "
                         "was loaded")
    if num_sentinels < 0 or num_sentinels + 300 > vocab_size:
      raise ValueError(f"vocabulary of {vocab_size} cannot hold {num_sentinels} sentinels "
                       "plus 256 byte pieces and the special tokens")
    self._extra_ids = num_sentinels
    self._trained_size = vocab_size - num_sentinels

  def _model_context(self):
    if not self._sentencepiece_model_file:
      self._sentencepiece_model_file = train_sentencepiece(
          self._texts_fn(), self._trained_size, self._user_symbols, self._cache_dir)
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    self._model_context()
    return self._sentencepiece_model_file


_GEMMA_TOKENIZER_ENV = "T5GEMMA_TOKENIZER"
_gemma_tokenizer_path: Optional[str] = None


def set_gemma_tokenizer(path: str) -> None:
  """Sets the tokenizer.model that `DeferredGemmaVocabulary` objects load (the CLI binds it)."""
  global _gemma_tokenizer_path
  _gemma_tokenizer_path = path


class DeferredGemmaVocabulary(seqio.SentencePieceVocabulary):
  """Gemma's tokenizer whose path is resolved on first use.

  Tasks are registered on import, before any configuration is read; the path comes later from
  `set_gemma_tokenizer` (gin: `data_settings.gemma_tokenizer`) or $T5GEMMA_TOKENIZER.
  """

  def __init__(self, sentinel_pieces: Sequence[str] = ()):
    super().__init__("", extra_ids=0)
    self.sentinel_pieces = tuple(sentinel_pieces)

  def _model_context(self):
    if not self._sentencepiece_model_file:
      path = _gemma_tokenizer_path or os.environ.get(_GEMMA_TOKENIZER_ENV)
      if not path:
        raise ValueError("this task uses the Gemma tokenizer, but none is configured: bind "
                         f"--gin.data_settings.gemma_tokenizer=... or set "
                         f"${_GEMMA_TOKENIZER_ENV}")
      if not storage.isfile(path):  # local or gs://
        raise FileNotFoundError(f"Gemma tokenizer not found: {path}")
      self._sentencepiece_model_file = path
      _check_special_ids(self, path)
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    self._model_context()
    return self._sentencepiece_model_file


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Token ids the objectives need: `sentinel_ids[k]` replaces the k-th noise span."""

  sentinel_ids: tuple[int, ...]
  mode_ids: Mapping[str, int]


def special_tokens(vocab: seqio.SentencePieceVocabulary,
                   sentinel_pieces: Optional[Sequence[str]] = None,
                   mode_pieces: Sequence[str] = MODE_TOKENS) -> SpecialTokens:
  """Looks up sentinel and mode-token ids in `vocab`.

  Args:
    vocab: the task vocabulary.
    sentinel_pieces: pieces to use as sentinels, in span order; None = the vocabulary's extra
      ids (highest id first).
    mode_pieces: the UL2 mode tokens; each must be a single piece.

  Returns:
    SpecialTokens. Raises ValueError naming any piece the vocabulary lacks.
  """
  if sentinel_pieces is None:
    if not vocab.extra_ids:
      raise ValueError("the vocabulary has no extra ids to use as sentinels; give it extra_ids "
                       "or configure sentinel_pieces")
    top = vocab.vocab_size - 1
    sentinels = tuple(top - k for k in range(vocab.extra_ids))
  else:
    sentinels = tuple(_piece_id(vocab, p, "sentinel") for p in sentinel_pieces)
  modes = {p: _piece_id(vocab, p, "mode token") for p in mode_pieces}
  return SpecialTokens(sentinels, modes)


def _piece_id(vocab: seqio.SentencePieceVocabulary, piece: str, role: str) -> int:
  tok = vocab.tokenizer
  i = tok.piece_to_id(piece)
  if i == tok.unk_id() and piece != tok.id_to_piece(tok.unk_id()):
    raise ValueError(f"{role} {piece!r} is not a single piece of the vocabulary "
                     f"({vocab.sentencepiece_model_file}); train it as a user-defined symbol "
                     "or configure another piece")
  return int(i)
