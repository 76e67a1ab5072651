"""``cpift`` with every training step slowed down by CPIFT_TEST_STEP_SLEEP seconds
(default 0.5), so that a test can kill a run between two checkpoints.

    python tests/workers/slow_cli.py train --base ... --out ...
"""

import os
import sys
import time

import transformers

_step = transformers.Trainer.training_step


def _slow_step(self, *args, **kwargs):
    time.sleep(float(os.environ.get("CPIFT_TEST_STEP_SLEEP", "0.5")))
    return _step(self, *args, **kwargs)


transformers.Trainer.training_step = _slow_step

from cpift_merge.cli import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:], prog_name="cpift")
