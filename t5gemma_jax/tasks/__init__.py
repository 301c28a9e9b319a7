"""seqio task and mixture registrations; importing this package registers them (once).

- `tasks.builtin`: offline tasks on text shipped with every install, and `builtin_mixture`.
- `tasks.tfds_tasks`: C4, WMT, CNN/DailyMail and XSum from a prepared TFDS_DATA_DIR.
- `tasks.files`: `file_task(...)` for the user's own files (from Python or gin).
- `tasks.settings`: `configure(DataSettings(...))`, the options applied before a run.
"""

import seqio

from t5gemma_jax.tasks import builtin, files, tfds_tasks  # noqa: F401
from t5gemma_jax.tasks.settings import DataSettings, configure  # noqa: F401

if "builtin_mixture" not in seqio.MixtureRegistry.names():
  builtin.register()
  tfds_tasks.register()
