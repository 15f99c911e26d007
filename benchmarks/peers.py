"""What the benchmark scripts need to import the optional peer libraries."""

from __future__ import annotations

import sys
import types


def stub_torchvision() -> None:
    """LibMTL imports torchvision at package import time (for its ResNet); MGDA needs none.

    torchvision does not import beside the CPU torch build we use, so stand-in modules are put
    in `sys.modules` (unless a real torchvision is already imported); touching anything in them
    raises.
    """

    class _Stub(types.ModuleType):
        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)

            def unavailable(*args, **kwargs):
                raise RuntimeError("torchvision is stubbed out by benchmarks/peers.py")

            return unavailable

    for name in ("torchvision", "torchvision.models", "torchvision.models.utils"):
        module = _Stub(name)
        module.__path__ = []
        sys.modules.setdefault(name, module)
