"""onnxruntime, imported once for all of capwatch: its telemetry off and its files kept out of people's homes.

onnxruntime (Linux wheels since 1.2x) starts Microsoft's 1DS telemetry when it is imported and persists a device id
and an event store in ``$XDG_CACHE_HOME`` (else ``~/.cache``) ``/Microsoft/DeveloperTools/.onnxruntime/`` and a
session file ``.ses`` in ``$TMPDIR`` (else ``/tmp``): in the home of everyone who runs capwatch, and in the system
service's state folder. Every capwatch module takes onnxruntime from here (``from capwatch.models.runtime import
ort``): it is imported with ``XDG_CACHE_HOME`` and ``TMPDIR`` pointing at a private temporary folder that is removed
again at once (both are restored right after the import; what onnxruntime keeps open lives on unlinked), and its
telemetry events are turned off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["ort"]


#: Where onnxruntime's telemetry puts its files: the device id and event store below the cache folder, a ``.ses``
#: session file in the temp folder.
_PLACES = ("XDG_CACHE_HOME", "TMPDIR")


def _import_quietly() -> ModuleType:
    """onnxruntime, imported as the module docstring says. Raises ImportError as the import does."""
    folder = tempfile.mkdtemp(prefix="capwatch-onnxruntime-")
    saved = {name: os.environ.get(name) for name in _PLACES}
    # The variables change for the length of one import, before capwatch starts any thread that reads them.
    os.environ.update(dict.fromkeys(_PLACES, folder))
    try:
        import onnxruntime
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)
    module: ModuleType = onnxruntime
    disable = getattr(module, "disable_telemetry_events", None)
    if disable is not None:
        disable()
    return module


if TYPE_CHECKING:
    import onnxruntime as ort
else:
    ort = _import_quietly()
