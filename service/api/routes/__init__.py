"""One router per resource: :mod:`.models` (``/v1``), :mod:`.health` (probes, metrics) and
:mod:`.page` (the browser page at ``/`` and its assets, outside the OpenAPI document)."""
