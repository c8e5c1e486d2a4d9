"""The MLflow surface: the model flavor and its REST contract (`pyfunc_model`), the evaluator
plugin (`evaluator`), the registry rules (`registry`), the jobs behind the MLproject entry points
(`jobs`, `line_jobs`, `tune_job`, `monitoring`) and Spark (`spark`). Only this layer and the CLI
import MLflow.
"""
