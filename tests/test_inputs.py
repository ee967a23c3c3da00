"""Input checks (st_viomni.inputs): which strings are images, header-only checks, dicts with unknown keys."""

import io

import numpy as np
import pytest
from PIL import Image
from sentence_transformers.base.modality import is_image_url_or_path

from st_viomni import check_inputs, load_image
from st_viomni.inputs import is_image_path, is_image_url


def _transparent_png(path):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 4), dtype=np.uint8)
    pixels[:, 30:, 3] = 0  # the right half transparent, over random colours
    Image.fromarray(pixels, "RGBA").save(path)


def test_strings_are_images_exactly_where_sentence_transformers_loads_them(tmp_path):
    for name in ("plain.png", "my photo.jpg", "  padded.webp"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    existing = [str(tmp_path / name) for name in ("plain.png", "my photo.jpg", "  padded.webp")]
    strings = [
        *existing,
        str(tmp_path / "missing.png"),
        str(tmp_path / "missing photo.png"),
        "a sentence that ends with cat.png",
        "hello",
        "https://example.com/cat.png",
        "https://example.com/page?x=cat.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "data:text/plain,cat.png",
    ]
    for value in strings:
        # What stock sentence-transformers loads as an image, st-viomni takes as a local file or leaves to it as a URL.
        local_file = is_image_path(value) and (tmp_path / value).is_file()
        assert is_image_url_or_path(value) == (is_image_url(value) or local_file), value
    assert all(is_image_path(value) for value in existing)  # spaces included
    # A missing file named without spaces or scheme is still taken as a path, so that a typo is an error.
    assert is_image_path(str(tmp_path / "missing.png"))
    assert not any(is_image_path(value) for value in strings[4:])


def test_an_image_path_with_a_space_is_decoded_with_load_image(tmp_path):
    _transparent_png(tmp_path / "my image.png")
    (decoded,) = check_inputs([str(tmp_path / "my image.png")])
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(load_image(str(tmp_path / "my image.png"))))
    assert decoded.getpixel((45, 10)) == (255, 255, 255)  # composited on white, as in training
    (tmp_path / "my corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ValueError, match=r"input 1: cannot decode image file '.*my corrupt\.png'"):
        check_inputs(["hello", str(tmp_path / "my corrupt.png")])
    assert check_inputs(["my favourite cat.png is lost"]) == ["my favourite cat.png is lost"]  # no such file: text


def test_dicts_with_unknown_keys_name_the_input_and_the_keys():
    with pytest.raises(ValueError, match=r"input 2 has unknown key\(s\) \['foo'\]; expected 'text' and/or 'image'$"):
        check_inputs(["a", "b", {"text": "x", "foo": 1}])
    with pytest.raises(ValueError, match=r"input 0 has unknown key\(s\) \['txt'\]"):
        check_inputs([{"txt": "hi"}])
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match=r"input 1 has unknown key\(s\) \['bytes', 'path'\].*goes under 'image'"):
        check_inputs(["a", {"bytes": buffer.getvalue(), "path": None}])
    (image,) = check_inputs([{"image": {"bytes": buffer.getvalue(), "path": None}}])
    assert image["image"].size == (8, 8)


def test_header_only_checks_leave_inputs_as_they_are(tmp_path):
    Image.new("RGB", (30, 20), "red").save(tmp_path / "ok.png")
    Image.new("RGB", (201 * 2, 2)).save(tmp_path / "wide.png")
    inputs = ["text", str(tmp_path / "ok.png"), {"image": [str(tmp_path / "ok.png")], "text": "q"}]
    checked = check_inputs(inputs, decode=False)
    assert checked == inputs and checked is not inputs
    wide = r"input 4\['image'\]: image file '.*wide\.png' is 402x2, an aspect ratio of 201"
    with pytest.raises(ValueError, match=wide):
        check_inputs([*inputs, {"image": str(tmp_path / "wide.png")}], offset=1, decode=False)
    with pytest.raises(FileNotFoundError, match=r"input 0 names an image file that does not exist"):
        check_inputs([str(tmp_path / "typo.png")], decode=False)
