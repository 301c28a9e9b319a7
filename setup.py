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
    "tokenizers==0.23.3",  # export writes tokenizer.json
]

# Optional parts, each named by what it enables.
HF_REQUIRES = [  # `t5gemma export --verify`: logits of the export in transformers
    "transformers==5.23.0",
    "torch==2.13.0",
]
# The TPU compiler for `t5gemma compile` on any host, and the runtime on TPU VMs: the libtpu
# that jax[tpu]==0.10.2 pins.
TPU_REQUIRES = ["libtpu==0.0.42.*"]
GPU_REQUIRES = ["jax[cuda12]==0.10.2"]  # the same jax with its CUDA 12 plugin
PROFILE_REQUIRES = ["tensorboard-plugin-profile==2.24.2"]  # TensorBoard's Profile tab (xprof)
WANDB_REQUIRES = ["wandb==0.31.0"]  # TrainConfig.wandb_project

TEST_REQUIRES = [
    "pytest==8.4.2",
    "pytest-xdist==3.8.0",  # `make test` runs on every core
    # The numerical oracle (torch: the CPU wheel on disk; never let pip pick a CUDA build), the
    # TPU compiler for the topology-compile tests, and the optional writers the tests exercise.
    *HF_REQUIRES,
    *TPU_REQUIRES,
    *PROFILE_REQUIRES,
    *WANDB_REQUIRES,
]

setup(
    name="t5gemma-jax",
    version="0.1.0",
    description="T5Gemma encoder-decoder models in JAX/Flax: exact numerics, sharded training.",
    packages=find_packages(include=["t5gemma_jax", "t5gemma_jax.*"]),
    # The gin configs travel inside the package: `--gin_file=runs/demo.gin` works from any
    # folder after a plain (non-editable) install too.
    package_data={"t5gemma_jax": ["gin/*/*.gin", "launch/sweeps/*.json"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "hf": HF_REQUIRES, "tpu": TPU_REQUIRES,
                    "gpu": GPU_REQUIRES, "profile": PROFILE_REQUIRES, "wandb": WANDB_REQUIRES},
    entry_points={"console_scripts": ["t5gemma=t5gemma_jax.cli.app:main"]},
)
