"""Apache Spark: batch scoring with `mlflow.pyfunc.spark_udf`, and distributed bank building.

Runs on `local[*]` by default, or on a cluster given by `--master` or `SPARK_REMOTE`; executors need
this package installed and read access to the image paths.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from .bank import FeatureBank
from .config import SpadeConfig
from .datasets import IMAGE_SUFFIXES
from .pyfunc_model import OUTPUT
from .spade import SpadeDetector, split_holdout

# Output columns and their Spark types. spark_udf cannot cast a numeric column that mixes values
# with the nulls of a bad row, so every field crosses the UDF as a string and is cast back here
# (str() of a float64 round-trips exactly).
COLUMNS = {c.name: c.type for c in OUTPUT}


def session(master: str | None = None, app_name: str = "mlflow-knn-anomaly"):
    """A SparkSession: Spark Connect when SPARK_REMOTE is set, else `master` (default local[*])."""
    from pyspark.sql import SparkSession

    # Local Python workers run this interpreter (with torch), not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    elif "SPARK_REMOTE" not in os.environ:
        builder = builder.master("local[*]")
    return builder.getOrCreate()


def read_images(spark, source: str):
    """DataFrame (path, image bytes), sorted by path, from a folder of images (searched
    recursively) or from a Parquet table with a `path` column and, optionally, an `image`
    column of encoded bytes (without it, the paths are read)."""
    if source.endswith(".parquet"):
        table = spark.read.parquet(source)
        if "path" not in table.columns:
            raise ValueError(f"{source} has columns {table.columns}; expected 'path' and optionally 'image'.")
        if "image" in table.columns:
            return table.select("path", "image").orderBy("path")
        paths = [row.path for row in table.select("path").collect()]
        return spark.read.format("binaryFile").load(paths).selectExpr("path", "content AS image").orderBy("path")
    glob = "*.{" + ",".join(s.lstrip(".") for s in IMAGE_SUFFIXES) + "}"
    frame = (
        spark.read.format("binaryFile")
        .option("pathGlobFilter", glob)
        .option("recursiveFileLookup", "true")
        .load(str(Path(source).resolve()))
    )
    return frame.selectExpr("path", "content AS image").orderBy("path")


def score(spark, model_uri: str, source: str, output: str) -> int:
    """Score every image of `source` (see `read_images`) and write Parquet with the REST columns.

    The mask column holds PNG bytes (not base64). Undecodable files become rows with an error.
    Returns the number of rows written.
    """
    from pyspark.sql import functions as F

    # spark_udf loads the model once per Python worker process and reuses it for every batch.
    result_type = ", ".join(f"{name} string" for name in COLUMNS)
    predict = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=result_type, env_manager="local")
    images = read_images(spark, source)
    scored = images.select("path", predict(F.struct("image")).alias("r"))
    fields = [
        F.when(F.col(f"r.{n}") == "<NA>", None).otherwise(F.col(f"r.{n}")).cast(t).alias(n) for n, t in COLUMNS.items()
    ]
    scored = scored.select("path", *fields)
    scored = scored.withColumn("mask", F.when(F.col("mask") == "", None).otherwise(F.unbase64("mask")))
    scored.write.mode("overwrite").parquet(output)
    return spark.read.parquet(output).count()


def build_bank(spark, images: list[Path], config: SpadeConfig) -> SpadeDetector:
    """Fit a detector whose bank features are extracted by Spark tasks; the driver assembles them.

    Batches are the same as a local `fit` (sorted paths, `batch_size` images each), so the bank is
    bit-identical to a local build of the same data.
    """
    bank_paths, holdout = split_holdout(list(images), config)
    size = config.batch_size
    rows = pd.DataFrame({"index": range(len(bank_paths)), "path": [str(p) for p in bank_paths]})
    rows["batch"] = rows["index"] // size
    config_json = config.to_json()
    # Convolution sums are ordered by thread count: executors use the driver's count so that the
    # features, and the bank, are bit-identical to a local build.
    threads = torch.get_num_threads()

    def extract(batch: pd.DataFrame) -> pd.DataFrame:
        torch.set_num_threads(threads)
        detector = _executor_detector(config_json)
        batch = batch.sort_values("index")
        pooled, images = detector.bank_features([Path(p) for p in batch["path"]])
        out = {"index": batch["index"].to_numpy(), "pooled": [row.tobytes() for row in pooled]}
        for layer in images[0]:
            out[layer] = [rows[layer].tobytes() for rows in images]
        return pd.DataFrame(out)

    detector = SpadeDetector(config)
    layers = list(detector.backbone.layers)
    schema = "index long, pooled binary, " + ", ".join(f"`{layer}` binary" for layer in layers)
    frame = spark.createDataFrame(rows).groupBy("batch").applyInPandas(extract, schema=schema)
    collected = frame.toPandas().sort_values("index")
    example = detector.bank_features(bank_paths[:1])[1][0]  # channels and dtype of each layer's rows
    pooled = np.stack([np.frombuffer(b, np.float32) for b in collected["pooled"]])
    images = [
        {
            layer: np.frombuffer(row[layer], example[layer].dtype).reshape(-1, example[layer].shape[1])
            for layer in layers
        }
        for _, row in collected.iterrows()
    ]
    return detector.fit_bank(FeatureBank.from_images(pooled, images), holdout)


_DETECTORS: dict[str, SpadeDetector] = {}


def _executor_detector(config_json: str) -> SpadeDetector:
    """One backbone per executor process, reused by every batch it extracts."""
    if config_json not in _DETECTORS:
        _DETECTORS[config_json] = SpadeDetector(SpadeConfig.from_json(config_json))
    return _DETECTORS[config_json]
