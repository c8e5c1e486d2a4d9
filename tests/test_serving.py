"""A real `mlflow models serve` process on 127.0.0.1: good images, every kind of bad input."""

import base64
import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

from mlflow_knn_anomaly import decode_mask, save_model
from mlflow_knn_anomaly.evaluation.datasets import read_test
from mlflow_knn_anomaly.runtime import THREADS_ENV

from .conftest import assert_masks_agree, encode_image, free_port, served, wait_until_up

pytestmark = pytest.mark.slow


def _bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def server(model_dir):
    with served(model_dir) as url:
        yield url


def _post(url: str, rows: list, params: dict | None = None, column: str = "image") -> requests.Response:
    payload = {"dataframe_split": {"columns": [column], "data": [[r] for r in rows]}}
    if params is not None:
        payload["params"] = params
    return requests.post(f"{url}/invocations", json=payload, timeout=120)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_real_images_score_with_masks_at_their_own_size(server, fitted, synthetic_root):
    samples = read_test(synthetic_root)[::7]
    response = _post(server, [_b64(s.path.read_bytes()) for s in samples], {"segment": "all"})
    assert response.status_code == 200
    rows = response.json()["predictions"]
    expected = fitted.predict([s.path for s in samples], segment="all")
    np.testing.assert_allclose([r["score"] for r in rows], expected.scores, rtol=1e-5)
    threshold = fitted.thresholds()[1]
    for row, mask, anomaly_map in zip(rows, expected.masks, expected.anomaly_maps, strict=True):
        assert_masks_agree(decode_mask(row["mask"]), mask, anomaly_map, threshold)


def test_every_bad_row_gets_an_error_and_good_rows_still_come_back(server, synthetic_root):
    good = read_test(synthetic_root)[0].path.read_bytes()
    png = encode_image(Image.new("RGB", (64, 64), (10, 200, 30)))
    jpeg = encode_image(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    bad = {
        "undecodable": b"\x00\x01\x02garbage",
        "empty": b"",
        "text": b"just some text, not an image\n",
        "truncated png": png[: len(png) // 2],
        "truncated jpeg": jpeg[:200],
        "bomb": _bomb_png(),
    }
    legal = {
        "1x1": encode_image(Image.new("RGB", (1, 1))),
        "16-bit": encode_image(Image.fromarray(np.full((40, 50), 40000, np.uint16))),
        "cmyk jpeg": encode_image(Image.new("CMYK", (40, 30), (0, 50, 100, 0)), "JPEG"),
        "rgba": encode_image(Image.new("RGBA", (33, 44), (1, 2, 3, 4))),
        "palette": encode_image(Image.new("RGB", (30, 30), (200, 0, 0)).convert("P")),
        "grayscale": encode_image(Image.new("L", (70, 20), 128)),
        "bmp": encode_image(Image.new("RGB", (20, 20)), "BMP"),
        "tiff": encode_image(Image.new("RGB", (20, 20)), "TIFF"),
        "huge 4000x3000": encode_image(Image.new("RGB", (4000, 3000), (90, 90, 90))),
    }
    rows = [good, *bad.values(), *legal.values(), good]
    response = _post(server, [_b64(r) for r in rows], {"segment": "all"})
    assert response.status_code == 200, response.text
    out = response.json()["predictions"]
    assert len(out) == len(rows)
    for row, name in zip(out[1 : 1 + len(bad)], bad):
        assert row["error"], name
        assert row.get("score") is None, name
    for row, (name, data) in zip(out[1 + len(bad) : -1], legal.items()):
        assert row["error"] == "", (name, row["error"])
        with Image.open(io.BytesIO(data)) as image:
            assert decode_mask(row["mask"]).shape == (image.height, image.width), name
    assert out[0]["score"] == out[-1]["score"] and out[0]["error"] == ""


@pytest.mark.parametrize(
    ("rows", "params", "column"),
    [
        (["aGVsbG8="], None, "picture"),
        (["this is not base64!!"], None, "image"),
        (["aGVsbG8="], {"segment": "sometimes"}, "image"),
        (["aGVsbG8="], {"image_threshold": "high"}, "image"),
    ],
    ids=["wrong-column", "invalid-base64", "bad-segment", "ill-typed-param"],
)
def test_unreadable_requests_get_a_4xx_json_error_without_a_stack_trace(server, rows, params, column):
    response = _post(server, rows, params, column)
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert body["message"] and "stack_trace" not in body
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200


def test_unknown_params_are_dropped_by_mlflow_with_a_warning(server, synthetic_root):
    # MLflow's scoring server removes params that are not in the signature before predict sees them.
    data = _b64(read_test(synthetic_root)[0].path.read_bytes())
    response = _post(server, [data], {"colour": "red"})
    assert response.status_code == 200 and response.json()["predictions"][0]["error"] == ""


def test_empty_batch_returns_no_rows(server):
    response = _post(server, [])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == []


def test_concurrent_requests_all_succeed_and_match_sequential_ones(server, synthetic_root):
    from concurrent.futures import ThreadPoolExecutor

    images = [_b64(s.path.read_bytes()) for s in read_test(synthetic_root)[:12]]
    sequential = [_post(server, [image], {"segment": "all"}).json()["predictions"][0] for image in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda image: _post(server, [image], {"segment": "all"}), images))
    assert all(r.status_code == 200 for r in responses)
    concurrent = [r.json()["predictions"][0] for r in responses]
    assert [r["error"] for r in concurrent] == [""] * len(images)
    assert [r["score"] for r in concurrent] == [r["score"] for r in sequential]


SIZING = re.compile(r"mlflow-knn-anomaly: (\d+) threads per process, (\d+) worker process\(es\)")


def _drain(fd: int, sink: list[bytes]) -> None:
    """Read a pseudo-terminal until every writer has closed it (a full one would block the server)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the server and its workers are gone
            return
        if not chunk:
            return
        sink.append(chunk)


def test_two_workers_share_the_free_cores_and_draw_no_progress_bar(fitted, synthetic_root, tmp_path):
    # `-w 2` as the README serves, output on a pseudo-terminal (where tqdm would draw), and the
    # thread count left to the model: MLFLOW_KNN_ANOMALY_THREADS unset.
    model = tmp_path / "model"
    save_model(fitted, model)
    env = {k: v for k, v in os.environ.items() if k != THREADS_ENV}
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    port, (terminal, follower) = free_port(), pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws nothing in 0 columns
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "-w", "2"],
        env=env, stdout=follower, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    output: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(terminal, output), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url)
        image = _b64(read_test(synthetic_root)[-1].path.read_bytes())
        assert all(_post(url, [image], {"segment": "all"}).status_code == 200 for _ in range(4))
        deadline = time.monotonic() + 120  # the second worker may still be loading
        while len(SIZING.findall(b"".join(output).decode(errors="replace"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(timeout=10)
        os.close(terminal)
    text = b"".join(output).decode(errors="replace")
    sizing = [(int(n), int(w)) for n, w in SIZING.findall(text)]
    per_worker = max(1, len(os.sched_getaffinity(0)) // 2)  # 1 on this project's 2 cores
    assert len(sizing) == 2, text[-3000:]
    assert all(workers == 2 and 1 <= threads <= per_worker for threads, workers in sizing), sizing
    assert "batch" not in text  # the unit of every progress bar of this package


def test_a_defective_and_a_normal_image_come_back_with_regions_and_none(server, fitted, synthetic_root):
    from mlflow_knn_anomaly import decode_regions

    samples = read_test(synthetic_root)
    defective = next(s for s in samples if s.is_anomalous)
    normals = [s for s in samples if not s.is_anomalous]
    clean = next(s for s, m in zip(normals, fitted.predict([s.path for s in normals], "all").masks) if not m.any())
    response = _post(server, [_b64(defective.path.read_bytes()), _b64(clean.path.read_bytes())], {"segment": "all"})
    assert response.status_code == 200, response.text
    first, second = response.json()["predictions"]
    regions = decode_regions(first["regions"])
    assert regions and regions[0].peak >= 1.0 and sum(r.area for r in regions) == decode_mask(first["mask"]).sum()
    assert second["regions"] == "[]"
