"""One router per resource: :mod:`.models` (``/v1``) and :mod:`.health` (probes, metrics)."""
