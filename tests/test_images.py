import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mlflow_knn_anomaly.algorithm.images import Geometry, load_image, network_size, prepare

from .conftest import encode_image

GRAY = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(GRAY, "L"),
        Image.fromarray(GRAY, "L").convert("LA"),
        Image.fromarray(GRAY, "L").convert("RGBA"),
        Image.fromarray(GRAY, "L").convert("P"),
        Image.fromarray(GRAY.astype(np.uint16) * 257).convert("I;16"),
        Image.fromarray(GRAY, "L").convert("RGB").convert("CMYK"),
    ],
    ids=["L", "LA", "RGBA", "P", "I;16", "CMYK"],
)
def test_every_mode_becomes_the_same_rgb(image):
    rgb = np.asarray(load_image(image))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[..., 1].astype(int), GRAY.astype(int), atol=1)


def test_paths_bytes_pil_and_arrays_decode_identically(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    for item in (
        tmp_path / "a.png",
        str(tmp_path / "a.png"),
        encode_image(Image.fromarray(array)),
        Image.fromarray(array),
        array,
    ):
        np.testing.assert_array_equal(np.asarray(load_image(item)), array)


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        (b"", ValueError, "empty image bytes"),
        (b"not an image at all", ValueError, "cannot decode"),
        (encode_image(Image.new("RGB", (64, 64)))[:60], ValueError, "cannot decode"),
        (3.5, TypeError, "unsupported image type"),
        (np.zeros((4, 4), dtype=np.float32), ValueError, "uint8"),
    ],
    ids=["empty", "text", "truncated-png", "float", "float-array"],
)
def test_bad_inputs_raise_clear_errors(item, error, message):
    with pytest.raises(error, match=message):
        load_image(item)


def test_decompression_bomb_is_refused_before_decoding():
    header = encode_image(Image.new("1", (40000, 40000)))
    with pytest.raises(ValueError, match="exceeds the cap"):
        load_image(header)


def test_geometry_puts_maps_back_at_the_image_size_with_zero_outside_the_crop():
    geometry = Geometry(width=300, height=200, input_width=256, input_height=256, crop=224)
    assert geometry.to_input(Image.new("RGB", (300, 200))).shape == (3, 224, 224)
    full = geometry.to_image(torch.ones(224, 224))
    assert full.shape == (200, 300)
    assert full[100, 150] == pytest.approx(1.0)
    assert full[0, 0] == 0.0 and full[-1, -1] == 0.0


def test_geometry_without_crop_covers_the_whole_image():
    geometry = Geometry(width=120, height=80, input_width=64, input_height=64)
    full = geometry.to_image(torch.ones(64, 64))
    assert full.shape == (80, 120) and np.allclose(full, 1.0)


def test_prepare_squashes_mixed_sizes_into_one_square():
    inputs, geometries = prepare([np.zeros((10, 20, 3), np.uint8), np.zeros((50, 40), np.uint8)], 32, 0)
    assert [tuple(x.shape) for x in inputs] == [(3, 32, 32), (3, 32, 32)]
    assert [(g.width, g.height) for g in geometries] == [(20, 10), (40, 50)]


@pytest.mark.parametrize(
    ("size", "expected"),
    [((256, 256), (256, 256)), ((400, 200), (352, 192)), ((200, 400), (192, 352)), ((1000, 10), (2560, 32))],
)
def test_kept_aspect_keeps_about_the_square_pixel_count_in_multiples_of_32(size, expected):
    assert network_size(*size, resize=256, keep_aspect=True) == expected
    assert network_size(*size, resize=256, keep_aspect=False) == (256, 256)


def test_kept_aspect_maps_back_onto_the_whole_image():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 150:] = 255  # right half white: it stays on the right half of the input
    inputs, (geometry,) = prepare([image], 64, keep_aspect=True)
    assert inputs[0].shape == (3, 32, 96) and geometry.input_shape == (32, 96)
    assert inputs[0][:, :, :47].max() == 0 and inputs[0][:, :, 49:].min() == 1
    ramp = torch.arange(96, dtype=torch.float32).expand(32, 96)
    full = geometry.to_image(ramp)
    assert full.shape == (100, 300) and full[50, 0] < 1 and full[50, -1] > 94


VALID_PNG = encode_image(Image.new("RGB", (24, 16), (90, 160, 30)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes_decode_or_raise_value_error(data):
    try:
        image = load_image(data)
    except ValueError:
        return
    assert image.mode == "RGB"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(VALID_PNG) - 1), st.integers(0, 255)), max_size=8),
    st.integers(1, len(VALID_PNG)),
)
def test_fuzz_corrupted_png_decodes_or_raises_value_error(flips, length):
    data = bytearray(VALID_PNG)
    for position, value in flips:
        data[position] = value
    try:
        image = load_image(bytes(data[:length]))
    except ValueError:
        return
    assert image.mode == "RGB" and image.size[0] > 0
