import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from st_viomni import format_input, load_image
from st_viomni.formatting import image_size


def test_text_only_input_is_the_prefixed_string():
    assert format_input("text_pair", "The cat sat on the mat.") == "<text_pair> The cat sat on the mat."
    assert format_input("instr", "Dịch sang tiếng Anh: xin chào") == "<instr> Dịch sang tiếng Anh: xin chào"


def test_images_come_first_and_the_prefix_starts_the_text():
    red, green = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 40), "green")
    sample = format_input("vqa_multi", "Which is larger?", [red, green])
    assert list(sample) == ["image", "text"]
    assert sample["text"] == "<vqa_multi> Which is larger?"
    assert [image.size for image in sample["image"]] == [(40, 30), (30, 40)]


def test_images_without_text_get_the_prefix_alone():
    sample = format_input("ocr", images=[Image.new("RGB", (40, 30))])
    assert sample["text"] == "<ocr>"
    assert format_input("ocr", "", [Image.new("RGB", (40, 30))])["text"] == "<ocr>"


def test_a_single_image_may_be_passed_without_a_list(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (20, 20), "blue").save(path)
    sample = format_input("vqa_single", "colour?", str(path))
    assert len(sample["image"]) == 1 and sample["image"][0].getpixel((0, 0)) == (0, 0, 255)


def test_bad_inputs_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="Unknown task 'caption'"):
        format_input("caption", "text")
    with pytest.raises(ValueError, match="needs text or at least one image"):
        format_input("ocr")
    with pytest.raises(ValueError, match="text must be a string"):
        format_input("ocr", 42)
    with pytest.raises(ValueError, match="already starts with a task prefix"):
        format_input("ocr", "<ocr> twice")
    with pytest.raises(FileNotFoundError, match=r"images\[1\].*missing\.png"):
        format_input("ocr", "q", [Image.new("RGB", (8, 8)), str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"images\[0\]: cannot decode image bytes"):
        format_input("ocr", "q", [b"\xff\xd8\xff\xe0 definitely not a jpeg"])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"images\[0\]: cannot decode image file .*corrupt\.jpg"):
        format_input("ocr", "q", [str(corrupt)])
    with pytest.raises(ValueError, match=r"images\[0\]: expected a PIL image"):
        format_input("ocr", "q", [None])


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 200, (200, 200, 200)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),
    ],
)
def test_non_rgb_images_are_converted_to_8_bit_rgb(mode, value, expected):
    image = load_image(Image.new(mode, (6, 4), value))
    assert image.mode == "RGB" and image.size == (6, 4)
    assert image.getpixel((0, 0)) == expected


def test_transparent_images_are_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] * 256)
    palette.info["transparency"] = 1
    assert load_image(palette).getpixel((0, 0)) == (0, 0, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert load_image(la).getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "red")
    image.paste(Image.new("RGB", (20, 20), "blue"), (20, 0))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    for source in (str(path), path.read_bytes(), Image.open(path), {"bytes": None, "path": str(path)}):
        upright = load_image(source)
        assert upright.size == (20, 40)
        top, bottom = upright.getpixel((10, 2)), upright.getpixel((10, 37))
        assert top[0] > 200 and top[2] < 60, top  # the red left edge is now on top
        assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_rgb_images_without_orientation_are_not_copied():
    image = Image.new("RGB", (4, 4))
    assert load_image(image) is image


def test_image_bytes_and_datasets_dicts_decode():
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), "green").save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (5, 3)
    assert load_image({"bytes": buffer.getvalue(), "path": None}).size == (5, 3)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([[0, 128, 255]], dtype=np.int32), [0, 128, 255]),  # 8-bit values in a 32-bit image: kept
        (np.array([[0, 32896, 65535]], dtype=np.int32), [0, 128, 255]),  # 16-bit values: scaled
        (np.array([[-100, 28, 155]], dtype=np.int32), [0, 128, 255]),  # anything else: stretched
    ],
)
def test_32_bit_integer_images_are_scaled_by_the_range_their_values_use(array, expected):
    image = load_image(Image.fromarray(array, "I"))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(value,) * 3 for value in expected]


def test_16_bit_pngs_keep_their_full_range(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = load_image(str(tmp_path / "deep.png"))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_images_qwen2_vl_cannot_resize_are_refused_naming_them(tmp_path):
    Image.new("RGB", (5000, 20)).save(tmp_path / "wide.png")
    buffer = io.BytesIO()
    Image.new("RGB", (2, 201 * 2)).save(buffer, format="PNG")
    cases = [
        (str(tmp_path / "wide.png"), r"image file '.*wide\.png' is 5000x20, an aspect ratio of 250"),
        (buffer.getvalue(), r"image bytes \(\d+ bytes\) is 2x402, an aspect ratio of 201"),
        (Image.new("L", (400, 2)), r"image is 400x2, an aspect ratio of 200"),
    ]
    for source, message in cases[:2]:
        for check in (load_image, image_size):
            with pytest.raises(ValueError, match=rf"^images\[3\]: {message}; Qwen2-VL takes at most 200$"):
                check(source, name="images[3]")
    assert load_image(cases[2][0]).size == (400, 2) and image_size(cases[2][0]) == (400, 2)  # 200 is allowed
    with pytest.raises(ValueError, match=r"anchor_images\[0\]: image is 2x401, an aspect ratio of 200.5"):
        load_image(Image.new("RGB", (2, 401)), name="anchor_images[0]")


def test_images_over_pillows_pixel_limit_are_refused_naming_them(tmp_path, monkeypatch):
    Image.new("1", (150, 150)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # refused above twice this: 22,500 pixels are
    for check in (load_image, image_size):
        with pytest.raises(ValueError, match=r"^input 2: image file '.*bomb\.png' is too large to decode: Image size "
                           r"\(22500 pixels\) exceeds limit"):
            check(str(tmp_path / "bomb.png"), name="input 2")
        with pytest.raises(ValueError, match=r"^x: image bytes \(\d+ bytes\) is too large to decode"):
            check((tmp_path / "bomb.png").read_bytes(), name="x")


def test_sizing_reads_headers_only_and_agrees_with_load_image(tmp_path, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 20), "red").save(tmp_path / "rotated.png", exif=exif)
    Image.new("RGB", (60, 20), "red").save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGB", (60, 20), "red").save(tmp_path / "plain.png")
    sources = [str(tmp_path / name) for name in ("rotated.png", "rotated.jpg", "plain.png")]
    expected = [load_image(source).size for source in sources]
    assert expected == [(20, 60), (20, 60), (60, 20)]

    def no_decoding(image):
        raise AssertionError(f"decoded {image.filename}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert [image_size(source) for source in sources] == expected
    assert image_size((tmp_path / "plain.png").read_bytes()) == (60, 20)
