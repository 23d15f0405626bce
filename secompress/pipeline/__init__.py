"""The one loop over decoder layers (:mod:`.driver`) and its layer sources (:mod:`.sources`)."""
from __future__ import annotations

from .driver import LayerInputs, LayerStep, Stream, run_pass, streams_of
from .sources import LayerSource, Resident, Streamed

__all__ = ["LayerInputs", "LayerSource", "LayerStep", "Resident", "Stream", "Streamed", "run_pass", "streams_of"]
