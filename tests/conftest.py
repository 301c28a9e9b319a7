"""Test session setup: CPU only, quiet TensorFlow, deterministic float32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Unit tests compile many small programs and run each once: LLVM's optimisations cost more
# compile time (about 40% here) than they save. Numerics stay IEEE float32.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
