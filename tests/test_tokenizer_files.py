"""Exported tokenizer files: transformers' AutoTokenizer reproduces our seqio preprocessing.

Two vocabularies: the built-in unigram one (seqio extra ids as sentinels) and a small BPE model
trained here with Gemma's special pieces and options (Gemma's own tokenizer is not available
offline). Our pipeline encodes `vocab.encode(text) + [EOS]`; the exported tokenizer must too.
"""

import io
import json
import logging
import os
import shutil
import sys

import pytest
import seqio
import sentencepiece as spm
import transformers

from t5gemma_jax.convert import tokenizer_files
from t5gemma_jax.data import corpora
from t5gemma_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from t5gemma_jax.tasks import named_vocabularies

GEMMA_SYMBOLS = ["<start_of_turn>", "<end_of_turn>", "[NLU]", "[NLG]", "[S2S]"]
ALL_FILES = sorted([tokenizer_files.TOKENIZER_MODEL, tokenizer_files.TOKENIZER_JSON,
                    tokenizer_files.TOKENIZER_CONFIG, tokenizer_files.SPECIAL_TOKENS_MAP])
# Byte fallback (some Cyrillic letters, emoji, CJK), NFKC, whitespace runs at either end and
# inside, mode tokens and Gemma's turn markers (user-defined pieces of one model, plain text for
# the other), digits, code.
HANDWRITTEN = [
    "Привет, мир! Как дела?", "Emoji 🙂👍 and CJK 漢字 need bytes: ☃ ∑ ᚠ",
    "  leading spaces and trailing ones   ", "multiple   spaces\tand\ttabs\n\nand newlines\r\n",
    "[NLU] fill in the blanks", "translate [NLG] this[S2S]now", "[NLU]", " [S2S]",
    "ﬁne ① ＦＵＬＬＷＩＤＴＨ Å", "", "   ", "x", "3.14159 + 2,718 = 5.85959",
    "def f(x):\n    return x ** 2  # square", "Grüße aus Köln — “quoted” ‘text’ … ½",
    "<start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\n",
]
SENTINEL_TEXTS = [
    "Fill <extra_id_0> the <extra_id_1> blanks.", "<extra_id_0> at the start",
    "at the end <extra_id_127>", "two  spaces  <extra_id_3>  here",
    "glued<extra_id_0> is plain text to seqio", "x <extra_id_0><extra_id_1> only the first",
]


@pytest.fixture(scope="module")
def texts():
  """About 50 texts: corpus validation items plus the handwritten cases."""
  python = [r.text for r in corpora.load("python_text", "validation")]
  pairs = corpora.load("cldr_en_ru", "validation")
  return (python[::40][:16] + [t for p in pairs[:10] for t in (p.source, p.target)] +
          HANDWRITTEN)


@pytest.fixture(scope="module")
def builtin():
  return named_vocabularies.BUILTIN


@pytest.fixture(scope="module")
def gemma_style(tmp_path_factory):
  """A small BPE model trained like Gemma's: its special pieces, no dummy prefix, no
  normalization or whitespace clean-up, split digits, byte fallback, user-defined markers."""
  train = [r.text for r in corpora.load("python_text", "train")[:1500]]
  train += [t for p in corpora.load("cldr_en_ru", "train")[:1500] for t in (p.source, p.target)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(train), model_writer=model, vocab_size=2000, model_type="bpe",
      pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID, pad_piece="<pad>",
      eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=GEMMA_SYMBOLS,
      byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
      remove_extra_whitespaces=False, add_dummy_prefix=False, normalization_rule_name="identity",
      max_sentence_length=8192, num_threads=1, minloglevel=2)
  path = tmp_path_factory.mktemp("gemma_style") / "spm.model"
  path.write_bytes(model.getvalue())
  return seqio.SentencePieceVocabulary(str(path))


@pytest.fixture(scope="module")
def exports(builtin, gemma_style, tmp_path_factory):
  """{name: (vocab, folder, names written, AutoTokenizer loaded from the folder)}."""
  out = {}
  for name, vocab in (("builtin", builtin), ("gemma_style", gemma_style)):
    folder = str(tmp_path_factory.mktemp(f"hf_{name}"))
    names = tokenizer_files.write_tokenizer_files(vocab, folder)
    out[name] = vocab, folder, names, transformers.AutoTokenizer.from_pretrained(folder)
  return out


@pytest.fixture(params=["builtin", "gemma_style"])
def exported(request, exports):
  return exports[request.param]


def _encode(vocab, text):
  return list(vocab.encode(text)) + [EOS_ID]


def test_files_and_config(exported):
  vocab, folder, names, tok = exported
  assert names == ALL_FILES and sorted(os.listdir(folder)) == ALL_FILES
  with open(os.path.join(folder, tokenizer_files.TOKENIZER_CONFIG), encoding="utf-8") as f:
    config = json.load(f)
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert (config["add_eos_token"], config["add_bos_token"]) == (True, False)
  sp = vocab.tokenizer
  pieces = {name: sp.id_to_piece(i) for name, i in
            [("pad_token", PAD_ID), ("eos_token", EOS_ID), ("bos_token", BOS_ID),
             ("unk_token", UNK_ID)]}
  assert {k: config[k] for k in pieces} == pieces
  assert type(tok).__name__ == "TokenizersBackend"
  assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (
      PAD_ID, EOS_ID, BOS_ID, UNK_ID)
  assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == tuple(pieces.values())
  assert len(tok) == vocab.vocab_size
  assert tok("").input_ids == [EOS_ID] and tok("hello").input_ids[0] != BOS_ID


def test_encodes_like_seqio(exported, texts):
  vocab, _, _, tok = exported
  assert len(texts) >= 50
  for text in texts:
    assert tok(text).input_ids == _encode(vocab, text), text
  assert tok(texts).input_ids == [_encode(vocab, t) for t in texts]


def test_decodes_like_seqio(exported, texts):
  vocab, _, _, tok = exported
  for text in texts:
    ids = _encode(vocab, text)
    assert tok.decode(ids, skip_special_tokens=True) == vocab.decode(ids), text


def test_sentinels_at_seqio_ids(exports):
  vocab, _, _, tok = exports["builtin"]
  assert vocab.extra_ids == 128
  for k in range(vocab.extra_ids):
    assert tok.convert_tokens_to_ids(f"<extra_id_{k}>") == vocab.vocab_size - 1 - k
  sentinels = set(range(vocab.vocab_size - vocab.extra_ids, vocab.vocab_size))
  for text in SENTINEL_TEXTS:
    ids = _encode(vocab, text)
    assert tok(text).input_ids == ids, text
    # seqio decodes sentinels as text, with the space of their piece "▁<extra_id_k>".
    assert tok.decode(ids[:-1]) == vocab.decode(ids), text
    # tokenizers 0.23 keeps them even here (see the module docstring); others may drop them.
    plain = vocab.decode([i for i in ids if i not in sentinels])
    assert tok.decode(ids, skip_special_tokens=True) in (vocab.decode(ids), plain), text


@pytest.mark.slow
def test_whole_validation_corpora(exported):
  """Every validation text matches, except float32 ties in the unigram lattice (see the module
  docstring): the same pieces in another order, decoding to the same text."""
  vocab, _, _, tok = exported
  texts = [r.text for r in corpora.load("python_text", "validation")]
  texts += [t for p in corpora.load("cldr_en_ru", "validation") for t in (p.source, p.target)]
  ties = 0
  for text, got in zip(texts, tok(texts).input_ids):
    want = _encode(vocab, text)
    if got != want:
      assert sorted(got) == sorted(want), text
      ties += 1
    assert tok.decode(got, skip_special_tokens=True) == vocab.decode(want), text
  assert ties <= 0.02 * len(texts)


def test_tokenizer_model_rebuilds_the_vocabulary(exported, texts):
  vocab, folder, _, _ = exported
  again = seqio.SentencePieceVocabulary(os.path.join(folder, tokenizer_files.TOKENIZER_MODEL),
                                        extra_ids=vocab.extra_ids)
  assert again.vocab_size == vocab.vocab_size
  for text in texts + SENTINEL_TEXTS:
    assert again.encode(text) == vocab.encode(text), text


def test_writes_are_deterministic(builtin, tmp_path):
  first, second = tmp_path / "a", tmp_path / "b"
  first.mkdir()
  second.mkdir()
  tokenizer_files.write_tokenizer_files(builtin, str(first))
  tokenizer_files.write_tokenizer_files(builtin, str(second))
  for name in ALL_FILES:
    data = (first / name).read_bytes()
    assert data == (second / name).read_bytes(), name
    if name.endswith(".json"):
      text = data.decode("utf-8")
      assert text == json.dumps(json.loads(text), ensure_ascii=False, indent=2,
                                sort_keys=True) + "\n"


def test_loads_next_to_a_t5gemma_config(exported, tmp_path):
  """An export has config.json (model_type t5gemma, whose registered class is GemmaTokenizer):
  AutoTokenizer must still take the class our files name."""
  vocab, folder, _, _ = exported
  dest = tmp_path / "export"
  shutil.copytree(folder, dest)
  transformers.T5GemmaConfig().save_pretrained(str(dest))
  tok = transformers.AutoTokenizer.from_pretrained(str(dest))
  assert type(tok).__name__ == "TokenizersBackend"
  for text in HANDWRITTEN:
    assert tok(text).input_ids == _encode(vocab, text), text


def test_without_tokenizers_package(builtin, tmp_path, caplog, monkeypatch):
  """No tokenizer.json: transformers converts tokenizer.model itself. The segmentation is its
  own (see the module docstring), but the special and sentinel ids and EOS are ours."""
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with caplog.at_level(logging.WARNING):
      names = tokenizer_files.write_tokenizer_files(builtin, str(tmp_path))
  assert tokenizer_files.TOKENIZER_JSON not in names and "tokenizers" in caplog.text
  assert names == sorted(os.listdir(tmp_path))
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (
      PAD_ID, EOS_ID, BOS_ID, UNK_ID)
  assert len(tok) == builtin.vocab_size
  for k in (0, 1, 127):
    assert tok.convert_tokens_to_ids(f"<extra_id_{k}>") == builtin.vocab_size - 1 - k
  ids = tok("hello world").input_ids
  assert ids[-1] == EOS_ID and BOS_ID not in ids
