"""Convert a UI-format ComfyUI workflow (what the editor saves and users drag in) into the API format
that POST /prompt takes, using the server's /object_info for each node's input order.

- widget values: `widgets_values` follow the order of the node's widget inputs in INPUT_TYPES
  (required, then optional); widgets beyond the stored values (added to the node after the workflow was
  saved) take their defaults, as the front end does; an INT input with `control_after_generate` (or named seed/noise_seed) is
  followed by its control value ("fixed"/"randomize"/...), an input with `image_upload` by the upload
  button's value; both extras are skipped.
- links: `[link_id, from_node, from_slot, to_node, to_slot, type]` -> inputs[name] = [str(from_node), from_slot];
  Reroute nodes are followed to their source; muted (mode 2) and bypassed (mode 4) nodes are dropped
  (a bypassed node passes its first input of the same type through).
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}


def _is_widget(spec) -> bool:
    t = spec[0]
    if isinstance(t, list):
        return True
    if t in WIDGET_TYPES:
        return not (len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("forceInput"))
    return False


def _extras(name: str, spec) -> int:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    n = 0
    if opts.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
        n += 1
    if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
        n += 1
    return n


def widget_inputs(info: dict) -> list[tuple[str, list, int]]:
    """[(name, spec, extra_values)] of the widget inputs of a node type, in widgets_values order."""
    out = []
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            if _is_widget(spec):
                out.append((name, spec, _extras(name, spec)))
    return out


def convert(ui: dict, object_info: dict) -> dict:
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {l[0]: l for l in ui.get("links", [])}

    def source(link_id):
        """(node_id, slot) feeding this link, through reroutes and bypassed nodes; None if muted."""
        l = links[link_id]
        src = nodes[l[1]]
        if src["type"] == "Reroute":
            inp = src["inputs"][0]
            return source(inp["link"]) if inp.get("link") is not None else None
        if src.get("mode") == 4:  # bypassed: pass through the first linked input of the same type
            out_type = src["outputs"][l[2]]["type"]
            for inp in src.get("inputs", []):
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return source(inp["link"])
            return None
        if src.get("mode") == 2:
            return None
        return str(src["id"]), l[2]

    api = {}
    for nid, node in nodes.items():
        if node["type"] in UI_ONLY_TYPES or node.get("mode") in (2, 4):
            continue
        if node["type"] not in object_info:
            raise KeyError(f"node {nid}: type {node['type']!r} is not registered on the server")
        info = object_info[node["type"]]
        linked = {}
        for inp in node.get("inputs", []) or []:
            if inp.get("link") is not None:
                src = source(inp["link"])
                if src is not None:
                    linked[inp["name"]] = [src[0], src[1]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ValueError(f"node {nid}: dict-style widgets_values are not supported")
        i = 0
        for name, spec, extra in widget_inputs(info):
            if i < len(values):
                inputs[name] = values[i]
            elif isinstance(spec[1] if len(spec) > 1 else None, dict) and "default" in spec[1]:
                inputs[name] = spec[1]["default"]  # a widget added after the workflow was saved: its default
            i += 1 + extra
        inputs.update(linked)  # a widget converted to an input and linked takes the link
        api[str(nid)] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title", node["type"])}}
    return api
