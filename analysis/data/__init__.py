"""Data: the distributions' manifests, fetching, recipes that cut documents, and calibration samples."""
