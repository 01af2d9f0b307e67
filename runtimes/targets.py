"""The names of what runs where, defined once: the runtimes (the backends of maskaq_deploy.runtimes), the QDQ
graph flavours the exporter writes (``export --for``) and the targets a build aims at (``build --target``).

    Runtime.TORCH        the fake-quant torch model (the reference); a build target, not an export flavour
    Runtime.ONNXRUNTIME  a QDQ ONNX graph run by onnxruntime
    Runtime.TENSORRT     a QDQ ONNX graph shaped for TensorRT, and its engine

Everything else reads them from here: the backends' ``name``, the export flavour registry, the recipe / target
matrix, the CLI's choices and every refusal of an unknown name (``check_name``). A member is its own string
(``Runtime.TENSORRT == "tensorrt"``, also in f-strings, repr and JSON), so callers may pass plain strings. The
module imports nothing heavy, so the CLI offers the names as choices without loading torch or onnxruntime.
"""

from __future__ import annotations

import enum


class Runtime(str, enum.Enum):
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"

    # a member reads as its name everywhere (messages, manifests, report keys), on every Python version
    __str__ = str.__str__
    __format__ = str.__format__
    __repr__ = str.__repr__


TORCH, ONNXRUNTIME, TENSORRT = Runtime.TORCH, Runtime.ONNXRUNTIME, Runtime.TENSORRT
RUNTIMES: tuple[Runtime, ...] = (TORCH, ONNXRUNTIME, TENSORRT)  # verify --runtime: every backend
FLAVOURS: tuple[Runtime, ...] = (ONNXRUNTIME, TENSORRT)  # export --for: the QDQ graph flavours
TARGETS: tuple[Runtime, ...] = (*FLAVOURS, TORCH)  # build --target: a flavour, or the torch model alone


def names(group: tuple[Runtime, ...]) -> list[str]:
    """The plain names of ``group``, e.g. for a command line's choices."""
    return [m.value for m in group]


def unknown_name(what: str, name, group: tuple[Runtime, ...]) -> str:
    """The one-line refusal of ``name``, which is not one of ``group`` (``what``: "runtime", "export flavour"...)."""
    return f"unknown {what} {name!r}; choose one of {', '.join(group)}"


def check_name(name, group: tuple[Runtime, ...], what: str, error: type[Exception] = ValueError) -> Runtime:
    """``name`` as its member of ``group``; anything else raises ``error`` (the caller layer's typed error)
    with the one-line refusal listing the names of ``group``."""
    for member in group:
        if name == member:
            return member
    raise error(unknown_name(what, name, group))
