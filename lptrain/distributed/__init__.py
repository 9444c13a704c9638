"""Everything DeepSpeed and the cluster: the process group, the generated DeepSpeed config and
`deepspeed.initialize` (engine.py); what one GPU holds for a recipe before a job is queued,
`lptrain plan` (memory.py).
"""

from lptrain.distributed.engine import DistInfo, deepspeed_config, dist_env, initialize

__all__ = ["DistInfo", "deepspeed_config", "dist_env", "initialize"]
