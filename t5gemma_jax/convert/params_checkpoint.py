"""A params-only checkpoint step: what `import_hf` and `adapt` write for `train` and `infer`.

A run directory (MODEL_DIR) holds `checkpoints/<step>/state` and the model files
(`run_files.write_model_files`). Here step 0 holds params and step, no optimizer state:
`train` fine-tunes from it (`init_from`), `infer`, `eval` and `export` read it. Reading any
checkpoint's parameters is `t5gemma_jax.params_reader`'s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional

from t5gemma_jax import checkpoint, run_files
from t5gemma_jax.config import T5GemmaConfig
from t5gemma_jax.convert import hf_writer


def save_params(params: Any, cfg: T5GemmaConfig, out_dir: str, *,
                overwrite: bool = False, source: Optional[dict] = None) -> str:
  """Writes `params` as step 0 of a run directory that `train` and `infer` start from.

  The directory gets `checkpoints/0` (params and step, no optimizer state: fine-tune with
  `TrainConfig.init_from=out_dir`) and the model files (`model_config.json`, `model.gin`).
  It is assembled under a temporary name and renamed into place.

  Args:
    params: the params tree (numpy or jax arrays), in `cfg`'s layout.
    cfg: the model config.
    out_dir: the run directory to create; must be empty or absent unless `overwrite`.
    source: where the params came from, kept as `source.json` (`run_files.write_source`).

  Returns:
    The step directory written.
  """
  import jax
  hf_writer.check_destination(out_dir, overwrite)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
  try:
    os.chmod(tmp, 0o755)
    # Device arrays: orbax restores them onto any mesh later (numpy leaves would come back
    # as numpy, ignoring the shardings asked for).
    state = {"params": jax.tree_util.tree_map(jax.numpy.asarray, params),
             "step": jax.numpy.zeros((), jax.numpy.int32)}
    with checkpoint.Checkpointer(os.path.join(tmp, "checkpoints"), save_every=1,
                                 async_save=False) as ckpt:
      ckpt.save(0, state, force=True)
    run_files.write_model_files(cfg, tmp)
    if source is not None:
      run_files.write_source(source, tmp)
    hf_writer.replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(out_dir, "checkpoints", "0")
