"""The common face of every model in the zoo: task specifications and `MultiTaskModel`.

A model is built for an ordered set of tasks. Each task has a `TaskSpec` (defined in
`gradbalance.tasks`, which owns the kinds; re-exported here): its *kind* (which head, loss
and metrics it uses) and its number of output channels (classes for segmentation and
classification). `parse_tasks` accepts the convenient spellings listed
there, so ``tasks={"segmentation": 13, "depth": 1, "normal": 3}`` works as well as explicit
`TaskSpec` objects.

Every model subclasses `MultiTaskModel`, which gives the optimizer wrapper what it relies
on: ``forward(x) -> {task: output}`` in task order, a partition of the parameters into
`MultiTaskModel.shared_parameters` and `MultiTaskModel.task_parameters`, the
last shared layer (GradNorm's ``W``) and, where a hard-shared representation exists,
``encode``/``decode`` for MGDA-UB.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

from gradbalance.errors import GradBalanceError
from gradbalance.tasks import DENSE_KINDS, KIND_TABLE, KINDS, TaskSpec

__all__ = [
    "CITYSCAPES_TASKS",
    "DENSE_KINDS",
    "KINDS",
    "NYUV2_TASKS",
    "MultiTaskModel",
    "NoSharedFeaturesError",
    "TaskSpec",
    "TasksLike",
    "init_weights",
    "parse_tasks",
    "scaled",
]

# Task names from which the kind is inferred (lower case, "-" and " " read as "_").
_KIND_BY_NAME = {name: kind for kind, row in KIND_TABLE.items() for name in (kind, *row.names)}
# Output channels a kind has when none is given.
_DEFAULT_CHANNELS = {
    kind: row.channels for kind, row in KIND_TABLE.items() if row.channels is not None
}


TaskValue = TaskSpec | int | str | tuple | Mapping
#: What ``tasks=`` accepts; see `parse_tasks`.
TasksLike = Mapping[str, TaskValue] | Sequence[str] | None

#: NYUv2 as in the MTAN paper: 13-class segmentation, depth and surface normals.
NYUV2_TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        "segmentation": TaskSpec("segmentation", 13),
        "depth": TaskSpec("depth", 1),
        "normal": TaskSpec("normal", 3),
    }
)
#: CityScapes as in the MTAN paper's two-task table: 7-class segmentation and (inverse) depth.
CITYSCAPES_TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {"segmentation": TaskSpec("segmentation", 7), "depth": TaskSpec("depth", 1)}
)

_RESERVED = frozenset(dir(nn.ModuleDict()))


def _kind_from_name(name: str) -> str | None:
    return _KIND_BY_NAME.get(name.lower().replace("-", "_").replace(" ", "_"))


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"task names must be non-empty strings, got {name!r}")
    if "." in name:
        raise ValueError(f"task name {name!r} contains '.', which torch module names forbid")
    if name in _RESERVED:
        raise ValueError(f"task name {name!r} clashes with an nn.ModuleDict attribute; rename it")
    return name


def _spec(
    name: str, value: Any, default_kind: str | None, default_channels: int | None
) -> TaskSpec:
    if isinstance(value, TaskSpec):
        return value
    if isinstance(value, Mapping):
        try:
            return TaskSpec(value["kind"], int(value["channels"]))
        except KeyError as exc:
            raise ValueError(
                f"task {name!r}: a mapping spec needs 'kind' and 'channels', got {dict(value)}"
            ) from exc
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"task {name!r}: a tuple spec is (kind, channels), got {value!r}")
        return TaskSpec(value[0], value[1])
    if isinstance(value, str):
        if value not in KINDS:
            raise ValueError(f"task {name!r}: kind must be one of {KINDS}, got {value!r}")
        channels = _DEFAULT_CHANNELS.get(value, default_channels)
        if channels is None:
            raise ValueError(
                f"task {name!r}: kind {value!r} needs a number of classes; "
                f"write ({value!r}, num_classes)"
            )
        return TaskSpec(value, channels)
    if isinstance(value, int) and not isinstance(value, bool):
        kind = _kind_from_name(name) or default_kind
        if kind is None:
            raise ValueError(
                f"cannot infer the kind of task {name!r} from its name; give it explicitly, "
                f"e.g. {{{name!r}: ('classification', {value})}} or TaskSpec(kind, channels); "
                f"names understood: {sorted(set(_KIND_BY_NAME))}"
            )
        return TaskSpec(kind, value)
    raise TypeError(
        f"task {name!r}: expected a TaskSpec, an int, a kind string, a (kind, channels) tuple "
        f"or a mapping, got {type(value).__name__}"
    )


def parse_tasks(
    tasks: TasksLike,
    *,
    default: TasksLike = None,
    default_kind: str | None = None,
    default_channels: int | None = None,
) -> dict[str, TaskSpec]:
    """Normalise the ``tasks=`` argument of a model to an ordered ``{name: TaskSpec}``.

    Accepted spellings (the order given is the task order everywhere):

    - a mapping name -> value, where the value is a `TaskSpec`, an ``int`` number of
      channels (the kind is inferred from standard names such as ``"segmentation"``/``"seg"``/
      ``"semantic"``, ``"depth"``, ``"normal"``/``"normals"``, or ``default_kind``), a kind
      string (``"depth"``, ``"normal"``: their channel count is implied), a
      ``(kind, channels)`` tuple, or a mapping ``{"kind": ..., "channels": ...}``;
    - a sequence of names, each given its inferred kind and default channels;
    - ``None``: ``default``.

    Args:
        tasks: the tasks, spelled as above.
        default: the tasks used when ``tasks`` is ``None``.
        default_kind: the kind of names that are not standard task names.
        default_channels: channels of kinds that have no implied count (classes).

    Returns:
        A new ``dict`` from task name to `TaskSpec`.

    Examples:
        >>> parse_tasks({"segmentation": 13, "depth": 1})
        {'segmentation': TaskSpec(kind='segmentation', channels=13), \
'depth': TaskSpec(kind='depth', channels=1)}
        >>> parse_tasks(["depth", "normal"])["normal"]
        TaskSpec(kind='normal', channels=3)
        >>> parse_tasks({"age": ("regression", 1)})
        {'age': TaskSpec(kind='regression', channels=1)}
    """
    if tasks is None:
        if default is None:
            raise ValueError("tasks must be given for this model")
        tasks = default
    out: dict[str, TaskSpec] = {}
    if isinstance(tasks, Mapping):
        for name, value in tasks.items():
            out[_check_name(name)] = _spec(name, value, default_kind, default_channels)
    elif isinstance(tasks, (str, bytes)):
        raise TypeError("tasks must be a mapping or a sequence of names, not a single string")
    elif isinstance(tasks, Iterable):
        for item in tasks:
            name = _check_name(item)
            if name in out:
                raise ValueError(f"task {name!r} is listed twice")
            kind = _kind_from_name(name) or default_kind
            if kind is None:
                raise ValueError(
                    f"cannot infer the kind of task {name!r}; pass a mapping "
                    f"{{{name!r}: TaskSpec(kind, channels)}}"
                )
            out[name] = _spec(name, kind, default_kind, default_channels)
    else:
        raise TypeError(f"tasks must be a mapping or a sequence, got {type(tasks).__name__}")
    if not out:
        raise ValueError("at least one task is needed")
    return out


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded, at least 1.

    Examples:
        >>> scaled(64, 1 / 16), scaled(3, 0.1), scaled(512, 1.0)
        (4, 1, 512)
    """
    return max(1, round(channels * width))


def check_width(width: float) -> float:
    """Validate a width multiplier (a positive finite number)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"width must be a float, got {type(width).__name__}")
    if not (0 < float(width) < float("inf")):
        raise ValueError(f"width must be positive and finite, got {width}")
    return float(width)


def init_weights(module: nn.Module) -> None:
    """Xavier-normal convolution and linear weights, zero biases, unit BatchNorm scales.

    The initialisation of the MTAN reference setup, applied to every SegNet-based model here.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


Member = nn.Module | nn.Parameter


class NoSharedFeaturesError(GradBalanceError, NotImplementedError):
    """``encode``/``decode`` were called on a model without a single shared representation."""


def _params(members: Iterable[Member]) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for m in members:
        items = [m] if isinstance(m, nn.Parameter) else m.parameters()
        for p in items:
            if id(p) not in seen:
                seen.add(id(p))
                yield p


class MultiTaskModel(nn.Module):
    """Base class of the zoo: one output per task, and a partition of the parameters.

    Subclasses set `tasks` (through ``super().__init__(tasks)``), implement
    `forward`, and say which modules are shared and which belong to each task by
    overriding `_shared_members`, `_task_members` and `_last_shared_members`.
    Models with a hard-shared representation set `has_shared_features` and implement
    `encode` and `decode` with ``forward(x) == decode(encode(x))``.

    Attributes:
        tasks: ordered mapping from task name to `TaskSpec` (read-only).
        has_shared_features: whether `encode`/`decode` exist (MGDA-UB).

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.create("split", tasks={"segmentation": 5, "depth": 1}, width=1 / 16)
        >>> out = model(torch.randn(2, 3, 32, 32))
        >>> {t: tuple(v.shape) for t, v in out.items()}
        {'segmentation': (2, 5, 32, 32), 'depth': (2, 1, 32, 32)}
        >>> n = sum(p.numel() for p in model.shared_parameters())
        >>> n += sum(p.numel() for t in model.tasks for p in model.task_parameters(t))
        >>> n == sum(p.numel() for p in model.parameters())
        True
    """

    has_shared_features: bool = False

    def __init__(self, tasks: Mapping[str, TaskSpec]) -> None:
        super().__init__()
        self._tasks = dict(tasks)

    @property
    def tasks(self) -> Mapping[str, TaskSpec]:
        """The tasks, in output order (a read-only view)."""
        return MappingProxyType(self._tasks)

    @property
    def all_tasks(self) -> tuple[str, ...]:
        """Every task that owns parameters: `tasks`, plus auxiliary tasks where a model
        has them (PAD-Net)."""
        return tuple(self._tasks)

    # -- to implement -----------------------------------------------------------------------
    def _shared_members(self) -> list[Member]:
        raise NotImplementedError

    def _task_members(self, task: str) -> list[Member]:
        raise NotImplementedError

    def _last_shared_members(self) -> list[Member]:
        return []

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the common face --------------------------------------------------------------------
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters every task's loss reaches through the shared part of the model."""
        return _params(self._shared_members())

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters owned by ``task`` (its head, attention, column, ...).

        Raises:
            ValueError: ``task`` is not one of `all_tasks`.
        """
        if task not in self.all_tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks are {self.all_tasks}")
        return _params(self._task_members(task))

    def last_shared_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of the last shared layer (GradNorm's ``W``); empty without one."""
        return _params(self._last_shared_members())

    def parameter_partition(self) -> tuple[list[nn.Parameter], dict[str, list[nn.Parameter]]]:
        """``(shared, {task: params})``: each parameter of the model appears exactly once."""
        return list(self.shared_parameters()), {
            t: list(self.task_parameters(t)) for t in self.all_tasks
        }

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; models whose papers train some parameters with a larger
        learning rate (Cross-Stitch, NDDR-CNN) return a second group for them.

        Examples:
            >>> import torch, gradbalance as gb
            >>> model = gb.models.create("multilenet")
            >>> opt = torch.optim.SGD(model.param_groups(lr=0.01), lr=0.01)
        """
        return [{"params": list(self.parameters()), "lr": lr}]

    def encode(self, x: Tensor) -> Tensor:
        """The hard-shared representation every head reads (MGDA-UB's ``z``).

        Raises:
            NoSharedFeaturesError: the model has none (`has_shared_features` is False).
        """
        raise NoSharedFeaturesError(
            f"{type(self).__name__} has no single shared representation "
            "(has_shared_features is False); use a method and engine that work on the shared "
            "parameters instead of engine='representation'"
        )

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        """The task outputs from `encode`'s features.

        Raises:
            NoSharedFeaturesError: the model has no shared representation.
        """
        raise NoSharedFeaturesError(
            f"{type(self).__name__} has no single shared representation "
            "(has_shared_features is False); call the model itself"
        )

    def extra_repr(self) -> str:
        return "tasks=" + ", ".join(f"{t}:{s.kind}[{s.channels}]" for t, s in self.tasks.items())


def check_image(x: Any, channels: int, model: str) -> Tensor:
    """Raise a clear error unless ``x`` is a ``(B, channels, H, W)`` tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{model} expects a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{model} expects images of shape (B, {channels}, H, W), got {tuple(x.shape)}"
        )
    return x
