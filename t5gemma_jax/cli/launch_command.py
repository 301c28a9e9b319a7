"""`t5gemma launch NAME ARGS...`: runs the launcher module t5gemma_jax.launch.NAME."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from t5gemma_jax.launch import LAUNCHERS


def usage() -> str:
  lines = ["usage: t5gemma launch NAME [ARGS...]   (t5gemma launch NAME --help for each)", ""]
  lines += [f"  {name:<8} {text}" for name, text in LAUNCHERS.items()]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  """Hands `argv[1:]` to launcher `argv[0]`'s `main`; its exit status is ours.

  Args:
    argv: what follows `t5gemma launch`.
  """
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0 if argv else 2
  name, rest = argv[0], list(argv[1:])
  if name not in LAUNCHERS:
    print(f"t5gemma launch: unknown launcher {name!r}\n{usage()}", file=sys.stderr)
    return 2
  return importlib.import_module(f"t5gemma_jax.launch.{name}").main(rest)
