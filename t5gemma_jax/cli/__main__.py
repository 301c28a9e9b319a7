"""`python -m t5gemma_jax.cli <command> ...`: the `t5gemma` console script."""

import sys

from t5gemma_jax.cli import app

sys.exit(app.main())
