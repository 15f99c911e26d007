"""Test-run settings for the whole repository (``tests/`` and the package's doctests).

One intra-op thread, set here once, before anything imports torch: on a shared CI machine (load
average 4-8 on 2 cores) oversubscribed intra-op threads stretched a 90 s suite to 18 minutes.
The environment variables also reach the subprocesses some tests start (CLI runs, DDP ranks).

Data caches (the parsed QM9 ``.npz``) go to a folder of this test run, removed at its end, so
that the tests never write into the user's ``~/.cache`` nor read a stale cache from it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

_CACHE = tempfile.mkdtemp(prefix="gradbalance-test-cache-")
os.environ["GRADBALANCE_DATA"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

import torch  # noqa: E402

torch.set_num_threads(1)

# The Hugging Face integration imports transformers on import (the Lightning one imports
# nothing of Lightning): without it (an install without the test extra) pytest's doctest
# collection skips the module instead of failing.
import importlib.util  # noqa: E402

collect_ignore = (
    ["gradbalance/integrations/huggingface.py"]
    if importlib.util.find_spec("transformers") is None
    else []
)
