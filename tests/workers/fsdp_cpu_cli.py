"""``cpift`` with FSDP2 allowed on the CPU, so that tests run ``--fsdp`` for real over gloo.

accelerate turns FSDP on only for GPUs: on CPU its ``AcceleratorState`` keeps plain data
parallelism and drops the Trainer's FSDP plugin, and ``--fsdp`` refuses the CPU for that
reason. This worker lifts both gates and nothing else: the model is then sharded by torch's
own ``fully_shard`` (DTensor parameters, reduce-scattered gradients, sharded AdamW state)
through the HF Trainer, our FreezeCallback and our gathered save, as on GPUs.

    torchrun --nproc-per-node 2 tests/workers/fsdp_cpu_cli.py train --fsdp ...

With CPIFT_TEST_STEP_SLEEP set, every training step is also slowed down as in slow_cli.py,
so that a test can kill an FSDP run between two checkpoints.
"""

import os
import sys

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if "CPIFT_TEST_STEP_SLEEP" in os.environ:
    import slow_cli  # noqa: F401  (this folder is sys.path[0]: the patch, not its main)

from cpift_merge.training import distributed  # noqa: E402

distributed.fsdp_available = lambda device="auto": True

from cpift_merge.cli import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:], prog_name="cpift")
