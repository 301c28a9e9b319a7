"""Test session setup: CPU only, quiet TensorFlow, deterministic float32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Built-in corpora and the trained vocabulary are cached inside the checkout: built once per
# fresh clone (as in CI), reused by later runs, never written to the user's home.
os.environ.setdefault("T5GEMMA_CACHE", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "t5gemma"))
# Unit tests compile many small programs and run each once: LLVM's optimisations cost more
# compile time (about 40% here) than they save. Numerics stay IEEE float32.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import gin  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: subprocess trainings, multi-process runs, TPU "
                          "compiles and checks over ~5 s; `make test-fast` skips them")


@pytest.fixture
def clean_gin():
  """Tests that drive the CLI start and end with an empty gin config."""
  gin.clear_config()
  yield
  gin.clear_config()
