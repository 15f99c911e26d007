"""Shared builders for the model-zoo tests: tiny widths, 32×32 images, batch 2."""

from __future__ import annotations

import torch

from gradbalance import models
from gradbalance.losses import task_loss

WIDTH = 1 / 16
IMAGE = 32
BATCH = 2


def zoo_models() -> list[str]:
    """The registered models the package ships, from the registry (sorted).

    Models that tests, doctests or examples register (their classes live outside
    ``gradbalance.models``, or their factories name no class) are left out.
    """
    return [
        info.name
        for info in models.describe()
        if info.model_class is not None
        and info.model_class.__module__.startswith("gradbalance.models.")
    ]


#: The zoo models that do not read 32×32 RGB images, each with its own input (`inputs`) and
#: task sets (tests/models/test_zoo.py), and why. A new model is an image model until listed here.
NON_IMAGE_MODELS = {
    "mmoe": "tabular features (in_features=6), no width=",
    "multilenet": "28×28 grey MultiMNIST digits, fixed left/right tasks",
    "qm9-mpnn": "padded molecules (B, 29, 4): atomic number and coordinates",
}

#: Every registered model, from the registry (read once, at collection).
ZOO_MODELS = zoo_models()

#: Every SegNet-family registry name (image models taking width=).
IMAGE_MODELS = [name for name in ZOO_MODELS if name not in NON_IMAGE_MODELS]

#: Task sets every image model is checked with.
IMAGE_TASK_SETS = {
    "nyuv2": dict(models.NYUV2_TASKS),
    "cityscapes": dict(models.CITYSCAPES_TASKS),
    "one": {"depth": 1},
    "mixed": {"seg": 4, "scene": ("classification", 5), "age": ("regression", 2)},
}


def build(name: str, tasks=None, **kw):
    """A small instance of a registered model."""
    torch.manual_seed(0)
    if name == "mmoe":
        return models.get(name, tasks, in_features=6, num_experts=3, **kw)
    if name == "multilenet":
        return models.get(name, tasks, **kw)
    if name == "qm9-mpnn":
        return models.get(name, tasks, width=kw.pop("width", 0.25), **kw)
    return models.get(name, tasks, width=kw.pop("width", WIDTH), **kw)


def inputs(name: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "mmoe":
        return torch.randn(BATCH, 6, generator=g)
    if name == "multilenet":
        return torch.randn(BATCH, 1, 28, 28, generator=g)
    if name == "qm9-mpnn":
        return molecules(BATCH, generator=g)
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)


def molecules(batch: int, atoms: int = 29, generator: torch.Generator | None = None):
    """Random padded molecules ``(batch, atoms, 4)``: 3 to 12 atoms of H, C, N, O or F, within
    a 3 Å box; the other rows are padding (Z = 0, coordinates 0)."""
    x = torch.zeros(batch, atoms, 4)
    elements = torch.tensor([1.0, 6.0, 7.0, 8.0, 9.0])
    for b in range(batch):
        n = int(torch.randint(3, min(12, atoms) + 1, (1,), generator=generator))
        x[b, :n, 0] = elements[torch.randint(0, 5, (n,), generator=generator)]
        x[b, :n, 1:] = 3.0 * torch.rand(n, 3, generator=generator)
    return x


def target_for(spec: models.TaskSpec, out: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random target matching a task's output."""
    g = torch.Generator().manual_seed(seed)
    if spec.kind in ("segmentation", "classification"):
        shape = (out.shape[0], *out.shape[2:])
        t = torch.randint(0, spec.channels, shape, generator=g)
        if spec.kind == "segmentation":
            t[..., 0] = -1  # some ignored pixels
        return t
    if spec.kind == "depth":
        t = torch.rand(out.shape, generator=g) + 0.5
        t[..., 0] = 0.0  # some invalid pixels
        return t
    if spec.kind == "normal":
        t = torch.nn.functional.normalize(torch.randn(out.shape, generator=g), dim=1)
        t[..., 0] = 0.0
        return t
    return torch.randn(out.shape, generator=g)


def task_losses(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One loss per task of ``model.all_tasks`` (PAD-Net: with deep supervision)."""
    if isinstance(model, models.PADNet):
        outputs = model.predict(x)
        specs = {**model.tasks, **model.auxiliary}
        targets = {
            t: target_for(s, outputs.initial[t], i) for i, (t, s) in enumerate(specs.items())
        }
        return model.deep_supervision_losses(outputs, targets)
    out = model(x)
    return {
        t: task_loss(spec, out[t], target_for(spec, out[t], i))
        for i, (t, spec) in enumerate(model.tasks.items())
    }
