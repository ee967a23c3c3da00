"""Qwen2-VL's patch embedding as a matrix product (st_viomni.patch_embedding): the convolution's outputs and
gradients, on every model st-viomni builds or loads, with nothing saved changed."""

import copy
import pickle

import torch
from PIL import Image
from sentence_transformers import SentenceTransformer
from transformers import Qwen2VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

from st_viomni import ViOmniQwen, build_model
from st_viomni.patch_embedding import use_matmul_patch_embedding


def _runs_as_matmul(model) -> bool:
    patch_embed = next(module for module in model.modules() if isinstance(module, PatchEmbed))
    return "forward" in vars(patch_embed)


def test_matmul_patch_embedding_equals_the_convolution_forward_and_backward(tiny_base):
    model = Qwen2VLModel.from_pretrained(tiny_base)
    patch_embed = model.visual.patch_embed
    torch.manual_seed(0)
    # The image processor's layout: one row of channels x temporal x height x width values per patch.
    pixels = torch.randn(37, patch_embed.proj.weight[0].numel())

    def run():
        patch_embed.zero_grad()
        inputs = pixels.clone().requires_grad_(True)
        output = patch_embed(inputs)
        (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
        return output.detach(), inputs.grad, patch_embed.proj.weight.grad.clone()

    convolution = run()
    assert use_matmul_patch_embedding(model) == 1
    assert _runs_as_matmul(model)
    matmul = run()
    assert matmul[0].shape == (37, patch_embed.embed_dim)
    for expected, actual, name in zip(convolution, matmul, ("output", "input grad", "weight grad")):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_viomni_models_use_it_and_save_exactly_what_plain_models_load(tiny_base, tmp_path):
    built = build_model(tiny_base, embedding_dim=32)
    assert _runs_as_matmul(built)
    built.save(str(tmp_path))
    plain = SentenceTransformer(str(tmp_path))
    loaded = ViOmniQwen(str(tmp_path))
    assert not _runs_as_matmul(plain) and _runs_as_matmul(loaded)
    assert plain.state_dict().keys() == loaded.state_dict().keys() == built.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[key], loaded.state_dict()[key]) for key in plain.state_dict())


def test_only_patchwise_convolutions_are_switched():
    overlapping = PatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=8)
    overlapping.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 7, 7), bias=False)
    padded = PatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=8)
    padded.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 14, 14), padding=1, bias=False)
    assert use_matmul_patch_embedding(torch.nn.ModuleList([overlapping, padded])) == 0
    assert "forward" not in vars(overlapping) and "forward" not in vars(padded)


def test_copies_of_a_viomni_model_keep_the_patch_embedding_on_their_own_layer(tiny_base, tmp_path):
    # Multi-process encode pools pickle the model; trainers and users deepcopy it. Each copy's switched patch
    # embedding must run on that copy's weights, not fail to load or point at the original.
    build_model(tiny_base, embedding_dim=32).save(str(tmp_path))
    model = ViOmniQwen(str(tmp_path))
    image = Image.new("RGB", (56, 84), (200, 40, 90))
    texts = ["<text_pair> một câu ngắn", {"image": image, "text": "<ocr> chữ trên ảnh"}]
    expected = torch.as_tensor(model.encode(texts))
    for copy_of in (lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy):
        duplicate = copy_of(model)
        switched = [m for m in duplicate.modules() if isinstance(m, PatchEmbed) and "forward" in vars(m)]
        assert len(switched) == 1
        assert all(m.forward.args[0] is m for m in switched)
        torch.testing.assert_close(torch.as_tensor(duplicate.encode(texts)), expected)
