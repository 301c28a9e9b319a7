"""One process of the two-process data test (run by tests/test_multihost_data.py).

Each process reads its shard of a TSV task, builds the global batch with
`jax.make_array_from_process_local_data`, and writes what it sees to OUT/process_N.json.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, index, tsv, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index,
                           initialization_timeout=120)

import numpy as np  # noqa: E402
import seqio  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from t5gemma_jax import tasks  # noqa: E402,F401
from t5gemma_jax.data import pipeline  # noqa: E402
from t5gemma_jax.tasks import files  # noqa: E402

if "test_multihost" not in seqio.TaskRegistry.names():
  files.file_task("test_multihost", train=tsv)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
sharding = NamedSharding(mesh, P(("data", "fsdp")))
cfg = pipeline.DataConfig("test_multihost", {"inputs": 16, "targets": 8}, global_batch_size=8,
                          shuffle=False, pack=False, num_epochs=1)
batches = pipeline.GlobalBatches(pipeline.host_dataset(cfg), sharding)
batch = next(batches)
tokens = batch["decoder_target_tokens"]
local_rows = [np.asarray(s.data).tolist() for s in tokens.addressable_shards]
gathered = multihost_utils.process_allgather(tokens, tiled=True)
with open(os.path.join(out, f"process_{index}.json"), "w") as f:
  json.dump({"shape": list(tokens.shape), "spec": str(tokens.sharding.spec),
             "local_shards": len(tokens.addressable_shards), "local_rows": local_rows,
             "global": np.asarray(gathered).tolist()}, f)
jax.distributed.shutdown()
