"""The patch table: every numerics patch the plugin applies in on-policy mode (see docs/parity.md)."""

from __future__ import annotations

from server_patches.patch import Patch

PATCHES: tuple[Patch, ...] = ()
