"""The test suite's own rules: one intra-op thread, and doctests that do not print last bits.

A doctest compares text. Text of a float is only stable when the value is exact by construction
(small integers, dyadic fractions, one correctly rounded division) or rounded before printing:
the last bits of a LAPACK, libm or iterative-solver result depend on the CPU's kernels. The most
fragile form is a tensor whose entries are all whole numbers yet print in torch's four-decimal
mode (``tensor([1.0000, 1.0000])``): an exact result prints ``tensor([1., 1.])`` instead, so the
expected text holds only on a machine where the result missed the integer by a rounding error.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re

import torch

import gradbalance

#: a tensor literal's numbers, e.g. ``tensor([[ 3.0000, -0.0000], [1.5000, 2.0000]])``
_TENSOR = re.compile(r"tensor\((\[[^a-z]*\])")
_NUMBER = re.compile(r"-?\d+\.\d*(?:e[-+]?\d+)?")


def _doctest_examples() -> list[tuple[str, doctest.Example]]:
    finder = doctest.DocTestFinder()
    out = []
    for info in pkgutil.walk_packages(gradbalance.__path__, "gradbalance."):
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as exc:  # an integration without its framework installed
            if not info.name.startswith("gradbalance.integrations."):
                raise
            frameworks = {"lightning", "transformers", "accelerate"}
            assert exc.name and exc.name.split(".")[0] in frameworks
            continue
        for test in finder.find(module):
            out.extend((test.name, example) for example in test.examples)
    return out


def fragile_float_text(want: str) -> list[str]:
    """The tensor literals in ``want`` whose printed text depends on the last bits."""
    bad = []
    for match in _TENSOR.finditer(want):
        numbers = _NUMBER.findall(match.group(1))
        decimals = [n for n in numbers if "." in n and len(n.split(".")[1].split("e")[0]) > 0]
        if any(n.lstrip("-").startswith("0.0000") and n.startswith("-") for n in numbers):
            bad.append(match.group(0))  # a negative zero: the sign of a rounding error
        elif (
            decimals
            and len(decimals) == len(numbers)
            and all(float(n) == round(float(n)) for n in numbers)
        ):
            bad.append(match.group(0))
    return bad


def test_fragile_float_text_detects_the_patterns():
    assert fragile_float_text("tensor([1.0000, 1.0000], dtype=torch.float64)")
    assert fragile_float_text("tensor([45.0000], dtype=torch.float64)")
    assert fragile_float_text("tensor([ 0.5000, -0.0000])")
    assert not fragile_float_text("tensor([1., 1.])")
    assert not fragile_float_text("tensor([0.7500, 0.2500])")
    assert not fragile_float_text("tensor([[ 3.,  3.],\n        [18., 36.]])")


def test_no_doctest_prints_a_whole_number_in_four_decimal_mode():
    offenders = [
        f"{name}: {example.source.strip()} -> {bad}"
        for name, example in _doctest_examples()
        for bad in fragile_float_text(example.want)
    ]
    assert not offenders, (
        "these doctests print values that are whole numbers only up to rounding; round them "
        "before printing (e.g. `.round(decimals=6)`) or compare with a tolerance:\n"
        + "\n".join(offenders)
    )


def test_the_run_uses_one_intra_op_thread():
    # pinned once in the repository's conftest.py, for this process and its subprocesses
    assert torch.get_num_threads() == 1
    assert os.environ.get("OMP_NUM_THREADS") == "1"
