"""One numerics patch = one ``Patch`` object: what it targets inside SGLang, why the numbers diverge
without it, how it is applied (SGLang's own ``HookRegistry``) and reverted, which test proves it,
and when it can be dropped. ``server_patches.table.PATCHES`` lists them all; docs/parity.md is the
ledger that maps each source of divergence to its patch and test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server_patches.targets import PatchTargetError, expect_signature, resolve


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # dotted path of the SGLang function or method that is hooked
    diverges: str  # why SGLang's numbers differ from the trainer's without this patch
    proof: str  # the test (path::name) that fails without the patch and passes with it
    drop_when: str  # the condition under which the patch is no longer needed
    hook: Callable
    hook_type: str  # a sglang.srt.plugins.hook_registry.HookType member name
    expected_params: Sequence[str]  # the target's parameter names on sglang 0.5.15

    def check(self) -> None:
        """Raise ``PatchTargetError`` unless the target exists with the expected signature."""
        _, _, current = resolve(self.name, self.target)
        expect_signature(self.name, self.target, current, self.expected_params)

    def register(self) -> None:
        """Register with SGLang's HookRegistry (applied by its ``load_plugins``/``apply_hooks``)."""
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register(self.target, self.hook, HookType[self.hook_type])

    def apply(self) -> None:
        """Check, register and apply now (in-process use: op-level tests, the trainer side)."""
        from sglang.srt.plugins.hook_registry import HookRegistry

        self.check()
        self.register()
        HookRegistry.apply_hooks()

    def revert(self) -> None:
        """Undo ``apply``: rebind the original everywhere the hooked wrapper was bound."""
        from sglang.srt.plugins.hook_registry import HookRegistry, _propagate_patch

        owner, attr, wrapped = resolve(self.name, self.target)
        original = getattr(wrapped, "__wrapped__", None)
        if original is None:
            raise PatchTargetError(self.name, self.target, "not applied")
        setattr(owner, attr, original)
        _propagate_patch(wrapped, original, owner)
        HookRegistry._hooks.pop(self.target, None)
        HookRegistry._patched.discard(self.target)
