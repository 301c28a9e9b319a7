"""Writes `t5gemma_jax/gin/models/<name>.gin` for every preset in `t5gemma_jax.presets.PRESETS`.

Run after changing the preset table: `python tools/gen_model_gins.py` (`--check` exits 1 when a
file is stale or missing, without writing).
"""

from __future__ import annotations

import argparse
import os
import sys

from t5gemma_jax import presets

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "t5gemma_jax", "gin", "models")


def stale(models_dir: str = MODELS_DIR) -> list[str]:
  """Names whose gin file is missing or differs from the table, plus stray files' names."""
  out = []
  for name in presets.PRESETS:
    path = os.path.join(models_dir, f"{name}.gin")
    if not os.path.isfile(path) or open(path).read() != presets.model_gin(name):
      out.append(name)
  known = {f"{n}.gin" for n in presets.PRESETS}
  out += sorted(f[:-4] for f in os.listdir(models_dir) if f.endswith(".gin") and f not in known)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--check", action="store_true")
  args = p.parse_args(argv)
  if args.check:
    bad = stale()
    if bad:
      print(f"stale gin/models files: {', '.join(bad)}; run python tools/gen_model_gins.py")
    return 1 if bad else 0
  for name in presets.PRESETS:
    with open(os.path.join(MODELS_DIR, f"{name}.gin"), "w") as f:
      f.write(presets.model_gin(name))
  return 0


if __name__ == "__main__":
  sys.exit(main())
