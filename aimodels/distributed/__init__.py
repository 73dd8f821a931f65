"""Distributed training on CPU with torch.distributed and gloo (chapter 10).

One module per idea: `launch` (run a function on N local ranks), `collectives` (a ring
all-reduce from point-to-point messages, the alpha-beta cost model), `data_parallel`
(from scratch and DDP), `sharding` (ZeRO's memory and FSDP2), `tensor_parallel`
(Megatron's MLP and `parallelize_module`), `pipeline` (GPipe and its bubble), `train_script`
and `faults` (torchrun, distributed checkpoints, restarts), `ray_train` (the same loop on
Ray Train) and `planner` (which parallelism fits).
"""

from aimodels.distributed.collectives import (  # noqa: F401
    all_reduce_bytes_per_rank,
    fit_alpha_beta,
    ring_all_reduce,
    ring_all_reduce_time,
)
from aimodels.distributed.common import (  # noqa: F401
    flat_state,
    make_optimizer,
    mlp,
    rank_rows,
    regression_batches,
    tensor_bytes,
    train_single,
)
from aimodels.distributed.launch import (  # noqa: F401
    RankError,
    free_port,
    init_from_env,
    launch,
    rank_and_world,
    run_parts,
)
from aimodels.distributed.pipeline import pipeline_bubble_fraction  # noqa: F401
from aimodels.distributed.planner import plan  # noqa: F401
from aimodels.distributed.sharding import zero_memory_bytes  # noqa: F401
