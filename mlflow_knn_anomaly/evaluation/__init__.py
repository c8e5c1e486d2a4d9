"""Data and evaluation: MVTec-layout folders (`datasets`), the metrics (`metrics`), a detector's
evaluation on a test set (`evaluation`, `plots`), and choosing settings on a validation split of
real defects (`tuning`, `bootstrap`). No MLflow here.
"""
