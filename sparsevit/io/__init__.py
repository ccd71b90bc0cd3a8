"""File formats: plans (:mod:`sparsevit.io.plan_file`); models live in :mod:`sparsevit.serialize`."""
