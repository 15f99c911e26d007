"""Test-run settings for the whole repository (``tests/`` and the package's doctests).

One intra-op thread, set here once, before anything imports torch: on a shared CI machine (load
average 4-8 on 2 cores) oversubscribed intra-op threads stretched a 90 s suite to 18 minutes.
The environment variables also reach the subprocesses some tests start (CLI runs, DDP ranks).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
