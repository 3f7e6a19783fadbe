"""One process of tests/test_multiprocess.py's late-gather job: `python -m tests.late_gather` under the ATOMO_*
variables. Process 1 reaches the first collective 45 s after process 0, as a host still compiling would."""

import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from atomo_jax.parallel import distributed, sharding
from atomo_jax.parallel.mesh import make_mesh
from configs.base import get_config

distributed.maybe_initialize()
config = get_config()
config.mesh.data, config.mesh.fsdp = 1, -1
mesh = make_mesh(config.mesh)
if jax.process_index() == 1:
    time.sleep(45)
local = np.arange(2, dtype=np.float32) + 10 * jax.process_index()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("fsdp")), local)
print("gathered", sharding.fetch(x).tolist(), flush=True)
