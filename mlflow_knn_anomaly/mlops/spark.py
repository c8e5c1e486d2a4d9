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

from ..algorithm.bank import FeatureBank
from ..algorithm.spade import SpadeDetector, split_holdout
from ..config import SpadeConfig
from ..evaluation.datasets import IMAGE_SUFFIXES
from .pyfunc_model import OUTPUT

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


def read_images(spark, source: str, category_column: str | None = None, category_from_folder: bool = False):
    """DataFrame (path, image bytes[, category]), sorted by path, from a folder of images (searched
    recursively) or from a Parquet table with a `path` column and, optionally, an `image`
    column of encoded bytes (without it, the paths are read).

    A line model's category comes from the table's `category_column`, or with
    `category_from_folder` from each image's parent folder name.
    """
    from pyspark.sql import functions as F

    if source.endswith(".parquet"):
        table = spark.read.parquet(source)
        if "path" not in table.columns:
            raise ValueError(f"{source} has columns {table.columns}; expected 'path' and optionally 'image'.")
        if category_column and category_column not in table.columns:
            raise ValueError(f"{source} has no column {category_column!r} (--category-column); it has {table.columns}.")
        keep = ["path"] + ([F.col(category_column).alias("category")] if category_column else [])
        if "image" in table.columns:
            frame = table.select(*keep, "image")
        else:
            paths = table.select(*keep)
            files = spark.read.format("binaryFile").load([row.path for row in paths.select("path").collect()])
            frame = files.selectExpr("path", "content AS image")
            if category_column:  # binaryFile gives file: URIs; join on the file name's full path
                paths = paths.withColumn("path", F.concat(F.lit("file:"), F.col("path")))
                frame = frame.join(paths, "path", "left")
    else:
        if category_column:
            raise ValueError("--category-column names a column of a .parquet source; for a folder use "
                             "--category-from-folder true.")  # fmt: skip
        glob = "*.{" + ",".join(s.lstrip(".") for s in IMAGE_SUFFIXES) + "}"
        frame = (
            spark.read.format("binaryFile")
            .option("pathGlobFilter", glob)
            .option("recursiveFileLookup", "true")
            .load(str(Path(source).resolve()))
            .selectExpr("path", "content AS image")
        )
    if category_from_folder:
        frame = frame.withColumn("category", F.element_at(F.split("path", "/"), -2))
    return frame.orderBy("path")


def score(
    spark, model_uri: str, source: str, output: str, category_column: str | None = None,
    category_from_folder: bool = False,
) -> int:  # fmt: skip
    """Score every image of `source` (see `read_images`) and write Parquet with the REST columns.

    The mask column holds PNG bytes (not base64), the regions column the JSON list of the REST
    output (`decode_regions`); both are null where the image was not segmented. Undecodable files
    become rows with an error.
    Returns the number of rows written.
    """
    from pyspark.sql import functions as F

    # spark_udf loads the model once per Python worker process and reuses it for every batch.
    result_type = ", ".join(f"{name} string" for name in COLUMNS)
    predict = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=result_type, env_manager="local")
    images = read_images(spark, source, category_column, category_from_folder)
    inputs = ["image", "category"] if "category" in images.columns else ["image"]
    scored = images.select("path", predict(F.struct(*inputs)).alias("r"))
    fields = [
        F.when(F.col(f"r.{n}") == "<NA>", None).otherwise(F.col(f"r.{n}")).cast(t).alias(n) for n, t in COLUMNS.items()
    ]
    scored = scored.select("path", *fields)
    scored = scored.withColumn("mask", F.when(F.col("mask") == "", None).otherwise(F.unbase64("mask")))
    scored = scored.withColumn("regions", F.when(F.col("regions") == "", None).otherwise(F.col("regions")))
    scored.write.mode("overwrite").parquet(output)
    return spark.read.parquet(output).count()


def build_bank(spark, images: list[Path], config: SpadeConfig) -> SpadeDetector:
    """Fit a detector whose bank features are extracted by Spark tasks; the driver assembles them.

    Batches are the same as a local `fit` (sorted paths, `batch_size` images each), so the bank is
    bit-identical to a local build of the same data.
    """
    if config.roi:
        raise ValueError("a roi is applied to the inputs: build a model with a roi without --spark-master.")
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
        pooled, images, statistics = detector.bank_features([Path(p) for p in batch["path"]])
        out = {
            "index": batch["index"].to_numpy(),
            "pooled": [row.tobytes() for row in pooled],
            "statistics": [row.tobytes() for row in statistics],
        }
        for layer in images[0]:
            out[layer] = [rows[layer].tobytes() for rows in images]
        return pd.DataFrame(out)

    detector = SpadeDetector(config)
    layers = list(detector.backbone.layers)
    schema = "index long, pooled binary, statistics binary, " + ", ".join(f"`{layer}` binary" for layer in layers)
    frame = spark.createDataFrame(rows).groupBy("batch").applyInPandas(extract, schema=schema)
    collected = frame.toPandas().sort_values("index")
    example = detector.bank_features(bank_paths[:1])[1][0]  # channels and dtype of each layer's rows
    pooled = np.stack([np.frombuffer(b, np.float32) for b in collected["pooled"]])
    statistics = np.stack([np.frombuffer(b, np.float64) for b in collected["statistics"]])
    images = [
        {
            layer: np.frombuffer(row[layer], example[layer].dtype).reshape(-1, example[layer].shape[1])
            for layer in layers
        }
        for _, row in collected.iterrows()
    ]
    return detector.fit_bank(FeatureBank.from_images(pooled, images, statistics), holdout)


_DETECTORS: dict[str, SpadeDetector] = {}


def _executor_detector(config_json: str) -> SpadeDetector:
    """One backbone per executor process, reused by every batch it extracts."""
    if config_json not in _DETECTORS:
        _DETECTORS[config_json] = SpadeDetector(SpadeConfig.from_json(config_json))
    return _DETECTORS[config_json]
