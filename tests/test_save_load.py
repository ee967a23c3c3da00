"""A saved viOmni model loads with plain sentence-transformers, in a process that never imports st_viomni."""

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from st_viomni import format_input


def _images(folder):
    """Images in the forms the model docstring lists as encoded identically by plain sentence-transformers, and
    (the last two) as encoded differently."""
    pixels = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    rgba = np.dstack([pixels, np.full((70, 90), 255, np.uint8)])
    rgba[:, 45:, 3] = 0  # the right half transparent
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(folder / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(pixels).save(folder / "rotated.png", exif=exif)
    Image.fromarray(pixels[..., 0]).save(folder / "gray.png")
    Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    rotated = Image.open(folder / "rotated.jpg")
    rotated.load()
    identical = [
        str(folder / "rotated.jpg"),
        str(folder / "rotated.png"),
        str(folder / "gray.png"),
        str(folder / "cmyk.jpg"),
        Image.fromarray(rgba, "RGBA"),
        Image.fromarray(pixels).convert("P"),
        Image.fromarray(pixels[..., 0].astype(np.int32), "I"),  # 8-bit values in a 32-bit image
    ]
    return identical, [str(folder / "transparent.png"), rotated]


def test_plain_sentence_transformers_reloads_and_encodes_identically(tiny_model, tmp_path):
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (90, 70), (200, 30, 30)).save(image_path)
    pairs_text = "Con mèo ngồi trên tấm thảm."
    identical, different = _images(tmp_path)
    # Inputs in the forms a plain sentence-transformers user would pass (paths, prompt names).
    calls = [
        ([pairs_text], "text_pair"),
        ([str(image_path)], "ocr"),
        ([{"image": str(image_path), "text": "Màu gì?"}], "vqa_single"),
        ([{"image": [str(image_path), str(image_path)], "text": "Giống nhau không?"}], "vqa_multi"),
        ([format_input("instr", "Dịch: xin chào")], None),
        *(([image], "ocr") for image in identical),
        *(([image], "ocr") for image in different),
    ]
    expected = [tiny_model.encode(inputs, prompt_name=prompt) for inputs, prompt in calls]
    model_dir = tmp_path / "model"
    tiny_model.save(str(model_dir))

    modules = json.loads((model_dir / "modules.json").read_text())
    assert all(module["type"].startswith("sentence_transformers.") for module in modules)
    (tmp_path / "calls.pkl").write_bytes(pickle.dumps(calls))

    script = textwrap.dedent(
        f"""
        import pickle, sys
        import numpy as np
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer({str(model_dir)!r})
        calls = pickle.loads(open({str(tmp_path / "calls.pkl")!r}, "rb").read())
        out = [model.encode(inputs, prompt_name=prompt) for inputs, prompt in calls]
        imported = sorted(name for name in sys.modules if name.startswith("st_viomni"))
        pickle.dump((out, imported, type(model).__name__), open({str(tmp_path / "out.pkl")!r}, "wb"))
        """
    )
    # The pickled format_input output holds PIL images only; unpickling them needs PIL, not st_viomni.
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    reloaded, imported, class_name = pickle.loads((tmp_path / "out.pkl").read_bytes())
    assert imported == [] and class_name == "SentenceTransformer"
    for (inputs, _), got, want in zip(calls[: -len(different)], reloaded, expected):
        # Same tokens, same weights; only float rounding may differ between processes (thread counts).
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=repr(inputs))
    # The documented exceptions: plain sentence-transformers decodes a transparent file without compositing it
    # on white, and ignores a PIL image's EXIF orientation.
    tail = -len(different)
    for (inputs, _), got, want in zip(calls[tail:], reloaded[tail:], expected[tail:]):
        assert np.abs(got - want).max() > 1e-2, inputs
