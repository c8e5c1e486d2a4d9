"""The algorithm: SPADE's two stages and what they are built from. No MLflow here.

`spade.SpadeDetector` is the detector: stage 1 (`bank`, `knn`: the K nearest normal images by the
pooled feature) and stage 2 (`anomaly_map`, `refine`: each pixel against the pixel features of
those K images), on a `backbones` feature pyramid; `calibration` fits its thresholds on held-out
normal images, `regions` and `roi` shape what an operator sees, `line` serves many part types
beside one backbone, `drift` measures how far new images are from normal, and `artifacts` saves
a detector without pickle.
"""
