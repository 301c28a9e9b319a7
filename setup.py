"""Packaging for t5gemma-jax: the tested stack is pinned exactly."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "gin-config==0.5.0",
    "sentencepiece==0.2.1",
    "safetensors==0.8.0",
    "sacrebleu==2.6.0",
    "rouge-score==0.1.2",
    "babel==2.18.0",  # CLDR names: the built-in offline translation data
    "tensorboard==2.21.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "numpy>=1.26",
    # Imported directly, so declared (orbax and jax bring them too): paths local or gs://
    # (storage.py, checkpoints), absl logging, bfloat16 numpy arrays.
    "etils[epath]==1.15.0",
    "absl-py==2.5.1",
    "ml_dtypes==0.7.0",
]

TEST_REQUIRES = [
    "pytest==8.4.2",
    "torch==2.13.0",  # the CPU wheel on disk; never let pip pick a CUDA build
    "transformers==5.23.0",
    # The TPU compiler, for `t5gemma compile` and the tests that compile for TPU topologies on
    # this CPU host: the libtpu that jax[tpu]==0.10.2 pins.
    "libtpu==0.0.42.*",
]

TPU_REQUIRES = ["libtpu==0.0.42.*"]

setup(
    name="t5gemma-jax",
    version="0.1.0",
    description="T5Gemma encoder-decoder models in JAX/Flax: exact numerics, sharded training.",
    packages=find_packages(include=["t5gemma_jax", "t5gemma_jax.*"]),
    # The gin configs travel inside the package: `--gin_file=runs/demo.gin` works from any
    # folder after a plain (non-editable) install too.
    package_data={"t5gemma_jax": ["gin/*/*.gin"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "tpu": TPU_REQUIRES},
    entry_points={"console_scripts": ["t5gemma=t5gemma_jax.cli.app:main"]},
)
