"""SGLang general-plugin entry point (group ``sglang.srt.plugins``, name ``truepolicy``).

SGLang calls ``load_plugin`` early in every process it starts: the launcher (HTTP server and
tokenizer manager) and each scheduler / TP worker, which is where the model runs. The plugin is off
unless ``TRUEPOLICY_ON_POLICY=1``; ``truepolicy server`` sets it.

When on, it checks every patch of ``server_patches.table.PATCHES`` (plus ``GPU_PATCHES`` when
``TRUEPOLICY_DEVICE=cuda``, which ``truepolicy server --device cuda`` sets) against the installed SGLang,
registers them with SGLang's ``HookRegistry`` (applied by ``load_plugins`` right after), and adds a
``truepolicy`` entry to the scheduler's internal state, so ``GET /get_server_info`` shows, from the
model-running process itself, that the plugin ran there and which patches it holds.

Failure policy: SGLang's ``load_plugins`` catches ``Exception`` from a plugin and only logs it, which
would leave a server running without its patches. We raise ``SystemExit`` instead (not an
``Exception``): the launcher exits, and a scheduler that exits before reporting ready makes SGLang's
launcher abort the start. No hidden fallback.
"""

from __future__ import annotations

import logging
import os

from parity.ops import DEFAULT_GPU_ATTENTION
from server_patches.patch import Patch
from server_patches.table import PATCHES
from server_patches.targets import expect_signature, resolve

ENABLE_ENV = "TRUEPOLICY_ON_POLICY"
DEVICE_ENV = "TRUEPOLICY_DEVICE"
GPU_ATTENTION_ENV = "TRUEPOLICY_GPU_ATTENTION"  # parity.ops.GPU_ATTENTION_KINDS: server_patches.gpu_patches
STATE_KEY = "truepolicy"
INTROSPECTION_TARGET = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"

logger = logging.getLogger("truepolicy.plugin")


def plugin_enabled() -> bool:
    return os.environ.get(ENABLE_ENV) == "1"


def active_patches() -> tuple[Patch, ...]:
    """The patches for this server's device: the table, plus the GPU kernels' on CUDA."""
    device = os.environ.get(DEVICE_ENV, "cpu")
    if device == "cpu":
        return PATCHES
    if device == "cuda":
        from server_patches.gpu_patches import GPU_PATCHES, select_attention

        kind = os.environ.get(GPU_ATTENTION_ENV, DEFAULT_GPU_ATTENTION)
        try:
            select_attention(kind)
        except ValueError as exc:
            raise SystemExit(f"truepolicy: refusing to start: {GPU_ATTENTION_ENV}: {exc}") from exc
        return (*PATCHES, *GPU_PATCHES)
    raise SystemExit(f"truepolicy: refusing to start: {DEVICE_ENV}={device!r} (cpu or cuda)")


def _process_report() -> dict:
    import setproctitle

    return {
        "pid": os.getpid(),
        "process": setproctitle.getproctitle(),
        "patches": [patch.name for patch in active_patches()],
        "gpu_attention": os.environ.get(GPU_ATTENTION_ENV, DEFAULT_GPU_ATTENTION)
        if os.environ.get(DEVICE_ENV) == "cuda"
        else None,
    }


def _add_report(result, self, recv_req):
    """AFTER hook on ``Scheduler.get_internal_state``: runs in the scheduler process."""
    result.internal_state[STATE_KEY] = _process_report()
    return result


def _register_introspection() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    _, _, current = resolve("introspection", INTROSPECTION_TARGET)
    expect_signature("introspection", INTROSPECTION_TARGET, current, ["self", "recv_req"])
    HookRegistry.register(INTROSPECTION_TARGET, _add_report, HookType.AFTER)


def load_plugin() -> None:
    if not plugin_enabled():
        return
    patches = active_patches()
    try:
        for patch in patches:
            patch.check()
        for patch in patches:
            patch.register()
        _register_introspection()
    except Exception as exc:
        logger.error("truepolicy: refusing to start: %s", exc)
        raise SystemExit(f"truepolicy: refusing to start: {exc}") from exc
    logger.info("truepolicy plugin active in pid %d with patches %s", os.getpid(), [p.name for p in patches])
