"""``gradbalance train``: any registered model x method x dataset, from flags or a run's
``config.json``.

Every combination either trains or stops with a usage error (exit status 2) that says what to
use instead; the checks run in the order of `run`, before the first training step. The run
folder (``--out``) is written by `gradbalance.cli.rundir`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, cast

import torch

from gradbalance import models
from gradbalance.cli import recipes, runconfig, rundir
from gradbalance.cli.errors import CommandError
from gradbalance.cli.options import first_line
from gradbalance.cli.outdir import check_out, make_out
from gradbalance.cli.report import fmt_time, table, write
from gradbalance.errors import GradBalanceError
from gradbalance.methods import FEATURES, KPIS, LAST_SHARED_GRAMIAN, Method, get_class
from gradbalance.models import MultiTaskModel
from gradbalance.training import TensorLoader, fit, make_evaluator, make_kpi_fn

__all__ = ["needs_shared_parameters", "run"]


def needs_shared_parameters(method_cls: type[Method]) -> bool:
    """Whether ``method_cls`` reads task gradients on parameters the tasks share.

    Every gradient method does (`Method.is_gradient_method`), and so does a method that
    weights the losses from the gradients of the last shared layer (GradNorm's
    ``LAST_SHARED_GRAMIAN``, which `Method.is_gradient_method` leaves out): on a model whose
    tasks share no parameter neither can run.
    """
    return method_cls.is_gradient_method() or LAST_SHARED_GRAMIAN in method_cls.requires


def models_with_features() -> list[str]:
    """Registered models whose class declares ``has_shared_features`` (MGDA-UB works on them)."""
    return [info.name for info in models.describe() if info.has_shared_features]


def model_hint(model: str, data: str) -> str:
    """What to try instead when ``model`` cannot be built for ``data``."""
    info = models.describe(model)
    if model == recipes.DEFAULT_MODELS["qm9"]:
        return f"; {model} reads padded molecules: it runs on --data qm9"
    if data == "qm9":
        return f"; on --data qm9 use --model {recipes.DEFAULT_MODELS['qm9']} (the default)"
    if "in_features" in info.required_options and data not in ("multimnist", "qm9"):
        return (
            f"; {model} predicts one output per sample (classification or regression), so "
            "among the command's datasets it runs on --data multimnist (flattened images) "
            "and --data qm9 (flattened padded molecules)"
        )
    if data == "multimnist":
        return "; the dense models (SegNet family) run on --data synthetic, nyuv2 or cityscapes"
    return ""


def _build_model(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    name: str,
    data: recipes.Data,
    tasks: dict[str, Any],
    width: float | None,
) -> MultiTaskModel:
    """The model ``name`` for ``tasks``, seeded with ``--seed``; a usage error if it cannot be."""
    info = models.describe(name)
    model_kwargs: dict[str, Any] = {}
    if info.accepts_width:
        if width is not None:
            model_kwargs["width"] = width
    elif args.width is not None:
        parser.error(f"model {name!r} has no width multiplier; drop --width")
    if "in_features" in info.required_options:  # a per-sample model (MMoE): flattened inputs
        model_kwargs["in_features"] = data.train[0][0].numel()
    missing = [o for o in info.required_options if o not in model_kwargs]
    if missing:
        parser.error(
            f"model {name!r} needs option(s) {missing} that the command line cannot "
            f"set; build it in Python with gradbalance.models.create({name!r}, ...)"
        )
    torch.manual_seed(args.seed)
    try:
        return models.create(name, tasks=tasks, **model_kwargs)
    except (ValueError, TypeError) as exc:
        parser.error(
            f"model {name!r} cannot be built for --data {args.data}: {exc}"
            + model_hint(name, args.data)
        )
    except (RuntimeError, MemoryError) as exc:  # the allocator, after a --width too large
        at = "" if width is None else f" at --width {width:g}"
        if isinstance(exc, MemoryError) or "allocat" in str(exc):
            parser.error(
                f"model {name!r}{at} does not fit in memory ({first_line(exc)}); pass "
                "a smaller --width"
            )
        parser.error(f"model {name!r}{at} cannot be built: {first_line(exc)}")


def _check_fit(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    method_cls: type[Method],
    model: MultiTaskModel,
    name: str,
) -> None:
    """A usage error when the method or ``--engine`` needs what the model does not have."""
    if FEATURES in method_cls.requires and not model.has_shared_features:
        parser.error(
            f"method {args.method!r} works on the shared features (model.encode / decode), "
            f"which model {name!r} does not have; use a model with a shared "
            f"representation, e.g. {', '.join(models_with_features())}"
        )
    if needs_shared_parameters(method_cls) and not any(True for _ in model.shared_parameters()):
        parser.error(
            f"method {args.method!r} reads the task gradients on the parameters the tasks "
            f"share, and model {name!r} shares none (one independent network per task); "
            "use a method that needs only the losses (e.g. equal, dwa, uncertainty, famo; "
            "`gradbalance list` shows what each method needs) or a model with shared "
            "parameters (e.g. split, mtan, cross-stitch)"
        )
    if args.engine == "representation" and not model.has_shared_features:
        parser.error(
            f"--engine representation differentiates through the shared features "
            f"(model.encode / decode), which model {name!r} does not have; use "
            f"--engine auto, or a model with a shared representation, e.g. "
            f"{', '.join(models_with_features())}"
        )


def _check_kpis(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    method_cls: type[Method],
    tasks: dict[str, Any],
) -> Any:
    """DTP's ``kpi_fn`` (``None`` for methods without KPIs); a usage error when a task has
    no KPI (regression targets), naming methods that need none."""
    if KPIS not in method_cls.requires:
        return None
    try:
        return make_kpi_fn(tasks)
    except ValueError as exc:
        parser.error(
            f"method {args.method!r} weights the tasks by per-batch KPIs in [0, 1] "
            f"(accuracy-like), which --data {args.data} does not define "
            f"({str(exc).split(';')[0]}); use a method "
            "that needs only the losses or the gradients, e.g. uncertainty, gls, imtl-g, "
            "nash-mtl or famo (`gradbalance list` shows what each method needs), or pass your "
            "own kpi_fn to gradbalance.training.fit in Python"
        )


def _to_device(parser: argparse.ArgumentParser, model: torch.nn.Module, value: str) -> torch.device:
    """Move ``model`` to ``--device``; a usage error if it cannot go there."""
    try:
        device = torch.device(value)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "CUDA is not available (no GPU, or this torch was built without CUDA); "
                "use --device cpu"
            )
        model.to(device)
    except (RuntimeError, ValueError, AssertionError) as exc:
        parser.error(f"--device {value!r}: {exc}")
    return device


def _method_error(parser: argparse.ArgumentParser, method: str, exc: Exception) -> NoReturn:
    """The usage error for a method that cannot be built with the given options."""
    hint = ""
    if isinstance(exc, TypeError) and "argument" in str(exc):
        hint = (
            "; pass the method's options with --method-arg KEY=VALUE (e.g. --method-arg "
            f'weights=[1,2]); `python -c "import gradbalance as gb; '
            f"help(gb.methods.get_class('{method}'))\"` lists them"
        )
    parser.error(f"method {method!r}: {exc}{hint}")


def _loaders(data: recipes.Data, tasks: dict[str, Any], batch_size: int, seed: int) -> tuple:
    """The training and test loaders (`TensorLoader` for in-memory data)."""
    if data.in_memory:
        x, y = data.train.tensors()
        xt, yt = data.test.tensors()
        names = list(tasks)
        loader: Any = TensorLoader(x, {t: y[t] for t in names}, batch_size, seed=seed)
        test_loader: Any = TensorLoader(xt, {t: yt[t] for t in names}, 1000, shuffle=False)
        return loader, test_loader
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=batch_size, shuffle=True, generator=generator
    )
    return loader, torch.utils.data.DataLoader(data.test, batch_size=batch_size)


def _probe(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    model: MultiTaskModel,
    name: str,
    test_loader: Any,
    device: torch.device,
) -> None:
    """One forward on a test batch first, so that a model that cannot read the data fails
    clearly (a usage error), and a broken dataset file is reported without a traceback."""
    try:
        probe_x, _ = next(iter(test_loader))
    except GradBalanceError as exc:  # a broken file of the dataset (DatasetError)
        raise CommandError(str(exc)) from None
    try:
        model.eval()
        with torch.no_grad():
            model(probe_x[:2].to(device))
    except (ValueError, RuntimeError, TypeError) as exc:
        parser.error(
            f"model {name!r} cannot run on --data {args.data} inputs: {exc}"
            + model_hint(name, args.data)
        )


def _reported(
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    report: Callable[[Mapping[str, float]], dict[str, float]],
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """``evaluate`` followed by the dataset's ``report`` (QM9: the MAE in the papers' units)."""

    def reported(model: torch.nn.Module) -> dict[str, float]:
        return report(evaluate(model))

    return reported


def run(args: argparse.Namespace) -> int:
    """Check every option against the data and the model, train, print the test metrics."""
    parser: argparse.ArgumentParser = args.subparser
    started = time.perf_counter()
    runconfig.resolve(args, parser)
    model_name = args.model or recipes.DEFAULT_MODELS.get(args.data, "split")
    out = args.out or Path("gradbalance-runs") / f"{args.data}-{model_name}-{args.method}"
    check_out(parser, out, files=rundir.FILES, folders=rundir.FOLDERS)
    if args.tensorboard:
        rundir.check_tensorboard(parser)
    data = recipes.train_data(args, parser)
    tasks = data.tasks
    if args.tasks:
        unknown = [t for t in args.tasks if t not in tasks]
        if unknown:
            parser.error(
                f"--data {args.data} has no task(s) {unknown}; its tasks are {list(tasks)}"
            )
        tasks = {t: tasks[t] for t in dict.fromkeys(args.tasks)}
    epochs = args.epochs or (1 if args.quick else data.defaults["epochs"])
    batch_size = args.batch_size or (
        4 if args.quick and not data.in_memory else data.defaults["batch_size"]
    )
    lr = args.lr or data.defaults["lr"]
    width = args.width or (1 / 16 if args.quick and not data.in_memory else data.defaults["width"])

    model = _build_model(parser, args, model_name, data, tasks, width)
    method_cls = get_class(args.method)
    _check_fit(parser, args, method_cls, model, model_name)
    kpi_fn = _check_kpis(parser, args, method_cls, tasks)
    device = _to_device(parser, model, args.device)
    groups = model.param_groups(lr)
    optimizer = (
        torch.optim.Adam(groups, lr=lr)
        if args.optimizer == "adam"
        else torch.optim.SGD(groups, lr=lr, momentum=0.9)
    )
    try:
        method_kwargs = {**data.method_kwargs.get(args.method, {}), **dict(args.method_arg)}
        balancer = recipes.build_balancer(
            model, args.method, optimizer, engine=args.engine, method_kwargs=method_kwargs
        )
    except (ValueError, TypeError) as exc:
        _method_error(parser, args.method, exc)
    loader, test_loader = _loaders(data, tasks, batch_size, args.seed)
    _probe(parser, args, model, model_name, test_loader, device)

    scheduler = None
    if "step_size" in data.defaults:
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=data.defaults["step_size"], gamma=data.defaults["gamma"]
        )
    deep: Any = getattr(model, "deep_supervision_losses", None)  # deep supervision
    use_deep = (
        callable(deep) and FEATURES not in method_cls.requires and args.engine != "representation"
    )
    evaluate = make_evaluator(test_loader, tasks, device=device)
    if data.report is not None:
        evaluate = _reported(evaluate, data.report)

    write(
        f"{args.data}: {len(data.train):,} train / {len(data.test):,} test samples; model "
        f"{model_name}" + ("" if width is None else f" (width {width:g})") + f", method "
        f"{args.method}, tasks {list(tasks)}; {args.optimizer} lr {lr:g}, batch {batch_size}, "
        f"{epochs} epochs"
    )
    if data.note:
        write(data.note)
    if data.units:
        units = ", ".join(f"{t} {data.units[t]}" for t in tasks)
        write(f"test metrics: mean absolute error in the papers' units ({units})")
    config = rundir.resolved_config(
        args,
        model=model_name,
        tasks=list(tasks),
        size=data.size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        width=width if models.describe(model_name).accepts_width else None,
    )
    config_text = runconfig.to_json(parser, config)
    make_out(parser, out)
    rundir.clear(out)  # the folder never mixes this run's files with an earlier run's
    (out / "config.json").write_text(config_text, encoding="utf-8")
    with rundir.callbacks(out, tensorboard=args.tensorboard) as callbacks:
        try:
            history = fit(
                model,
                balancer,
                loader,
                deep if use_deep else recipes.loss_fns(tasks),
                epochs=epochs,
                evaluate=evaluate,
                kpi_fn=kpi_fn,
                scheduler=scheduler,
                callbacks=callbacks,
                show_progress=not args.no_progress,
                desc=f"{model_name} + {args.method}",
                forward=cast("Callable[[torch.Tensor], Any]", model.predict) if use_deep else None,
                device=device,
            )
        except GradBalanceError as exc:  # e.g. a solver failure or a non-finite loss
            raise CommandError(
                f"{model_name} + {args.method} failed during training: {exc} (the steps so "
                f"far are in {out / 'steps.csv'})"
            ) from None
    rundir.save_checkpoint(out, model, balancer, scheduler, epochs, config)
    steps_per_epoch = len(loader)
    title = f"{args.data}: {model_name} + {args.method}"
    drawn = rundir.figure(history, out, title, steps_per_epoch)
    final = history.final
    last_n = min(10, len(history.epochs))
    mean = history.mean_of_last(last_n)
    rows = [[k, f"{final[k]:.4f}", f"{mean[k]:.4f}"] for k in final if k != "epoch"]
    write()
    write(table(["metric", "last epoch", f"mean of last {last_n}"], rows, [False, True, True]))
    weights = history.steps[-1] if history.steps else {}
    w = ", ".join(f"{t}={weights[f'weight/{t}']:.3g}" for t in history.tasks if weights)
    write()
    write(f"final task weights: {w}; {1000 * history.seconds_per_step:.1f} ms/step")
    written = rundir.written(drawn, args.tensorboard)
    write(f"Wrote {written} to {out}/ in {fmt_time(time.perf_counter() - started)}.")
    write(f"Run it again: gradbalance train --config {out / 'config.json'}")
    return 0
