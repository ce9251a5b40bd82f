"""The migration pipeline's two implementations, for tests that run on both.

``CORES`` is what a test module parametrizes over (``pytest.mark.parametrize`` or a fixture):
the pure-Python reference (tmdht.migration_stream) and the native module (tmdht._native via
tmdht.native), which is skipped — with its reason — only where it was not built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from tmdht.catalog import TemplateCatalog
from tmdht.catalog_file import TemplateDigests
from tmdht.migration_stream import SenderRewriter
from tmdht.native import NativeReceiver, NativeSender, ReferenceReceiver, native_module

__all__ = ["CORES", "Cores", "native_available", "templates_of"]


def native_available() -> bool:
    """The extension module imports (whatever TMDHT_NATIVE says: tests pick explicitly)."""
    try:
        from tmdht import _native  # noqa: F401
    except ImportError:
        return False
    return True


def templates_of(catalog: TemplateCatalog) -> TemplateDigests:
    """What a sender needs of a catalog."""
    return TemplateDigests(catalog.catalog_id, catalog.digests.tobytes())


@dataclass(frozen=True)
class Cores:
    """Makes the sender and receiver cores of one implementation."""

    name: str

    def sender(self, catalog: TemplateCatalog, **options: Any) -> Any:
        if self.name == "native":
            return NativeSender(templates_of(catalog), native=_module(), **options)
        return SenderRewriter(
            catalog.catalog_id, lambda ds: catalog.contains_many(ds).tolist(), **options
        )

    def receiver(self, expected_catalog_id: bytes | None = None) -> Any:
        if self.name == "native":
            return NativeReceiver(expected_catalog_id, native=_module())
        return ReferenceReceiver(expected_catalog_id)


def _module() -> Any:
    module = native_module()
    if module is None:
        from tmdht import _native  # TMDHT_NATIVE=0 turns the default off, not the tests

        module = _native
    return module


REFERENCE = Cores("reference")
NATIVE = Cores("native")
CORES = [
    pytest.param(REFERENCE, id="reference"),
    pytest.param(
        NATIVE,
        id="native",
        marks=pytest.mark.skipif(
            not native_available(), reason="tmdht._native is not built (no Rust toolchain)"
        ),
    ),
]
