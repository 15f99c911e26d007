"""The balancer: `GradBalancer`, the ``torch.optim`` wrapper users hold, and its parts.

``optimizer`` (the torch.optim face) → ``step`` (one pipeline for every method and engine) →
`gradbalance.engine`; beside them ``inputs`` (what `backward` accepts), ``parameters`` (which
parameters a step balances), ``binding`` (tasks and the method's param group), ``guards``
(non-finite policy), ``commit`` (writing ``.grad``, under `torch.distributed` too), ``state``
and ``checkpoint`` (the state dict's layouts).
"""

from gradbalance.balancer.optimizer import GradBalancer

__all__ = ["GradBalancer"]
