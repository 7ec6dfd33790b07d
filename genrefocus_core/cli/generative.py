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
from .focus_options import (add_depth_file_options, add_focus_and_blur_options, check_focus_and_blur,
                            defocus_from_args, disparity_from_args)
from .options import check_finite_options, check_outputs
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
        r.add_argument("--depth-pro", help="Depth Pro weights (depth_pro.pt or a Hugging Face folder), or --depth")
        r.add_argument("--aperture", help="aperture shape (circle, hexagon, star, heart, ...; needs --aperture-lora)")
        r.add_argument("--save-aif", help="also write the all-in-focus image here")
        r.add_argument("--save-defocus", help="also write the defocus map (px) here as .npy")
        add_depth_file_options(p, depth_required=False)
        add_focus_and_blur_options(p)
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
    """(disparity [1, H, W] (1/m or relative), metric?) for the all-in-focus image."""
    from ..basics.defocus import disparity_from_depth

    if args.depth or args.disparity:
        return disparity_from_args(args, tuple(aif.shape[1:3]))
    from ..depth.depth_pro import depth_pro_loaded, estimate_depth

    # FLUX is back on the CPU between stages (model/sequential offload), Depth Pro is freed after use.
    with depth_pro_loaded(args.depth_pro, device=offload.device) as model:
        result = estimate_depth(model, aif)
    return disparity_from_depth(result.depth_m.cpu()), True


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

    from ..basics.files import save_array
    from ..basics.images import load_image, save_image

    if bool(args.depth or args.disparity) == bool(args.depth_pro):
        raise InputError("refocus needs exactly one depth source: --depth FILE (or --disparity FILE) or --depth-pro "
                         "WEIGHTS.")
    if args.aperture and not args.aperture_lora:
        raise InputError("--aperture needs --aperture-lora (the shape adapter trained on top of BokehNet).")
    image = load_image(args.image)
    check_focus_and_blur(args, tuple(image.shape[1:3]))  # fails now, not after the deblur
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

    disparity, metric = _disparity(args, aif, pipe.offload)
    d = defocus_from_args(args, disparity, metric)
    defocus = d.signed_coc.abs()
    if args.save_defocus:
        save_array(defocus[0].numpy().astype(np.float32), args.save_defocus, "defocus map")
    print(f"focus disparity {float(d.focus_disparity[0]):.4g}, K {float(d.K[0]):.4g}, max blur radius "
          f"{float(defocus.max()):.1f} px", file=sys.stderr)
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
    # bad options and output paths fail now, not after the models are loaded and sampled
    check_finite_options(args)
    _settings(args, args.seed)
    if command == "refocus":
        _settings(args, args.bokeh_seed)
    inputs = ["image", "pre_deblurred", "depth", "depth_pro", "diffusers_dir", "flux", "vae", "clip_l", "t5",
              "prompt_embeds"] + [a.option for a in ADAPTERS.values()]
    check_outputs(args, images=["out", "save_aif"], arrays=["save_defocus"], inputs=inputs)
    return run_deblur(args) if command == "deblur" else run_refocus(args)
