import io

import pytest
from PIL import Image

from st_viomni import format_input, load_image


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
