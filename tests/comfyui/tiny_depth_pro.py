"""A tiny random-weight Depth Pro in the Hugging Face folder layout (config.json + model.safetensors),
built with transformers for the real-server tests (the real model is 1.9 GB)."""
from __future__ import annotations

from pathlib import Path


def tiny_depth_pro_config():
    from transformers import DepthProConfig
    vit = dict(model_type="dinov2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
               image_size=32, patch_size=8, out_indices=[2], out_features=["stage2"])
    return DepthProConfig(
        patch_size=32, fusion_hidden_size=16, intermediate_hook_ids=[1, 0], intermediate_feature_dims=[16, 16],
        scaled_images_ratios=[0.25, 0.5, 1], scaled_images_overlap_ratios=[0.0, 0.5, 0.25],
        scaled_images_feature_dims=[32, 32, 16], use_fov_model=True, num_fov_head_layers=1,
        image_model_config=dict(vit), patch_model_config=dict(vit), fov_model_config=dict(vit))


def build_tiny_depth_pro(folder: Path, name: str = "depth-pro-tiny", seed: int = 0) -> Path:
    """Write the tiny model into folder/name/ and return that folder."""
    import torch
    from transformers import DepthProForDepthEstimation
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = DepthProForDepthEstimation(tiny_depth_pro_config()).eval()
    # random weights would predict any field of view; make the last FOV layer a plausible constant (60 deg)
    last = model.fov_model.head.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(60.0)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
