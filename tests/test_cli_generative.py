"""`python -m genrefocus_core deblur|refocus` end to end on the tiny FLUX (diffusers folder + tiny LoRAs)."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from genrefocus_core.__main__ import main as cli
from genrefocus_core.basics.images import load_image
from genrefocus_core.generative.loader import load_genrefocus
from genrefocus_core.generative.sampling import SamplerSettings

from fixture_paths import ROOT


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    img = (rng.random((36, 40, 3)) * 255).astype(np.uint8)  # not a multiple of 16: padded and restored
    Image.fromarray(img).save(d / "in.png")
    depth = np.full((18, 20), 4.0, np.float32)  # lower resolution, same aspect: resized
    depth[:, 10:] = 1.0
    np.save(d / "depth.npy", depth)
    return d


def _models(tiny_dir, tmp):
    return ["--diffusers-dir", str(tiny_dir / "pipeline"), "--memory-mode", "fp32", "--device", "cpu",
            "--cache-dir", str(tmp / "cache"), "--steps", "2"]


def test_deblur_cli_matches_api(tiny_dir, files):
    out = files / "sharp.png"
    rc = cli(["deblur", "--image", str(files / "in.png"), "--out", str(out), "--seed", "5",
              "--deblur-lora", str(tiny_dir / "deblurNet.safetensors")] + _models(tiny_dir, files))
    assert rc == 0 and out.is_file()
    got = np.asarray(Image.open(out))
    assert got.shape == (36, 40, 3)
    assert len(list((files / "cache").glob("*.safetensors"))) == 1  # deblur prompt encoded once, cached
    pipe = load_genrefocus(diffusers_dir=tiny_dir / "pipeline", deblur_lora=tiny_dir / "deblurNet.safetensors",
                           memory_mode="fp32", device="cpu", cache_dir=files / "cache")
    want = pipe.deblur(load_image(files / "in.png"), settings=SamplerSettings(steps=2, seed=5))
    want = (want[0].clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(got, want)


def test_refocus_cli_with_depth_file(tiny_dir, files):
    out, aif, defocus = files / "refocused.png", files / "aif.png", files / "defocus.npy"
    args = ["refocus", "--image", str(files / "in.png"), "--out", str(out), "--seed", "5",
            "--deblur-lora", str(tiny_dir / "deblurNet.safetensors"),
            "--bokeh-lora", str(tiny_dir / "bokehNet.safetensors"),
            "--depth", str(files / "depth.npy"), "--focus", "5,10", "--K", "15",
            "--save-aif", str(aif), "--save-defocus", str(defocus)] + _models(tiny_dir, files)
    assert cli(args) == 0
    result = np.asarray(Image.open(out))
    assert result.shape == (36, 40, 3)
    d = np.load(defocus)
    assert d.shape == (36, 40)
    # focus on the far half (4 m): there 0 blur; the near half (1 m): 15 * (1 - 0.25) = 11.25 px
    assert np.allclose(d[:, :15], 0, atol=1e-5) and np.allclose(d[:, 25:], 11.25, atol=1e-4)
    assert np.asarray(Image.open(aif)).shape == (36, 40, 3)
    assert not np.array_equal(result, np.asarray(Image.open(aif)))
    # K = 0: nothing to blur, BokehNet is skipped and the all-in-focus image comes back unchanged
    out0 = files / "k0.png"
    args0 = [a if a != str(out) else str(out0) for a in args]
    args0[args0.index("--K") + 1] = "0"
    assert cli(args0) == 0
    assert np.array_equal(np.asarray(Image.open(out0)), np.asarray(Image.open(aif)))


def test_refocus_without_deblur_uses_input_as_aif(tiny_dir, files):
    out = files / "nodeblur.png"
    assert cli(["refocus", "--image", str(files / "in.png"), "--out", str(out),
                "--bokeh-lora", str(tiny_dir / "bokehNet.safetensors"), "--depth", str(files / "depth.npy"),
                "--prompt-embeds", str(tiny_dir / "prompt_embeds.safetensors"), "--focus-norm", "0.9,0.5",
                "--K", "10"] + _models(tiny_dir, files)) == 0
    assert np.asarray(Image.open(out)).shape == (36, 40, 3)


@pytest.mark.parametrize("extra, message", [
    (["--focus", "400,10"], "outside"),
    (["--K", "-3"], "K must be"),
    (["--steps", "0"], "steps"),
    (["--tile-overlap", "40"], "tile_overlap"),
    (["--depth-pro", "x.pt"], "exactly one depth source"),
    (["--focus", "1,1", "--focus-disparity", "0.3"], "one of"),
    (["--aperture", "heart"], "aperture-lora"),
])
def test_refocus_bad_arguments(tiny_dir, files, capsys, extra, message):
    args = ["refocus", "--image", str(files / "in.png"), "--out", str(files / "bad.png"),
            "--bokeh-lora", str(tiny_dir / "bokehNet.safetensors"), "--depth", str(files / "depth.npy")]
    args += _models(tiny_dir, files) + extra
    assert cli(args) == 1
    assert message in capsys.readouterr().err


def test_missing_model_file_message_via_python_m(tmp_path, files):
    proc = subprocess.run([sys.executable, "-m", "genrefocus_core", "deblur", "--image", str(files / "in.png"),
                           "--out", str(tmp_path / "o.png"), "--flux", str(tmp_path / "flux1-dev.safetensors"),
                           "--vae", str(tmp_path / "ae.safetensors"), "--deblur-lora",
                           str(tmp_path / "deblurNet.safetensors"), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "deblurNet.safetensors' not found" in proc.stderr and "models/genrefocus" in proc.stderr


def test_refocus_cli_with_depth_pro_runs_it_between_the_stages(tiny_dir, files, tmp_path, monkeypatch):
    """Depth Pro (tiny random weights, HF folder) runs while FLUX is off the execution device, and is freed."""
    sys.path.insert(0, str(ROOT / "tests" / "comfyui"))
    from tiny_depth_pro import build_tiny_depth_pro

    from genrefocus_core.depth import depth_pro

    from genrefocus_core.generative import loader

    folder = build_tiny_depth_pro(tmp_path)
    seen = {}
    real_load, real_estimate, real_release = loader.load_genrefocus, depth_pro.estimate_depth, depth_pro.release_depth_pro

    def load(*a, **k):
        seen["pipe"] = real_load(*a, **k)
        return seen["pipe"]

    def estimate(model, image, *a, **k):
        seen["resident_during_depth"] = seen["pipe"].offload.stats.resident
        seen["peak_before_depth"] = seen["pipe"].offload.stats.peak
        return real_estimate(model, image, *a, **k)

    def release(model, *a, **k):
        seen["released"] = True
        return real_release(model, *a, **k)

    monkeypatch.setattr(loader, "load_genrefocus", load)
    monkeypatch.setattr(depth_pro, "estimate_depth", estimate)
    monkeypatch.setattr(depth_pro, "release_depth_pro", release)
    out = tmp_path / "dp.png"
    args = ["refocus", "--image", str(files / "in.png"), "--out", str(out), "--seed", "5",
            "--deblur-lora", str(tiny_dir / "deblurNet.safetensors"),
            "--bokeh-lora", str(tiny_dir / "bokehNet.safetensors"), "--depth-pro", str(folder), "--K", "20",
            "--diffusers-dir", str(tiny_dir / "pipeline"), "--memory-mode", "default", "--device", "cpu",
            "--prompt-embeds", str(tiny_dir / "prompt_embeds.safetensors"), "--steps", "1"]
    assert cli(args) == 0
    assert np.asarray(Image.open(out)).shape == (36, 40, 3)
    assert seen["peak_before_depth"] > 0  # the deblur stage had FLUX on the device ...
    assert seen["resident_during_depth"] == 0  # ... and nothing of it was there while Depth Pro ran
    assert seen["released"]


def test_deblur_cli_from_comfyui_single_files_in_low_memory_mode(tiny_dir, files, tmp_path):
    """The ComfyUI user's files: fp8 flux1-dev (original layout, scaled), ae, clip_l, t5xxl; tokenizers
    from a ComfyUI install layout; no diffusers folder at all."""
    import shutil

    from safetensors.torch import load_file, save_file
    from flux_files import diffusers_to_bfl_transformer, diffusers_to_ldm_vae

    pipe_dir = tiny_dir / "pipeline"
    bfl = diffusers_to_bfl_transformer(load_file(str(tiny_dir / "transformer.safetensors")), 2, 2)
    fp8 = {}
    for k, v in bfl.items():
        if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448.0
            fp8[k], fp8[k[:-7] + ".scale_weight"] = (v / scale).to(torch.float8_e4m3fn), scale
        else:
            fp8[k] = v
    save_file({"model.diffusion_model." + k: v for k, v in fp8.items()}, str(tmp_path / "flux1-dev-fp8.safetensors"))
    save_file(diffusers_to_ldm_vae(load_file(str(tiny_dir / "vae.safetensors")), 4), str(tmp_path / "ae.safetensors"))
    save_file({"text_model." + k: v for k, v in load_file(str(tiny_dir / "clip_text_encoder.safetensors")).items()},
              str(tmp_path / "clip_l.safetensors"))
    save_file(load_file(str(tiny_dir / "t5_encoder.safetensors")), str(tmp_path / "t5xxl_fp16.safetensors"))
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(pipe_dir / "tokenizer", comfy / "comfy" / "sd1_tokenizer")
    shutil.copytree(pipe_dir / "tokenizer_2", comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    out = tmp_path / "sharp.png"
    args = ["deblur", "--image", str(files / "in.png"), "--out", str(out), "--seed", "5", "--steps", "2",
            "--flux", str(tmp_path / "flux1-dev-fp8.safetensors"), "--vae", str(tmp_path / "ae.safetensors"),
            "--clip-l", str(tmp_path / "clip_l.safetensors"), "--t5", str(tmp_path / "t5xxl_fp16.safetensors"),
            "--tokenizer-dir", str(comfy), "--deblur-lora", str(tiny_dir / "deblurNet.safetensors"),
            "--transformer-config", str(pipe_dir / "transformer"), "--vae-config", str(pipe_dir / "vae"),
            "--clip-config", str(pipe_dir / "text_encoder"), "--t5-config", str(pipe_dir / "text_encoder_2"),
            "--memory-mode", "low", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert cli(args) == 0
    got = np.asarray(Image.open(out)).astype(np.int16)
    # the same photo through the fp32 diffusers-folder path: close (fp8 weights, bf16 compute)
    ref = load_genrefocus(diffusers_dir=pipe_dir, deblur_lora=tiny_dir / "deblurNet.safetensors",
                          memory_mode="fp32", device="cpu",
                          prompt_embeddings=tiny_dir / "prompt_embeds.safetensors")
    want = ref.deblur(load_image(files / "in.png"), settings=SamplerSettings(steps=2, seed=5))
    want = (want[0].numpy() * 255 + 0.5).astype(np.int16)
    assert got.shape == want.shape and np.abs(got - want).max() <= 0.12 * 255
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
