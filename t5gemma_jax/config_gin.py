"""A run's config.gin read back without gin: its macros and bindings as text, and as values.

`gin.config_str()` writes one `NAME = VALUE` statement per macro and binding, long values
continued on indented lines (after a trailing backslash), under `#` comment headers. Readers
of a finished run (the model card, the sweep report, the W&B run config) need those values
without gin's registry, which would need every configurable imported: `parse_gin` reads the
text alone.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from typing import Any, Optional

from t5gemma_jax import run_files, storage


@dataclasses.dataclass(frozen=True)
class GinSettings:
  """A config.gin's statements as text, e.g. bindings["TrainConfig.batch_size"] == "%BATCH_SIZE".

  Attributes:
    macros: macro name -> value text.
    bindings: "[scope/]Configurable.parameter" -> value text.
  """

  macros: dict[str, str]
  bindings: dict[str, str]

  def text(self, key: str) -> Optional[str]:
    """The value text bound to `key` (or of the macro `key`), a macro reference (`%NAME`)
    replaced by its value; None when `key` is not bound."""
    value = self.bindings.get(key, self.macros.get(key))
    for _ in range(len(self.macros) + 1):  # macros may name macros
      if value is None or not value.startswith("%") or value[1:] not in self.macros:
        break
      value = self.macros[value[1:]]
    return value

  def value(self, key: str) -> Any:
    """`text(key)` as a Python value (numbers, strings, dicts, ...); a reference such as
    `@RunOptions()` or anything else that is no literal stays text."""
    text = self.text(key)
    return None if text is None else _literal(text)

  def values(self) -> dict[str, Any]:
    """{name: `value(name)`} of every macro and binding (e.g. a W&B run config): macros by
    name, bindings as "[scope/]Configurable.parameter"."""
    return {k: self.value(k) for k in (*self.macros, *self.bindings)}

  def parameters_of(self, configurable: str) -> dict[str, Any]:
    """{parameter: value} of the unscoped bindings of `configurable` (e.g. "preset")."""
    prefix = configurable + "."
    return {k[len(prefix):]: self.value(k) for k in sorted(self.bindings)
            if k.startswith(prefix)}


def parse_gin(text: str) -> GinSettings:
  """Reads the statements of a gin file as written by `gin.config_str()` (config.gin).

  A statement starts at an unindented line `NAME = VALUE`; indented lines continue it (gin
  breaks long values after a backslash). Comments, imports and includes are skipped.

  Args:
    text: the file's text.

  Returns:
    Its macros and bindings, values as text.
  """
  statements: list[str] = []
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    if line[:1].isspace() and statements:
      statements[-1] = statements[-1].rstrip().rstrip("\\").rstrip() + " " + line.strip()
    else:
      statements.append(line)
  macros, bindings = {}, {}
  for statement in statements:
    name, sep, value = statement.partition("=")
    name, value = name.strip(), value.strip().rstrip("\\").strip()
    if not sep or not name or " " in name or name.startswith(("import", "include")):
      continue
    (bindings if "." in name else macros)[name] = value
  return GinSettings(macros=macros, bindings=bindings)


def read_run(run_dir: str) -> Optional[GinSettings]:
  """The config.gin a training run wrote into `run_dir` (local or remote), parsed; None when
  it has none (not a training run, or not started)."""
  text = storage.read_text_if_exists(os.path.join(run_dir, run_files.TRAIN_GIN))
  return None if text is None else parse_gin(text)


def _literal(text: str) -> Any:
  """A value's text as the Python literal it spells, else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
