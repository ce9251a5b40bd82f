"""The live-migration stream between the sender and the receiver proxy: every public name of
:mod:`tmdht.migration` (the format, its decoders and the two sans-IO cores), importable from the
module that held them before they were split by concern."""

from tmdht import migration
from tmdht.migration import *  # noqa: F403 - the same names under the module's old name

__all__ = migration.__all__
