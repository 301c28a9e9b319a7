"""The model for a params tree: its layer layout read from the params themselves."""

from t5gemma_jax import model
from t5gemma_jax.model import layout
from t5gemma_jax.run_options import RunOptions


def net_for(cfg, params, **options) -> model.T5Gemma:
  """`T5Gemma(cfg)` run in the layout `params` are in, with other `RunOptions` fields given."""
  return model.T5Gemma(cfg, layout.options_for(params, RunOptions(**options)))
