"""The `t5gemma` command line, gin at the edge; `python -m t5gemma_jax.cli` is the same.

  t5gemma <command> --gin_file=models/tiny.gin --gin.RunOptions.dtype='"bfloat16"'

- `app`: the command table, argument parsing and `main`.
- `gin_setup`: which configurables gin may bind, gin file lookup, `--gin.NAME=VALUE` bindings.
- `errors`: which failures are bad input (exit 2) and how they read on one line.
- `backends`: a quiet start (no TensorFlow banners, no libtpu probe on a CPU-only host).
- `model_commands`, `run_commands`, `convert_commands`, `compile_command`: the commands.

Only this package imports gin; the library below it takes plain dataclasses.
"""
