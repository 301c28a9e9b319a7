"""Launchers that start `t5gemma` jobs: `t5gemma launch NAME ...` or
`python -m t5gemma_jax.launch.NAME ...` (each module's `main(argv)`).

  local       N processes on this machine joined by jax.distributed on localhost (the
              multi-host rehearsal the tests use)
  tpu         Cloud TPU VMs and queued resources: create, run, status, logs, delete
              (--dry_run prints the gcloud commands); `shipping` is how code reaches workers
  slurm       an sbatch script for GPU clusters: one process per GPU or per node under srun
  sweep       grids or lists of gin overrides as named runs, each with its own MODEL_DIR; run
              here (`local_runs`: in turn or --jobs=N at a time), printed, or launched on TPU;
              the sweep files in sweeps/ ship with the package
  report      a sweep's metrics as a markdown table and a PNG of loss curves

The end-to-end TPU walk-through is docs/tpu_pod.md.
"""

from typing import Sequence

# launcher module name -> what it does (`t5gemma launch --help`).
LAUNCHERS = {
    "local": "N processes on this machine joined by jax.distributed",
    "tpu": "Cloud TPU VMs: create, run, status, logs, delete",
    "slurm": "an sbatch script for GPU clusters",
    "sweep": "expand a sweep into runs; train, print or launch them",
    "report": "a sweep's table and loss curves",
}


def split_train_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(launcher arguments, `t5gemma train` arguments): the latter follow the first `--`."""
  argv = list(argv)
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []
