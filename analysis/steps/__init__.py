"""The stage functions of ``calibdrop run`` (:data:`analysis.pipeline.STAGES`), by what they work on."""
