"""Depth Pro: key mapping for Apple's depth_pro.pt, loading either layout, inference maths, bad files.

Networks are tiny random-weight DepthPro configs of the released topology (3 image scales, 2 hooks,
3 ViTs) built here; the full-size model is only ever built on the meta device.
"""
import json
import math
import os
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fixture_paths import DEPTH_PRO_FIXTURES
from genrefocus_core.depth.depth_pro import (
    SHIPPED_CONFIG, DepthResult, convert_apple_checkpoint, depth_pro_loaded, estimate_depth, fov_to_focal_px,
    load_depth_pro, release_depth_pro, working_size,
)
from genrefocus_core.depth.depth_pro_apple import (
    APPLE_TENSOR_COUNT, HF_TENSOR_COUNT, align_attention_names, apple_key_to_hf, convert_apple_state_dict,
    hf_state_dict_to_apple,
)
from genrefocus_core.basics.errors import InputError, MissingModelFileError, ModelFileError
from numerics import assert_fp32_close

# The tiny Depth Pro below, input to disparity, as a chain of fp32 reductions (tests/numerics.py): patch
# embedding (K = 3 * 8 * 8 = 192) 1; ViT 3 layers x (LayerNorm, q/k/v, scores, softmax over 17 tokens,
# P.V, out, LayerNorm, fc1, fc2) + final LayerNorm = 28; neck projections and upsampling 3; fusion, 4
# levels x (two residual units of two 3x3 convs, K = 16 * 9 = 144, deconvolution, projection) = 24;
# head 4; bilinear resize 1 -> depth 61, K 192. The FOV branch is a parallel chain of the same length.
DEPTH_PRO_CHAIN = dict(depth=61, reduction=192)


def tiny_config():
    from transformers import DepthProConfig
    vit = dict(model_type="dinov2", hidden_size=16, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2,
               patch_size=8, image_size=32, use_mask_token=False)
    return DepthProConfig(patch_size=32, fusion_hidden_size=16, intermediate_hook_ids=[2, 1],
                          intermediate_feature_dims=[16, 16], scaled_images_ratios=[0.25, 0.5, 1],
                          scaled_images_overlap_ratios=[0.0, 0.5, 0.25], scaled_images_feature_dims=[32, 32, 16],
                          use_fov_model=True, num_fov_head_layers=2,
                          image_model_config=dict(vit), patch_model_config=dict(vit), fov_model_config=dict(vit))


def make_tiny_model(seed=0):
    from transformers import DepthProForDepthEstimation
    torch.manual_seed(seed)
    model = DepthProForDepthEstimation(tiny_config()).eval()
    with torch.no_grad():  # random weights predict any field of view: keep it near 60 degrees, varying per image
        last = model.fov_model.head.layers[-1]
        last.weight.mul_(0.05)
        last.bias.fill_(60.0)
        model.head.layers[-2].bias.fill_(0.3)  # keep most of the canonical inverse depth above ReLU's zero
    return model


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 45, 70, 3, generator=g)


@pytest.fixture(scope="module")
def apple_pt(tmp_path_factory, tiny_model):
    """The tiny model written in Apple's layout (fused qkv, Apple names) as depth_pro.pt."""
    path = tmp_path_factory.mktemp("apple") / "depth_pro.pt"
    torch.save(hf_state_dict_to_apple(tiny_model.state_dict()), path)
    return path


@pytest.fixture(scope="module")
def config_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny_depth_pro.json"
    tiny_config().to_json_file(str(path))
    return path


# ---------------------------------------------------------------------------------- key mapping

def test_apple_layout_maps_onto_full_size_transformers_model():
    """Every tensor of Apple's depth_pro.pt lands on transformers' model with the fixture's shape, and
    the shipped config builds exactly the fixture's architecture (on the meta device)."""
    from transformers import DepthProConfig, DepthProForDepthEstimation
    apple = json.loads((DEPTH_PRO_FIXTURES / "apple_depth_pro_keys.json").read_text())["keys"]
    hf = json.loads((DEPTH_PRO_FIXTURES / "hf_depth_pro_keys.json").read_text())["keys"]  # transformers 5.18 names
    assert len(apple) == APPLE_TENSOR_COUNT and len(hf) == HF_TENSOR_COUNT

    config = DepthProConfig.from_dict(json.loads(SHIPPED_CONFIG.read_text()))
    with torch.device("meta"):
        model = DepthProForDepthEstimation(config)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hf = align_attention_names(hf, model_shapes)  # the installed transformers' attention naming
    assert model_shapes == {k: tuple(v) for k, v in hf.items()}
    assert working_size(config) == 1536

    apple_tensors = {k: torch.empty(v, device="meta") for k, v in apple.items()}
    converted = convert_apple_state_dict(apple_tensors, model_shapes)  # raises on any missing/extra/shape
    assert set(converted) == set(hf)
    assert all(tuple(converted[k].shape) == tuple(hf[k]) for k in hf)
    model.load_state_dict(converted, strict=True, assign=True)

    qkv = [k for k in apple if k.endswith("attn.qkv.weight")]
    assert len(qkv) == 72  # 3 ViTs x 24 blocks, each split in three
    assert apple_key_to_hf("encoder.patch_encoder.blocks.5.attn.qkv.weight") == [
        f"depth_pro.encoder.patch_encoder.model.encoder.layer.5.attention.{p}_proj.weight" for p in "qkv"]
    assert apple_key_to_hf("decoder.fusions.0.out_conv.weight") == ["fusion_stage.final.projection.weight"]
    assert apple_key_to_hf("decoder.fusions.4.deconv.weight") == ["fusion_stage.intermediate.0.deconv.weight"]
    assert apple_key_to_hf("encoder.upsample_latent0.3.weight") == [
        "depth_pro.neck.feature_upsample.intermediate.1.layers.3.weight"]

    back = hf_state_dict_to_apple({k: torch.empty(v, device="meta") for k, v in hf.items()})
    assert {k: list(v.shape) for k, v in back.items()} == apple


def test_qkv_split_order_and_inverse():
    w = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(12, 2)
    out = convert_apple_state_dict({"fov.encoder.0.blocks.1.attn.qkv.weight": w})
    prefix = "fov_model.fov_encoder.model.encoder.layer.1.attention."
    assert torch.equal(out[prefix + "q_proj.weight"], w[:4])
    assert torch.equal(out[prefix + "k_proj.weight"], w[4:8])
    assert torch.equal(out[prefix + "v_proj.weight"], w[8:])
    assert torch.equal(hf_state_dict_to_apple(out)["fov.encoder.0.blocks.1.attn.qkv.weight"], w)


# Apple's network written out functionally on an Apple-layout state dict (timm ViT with fused qkv,
# image pyramid split into overlapping 384-style patches, merge with fixed paddings 3 and 6, DPT-style
# decoder, FOV head), so the mapping is checked against what each Apple tensor does, not only against
# its own inverse. Apple merges patch grids with paddings 3 (full resolution) and 6 (half); transformers
# caps them at a quarter of the token grid and resizes the merged map to 4x (2x) the grid, both of which
# only act below the released grid of 24 tokens; the reference does the same to run on a small grid.

def _apple_vit(sd, prefix, x, heads, hooks=()):
    w = lambda name: sd[prefix + name]
    proj = w("patch_embed.proj.weight")
    x = F.conv2d(x, proj, w("patch_embed.proj.bias"), stride=proj.shape[-1]).flatten(2).transpose(1, 2)
    b, _, d = x.shape
    x = torch.cat([w("cls_token").expand(b, -1, -1), x], 1) + w("pos_embed")
    n = x.shape[1]
    saved = {}
    i = 0
    while prefix + f"blocks.{i}.norm1.weight" in sd:
        blk = f"blocks.{i}."
        h = F.layer_norm(x, (d,), w(blk + "norm1.weight"), w(blk + "norm1.bias"), eps=1e-6)
        qkv = F.linear(h, w(blk + "attn.qkv.weight"), w(blk + "attn.qkv.bias"))
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        att = att.transpose(1, 2).reshape(b, n, d)
        x = x + w(blk + "ls1.gamma") * F.linear(att, w(blk + "attn.proj.weight"), w(blk + "attn.proj.bias"))
        h = F.layer_norm(x, (d,), w(blk + "norm2.weight"), w(blk + "norm2.bias"), eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, w(blk + "mlp.fc1.weight"), w(blk + "mlp.fc1.bias"))),
                     w(blk + "mlp.fc2.weight"), w(blk + "mlp.fc2.bias"))
        x = x + w(blk + "ls2.gamma") * h
        if i in hooks:
            saved[i] = x
        i += 1
    return F.layer_norm(x, (d,), w("norm.weight"), w("norm.bias"), eps=1e-6), saved


def _grid(tokens):
    n, t, c = tokens.shape
    side = int(math.isqrt(t - 1))
    return tokens[:, 1:].reshape(n, side, side, c).permute(0, 3, 1, 2)


def _split(x, patch, overlap):
    stride = int(patch * (1 - overlap))
    steps = int(math.ceil((x.shape[-1] - patch) / stride)) + 1
    return torch.cat([x[..., j * stride:j * stride + patch, i * stride:i * stride + patch]
                      for j in range(steps) for i in range(steps)], 0)


def _merge(x, batch, padding, size):
    steps = int(math.sqrt(x.shape[0] // batch))
    rows = []
    for j in range(steps):
        row = []
        for i in range(steps):
            o = x[batch * (j * steps + i):batch * (j * steps + i + 1)]
            o = o[..., padding if j else 0:o.shape[-2] - (padding if j < steps - 1 else 0),
                  padding if i else 0:o.shape[-1] - (padding if i < steps - 1 else 0)]
            row.append(o)
        rows.append(torch.cat(row, -1))
    merged = torch.cat(rows, -2)  # released model: already size x size
    return F.interpolate(merged, size=(size, size), mode="bilinear", align_corners=False)


def _apple_forward(sd, x, patch, heads, hook_blocks, grid):
    """-> (canonical inverse depth [B,1,S,S], fov in degrees [B,1,1,1]) as Apple's DepthPro.forward."""
    bsz = x.shape[0]
    pad3, pad6 = min(3, grid // 4), min(6, grid // 4)
    x1 = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    x2 = F.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=False)
    p0, p1 = _split(x, patch, 0.25), _split(x1, patch, 0.5)
    enc, hooks = _apple_vit(sd, "encoder.patch_encoder.", torch.cat([p0, p1, x2]), heads, hook_blocks)
    enc = _grid(enc)
    e0, e1, e2 = torch.split(enc, [len(p0), len(p1), len(x2)])
    latent0 = _merge(_grid(hooks[hook_blocks[0]])[:bsz * 25], bsz, pad3, 4 * grid)
    latent1 = _merge(_grid(hooks[hook_blocks[1]])[:bsz * 25], bsz, pad3, 4 * grid)

    def up(name, t):
        t = F.conv2d(t, sd[f"encoder.{name}.0.weight"])
        j = 1
        while f"encoder.{name}.{j}.weight" in sd:
            t = F.conv_transpose2d(t, sd[f"encoder.{name}.{j}.weight"], stride=2)
            j += 1
        return t

    glob = _grid(_apple_vit(sd, "encoder.image_encoder.", x2, heads)[0])
    glob = F.conv_transpose2d(glob, sd["encoder.upsample_lowres.weight"], sd["encoder.upsample_lowres.bias"], stride=2)
    glob = F.conv2d(torch.cat([up("upsample2", e2), glob], 1), sd["encoder.fuse_lowres.weight"],
                    sd["encoder.fuse_lowres.bias"])
    encodings = [up("upsample_latent0", latent0), up("upsample_latent1", latent1),
                 up("upsample0", _merge(e0, bsz, pad3, 4 * grid)),
                 up("upsample1", _merge(e1, bsz, pad6, 2 * grid)), glob]

    def conv(i, t):
        key = f"decoder.convs.{i}.weight"
        return t if key not in sd else F.conv2d(t, sd[key], padding=sd[key].shape[-1] // 2)

    def fusion(i, a, skip=None):
        pre = f"decoder.fusions.{i}."

        def res(r, t):
            unit = pre + f"resnet{r}.residual."
            h = F.conv2d(F.relu(t), sd[unit + "1.weight"], sd[unit + "1.bias"], padding=1)
            h = F.conv2d(F.relu(h), sd[unit + "3.weight"], sd[unit + "3.bias"], padding=1)
            return t + h
        if skip is not None:
            a = a + res(1, skip)
        a = res(2, a)
        if i:
            a = F.conv_transpose2d(a, sd[pre + "deconv.weight"], stride=2)
        return F.conv2d(a, sd[pre + "out_conv.weight"], sd[pre + "out_conv.bias"])

    features = conv(4, encodings[4])
    lowres = features
    features = fusion(4, features)
    for i in (3, 2, 1, 0):
        features = fusion(i, features, conv(i, encodings[i]))
    h = F.conv2d(features, sd["head.0.weight"], sd["head.0.bias"], padding=1)
    h = F.conv_transpose2d(h, sd["head.1.weight"], sd["head.1.bias"], stride=2)
    h = F.relu(F.conv2d(h, sd["head.2.weight"], sd["head.2.bias"], padding=1))
    depth = F.relu(F.conv2d(h, sd["head.4.weight"], sd["head.4.bias"]))

    tokens = _apple_vit(sd, "fov.encoder.0.", x2, heads)[0][:, 1:]
    tokens = F.linear(tokens, sd["fov.encoder.1.weight"], sd["fov.encoder.1.bias"]).permute(0, 2, 1)
    low = F.relu(F.conv2d(lowres, sd["fov.downsample.0.weight"], sd["fov.downsample.0.bias"], stride=2, padding=1))
    f = tokens.reshape_as(low) + low
    f = F.relu(F.conv2d(f, sd["fov.head.0.weight"], sd["fov.head.0.bias"], stride=2, padding=1))
    f = F.relu(F.conv2d(f, sd["fov.head.2.weight"], sd["fov.head.2.bias"], stride=2, padding=1))
    return depth, F.conv2d(f, sd["fov.head.4.weight"], sd["fov.head.4.bias"])


def test_mapped_weights_compute_what_apples_network_computes(tmp_path):
    """An Apple-layout file loaded through the mapping gives the outputs of Apple's architecture run
    directly on that file's tensors (a swapped level, fusion block or q/k/v would change them)."""
    from transformers import DepthProConfig
    vit = dict(model_type="dinov2", hidden_size=16, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2,
               patch_size=2, image_size=8, use_mask_token=False)
    config = DepthProConfig(patch_size=8, fusion_hidden_size=16, intermediate_hook_ids=[2, 1],
                            intermediate_feature_dims=[16, 16], scaled_images_feature_dims=[32, 24, 8],
                            use_fov_model=True, num_fov_head_layers=2, image_model_config=dict(vit),
                            patch_model_config=dict(vit), fov_model_config=dict(vit))
    from transformers import DepthProForDepthEstimation
    torch.manual_seed(3)
    source = DepthProForDepthEstimation(config).eval()
    apple = {k: v.clone() for k, v in hf_state_dict_to_apple(source.state_dict()).items()}
    g = torch.Generator().manual_seed(4)
    for k, v in apple.items():  # independent values everywhere, so a mix-up cannot cancel out
        apple[k] = torch.randn(v.shape, generator=g) * (0.5 / math.sqrt(max(1, v[0].numel()) if v.ndim > 1 else 4))
    for k in apple:
        if k.endswith("attn.qkv.weight"):  # peaked attention, so that swapping q and k shows
            apple[k] *= 8.0
    apple["head.4.bias"] = torch.tensor([0.5])  # most of the depth above the final ReLU
    torch.save(apple, tmp_path / "depth_pro.pt")
    cfg_path = tmp_path / "config.json"
    config.to_json_file(str(cfg_path))
    model = load_depth_pro(tmp_path / "depth_pro.pt", config=cfg_path)

    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        out = model(pixel_values=pixels)
        apple_hooks = (config.intermediate_hook_ids[1], config.intermediate_hook_ids[0])  # block 5, 11 in full size
        ref_depth, ref_fov = _apple_forward(apple, pixels, patch=8, heads=2, grid=4, hook_blocks=apple_hooks)
    assert ref_depth.shape == (2, 1, 256, 256) and ref_depth.std() > 0
    # Two implementations of one network, equal up to rounding. Only the heads' rounding reaches the
    # outputs at full size (4 convolutions, K <= 16 * 9 = 144): these random weights attenuate whatever
    # happens upstream, so much that swapping q and k everywhere (an O(1) change of every attention map)
    # moves depth by only 6e-5 relative, and the encoders' rounding (DEPTH_PRO_CHAIN's ~5e-4 relative)
    # arrives at ~3e-8 relative. The whole-chain bound would hide such a swap; the heads' bound does not.
    assert_fp32_close(out.predicted_depth, ref_depth[:, 0], depth=4, reduction=144)
    assert_fp32_close(out.field_of_view, ref_fov.flatten(), depth=4, reduction=144)


# ---------------------------------------------------------------------------------- inference

def test_shapes_any_aspect_ratio_and_batch(tiny_model, images):
    result = estimate_depth(tiny_model, images)
    assert isinstance(result, DepthResult)
    assert result.depth_m.shape == (2, 45, 70) and result.depth_m.dtype == torch.float32
    assert result.focal_px.shape == (2,) and result.fov_deg.shape == (2,)
    assert torch.isfinite(result.depth_m).all() and (result.depth_m >= 1e-4).all() and (result.depth_m <= 1e4).all()
    assert result.depth_m.std() > 0
    # the focal length belongs to the input width and the FOV the network predicted
    assert torch.allclose(result.focal_px, 0.5 * 70 / torch.tan(torch.deg2rad(result.fov_deg) / 2), rtol=1e-5)
    # batching does not change the result: one pass of 2 == two passes of 1 == each image alone, up to
    # rounding (another batch size runs other matmul/conv blockings); compared as disparity, which the
    # network predicts linearly (depth = 1 / disparity magnifies the error where disparity is small)
    together = estimate_depth(tiny_model, images, max_batch=2)
    alone = estimate_depth(tiny_model, images[1:])
    assert_fp32_close(together.disparity(), result.disparity(), **DEPTH_PRO_CHAIN)
    assert_fp32_close(alone.disparity()[0], result.disparity()[1], **DEPTH_PRO_CHAIN)
    assert_fp32_close(together.focal_px, result.focal_px, **DEPTH_PRO_CHAIN)
    for h, w in ((80, 31), (128, 128), (17, 200)):  # portrait, the working size itself, a strip
        r = estimate_depth(tiny_model, torch.rand(1, h, w, 3))
        assert r.depth_m.shape == (1, h, w) and torch.isfinite(r.depth_m).all()
    assert torch.allclose(result.disparity(), 1.0 / result.depth_m)
    # progress after every pass; a callback that raises cancels
    calls = []
    estimate_depth(tiny_model, torch.rand(3, 20, 20, 3), max_batch=2, callback=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 3), (3, 3)]

    def cancel(done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        estimate_depth(tiny_model, torch.rand(2, 20, 20, 3), callback=cancel)


class _FakeDepthPro(torch.nn.Module):
    """Stands in for the network to check the pre- and post-processing maths exactly."""

    def __init__(self, config, inverse_depth, fov_deg, with_fov=True):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.fov_model = torch.nn.Identity() if with_fov else None
        self.inverse_depth, self.fov_deg, self.seen = inverse_depth, fov_deg, []

    def forward(self, pixel_values):
        self.seen.append(pixel_values)
        b = pixel_values.shape[0]
        return SimpleNamespace(predicted_depth=self.inverse_depth.expand(b, -1, -1),
                               field_of_view=torch.full((b,), self.fov_deg))


def test_preprocessing_and_metric_scale_follow_depth_pro():
    config = tiny_config()
    size = working_size(config)
    assert size == 128
    canonical = torch.linspace(0.1, 2.0, size * size).reshape(1, size, size)
    fake = _FakeDepthPro(config, canonical, fov_deg=90.0)
    image = torch.rand(1, 30, 60, 3)
    result = estimate_depth(fake, image)
    # input: normalised to [-1, 1] (mean = std = 0.5) then bilinear to the working square
    expected_pixels = F.interpolate(image.permute(0, 3, 1, 2) * 2 - 1, size=(size, size), mode="bilinear",
                                    align_corners=False)
    assert torch.allclose(fake.seen[0], expected_pixels, atol=1e-6)
    # FOV 90 deg -> focal = W / 2; inverse depth = canonical * W / focal = 2 * canonical, resized, inverted
    assert torch.allclose(result.focal_px, torch.tensor([30.0]))
    inverse = F.interpolate((canonical * 2.0)[:, None], size=(30, 60), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(result.depth_m, 1.0 / inverse, rtol=1e-5)
    # a known focal length replaces the estimate (Apple's f_px): depth scales with it
    known = estimate_depth(fake, image, focal_px=120.0)
    assert torch.allclose(known.depth_m, result.depth_m * 4.0, rtol=1e-5)
    assert math.isclose(float(known.fov_deg), math.degrees(2 * math.atan(30 / 120)), rel_tol=1e-5)
    assert math.isclose(fov_to_focal_px(90.0, 60), 30.0, rel_tol=1e-9)


def test_impossible_fov_and_missing_fov_head():
    config = tiny_config()
    canonical = torch.ones(1, 128, 128)
    with pytest.raises(ModelFileError, match="field of view"):
        estimate_depth(_FakeDepthPro(config, canonical, fov_deg=-5.0), torch.rand(1, 8, 8, 3))
    no_head = _FakeDepthPro(config, canonical, fov_deg=60.0, with_fov=False)
    with pytest.raises(InputError, match="focal_px"):
        estimate_depth(no_head, torch.rand(1, 8, 8, 3))
    assert torch.allclose(estimate_depth(no_head, torch.rand(1, 8, 8, 3), focal_px=8.0).depth_m, torch.ones(1, 8, 8))
    with pytest.raises(InputError, match="focal_px"):
        estimate_depth(no_head, torch.rand(1, 8, 8, 3), focal_px=-1.0)
    with pytest.raises(InputError):
        estimate_depth(no_head, torch.rand(2, 8, 8, 3), focal_px=[1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------- loading

def assert_same_depth(result, reference):
    """The same weights loaded another way give the same depth up to rounding: a split fused qkv is a
    view of one tensor, and another memory layout may take other kernels. A misplaced weight moves the
    result by far more."""
    assert_fp32_close(result.disparity(), reference.disparity(), **DEPTH_PRO_CHAIN)
    assert_fp32_close(result.focal_px, reference.focal_px, **DEPTH_PRO_CHAIN)


def test_round_trip_hf_to_apple_layout_gives_the_same_outputs(tiny_model, images, apple_pt, config_json, tmp_path):
    reference = estimate_depth(tiny_model, images)
    loaded = load_depth_pro(apple_pt, device="cpu", config=config_json)
    assert loaded.dtype == torch.float32 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    out = estimate_depth(loaded, images)
    assert_same_depth(out, reference)
    # a folder holding depth_pro.pt works too
    assert_same_depth(estimate_depth(load_depth_pro(apple_pt.parent, config=config_json), images), reference)
    # converted once to a Hugging Face folder: same numbers, no pickle involved
    folder = convert_apple_checkpoint(apple_pt, tmp_path / "converted", config=config_json)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert_same_depth(estimate_depth(load_depth_pro(folder), images), reference)
    # or converted on first load into a cache folder that later loads read instead
    cache = tmp_path / "cache"
    first = load_depth_pro(apple_pt, config=config_json, cache_dir=cache)
    (copy,) = list(cache.iterdir())
    assert sorted(os.listdir(copy)) == ["config.json", "model.safetensors"]
    second = load_depth_pro(apple_pt, config=config_json, cache_dir=cache)
    assert second.genrefocus_source == str(copy)
    assert_same_depth(estimate_depth(first, images), reference)
    assert_same_depth(estimate_depth(second, images), reference)


def test_hf_folder_either_naming(tiny_model, images, tmp_path):
    reference = estimate_depth(tiny_model, images)
    folder = tmp_path / "hf"
    tiny_model.save_pretrained(str(folder))
    assert_same_depth(estimate_depth(load_depth_pro(folder), images), reference)
    # the same weights under transformers 5.x attention names (q_proj/o_proj) load identically
    weights = load_file(str(folder / "model.safetensors"))
    modern = {k.replace("attention.attention.query.", "attention.q_proj.")
               .replace("attention.attention.key.", "attention.k_proj.")
               .replace("attention.attention.value.", "attention.v_proj.")
               .replace("attention.output.dense.", "attention.o_proj."): v for k, v in weights.items()}
    assert modern.keys() != weights.keys()
    save_file(modern, str(folder / "model.safetensors"))
    assert_same_depth(estimate_depth(load_depth_pro(folder), images), reference)
    # half precision loads and runs (the GPU setting), close to fp32 (outputs stay float32)
    for dtype in (torch.float16, torch.bfloat16):
        model = load_depth_pro(folder, dtype=dtype)
        assert next(model.parameters()).dtype == dtype
        half = estimate_depth(model, images)
        assert half.depth_m.dtype == torch.float32 and torch.isfinite(half.depth_m).all()
        assert torch.allclose(half.focal_px, reference.focal_px, rtol=5e-3)
        assert ((half.depth_m - reference.depth_m).abs() / reference.depth_m).median() < 0.05


def test_release_and_context_manager(apple_pt, config_json, images):
    model = load_depth_pro(apple_pt, config=config_json)
    release_depth_pro(model, offload_to_cpu=True)
    assert estimate_depth(model, images).depth_m.shape == (2, 45, 70)
    release_depth_pro(model)
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(InputError, match="released"):
        estimate_depth(model, images)
    with depth_pro_loaded(apple_pt, config=config_json) as m:
        assert estimate_depth(m, images).depth_m.shape == (2, 45, 70)
    assert all(p.is_meta for p in m.parameters())


# ---------------------------------------------------------------------------------- bad files

def test_missing_files_name_the_file_and_folder(tmp_path):
    with pytest.raises(MissingModelFileError) as e:
        load_depth_pro(tmp_path / "depth_pro.pt")
    assert "depth_pro.pt" in str(e.value) and "models/depth_pro" in str(e.value)
    with pytest.raises(MissingModelFileError, match="depth_pro.pt"):
        load_depth_pro(tmp_path)  # an empty folder
    with pytest.raises(MissingModelFileError, match="models/depth_pro"):
        load_depth_pro(None)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the plain-pickle file
def test_not_a_checkpoint_truncated_and_code_pickle_are_refused(apple_pt, tmp_path):
    text = tmp_path / "depth_pro.pt"
    text.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(ModelFileError):
        load_depth_pro(text)

    truncated = tmp_path / "truncated.pt"
    data = apple_pt.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_depth_pro(truncated)

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name, save in (("legacy.pt", lambda obj, p: p.write_bytes(pickle.dumps(obj))),
                       ("zip.pt", lambda obj, p: torch.save(obj, p))):
        path = tmp_path / name
        save({"encoder.fuse_lowres.weight": Payload()}, path)
        with pytest.raises(ModelFileError, match="refused|not a PyTorch checkpoint"):
            load_depth_pro(path)
        assert not marker.exists()

    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(ModelFileError, match="state dict"):
        load_depth_pro(not_dict)

    bad_safetensors = tmp_path / "model.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelFileError):
        load_depth_pro(bad_safetensors)

    other_model = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(2)}, str(other_model))
    with pytest.raises(ModelFileError, match="not a Depth Pro"):
        load_depth_pro(other_model)


def test_unknown_missing_and_misshaped_tensors_are_named(tiny_model, config_json, tmp_path):
    apple = hf_state_dict_to_apple(tiny_model.state_dict())

    extra = dict(apple, **{"encoder.surprise.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ModelFileError, match="encoder.surprise.weight"):
        load_depth_pro(tmp_path / "extra.pt", config=config_json)

    missing = {k: v for k, v in apple.items() if k != "decoder.fusions.2.out_conv.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ModelFileError, match=r"missing.*decoder\.fusions\.2\.out_conv\.bias"):
        load_depth_pro(tmp_path / "missing.pt", config=config_json)

    wrong = dict(apple, **{"head.0.bias": torch.zeros(5)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ModelFileError, match=r"wrong shape.*head\.0\.bias"):
        load_depth_pro(tmp_path / "wrong.pt", config=config_json)

    # the tiny file against the full-size architecture (the default config): refused, not half-loaded
    torch.save(apple, tmp_path / "depth_pro.pt")
    with pytest.raises(ModelFileError, match="does not match the Depth Pro architecture"):
        load_depth_pro(tmp_path / "depth_pro.pt")


def test_old_transformers_gives_a_clear_error(monkeypatch, apple_pt):
    import sys
    import types
    old = types.ModuleType("transformers")
    old.__version__ = "4.46.3"  # before Depth Pro was added
    monkeypatch.setitem(sys.modules, "transformers", old)
    with pytest.raises(ModelFileError, match=r"transformers >= 4.49 \(installed: 4.46.3\)"):
        load_depth_pro(apple_pt)


def test_foreign_config_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "hf"
    tiny_model.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "dpt"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="not a Depth Pro config"):
        load_depth_pro(folder)
