"""Built-in offline corpora: real content, stable keys and splits, the docstring cache."""

import json
import os
import subprocess
import sys

import pytest

from t5gemma_jax.data import corpora
from t5gemma_jax.data.corpora import Pair, Record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The one full (stdlib + default packages) docstring build of this test module."""
  cache_dir = str(tmp_path_factory.mktemp("corpus_cache"))
  calls = []
  parse = corpora._parse_file

  def counting(path, module):
    calls.append(path)
    return parse(path, module)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(corpora, "_parse_file", counting)
    records = corpora.docstrings(cache_dir=cache_dir)
  return cache_dir, records, len(calls)


def test_pydoc_topics():
  topics = corpora.pydoc_topics()
  by_key = {r.key: r.text for r in topics}
  assert len(by_key) == len(topics) > 50
  assert "assert" in by_key["topic:assert"]
  assert "while" in by_key["topic:while"]
  assert all(isinstance(r, Record) and r.text.strip() == r.text and r.text for r in topics)


@pytest.mark.slow
def test_docstrings_cover_stdlib_and_packages(built):
  _, records, parsed_files = built
  assert parsed_files > 1000  # the stdlib alone has over a thousand source files
  by_key = {r.key: r.text for r in records}
  assert len(by_key) == len(records), "keys must be unique"
  assert len({r.text for r in records}) == len(records), "texts must be deduplicated"
  assert "JSON" in by_key["json.dumps"] and "obj" in by_key["json.dumps"]
  assert "Python representation" in by_key["json.decoder.JSONDecoder.decode"]
  assert "json" in by_key  # the module docstring, keyed by the package name
  assert any(k.startswith("babel.core.Locale.") for k in by_key)
  assert any(k.startswith("numpy.") for k in by_key)
  assert any(k.startswith("gin.") for k in by_key)  # import name differs from its dist name
  assert all(len(r.text.split()) >= corpora.MIN_DOC_WORDS for r in records)
  # Functions may be called `test` (cgi.test); modules of test packages may not appear.
  assert not [k for k in by_key if k.split(".")[0] in {"test", "idlelib", "lib2to3"}
              or ".tests." in k or "site-packages" in k]
  assert "numpy.testing._private.utils.assert_allclose" in by_key  # public, not a test suite
  assert all(t == t.strip() for t in by_key.values())


@pytest.mark.slow
def test_docstring_cache(built, monkeypatch):
  cache_dir, records, _ = built
  files = os.listdir(os.path.join(cache_dir, "corpora"))
  assert len(files) == 1 and files[0].startswith("docstrings-") and files[0].endswith(".json")

  def fail(path, module):
    raise AssertionError(f"re-parsed {path} despite the cache")

  monkeypatch.setattr(corpora, "_parse_file", fail)
  assert corpora.docstrings(cache_dir=cache_dir) == records
  with open(os.path.join(cache_dir, "corpora", files[0]), encoding="utf-8") as f:
    assert len(json.load(f)) == len(records)


def test_cache_key_tracks_inputs(tmp_path, monkeypatch):
  path = corpora._cache_path(corpora.DEFAULT_PACKAGES, True, str(tmp_path))
  assert path == corpora._cache_path(corpora.DEFAULT_PACKAGES, True, str(tmp_path))
  assert path != corpora._cache_path(("numpy",), True, str(tmp_path))
  assert path != corpora._cache_path(corpora.DEFAULT_PACKAGES, False, str(tmp_path))
  monkeypatch.setattr(corpora, "CORPUS_VERSION", corpora.CORPUS_VERSION + 1)
  assert path != corpora._cache_path(corpora.DEFAULT_PACKAGES, True, str(tmp_path))
  monkeypatch.setenv("T5GEMMA_CACHE", str(tmp_path / "env"))
  assert corpora.default_cache_dir() == str(tmp_path / "env")


def test_damaged_cache_is_rebuilt_and_missing_packages_skipped(tmp_path):
  packages = ("sacrebleu", "no_such_package_xyz")
  first = corpora.docstrings(packages, stdlib=False, cache_dir=str(tmp_path))
  assert first and all(r.key.startswith("sacrebleu") for r in first)
  path = corpora._cache_path(packages, False, str(tmp_path))
  with open(path, "w") as f:
    f.write("[[\"truncated")
  assert corpora.docstrings(packages, stdlib=False, cache_dir=str(tmp_path)) == first
  assert [n for n in os.listdir(tmp_path / "corpora") if n.startswith(".tmp")] == []
  with pytest.raises(ValueError, match="jax.numpy"):
    corpora.docstrings(("jax.numpy",), stdlib=False, cache_dir=str(tmp_path))


@pytest.mark.slow
def test_other_process_imports_nothing_and_splits_alike(tmp_path, built):
  _, records, _ = built
  keys = [r.key for r in records[:2000]]
  script = (
      "import json, sys\n"
      "from t5gemma_jax.data import corpora\n"
      f"corpora.docstrings(('sacrebleu', 'seqio'), stdlib=False, cache_dir={str(tmp_path)!r})\n"
      "keys = json.load(sys.stdin)\n"
      "print(json.dumps({'imported': [m for m in ('sacrebleu', 'seqio') if m in sys.modules],\n"
      "                  'splits': [corpora.split_of(k) for k in keys]}))\n")
  # A different hash seed proves the split does not ride on Python's salted hash().
  env = dict(os.environ, PYTHONHASHSEED="12345")
  out = subprocess.run([sys.executable, "-c", script], input=json.dumps(keys), cwd=REPO,
                       env=env, capture_output=True, text=True, check=True, timeout=120)
  result = json.loads(out.stdout)
  assert result["imported"] == []
  assert result["splits"] == [corpora.split_of(k) for k in keys]


@pytest.mark.slow
def test_summarization_pairs(built):
  _, records, _ = built
  pairs = corpora.summarization_pairs(records)
  assert len(pairs) > 1000
  keys = {r.key for r in records}
  for p in pairs:
    assert isinstance(p, Pair) and p.key in keys
    assert "\n" not in p.target and p.target.endswith(".")
    assert 3 <= len(p.target.split()) <= 40
    assert len(p.source.split()) >= corpora.MIN_BODY_WORDS and p.source != p.target
    assert p.source == " ".join(p.source.split())


def test_summarization_shapes():
  body = " ".join(["word"] * 20)
  records = [
      Record("ok", f"Returns the thing.\n\n{body}\n  indented more."),
      Record("two_line_summary", f"Returns the\nthing.\n\n{body}"),
      Record("no_period", f"Returns the thing\n\n{body}"),
      Record("short_body", "Returns the thing.\n\nToo short a body."),
      Record("no_blank_line", f"Returns the thing.\n{body}"),
  ]
  assert corpora.summarization_pairs(records) == [
      Pair("ok", f"{body} indented more.", "Returns the thing.")]


@pytest.mark.parametrize("locale,germany,january,monday,five_km,austria", [
    ("ru", "Германия", "январь", "понедельник", "5 километров", "немецкий (Австрия)"),
    ("de", "Deutschland", "Januar", "Montag", None, "Deutsch (Österreich)")])
def test_cldr_pairs(locale, germany, january, monday, five_km, austria):
  pairs = corpora.cldr_pairs(locale)
  by_key = {p.key: p for p in pairs}
  assert len(by_key) == len(pairs) > 3000
  assert by_key["territory:DE"] == Pair("territory:DE", "Germany", germany)
  assert by_key["month:1"].source == "January" and by_key["month:1"].target == january
  assert by_key["weekday:0"].source == "Monday" and by_key["weekday:0"].target == monday
  assert by_key["language:en"].source == "English"
  assert by_key["locale:de_AT"] == Pair("locale:de_AT", "German (Austria)", austria)
  assert "currency:USD" in by_key and "script:Cyrl" in by_key
  assert {k.split(":")[0] for k in by_key} >= {
      "territory", "language", "currency", "script", "unit", "month", "weekday", "city",
      "locale", "metazone", "relative", "era", "quarter", "day-period", "variant"}
  assert by_key["unit:length-kilometer#long:1"].source == "1 kilometer"
  if five_km:  # Russian's "many" form; German's "5 Kilometer" repeats the form of 2 and is out
    assert by_key["unit:length-kilometer#long:5"] == Pair(
        "unit:length-kilometer#long:5", "5 kilometers", five_km)
  else:
    assert "unit:length-kilometer#long:5" not in by_key
    assert by_key["unit:length-kilometer#long:2"].target == "2 Kilometer"
    assert "unit:length-kilometer#short:1.5" not in by_key  # "1,5 km": only the comma differs
  assert all(p.source and p.target and p.source != p.target for p in pairs)
  assert all(p.source == " ".join(p.source.split()) and p.target == " ".join(p.target.split())
             for p in pairs)
  assert len({(p.source, p.target) for p in pairs}) == len(pairs), "pairs must be deduplicated"
  assert all(corpora.split_of(p.key) == corpora.split_of(p.key.split("#")[0]) for p in pairs)


def test_cldr_ignores_what_babel_read_before():
  """babel writes resolved aliases into tables locales share; cldr reads private copies."""
  import babel
  fresh = corpora.cldr_pairs("ru")
  dict(babel.Locale.parse("de").quarters["stand-alone"]["wide"])  # pollutes babel's root table
  assert corpora.cldr_pairs("ru") == fresh
  assert all("Quartal" not in p.target for p in fresh)


@pytest.mark.parametrize("name", sorted(corpora.CLDR_LOCALES))
def test_cldr_splits(name):
  train, valid = corpora.load(name, "train"), corpora.load(name, "validation")
  assert len(valid) >= 500, f"{name}: {len(valid)} validation pairs cannot separate models"
  assert len(train) > 2 * len(valid)
  assert not {p.key for p in train} & {p.key for p in valid}
  groups = lambda items: {p.key.split("#")[0] for p in items}  # noqa: E731
  assert not groups(train) & groups(valid), "every form of a name shares its split"
  assert [p.key for p in corpora.load(name, "validation")] == [p.key for p in valid]
  assert len(train) + len(valid) == len(corpora.cldr_pairs(corpora.CLDR_LOCALES[name]))


def test_cldr_key_has_one_split_in_every_locale():
  split = {name: {p.key: s for s in corpora.SPLITS for p in corpora.load(name, s)}
           for name in corpora.CLDR_LOCALES}
  de, ru = split["cldr_en_de"], split["cldr_en_ru"]
  shared = set(de) & set(ru)
  assert len(shared) > 2000
  assert all(de[k] == ru[k] for k in shared)
  assert {de[k] for k in shared} == set(corpora.SPLITS)


def test_cldr_unknown_locale():
  with pytest.raises(ValueError, match="xx_NOPE"):
    corpora.cldr_pairs("xx_NOPE")


@pytest.mark.slow
def test_split(built):
  _, records, _ = built
  keys = [r.key for r in records]
  assert not [k for k in keys if "#" in k], "a docstring key must be its own group"
  splits = [corpora.split_of(k) for k in keys]
  assert splits == [corpora.split_of(k) for k in keys]
  assert set(splits) == {"train", "validation"}
  assert 0.02 <= splits.count("validation") / len(keys) <= 0.09
  cldr_keys = [p.key.split("#")[0] for p in corpora.cldr_pairs("ru")]
  share = [corpora.split_of(k, corpora.CLDR_VALIDATION_PERCENT) for k in set(cldr_keys)]
  assert 0.15 <= share.count("validation") / len(share) <= 0.25
  train, valid = corpora.select(records, "train"), corpora.select(records, "validation")
  assert not {r.key for r in train} & {r.key for r in valid}
  assert len(train) + len(valid) == len(records)
  assert corpora.select(records, "validation", validation_percent=0) == []
  assert corpora.select(records, "train", validation_percent=100) == []
  with pytest.raises(ValueError, match="101"):
    corpora.split_of("x", validation_percent=101)
  with pytest.raises(ValueError, match="'dev'"):
    corpora.select(records, "dev")


@pytest.mark.slow
def test_load(built):
  cache_dir, records, _ = built
  sizes = {}
  for name in corpora.CORPORA:
    train = corpora.load(name, "train", cache_dir=cache_dir)
    valid = corpora.load(name, "validation", cache_dir=cache_dir)
    assert train and valid, name
    assert not {x.key for x in train} & {x.key for x in valid}, name
    sizes[name] = len(train) + len(valid)
    if name not in ("pydoc_topics", "docstrings"):  # python_text is the pretraining set
      assert len(valid) >= 500, f"{name}: {len(valid)} validation examples"
  assert sizes["docstrings"] == len(records)
  assert sizes["python_text"] == sizes["pydoc_topics"] + sizes["docstrings"]
  assert isinstance(corpora.load("cldr_en_ru", "train")[0], Pair)
  summaries = corpora.load("docstring_summaries", "validation", cache_dir=cache_dir)
  assert [p.key for p in summaries] == [
      p.key for p in corpora.load("docstring_summaries", "validation", cache_dir=cache_dir)]
  assert any(p.key.startswith("tensorflow.") for p in summaries)


def test_load_errors():
  with pytest.raises(ValueError, match="'wiki'.*pydoc_topics"):
    corpora.load("wiki", "train")
  with pytest.raises(ValueError, match="'test'"):
    corpora.load("cldr_en_de", "test")
