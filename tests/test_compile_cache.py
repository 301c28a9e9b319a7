"""The persistent compilation cache: a second process compiling the same program reads the
entry the first one wrote."""

import os
import subprocess
import sys

SCRIPT = """
import sys, jax, jax.numpy as jnp
from t5gemma_jax import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
compile_cache.enable(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even this one
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((64, 64))).block_until_ready()
print("HITS", sum("cache_hits" in e for e in events))
"""


def _run(cache):
  p = subprocess.run([sys.executable, "-c", SCRIPT, cache], capture_output=True, text=True,
                     timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert p.returncode == 0, p.stderr[-2000:]
  return int(p.stdout.split("HITS")[1])


def test_entries_are_written_then_read(tmp_path):
  cache = str(tmp_path / "cache")
  assert _run(cache) == 0
  written = os.listdir(cache)
  assert written, "no cache entry written"
  assert _run(cache) >= 1  # the second process loaded the executable instead of compiling
  assert sorted(os.listdir(cache)) == sorted(written)


def test_off_and_default_folders(monkeypatch, tmp_path):
  from t5gemma_jax import compile_cache
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
  assert compile_cache.default_dir() == os.path.join(str(tmp_path), "jax")
