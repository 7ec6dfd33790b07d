"""`python -m genrefocus_core deblur|refocus ...`: the generative stages on image files.

deblur : photo -> all-in-focus image (DeblurNet; with --pre-deblur-lora the pre-deblur variant).
refocus: photo -> [DeblurNet if a deblur LoRA is given] -> depth (a depth file, or Depth Pro) ->
         defocus map |K * (disparity - focus disparity)| -> BokehNet -> refocused image.

Models come from a diffusers folder (--diffusers-dir) and/or single files (--flux, --vae, --clip-l,
--t5 with --tokenizer-dir). Order of residency: prompts (cached) -> encoders freed -> FLUX; Depth Pro
runs between the stages while FLUX is off the GPU and is freed before BokehNet.
"""
from __future__ import annotations

import argparse
import sys
import time

from ..basics.errors import InputError
from ..generative.stages import ADAPTERS, APERTURE_ADAPTER, BOKEH, BOKEH_ADAPTER, DEBLUR, DEBLUR_ADAPTER

_EPILOG = """examples:
  python -m genrefocus_core deblur --image blurry.jpg --out sharp.png \\
      --flux models/diffusion_models/flux1-dev.safetensors --vae models/vae/ae.safetensors \\
      --clip-l models/text_encoders/clip_l.safetensors --t5 models/text_encoders/t5xxl_fp16.safetensors \\
      --tokenizer-dir FLUX.1-dev --deblur-lora models/genrefocus/deblurNet.safetensors --memory-mode low
  python -m genrefocus_core refocus --image photo.jpg --out refocused.png --diffusers-dir FLUX.1-dev \\
      --deblur-lora deblurNet.safetensors --bokeh-lora bokehNet.safetensors \\
      --depth-pro models/genrefocus/depth_pro.pt --focus 512,300 --K 20
"""


def _pair(text: str, what: str, cast=float):
    try:
        a, b = (cast(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} must be two comma-separated numbers 'x,y', got {text!r}.") from None
    return a, b


def _flag(adapter) -> str:
    return "--" + adapter.option.replace("_", "-")


def build_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m genrefocus_core {command}", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=("Generative refocus: photo -> [DeblurNet] -> depth -> defocus map "
                                             "|K * (disparity - focus)| -> BokehNet -> refocused photo."
                                             if command == "refocus" else
                                             "DeblurNet: blurry or sharp photo -> all-in-focus image."))
    io = p.add_argument_group("images")
    io.add_argument("--image", required=True, help="input photo (PNG/JPEG/...)")
    io.add_argument("--out", required=True, help="output image path (8-bit, format by extension)")
    m = p.add_argument_group("models (single files and/or a diffusers folder; nothing is downloaded)")
    m.add_argument("--diffusers-dir", help="FLUX.1-dev diffusers folder (any part not given as a file comes from it)")
    m.add_argument("--flux", help="flux1-dev*.safetensors (original layout, bf16 or fp8) or a transformer folder")
    m.add_argument("--vae", help="ae.safetensors")
    m.add_argument("--clip-l", help="clip_l.safetensors (fingerprinted to find cached prompts; loaded only "
                   "to encode a prompt that is not cached yet)")
    m.add_argument("--t5", help="t5xxl_*.safetensors (likewise; freed before FLUX loads)")
    m.add_argument("--tokenizer-dir", help="diffusers folder (tokenizer/, tokenizer_2/) or a ComfyUI install, for the "
                   "CLIP/T5 tokenizers (default --diffusers-dir)")
    m.add_argument("--prompt-embeds", help="precomputed <stage>_prompt_embeds safetensors (skips the encoders)")
    m.add_argument("--cache-dir", help="prompt-embedding cache (default ~/.cache/genrefocus/prompt_embeds)")
    m.add_argument("--transformer-config", help="config folder for a non-standard transformer file")
    m.add_argument("--vae-config", help="config folder for a non-standard VAE file")
    m.add_argument("--clip-config", help="config folder for a non-standard CLIP text encoder file")
    m.add_argument("--t5-config", help="config folder for a non-standard T5 encoder file")
    for a in ADAPTERS.values():
        if command == "refocus" or a.stage == DEBLUR.name:
            m.add_argument(_flag(a), required=command == "refocus" and a is BOKEH_ADAPTER,
                           help=a.file + (" (with --aperture)" if a is APERTURE_ADAPTER else ""))
    if command == "deblur":
        m.add_argument("--pre-deblurred", help="image from a conventional deblurring model (pre-deblur variant)")
    s = p.add_argument_group("sampling and memory")
    s.add_argument("--steps", type=int, default=28, help="denoising steps per stage (default 28)")
    s.add_argument("--seed", type=int, default=None, help="seed of the deblur noise (default: random, printed)")
    s.add_argument("--tiled", choices=("auto", "on", "off"), default="auto",
                   help="tiled denoising (auto: when the short side is >= 512 px)")
    s.add_argument("--tile-size", type=int, default=32, help="tile side in packed tokens (16 px each)")
    s.add_argument("--tile-overlap", type=int, default=4, help="tile overlap in packed tokens")
    s.add_argument("--tile-batch", type=int, default=1, help="tiles per transformer call (more memory)")
    s.add_argument("--memory-mode", default="default", choices=("default", "low", "sequential", "fp32"),
                   help="default: bf16 (24 GB); low: fp8 weights (16 GB); sequential: layer offload; fp32: CPU")
    s.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    if command == "refocus":
        r = p.add_argument_group("refocus")
        r.add_argument("--bokeh-seed", type=int, default=BOKEH.seed,
                       help="seed of the bokeh noise (fixed so that another K/focus changes only the blur)")
        r.add_argument("--depth", help="depth/disparity file (.npy, .npz, .pfm, .exr, 16-bit PNG, TIFF)")
        r.add_argument("--depth-kind", choices=("depth", "disparity"), default="depth")
        r.add_argument("--depth-scale", choices=("metric", "relative"), default="metric")
        r.add_argument("--depth-near", choices=("auto", "bright", "dark"), default="auto",
                       help="relative maps: which end is near")
        r.add_argument("--depth-unit", type=float, default=1.0, help="metric maps: metres per stored unit")
        r.add_argument("--depth-pro", help="Depth Pro weights (depth_pro.pt or a Hugging Face folder)")
        r.add_argument("--focus", help="focus point 'x,y' in pixels (default: image centre)")
        r.add_argument("--focus-norm", help="focus point 'x,y' as fractions of width and height")
        r.add_argument("--focus-disparity", type=float, help="focus plane as a disparity (1/m)")
        r.add_argument("--K", type=float, default=20.0, help="blur level (px of CoC radius per 1/m; 0 = none)")
        r.add_argument("--aperture", help="aperture shape (circle, hexagon, star, heart, ...; needs --aperture-lora)")
        r.add_argument("--save-aif", help="also write the all-in-focus image here")
        r.add_argument("--save-defocus", help="also write the defocus map (px) here as .npy")
    return p


def _progress(stage: str):
    start = time.time()

    def callback(step: int, total: int, latents) -> None:
        print(f"\r{stage}: step {step}/{total} ({time.time() - start:.1f} s)", end="" if step < total else "\n",
              file=sys.stderr, flush=True)

    return callback


def _settings(args, seed):
    from ..generative.sampling import SamplerSettings

    tiled = {"auto": "auto", "on": True, "off": False}[args.tiled]
    return SamplerSettings(steps=args.steps, seed=seed, tiled=tiled, tile_size=args.tile_size,
                           tile_overlap=args.tile_overlap, tile_batch=args.tile_batch).validated()


def _load(args, command: str):
    from ..generative.loader import load_genrefocus

    return load_genrefocus(flux=args.flux, vae=args.vae, clip_l=args.clip_l, t5=args.t5,
                           diffusers_dir=args.diffusers_dir, memory_mode=args.memory_mode,
                           **{a.option: getattr(args, a.option, None) for a in ADAPTERS.values()},
                           device=args.device, cache_dir=args.cache_dir, prompt_embeddings=args.prompt_embeds,
                           tokenizer_dir=args.tokenizer_dir, transformer_config=args.transformer_config,
                           vae_config=args.vae_config, clip_config=args.clip_config, t5_config=args.t5_config)


def _disparity(args, aif, offload):
    """Disparity [1, H, W] (1/m or relative) for the all-in-focus image."""
    from ..basics.defocus import disparity_from_depth

    _, H, W, _ = aif.shape
    if args.depth:
        from ..depth.sources import disparity_from_external, load_depth_file

        raw = load_depth_file(args.depth)
        return disparity_from_external(raw, kind=args.depth_kind, near=args.depth_near, scale=args.depth_scale,
                                       unit=args.depth_unit, size=(H, W), batch=1, name=f"depth file {args.depth}")
    from ..depth.depth_pro import depth_pro_loaded, estimate_depth

    # FLUX is back on the CPU between stages (model/sequential offload), Depth Pro is freed after use.
    with depth_pro_loaded(args.depth_pro, device=offload.device) as model:
        result = estimate_depth(model, aif)
    return disparity_from_depth(result.depth_m.cpu())


def run_deblur(args) -> int:
    from ..basics.images import load_image, save_image

    if not (args.deblur_lora or args.pre_deblur_lora):
        raise InputError(f"deblur needs --deblur-lora ({DEBLUR_ADAPTER.file}) or --pre-deblur-lora.")
    image = load_image(args.image)
    pre = load_image(args.pre_deblurred) if args.pre_deblurred else None
    pipe = _load(args, "deblur")
    out = pipe.deblur(image, pre_deblurred=pre, settings=_settings(args, args.seed), callback=_progress("deblur"))
    print(f"deblur seed: {pipe.last_seed}", file=sys.stderr)
    save_image(out, args.out)
    print(args.out)
    return 0


def run_refocus(args) -> int:
    import numpy as np

    from ..basics.defocus import check_blur_level, defocus_map, focus_disparity
    from ..basics.images import load_image, save_image

    if bool(args.depth) == bool(args.depth_pro):
        raise InputError("refocus needs exactly one depth source: --depth FILE or --depth-pro WEIGHTS.")
    if sum(x is not None for x in (args.focus, args.focus_norm, args.focus_disparity)) > 1:
        raise InputError("Give the focus as one of --focus, --focus-norm or --focus-disparity.")
    if args.aperture and not args.aperture_lora:
        raise InputError("--aperture needs --aperture-lora (the shape adapter trained on top of BokehNet).")
    K = check_blur_level(args.K)
    image = load_image(args.image)
    _, H, W, _ = image.shape
    point = _pair(args.focus, "--focus", int) if args.focus else None
    if point is not None and not (0 <= point[0] < W and 0 <= point[1] < H):
        raise InputError(f"Focus point (x={point[0]}, y={point[1]}) lies outside the {W}x{H} image.")
    aperture = None
    if args.aperture:
        from ..basics.apertures import make_aperture

        aperture = make_aperture(args.aperture)

    pipe = _load(args, "refocus")
    if args.deblur_lora or args.pre_deblur_lora:
        aif = pipe.deblur(image, settings=_settings(args, args.seed), callback=_progress("deblur"))
        print(f"deblur seed: {pipe.last_seed}", file=sys.stderr)
    else:
        print("no deblur LoRA given: the input is used as the all-in-focus image", file=sys.stderr)
        aif = image
    if args.save_aif:
        save_image(aif, args.save_aif)

    disparity = _disparity(args, aif, pipe.offload)
    if args.focus_disparity is not None:
        disp_f = focus_disparity(disparity, value=args.focus_disparity)
    elif args.focus_norm:
        disp_f = focus_disparity(disparity, point=_pair(args.focus_norm, "--focus-norm"), normalized=True)
    else:
        disp_f = focus_disparity(disparity, point=point)
    defocus = defocus_map(disparity, disp_f, K)
    if args.save_defocus:
        np.save(args.save_defocus, defocus[0].numpy().astype(np.float32))
    print(f"focus disparity {float(disp_f[0]):.4g}, max blur radius {float(defocus.max()):.1f} px", file=sys.stderr)
    out = pipe.bokeh(aif, defocus, aperture=aperture, settings=_settings(args, args.bokeh_seed),
                     callback=_progress("bokeh"))
    save_image(out, args.out)
    print(args.out)
    return 0


def main(argv) -> int:
    argv = list(argv)
    command = argv[0] if argv else ""
    if command not in ("deblur", "refocus"):
        raise InputError(f"cli_generative handles 'deblur' and 'refocus', not {command!r}.")
    args = build_parser(command).parse_args(argv[1:])
    _settings(args, args.seed)  # bad sampling options fail now, not after the models are loaded
    return run_deblur(args) if command == "deblur" else run_refocus(args)
