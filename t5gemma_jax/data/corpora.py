"""Built-in offline corpora of real text that exist on every install of this project.

Nothing here downloads anything: the text comes from what Python and our dependencies ship.

* `pydoc_topics()`: Python's documentation topics (`pydoc_data.topics`), keyed `topic:<name>`.
* `docstrings()`: module, class, function and method docstrings of the standard library and of
  `DEFAULT_PACKAGES`, read from source with `ast` (never imported), keyed by dotted qualified
  name (`json.decoder.JSONDecoder.decode`) and cached as JSON.
* `summarization_pairs(records)`: docstring body -> its one-line summary, keyed like the docstring.
* `cldr_pairs(locale)`: English -> `locale` phrases from babel's CLDR data (names of
  territories, languages, locales, currencies, scripts, units, time zones and cities; calendar
  words; counted phrases such as "5 kilometers"), keyed `<category>:<code>[#<variant>]`; the
  extraction lives in `t5gemma_jax.data.cldr`.

`split_of(key)` puts each key in "train" or "validation" by a stable hash of its group (the key
up to "#"), so a split never changes between runs or processes and every form of one CLDR name
shares a split. A summary pair shares its docstring's key, hence its split: pretraining on the
`python_text` train split never shows the text of a `docstring_summaries` validation pair. The
CLDR corpora hold `CLDR_VALIDATION_PERCENT` of their keys out, more than the others' 5%, so
their validation sets reach 500 pairs; the same key is in the same split in every locale.
`load(name, split)` is the one entry the task layer calls.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import sysconfig
import tempfile
import warnings
import zlib
from typing import Iterable, Iterator, Optional, Sequence, TypeVar, Union

from t5gemma_jax import cache_root
from t5gemma_jax.data import cldr

CORPUS_VERSION = 2  # bump when extraction or filtering changes, to invalidate the caches
# Install requirements only (setup.py), so every install builds the same corpora. tensorflow,
# orbax and tensorflow_datasets triple the summary pairs (to ~790 validation pairs); torch and
# transformers are test extras and stay out.
DEFAULT_PACKAGES = ("numpy", "jax", "flax", "optax", "seqio", "gin", "sentencepiece", "babel",
                    "sacrebleu", "absl", "tensorflow", "tensorflow_datasets", "orbax",
                    "safetensors")
SPLITS = ("train", "validation")
VALIDATION_PERCENT = 5
CLDR_VALIDATION_PERCENT = 20
CLDR_LOCALES = {"cldr_en_ru": "ru", "cldr_en_de": "de"}
CORPORA = ("pydoc_topics", "docstrings", "python_text", "docstring_summaries") + tuple(
    CLDR_LOCALES)
MIN_DOC_WORDS = 3
SUMMARY_WORDS = (3, 40)
MIN_BODY_WORDS = 15
# Tests, IDLE and the 2to3 fixers are code samples and tool internals, not library documentation.
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo",
                        "__pycache__", "_vendor", "_bundled"})


@dataclasses.dataclass(frozen=True)
class Record:
  """One text of a pretraining corpus."""
  key: str
  text: str


@dataclasses.dataclass(frozen=True)
class Pair:
  """One source -> target example of a sequence-to-sequence corpus."""
  key: str
  source: str
  target: str


Item = TypeVar("Item", Record, Pair)


# ----------------------------------------------------------------------------- pydoc topics


def pydoc_topics() -> list[Record]:
  """Python's documentation topics, the text `help("assert")` shows.

  Returns:
    One record per topic, keyed `topic:<name>` and sorted by key.
  """
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  return [Record(f"topic:{name}", text.strip()) for name, text in sorted(topics.items())
          if text.strip()]


# ------------------------------------------------------------------------------- docstrings


def docstrings(packages: Sequence[str] = DEFAULT_PACKAGES, *, stdlib: bool = True,
               cache_dir: Optional[str] = None) -> list[Record]:
  """Docstrings of the standard library and of installed packages, cached as JSON.

  Source files are parsed with `ast`; no module is imported. Packages that are not installed
  are skipped. Docstrings under `MIN_DOC_WORDS` words are dropped and a text already seen under
  an earlier key is dropped too.

  Args:
    packages: top-level import names to include besides the standard library.
    stdlib: whether to include the standard library (tests turn it off to stay fast).
    cache_dir: where the JSON cache lives; default `$T5GEMMA_CACHE` or `~/.cache/t5gemma_jax`.

  Returns:
    Records keyed by dotted qualified name, in a deterministic order for a given install.
  """
  path = _cache_path(packages, stdlib, cache_dir)
  cached = _read_cache(path)
  if cached is not None:
    return cached
  roots = ([(sysconfig.get_paths()["stdlib"], None)] if stdlib else []) + [
      root for name in packages for root in _package_roots(name)]
  records, seen_keys, seen_texts = [], set(), set()
  for root, package in roots:
    for path_, module in _module_files(root, package):
      for key, text in _parse_file(path_, module):
        # Conditional definitions (`if sys.platform ...: def f`) repeat a key; keep the first.
        if key in seen_keys or text in seen_texts or len(text.split()) < MIN_DOC_WORDS:
          continue
        seen_keys.add(key)
        seen_texts.add(text)
        records.append(Record(key, text))
  _write_cache(path, records)
  return records


def default_cache_dir() -> str:
  """`cache_root.cache_root()`: `$T5GEMMA_CACHE`, else `~/.cache/t5gemma_jax`."""
  return cache_root.cache_root()


def _package_roots(name: str) -> list[tuple[str, Optional[str]]]:
  """(directory or file, package name) of an installed top-level package, without importing it."""
  if "." in name:
    raise ValueError(f"package {name!r}: give a top-level name; find_spec would import "
                     f"{name.rsplit('.', 1)[0]!r} to find a submodule")
  try:
    spec = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    return []
  if spec is None:
    return []
  if spec.submodule_search_locations:
    return [(location, name) for location in sorted(spec.submodule_search_locations)]
  if spec.origin and spec.origin.endswith(".py"):
    return [(spec.origin, None)]
  return []  # a compiled extension has no source to read


def _module_files(root: str, package: Optional[str]) -> Iterator[tuple[str, str]]:
  """(path, dotted module name) of every `.py` file under `root`, in sorted order.

  `package` is the dotted name of `root` itself; None for the standard library's top directory
  (whose files are top-level modules) and for a single-file module given as `root`.
  """
  if os.path.isfile(root):
    yield root, os.path.splitext(os.path.basename(root))[0]
    return
  for entry in sorted(os.scandir(root), key=lambda e: e.name):
    stem, ext = os.path.splitext(entry.name)
    if entry.is_dir():
      # A directory whose name is no identifier (site-packages, lib-dynload) is not a package.
      if entry.name.isidentifier() and entry.name not in _SKIP_DIRS:
        yield from _module_files(entry.path, _join(package, entry.name))
    elif ext == ".py" and stem.isidentifier():
      yield entry.path, (package or stem) if stem == "__init__" else _join(package, stem)


def _join(package: Optional[str], name: str) -> str:
  return f"{package}.{name}" if package else name


def _parse_file(path: str, module: str) -> list[tuple[str, str]]:
  """(qualified name, cleaned docstring) pairs of one source file; [] if it does not parse."""
  try:
    with open(path, "rb") as f:
      source = f.read()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # invalid escapes in old sources warn; they still parse
      tree = ast.parse(source, filename=path)
  except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
    return []
  out = []
  _collect(tree, module, out)
  return out


def _collect(node: ast.AST, name: str, out: list[tuple[str, str]]) -> None:
  """Appends the docstring of `node` and of the classes and functions defined in its body."""
  doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
  if doc and doc.strip():
    out.append((name, doc.strip()))
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
    return  # helpers nested in a function have no stable importable name
  for child in _definitions(node.body):  # type: ignore[attr-defined]
    _collect(child, f"{name}.{child.name}", out)


def _definitions(body: list[ast.stmt]) -> Iterator[ast.AST]:
  """Class and function definitions of a body, including those under if/try/with blocks."""
  for stmt in body:
    if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      yield stmt
    elif isinstance(stmt, (ast.If, ast.Try, ast.With)):
      for block in (getattr(stmt, "body", []), getattr(stmt, "orelse", []),
                    *[h.body for h in getattr(stmt, "handlers", [])],
                    getattr(stmt, "finalbody", [])):
        yield from _definitions(block)


# ------------------------------------------------------------------------------------ cache


def _cache_path(packages: Sequence[str], stdlib: bool, cache_dir: Optional[str]) -> str:
  """The cache file of this Python, these package versions and this extraction code."""
  dists = importlib.metadata.packages_distributions()  # scans every install: call it once
  key = json.dumps({"corpus_version": CORPUS_VERSION, "python": sys.version, "stdlib": stdlib,
                    "packages": [[name, _version(name, dists)] for name in packages]})
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(cache_dir or default_cache_dir(), "corpora", f"docstrings-{digest}.json")


def _version(name: str, dists: dict[str, list[str]]) -> Optional[str]:
  """Installed version of the distribution providing import name `name` (gin -> gin-config)."""
  for dist in dists.get(name, [name]):
    try:
      return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      continue
  return None


def _read_cache(path: str) -> Optional[list[Record]]:
  try:
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)
    return [Record(key, text) for key, text in rows]
  except FileNotFoundError:
    return None
  except (OSError, ValueError, TypeError) as e:  # a damaged cache is rebuilt, not fatal
    logging.warning("ignoring unreadable corpus cache %s: %s", path, e)
    return None


def _write_cache(path: str, records: list[Record]) -> None:
  """Writes via a temporary file and rename, so concurrent readers never see half a file."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump([[r.key, r.text] for r in records], f, ensure_ascii=False)
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise
  except OSError as e:  # a read-only home still gets its corpus, only rebuilt each time
    logging.warning("could not write corpus cache %s: %s", path, e)


# ------------------------------------------------------------------------------- summaries


def summarization_pairs(records: Iterable[Record]) -> list[Pair]:
  """Docstring body -> its one-line summary, from docstrings written in that shape.

  A docstring qualifies when its first line ends with "." and has `SUMMARY_WORDS` words, the
  second line is blank, and the rest has at least `MIN_BODY_WORDS` words.

  Args:
    records: docstring records, e.g. from `docstrings()`.

  Returns:
    Pairs keyed like their records; source is the whitespace-normalised body, target the
    summary line.
  """
  pairs = []
  for record in records:
    lines = record.text.split("\n")
    if len(lines) < 3 or lines[1].strip():
      continue
    summary = " ".join(lines[0].split())
    body = " ".join(" ".join(lines[2:]).split())
    if (summary.endswith(".") and SUMMARY_WORDS[0] <= len(summary.split()) <= SUMMARY_WORDS[1]
        and len(body.split()) >= MIN_BODY_WORDS):
      pairs.append(Pair(record.key, body, summary))
  return pairs


# ------------------------------------------------------------------------------------- CLDR


def cldr_pairs(target_locale: str) -> list[Pair]:
  """English -> `target_locale` phrases from babel's CLDR data (see `t5gemma_jax.data.cldr`).

  Args:
    target_locale: a CLDR locale id such as "ru" or "de".

  Returns:
    Pairs keyed `<category>:<code>[#<variant>]` (e.g. `territory:DE`,
    `unit:length-kilometer#long:5`), sorted by key; no empty, untranslated or repeated pair.

  Raises:
    ValueError: babel does not know `target_locale`.
  """
  return [Pair(key, source, target) for key, source, target in cldr.pairs(target_locale)]


# ------------------------------------------------------------------------------------ split


def split_of(key: str, validation_percent: int = VALIDATION_PERCENT) -> str:
  """"train" or "validation" for `key`, the same in every run and process.

  Only the key's group counts (the part before "#", `cldr.group_of`): "unit:length-meter" and
  "unit:length-meter#long:5" share a split, so no form of a validation name is trained on.
  Docstring and topic keys contain no "#".

  Args:
    key: a record or pair key.
    validation_percent: share of groups, 0..100, that go to validation.

  Returns:
    "validation" when crc32(group) % 100 < validation_percent, else "train".
  """
  if not 0 <= validation_percent <= 100:
    raise ValueError(f"validation_percent must be in 0..100, got {validation_percent}")
  group = cldr.group_of(key).encode("utf-8")
  return "validation" if zlib.crc32(group) % 100 < validation_percent else "train"


def validation_percent_of(name: str) -> int:
  """The `validation_percent` corpus `name` is split with (`CLDR_VALIDATION_PERCENT` or 5)."""
  return CLDR_VALIDATION_PERCENT if name in CLDR_LOCALES else VALIDATION_PERCENT


def select(items: Iterable[Item], split: str,
           validation_percent: int = VALIDATION_PERCENT) -> list[Item]:
  """The records or pairs of `items` that `split_of` puts in `split`.

  Args:
    items: records or pairs.
    split: "train" or "validation".
    validation_percent: as in `split_of`.

  Returns:
    The matching items, in their original order.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
  return [item for item in items if split_of(item.key, validation_percent) == split]


def load(name: str, split: str, *,
         cache_dir: Optional[str] = None) -> Union[list[Record], list[Pair]]:
  """One split of a named corpus; the entry the seqio task layer calls.

  Args:
    name: one of `CORPORA`: "pydoc_topics", "docstrings", "python_text" (topics and docstrings,
      the pretraining corpus), "docstring_summaries", "cldr_en_ru", "cldr_en_de".
    split: "train" or "validation".
    cache_dir: docstring cache directory, as in `docstrings()`.

  Returns:
    Records for pretraining corpora, pairs for the others; split by `split_of` with
    `validation_percent_of(name)`.
  """
  if name not in CORPORA:
    raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} for corpus {name!r}; known splits: "
                     f"{', '.join(SPLITS)}")
  if name == "pydoc_topics":
    items = pydoc_topics()
  elif name == "docstrings":
    items = docstrings(cache_dir=cache_dir)
  elif name == "python_text":
    items = pydoc_topics() + docstrings(cache_dir=cache_dir)
  elif name == "docstring_summaries":
    items = summarization_pairs(docstrings(cache_dir=cache_dir))
  else:
    items = cldr_pairs(CLDR_LOCALES[name])
  return select(items, split, validation_percent_of(name))
