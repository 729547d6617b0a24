"""Resolve and check SGLang patch targets before anything is patched.

A patch may only apply to the code it was written against. ``resolve`` imports a dotted path
(``package.module.Class.attr``) and ``expect_signature`` checks a callable's parameters, raising
``PatchTargetError`` with the patch's name and the reason when SGLang differs from what we expect.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any


class PatchTargetError(RuntimeError):
    """A patch target is missing or differs from the SGLang version the patch was written for."""

    def __init__(self, patch: str, target: str, reason: str) -> None:
        super().__init__(f"patch {patch!r} cannot apply to {target}: {reason}")
        self.patch = patch
        self.target = target
        self.reason = reason


def split_target(target: str) -> tuple[Any, str, Any]:
    """Return ``(owner, attribute name, current value)`` for a dotted path inside an importable module.

    The longest importable module prefix is imported; the rest is walked with ``getattr``.
    Raises ``LookupError`` if nothing along the path exists.
    """
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            owner: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue
            raise
        for name in parts[cut:-1]:
            if not hasattr(owner, name):
                raise LookupError(f"{module_name} has no attribute path {'.'.join(parts[cut:])}")
            owner = getattr(owner, name)
        attr = parts[-1]
        if isinstance(owner, type):
            if attr not in owner.__dict__:
                raise LookupError(f"{owner.__qualname__} does not define {attr}")
            return owner, attr, owner.__dict__[attr]
        if not hasattr(owner, attr):
            raise LookupError(f"{module_name} has no attribute {attr}")
        return owner, attr, getattr(owner, attr)
    raise LookupError(f"no importable module in {target}")


def resolve(patch: str, target: str) -> tuple[Any, str, Any]:
    """``split_target`` that reports failures as ``PatchTargetError`` naming ``patch``."""
    try:
        return split_target(target)
    except (LookupError, ImportError) as exc:
        raise PatchTargetError(patch, target, f"target not found ({exc})") from exc


def expect_signature(patch: str, target: str, fn: Any, params: Sequence[str]) -> None:
    """Raise unless ``fn``'s parameter names are exactly ``params`` (in order)."""
    fn = fn.__func__ if isinstance(fn, classmethod | staticmethod) else fn
    if not callable(fn):
        raise PatchTargetError(patch, target, f"expected a function, found {type(fn).__name__}")
    got = list(inspect.signature(fn).parameters)
    if got != list(params):
        raise PatchTargetError(
            patch,
            target,
            f"signature changed: expected ({', '.join(params)}), found ({', '.join(got)})",
        )
