"""Real ComfyUI server: the pack loads, every shipped workflow runs through /prompt (converted from
its UI format here), bad graphs and failing nodes give the user ComfyUI's validation error or our
message, progress and interrupt work per denoising step, and the server keeps serving."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import INPUT_SIZE, PACK_NAME, ROOT, WebSocketMessages, errors_of

pytestmark = pytest.mark.comfyui

OUR_NODES = {"GenRefocusScene", "GenRefocusApertureShape", "GenRefocusDefocusMap", "GenRefocusClassicalBokeh",
             "GenRefocusDepthFromImage", "GenRefocusLoadDepthMap", "GenRefocusLoadDepthPro", "GenRefocusDepthEstimate",
             "GenRefocusLoadModel", "GenRefocusTiledSampler", "GenRefocusDeblurNet", "GenRefocusBokehNet",
             "GenRefocusFocusPull", "GenRefocusSceneClip"}


def _small_sampler(api: dict, steps: int = 3, **extra):
    for node in api.values():
        if node["class_type"] == "GenRefocusTiledSampler":
            node["inputs"].update(steps=steps, **extra)


def _check_image(server, item, size=INPUT_SIZE) -> np.ndarray:
    arr = server.image(item)
    assert arr.shape == (*size, 3), arr.shape
    assert arr.std() > 1.0, "output image is flat"
    return arr


def test_pack_loads_with_every_node_and_tooltips(server):
    info = server.object_info()
    assert OUR_NODES <= set(info), sorted(OUR_NODES - set(info))
    for name in OUR_NODES:
        for section in ("required", "optional"):
            for inp, spec in (info[name]["input"].get(section) or {}).items():
                assert spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    ext = server.get_json("/extensions")
    assert f"/extensions/{PACK_NAME}/focus_picker.js" in ext
    log = server.log_tail(10**7)
    assert "GenRefocus: nodes in" not in log, log  # no node family disabled
    assert info["GenRefocusLoadModel"]["input"]["required"]["model"][0] == "MODEL"
    assert info["GenRefocusBokehNet"]["input"]["required"]["vae"][0] == "VAE"
    assert "deblurNet.safetensors" in info["GenRefocusLoadModel"]["input"]["required"]["deblur_lora"][0]
    assert "depth-pro-tiny/model.safetensors" in info["GenRefocusLoadDepthPro"]["input"]["required"]["model_name"][0]
    for d in ("genrefocus", "depth_pro"):
        assert (server.base / "models" / d).is_dir()


def test_classical_workflow_matches_the_core(server):
    """The no-weights workflow as shipped: its saved PNG equals the same nodes run in this process."""
    api = server.workflow_api("Bokeh Lens Blur (classical, no weights).json")
    h = server.run(api)
    assert h["status"]["status_str"] == "success", errors_of(h)
    save_id = next(k for k, v in api.items() if v["class_type"] == "SaveImage")
    (item,) = server.outputs_of(h, save_id)
    got = _check_image(server, item, size=(512, 768))
    # the same graph through the pack's node classes here
    sys.path.insert(0, str(ROOT))
    from nodes.aperture_nodes import GenRefocusApertureShape
    from nodes.classical_nodes import GenRefocusClassicalBokeh
    from nodes.defocus_nodes import GenRefocusDefocusMap
    from nodes.scene_nodes import GenRefocusScene
    by_type = {v["class_type"]: v["inputs"] for v in api.values()}
    widgets = lambda t: {k: v for k, v in by_type[t].items() if not isinstance(v, list)}  # noqa: E731
    image, depth, _ = GenRefocusScene().make(**widgets("GenRefocusScene"))
    aperture, _ = GenRefocusApertureShape().make(**widgets("GenRefocusApertureShape"))
    defocus = GenRefocusDefocusMap().build(depth, **widgets("GenRefocusDefocusMap"), image=image)["result"][0]
    (expected,) = GenRefocusClassicalBokeh().render(image, defocus, aperture=aperture,
                                                    **widgets("GenRefocusClassicalBokeh"))
    want = (expected[0].numpy() * 255 + 0.5).astype(np.uint8)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1, diff.max()
    # the blur is real: far from the focal plane the image differs from the sharp scene
    assert np.abs(got.astype(int) - (image[0].numpy() * 255 + 0.5).astype(int)).mean() > 2.0


@pytest.mark.parametrize("name", ["Rack Focus from a Still (classical, no weights).json",
                                  "Focus Pull over a Clip (classical, no weights).json"])
def test_focus_pull_workflows_make_the_clip_the_core_makes(server, name):
    """The two no-weights focus-pull workflows as shipped (scene made smaller): the saved animated WEBP
    holds every frame, equal to the same nodes run in this process, and the focus moves through the clip."""
    import io

    from PIL import Image, ImageSequence
    api = server.workflow_api(name)
    for node in api.values():
        if node["class_type"] in ("GenRefocusScene", "GenRefocusSceneClip"):
            node["inputs"].update(width=192, height=128)
    h = server.run(api)
    assert h["status"]["status_str"] == "success", errors_of(h)
    save_id = next(k for k, v in api.items() if v["class_type"] == "SaveAnimatedWEBP")
    (item,) = server.outputs_of(h, save_id)
    frame_ms = int(1000.0 / api[save_id]["inputs"]["fps"])
    frames = []
    with Image.open(io.BytesIO(server.view(item))) as webp:
        for f in ImageSequence.Iterator(webp):
            rgb = np.asarray(f.convert("RGB"))  # loading the frame sets its duration
            frames += [rgb] * round(f.info["duration"] / frame_ms)  # the encoder merges equal frames (held focus)
    got = np.stack(frames)
    assert got.shape == (24, 128, 192, 3), got.shape
    # the same graph through the pack's node classes here (lossless WEBP keeps the 8-bit values)
    sys.path.insert(0, str(ROOT))
    from nodes.classical_nodes import GenRefocusClassicalBokeh
    from nodes.focus_pull_nodes import GenRefocusFocusPull
    from nodes.scene_nodes import GenRefocusScene, GenRefocusSceneClip
    by_type = {v["class_type"]: v["inputs"] for v in api.values()}
    widgets = lambda t: {k: v for k, v in by_type[t].items() if not isinstance(v, list)}  # noqa: E731
    if "GenRefocusScene" in by_type:
        image, depth, _ = GenRefocusScene().make(**widgets("GenRefocusScene"))
        image = image.repeat(by_type["RepeatImageBatch"]["amount"], 1, 1, 1)
    else:
        image, depth, _ = GenRefocusSceneClip().make(**widgets("GenRefocusSceneClip"))
    defocus = GenRefocusFocusPull().pull(depth, **widgets("GenRefocusFocusPull"), image=image)["result"][0]
    (expected,) = GenRefocusClassicalBokeh().render(image, defocus, **widgets("GenRefocusClassicalBokeh"))
    want = (expected.numpy() * 255 + 0.5).astype(np.uint8)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1, diff.max()
    # a pull, not a still: the blur moves from frame to frame, and each keyframe's focal plane is sharp there
    assert np.abs(got[0].astype(int) - got[-1].astype(int)).mean() > 2.0
    coc = defocus.signed_coc
    assert float(coc[-1].abs().min()) == 0.0 and float(coc[0].abs().min()) == 0.0


@pytest.mark.parametrize("name", ["Sharpen a Blurry Photo (DeblurNet).json",
                                  "Refocus a Photo (DeblurNet, BokehNet).json",
                                  "Refocus a Photo in Tiles (DeblurNet, BokehNet).json"])
def test_generative_workflow_on_tiny_weights(server, name):
    api = server.workflow_api(name, tiny=True)
    # a workflow that tiles: tiles of 64 px (4x4 tokens) so that a small image is tiled like a large one at 512 px
    tiles = any(n["class_type"] == "GenRefocusTiledSampler" and n["inputs"]["tiling"] == "on" for n in api.values())
    _small_sampler(api, steps=3, **({"tile_size": 64, "tile_overlap": 16} if tiles else {}))
    h = server.run(api)
    assert h["status"]["status_str"] == "success", json.dumps(errors_of(h))[:3000]
    save_id = next(k for k, v in api.items() if v["class_type"] == "SaveImage")
    (item,) = server.outputs_of(h, save_id)
    _check_image(server, item)


def test_txt2img_workflow_validates_and_runs_with_flux_loaded_once(server):
    """(1) The unmodified workflow passes the server's validation (HTTP 200) and fails only when a loader
    reads a placeholder file; (2) on the tiny weights the whole graph runs: ComfyUI's KSampler and
    BokehNet share ONE UNETLoader (one MODEL), so FLUX is read once per queue."""
    name = "Text to Image, then Refocus (BokehNet).json"
    full = server.workflow_api(name)
    st, resp = server.post_prompt(full)
    assert st == 200, resp
    h = server.wait(resp["prompt_id"])
    errs = errors_of(h)
    assert h["status"]["status_str"] == "error" and errs
    assert errs[0]["node_type"] in ("UNETLoader", "DualCLIPLoader", "VAELoader", "GenRefocusLoadModel",
                                    "GenRefocusLoadDepthPro"), errs[0]
    api = txt2img_tiny(server)
    loaders = [k for k, v in api.items() if v["class_type"] == "UNETLoader"]
    assert len(loaders) == 1
    users = {v["class_type"] for v in api.values() if ["%s" % loaders[0], 0] in v["inputs"].values()}
    assert {"KSampler", "GenRefocusLoadModel"} <= users, users
    h = server.run(api)
    assert h["status"]["status_str"] == "success", json.dumps(errors_of(h))[:3000]
    save_id = next(k for k, v in api.items() if v["class_type"] == "SaveImage")
    (item,) = server.outputs_of(h, save_id)
    _check_image(server, item, size=(96, 128))


def txt2img_tiny(server) -> dict:
    """The text-to-image -> refocus workflow on the tiny weights, small and with few steps."""
    api = server.workflow_api("Text to Image, then Refocus (BokehNet).json", tiny=True)
    for nid, node in api.items():
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=128, height=96)
        if node["class_type"] == "KSampler":
            node["inputs"].update(steps=2)
        if node["class_type"] == "GenRefocusBokehNet":
            node["inputs"]["sampler"] = ["990", 0]
    api["990"] = {"class_type": "GenRefocusTiledSampler", "inputs": {
        "steps": 2, "seed": 1234, "tiling": "off", "tile_size": 512, "tile_overlap": 64, "tile_batch": 1, "guidance": 0.0}}
    return api


def _classical_ok(server, K: float):
    api = server.workflow_api("Bokeh Lens Blur (classical, no weights).json")
    for node in api.values():
        if node["class_type"] == "GenRefocusScene":
            node["inputs"].update(width=96, height=64)
        if node["class_type"] == "GenRefocusDefocusMap":
            node["inputs"]["K"] = K
    h = server.run(api)
    assert h["status"]["status_str"] == "success", errors_of(h)


def test_bad_graphs_are_rejected_and_the_server_keeps_serving(server):
    api = server.workflow_api("Bokeh Lens Blur (classical, no weights).json")
    # only the output that depends on the broken node: with another valid output ComfyUI would run that
    # part and answer 200 with node_errors; with none it rejects the graph with HTTP 400
    api = {k: v for k, v in api.items() if v["class_type"] != "PreviewImage"}
    scene_id = next(k for k, v in api.items() if v["class_type"] == "GenRefocusScene")
    defocus_id = next(k for k, v in api.items() if v["class_type"] == "GenRefocusDefocusMap")
    wrong_type = json.loads(json.dumps(api))
    wrong_type[defocus_id]["inputs"]["depth"] = [scene_id, 0]  # an IMAGE into GENREFOCUS_DEPTH
    st, resp = server.post_prompt(wrong_type)
    assert st == 400, resp
    errs = resp["node_errors"][defocus_id]["errors"]
    assert errs[0]["type"] == "return_type_mismatch" and "depth" in json.dumps(errs[0])
    missing = json.loads(json.dumps(api))
    del missing[defocus_id]["inputs"]["depth"]
    st, resp = server.post_prompt(missing)
    assert st == 400 and resp["node_errors"][defocus_id]["errors"][0]["type"] == "required_input_missing"
    bad_value = json.loads(json.dumps(api))
    bad_value[defocus_id]["inputs"]["focus_mode"] = "somewhere"
    st, resp = server.post_prompt(bad_value)
    assert st == 400 and resp["node_errors"][defocus_id]["errors"][0]["type"] == "value_not_in_list"
    _classical_ok(server, 11.0)


def test_failing_nodes_show_our_message_and_the_server_keeps_serving(server):
    api = server.workflow_api("Bokeh Lens Blur (classical, no weights).json")
    defocus_id = next(k for k, v in api.items() if v["class_type"] == "GenRefocusDefocusMap")
    api[defocus_id]["inputs"]["focus_mode"] = "mask"  # and no mask connected
    h = server.run(api)
    (err,) = errors_of(h)
    assert err["node_id"] == defocus_id and err["exception_type"].endswith("InputError")
    assert "no focus_mask is connected" in err["exception_message"]
    # a file that is not a LoRA chosen as the DeblurNet LoRA: the core's message naming it reaches the user
    gen = server.workflow_api("Sharpen a Blurry Photo (DeblurNet).json", tiny=True)
    loader_id = next(k for k, v in gen.items() if v["class_type"] == "GenRefocusLoadModel")
    gen[loader_id]["inputs"]["deblur_lora"] = "prompt_embeds.safetensors"
    h = server.run(gen)
    (err,) = errors_of(h)
    assert err["node_type"] == "GenRefocusLoadModel" and err["exception_type"].endswith("ModelFileError"), err
    assert "prompt_embeds.safetensors" in err["exception_message"]
    assert "lora" in err["exception_message"].lower(), err["exception_message"]
    _classical_ok(server, 12.0)


def test_nan_and_infinity_in_widgets_are_refused_by_our_nodes(server):
    """NaN passes ComfyUI's own min/max validation (it compares false); the node says which input."""
    for class_type, name, value in (("GenRefocusApertureShape", "rotation_deg", float("nan")),
                                    ("GenRefocusDefocusMap", "K", float("nan")),
                                    ("GenRefocusClassicalBokeh", "highlight_boost", float("nan"))):
        api = server.workflow_api("Bokeh Lens Blur (classical, no weights).json")
        node_id = next(k for k, v in api.items() if v["class_type"] == class_type)
        api[node_id]["inputs"][name] = value
        st, resp = server.post_prompt(api)
        assert st == 200, resp  # accepted by ComfyUI's validation...
        h = server.wait(resp["prompt_id"])
        (err,) = errors_of(h)  # ...and refused by the node, naming the input
        assert err["node_id"] == node_id and err["exception_type"].endswith("InputError"), err
        assert f"'{name}' must be a finite number" in err["exception_message"], err
    _classical_ok(server, 13.0)


def test_progress_per_step_and_interrupt_between_steps(server):
    ws = WebSocketMessages(server.port)
    try:
        api = server.workflow_api("Sharpen a Blurry Photo (DeblurNet).json", tiny=True)
        deblur_id = next(k for k, v in api.items() if v["class_type"] == "GenRefocusDeblurNet")
        api["990"] = {"class_type": "GenRefocusTiledSampler", "inputs": {
            "steps": 7, "seed": 5, "tiling": "off", "tile_size": 512, "tile_overlap": 64, "tile_batch": 1,
            "guidance": 0.0}}
        api[deblur_id]["inputs"]["sampler"] = ["990", 0]
        h = server.run(api, client_id=ws.client_id)
        assert h["status"]["status_str"] == "success", errors_of(h)
        time.sleep(0.5)
        steps = [(p["value"], p["max"]) for p in ws.of_type("progress") if p.get("node") == deblur_id]
        assert steps == [(i, 7) for i in range(1, 8)], steps
        # interrupt: a long run stops after the current step
        api["990"]["inputs"].update(steps=200, seed=6)
        st, resp = server.post_prompt(api, ws.client_id)
        assert st == 200
        end = time.time() + 120
        while not [p for p in ws.of_type("progress") if p.get("node") == deblur_id and p["max"] == 200]:
            assert time.time() < end, "no progress message"
            time.sleep(0.05)
        server.request("POST", "/interrupt", {})
        h = server.wait(resp["prompt_id"], timeout=120)
        kinds = [k for k, _ in h["status"]["messages"]]
        assert "execution_interrupted" in kinds, kinds
        done = [p["value"] for p in ws.of_type("progress") if p.get("node") == deblur_id and p["max"] == 200]
        assert max(done) < 60, max(done)
    finally:
        ws.close()
    _classical_ok(server, 13.0)


def test_comfyui_tokenizer_gives_the_reference_padding():
    """The node encodes the stage prompts with ComfyUI's FLUX tokenizer and t5xxl_min_length=512 (the
    reference pads T5 to 512 tokens); check that option with this ComfyUI's real tokenizers."""
    from conftest import comfy_dir
    code = ("import sys; sys.argv = [sys.argv[0], '--cpu']; sys.path.insert(0, '.'); "
            "import comfy.options; comfy.options.enable_args_parsing(); "
            "from comfy.text_encoders.flux import FluxTokenizer; "
            "t = FluxTokenizer().tokenize_with_weights('an excellent photo with a large aperture', "
            "tokenizer_options={'t5xxl_min_length': 512}); "
            "print(len(t['t5xxl'][0]), len(t['l'][0]))")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, "-c", code], cwd=comfy_dir(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["512", "77"], out.stdout


def test_changing_the_focus_reruns_only_the_refocus(server):
    """The model, DeblurNet and Depth Pro stay cached between runs: a new K or focus point re-runs only
    Defocus Map, BokehNet and the save."""
    ws = WebSocketMessages(server.port)
    try:
        api = server.workflow_api("Refocus a Photo (DeblurNet, BokehNet).json", tiny=True)
        _small_sampler(api, steps=2)
        ids = {v["class_type"]: k for k, v in api.items()}
        api[ids["GenRefocusDefocusMap"]]["inputs"].update(K=7.5, focus_x=0.31)
        assert server.run(api, client_id=ws.client_id)["status"]["status_str"] == "success"
        api[ids["GenRefocusDefocusMap"]]["inputs"].update(K=9.5, focus_x=0.62)
        h = server.run(api, client_id=ws.client_id)
        assert h["status"]["status_str"] == "success", errors_of(h)
        time.sleep(0.5)
        pid = h["prompt"][1] if "prompt" in h else None
        executed = {m["node"] for m in ws.of_type("executing")
                    if m.get("node") and (pid is None or m.get("prompt_id") == pid)}
        cached = {n for m in ws.of_type("execution_cached") if pid is None or m.get("prompt_id") == pid
                  for n in m["nodes"]}
        assert {ids["GenRefocusLoadModel"], ids["GenRefocusDeblurNet"], ids["GenRefocusDepthEstimate"]} <= cached
        assert executed == {ids["GenRefocusDefocusMap"], ids["GenRefocusBokehNet"], ids["SaveImage"]}, executed
    finally:
        ws.close()


def test_lens_controls_and_mask_outputs_in_a_real_graph(server):
    """The shipped classical workflow with the new lens controls set through /prompt: focus by distance,
    an in-focus band, the annular aperture, cat's eye across the frame and grain; the in-focus MASK
    output feeds ComfyUI's own MaskToImage and is white on the focused pillar, black elsewhere."""
    api = server.workflow_api("Bokeh Lens Blur (classical, no weights).json")
    ids = {v["class_type"]: k for k, v in api.items()}
    api[ids["GenRefocusScene"]]["inputs"].update(width=128, height=96)
    api[ids["GenRefocusDefocusMap"]]["inputs"].update(focus_mode="distance", focus_distance_m=6.0, blur_mode="lens",
                                                      f_number=1.4, focal_length_mm=200.0, in_focus_range=0.5,
                                                      in_focus_unit="metres", near_blur=0.7, far_blur=1.3)
    api[ids["GenRefocusApertureShape"]]["inputs"].update(shape="annular", annular_inner_ratio=0.5)
    api[ids["GenRefocusClassicalBokeh"]]["inputs"].update(cat_eye_across_frame=0.5, grain=1.0, grain_seed=3)
    api["900"] = {"class_type": "MaskToImage", "inputs": {"mask": [ids["GenRefocusDefocusMap"], 3]}}
    api["901"] = {"class_type": "SaveImage", "inputs": {"images": ["900", 0], "filename_prefix": "in_focus"}}
    h = server.run(api)
    assert h["status"]["status_str"] == "success", errors_of(h)
    (item,) = server.outputs_of(h, "901")
    mask = server.image(item)[..., 0]
    assert set(np.unique(mask)) <= {0, 255}
    from genrefocus_core.basics.scene import scene_landmarks
    x, y = scene_landmarks(96, 128)["pillar"]
    assert mask[y, x] == 255 and mask.mean() < 0.5 * 255
    (item,) = server.outputs_of(h, ids["SaveImage"])
    _check_image(server, item, size=(96, 128))
