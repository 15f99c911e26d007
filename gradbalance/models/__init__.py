"""Reference multi-task models with a common face (see `MultiTaskModel`).

Build them by name with the verbs of `gradbalance.methods`: `available()` gives the names,
`get(name, tasks=..., **options)` builds one, `describe(name)` says what it is, `register` adds
one (`create` and `list` are aliases of `get` and `available`). Or build them from their classes:

==================  ===========================================  ==========================
name                model                                        paper
==================  ===========================================  ==========================
``segnet``          one SegNet per task (single-task baseline)   Badrinarayanan et al. 2017
``split``           shared SegNet, split at the heads            Liu et al. CVPR 2019
``split-wide``      Split with a 1024-channel last stage         Liu et al. CVPR 2019
``split-deep``      Split with doubled convolution layers        Liu et al. CVPR 2019
``dense``           shared SegNet + task SegNets reading it      Liu et al. CVPR 2019
``stan``            one single-task attention network per task   Liu et al. CVPR 2019
``mtan``            MTAN on SegNet                               Liu et al. CVPR 2019
``mtan-resnet``     the MTAN wrapper on a ResNet-18-style net    Liu et al. CVPR 2019
``cross-stitch``    SegNet columns with cross-stitch units       Misra et al. CVPR 2016
``nddr-cnn``        SegNet columns with NDDR layers              Gao et al. CVPR 2019
``pad-net``         prediction-and-distillation network          Xu et al. CVPR 2018
``mmoe``            multi-gate mixture of experts (tabular)      Ma et al. KDD 2018
``multilenet``      LeNet trunk + heads for MultiMNIST           Sener & Koltun NeurIPS 2018
``qm9-mpnn``        SchNet-style message passing for QM9         Schütt et al. NeurIPS 2017
==================  ===========================================  ==========================
"""

from collections.abc import Callable
from typing import Any

from gradbalance.models.base import (
    CITYSCAPES_TASKS,
    DENSE_KINDS,
    KINDS,
    NYUV2_TASKS,
    MultiTaskModel,
    NoSharedFeaturesError,
    TasksLike,
    TaskSpec,
    parse_tasks,
)
from gradbalance.models.cross_stitch import CrossStitch, CrossStitchUnit
from gradbalance.models.layers import TaskHead
from gradbalance.models.lenet import MultiLeNet
from gradbalance.models.mmoe import CENSUS_TASKS, MMoE
from gradbalance.models.mtan import MTAN, STAN, AttentionModule, SegNetMTAN, resnet_mtan
from gradbalance.models.nddr import NDDRCNN, NDDRLayer
from gradbalance.models.padnet import PADNet, PADNetOutput
from gradbalance.models.qm9_mpnn import QM9_TARGETS, QM9_TASKS, QM9MPNN
from gradbalance.models.registry import (
    ModelInfo,
    available,
    create,
    describe,
    get,
    list,
    register,
)
from gradbalance.models.segnet import Dense, SegNet, SegNetBackbone, Split

__all__ = [
    "CENSUS_TASKS",
    "CITYSCAPES_TASKS",
    "DENSE_KINDS",
    "KINDS",
    "MTAN",
    "NDDRCNN",
    "NYUV2_TASKS",
    "QM9MPNN",
    "QM9_TARGETS",
    "QM9_TASKS",
    "STAN",
    "AttentionModule",
    "CrossStitch",
    "CrossStitchUnit",
    "Dense",
    "MMoE",
    "ModelInfo",
    "MultiLeNet",
    "MultiTaskModel",
    "NDDRLayer",
    "NoSharedFeaturesError",
    "PADNet",
    "PADNetOutput",
    "SegNet",
    "SegNetBackbone",
    "SegNetMTAN",
    "Split",
    "TaskHead",
    "TaskSpec",
    "available",
    "create",
    "describe",
    "get",
    "list",
    "parse_tasks",
    "register",
    "resnet_mtan",
]


def _split(variant: str) -> Callable[..., Split]:
    def build(tasks: TasksLike = None, **kw: Any) -> Split:
        return Split(tasks, variant=variant, **kw)

    build.__doc__ = f"Split ({variant}) on SegNet."
    return build


register("segnet", SegNet)
register("split", _split("standard"))
register("split-wide", _split("wide"))
register("split-deep", _split("deep"))
register("dense", Dense)
register("stan", STAN)
register("mtan", SegNetMTAN)
register("mtan-resnet", resnet_mtan)
register("cross-stitch", CrossStitch)
register("nddr-cnn", NDDRCNN)
register("pad-net", PADNet)
register("mmoe", MMoE)
register("multilenet", MultiLeNet)
register("qm9-mpnn", QM9MPNN)
