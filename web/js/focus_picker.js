// GenRefocus focus-point picker.
// On "Defocus Map (GenRefocus)" nodes: click on the preview image to set focus_x / focus_y (fractions of
// the image width / height, ordinary widget values, so workflows stay shareable) and switch focus_mode
// to "point". The chosen point is drawn as a marker over the preview. Works with the canvas image
// preview widget of current front ends and with the older onDrawBackground image drawing.
// The last preview is remembered in the node's properties (the front end keeps node outputs only in
// page memory), so the thing to click on is still there after a page reload.
import { app } from "../../scripts/app.js";

const NODE_TYPES = new Set(["GenRefocusDefocusMap"]);
const PREVIEW_WIDGET = "$$canvas-image-preview";
const PREVIEW_PROPERTY = "genrefocus_preview";

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function setWidget(node, name, value) {
  const w = widget(node, name);
  if (!w) return;
  const old = w.value;
  w.value = value;
  w.callback?.(value, app.canvas, node);
  node.onWidgetChanged?.(name, value, old, w);
}

function sizeTextHeight() {
  try {
    const v = app.extensionManager?.setting?.get?.("Comfy.Node.AllowImageSizeDraw") ??
      app.ui?.settings?.getSettingValue?.("Comfy.Node.AllowImageSizeDraw");
    return v === false ? 0 : 15;
  } catch (e) {
    return 15;
  }
}

// Rectangle (node-local coordinates) where the front end draws the current preview image,
// computed the way its preview renderer places a single image. null when there is no image.
export function previewRect(node) {
  const imgs = node.imgs;
  if (!imgs?.length) return null;
  const index = node.imageIndex ?? (imgs.length === 1 ? 0 : null);
  const previewWidget = widget(node, PREVIEW_WIDGET);
  if (index == null) {
    // grid of several images: the first image's cell
    const cell = node.imageRects?.[0];
    const img = imgs[0];
    if (!cell || !img?.naturalWidth) return null;
    const [cx, cy, cw, ch] = cell;
    const r = Math.min(cw / img.naturalWidth, ch / img.naturalHeight);
    const w = img.naturalWidth * r, h = img.naturalHeight * r;
    return { x: cx + (cw - w) / 2, y: cy + (ch - h) / 2, w, h };
  }
  const img = imgs[index];
  if (!img?.naturalWidth) return null;
  const shiftY = previewWidget ? (previewWidget.y ?? previewWidget.last_y ?? 0) : (node.imageOffset ?? 0);
  const dw = node.size[0];
  const dh = node.size[1] - shiftY - sizeTextHeight();
  const scale = Math.min(dw / img.naturalWidth, dh / img.naturalHeight, 1);
  const w = img.naturalWidth * scale, h = img.naturalHeight * scale;
  return { x: (dw - w) / 2, y: (dh - h) / 2 + shiftY, w, h };
}

// Set the focus from a node-local position; true when it was on the image.
export function pickFocus(node, localX, localY) {
  const r = previewRect(node);
  if (!r || r.w <= 0 || r.h <= 0) return false;
  const fx = (localX - r.x) / r.w, fy = (localY - r.y) / r.h;
  if (fx < 0 || fx > 1 || fy < 0 || fy > 1) return false;
  setWidget(node, "focus_x", Math.round(fx * 1000) / 1000);
  setWidget(node, "focus_y", Math.round(fy * 1000) / 1000);
  if (widget(node, "focus_mode")?.value !== "point") setWidget(node, "focus_mode", "point");
  // A lens has one focus: a click replaces a focus distance set earlier (the node refuses both at once).
  if ((widget(node, "focus_distance_m")?.value ?? 0) > 0) setWidget(node, "focus_distance_m", 0);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
  return true;
}

function patchPreviewWidget(node) {
  const w = widget(node, PREVIEW_WIDGET);
  if (!w || w.__genrefocusPicker) return;
  w.__genrefocusPicker = true;
  // the preview widget is drawn after onDrawForeground: draw the marker right after the image
  for (const method of ["drawWidget", "draw"]) {
    if (typeof w[method] !== "function") continue;
    const draw = w[method].bind(w);
    w[method] = function (ctx, ...rest) {
      const r = draw(ctx, ...rest);
      drawMarker(node, ctx);
      return r;
    };
    break;
  }
  const original = w.onPointerDown?.bind(w);
  w.onPointerDown = function (pointer, n, canvas) {
    const handled = original ? original(pointer, n, canvas) : false;
    const c = canvas ?? app.canvas;
    const [gx, gy] = c.graph_mouse;
    const lx = gx - node.pos[0], ly = gy - node.pos[1];
    // a click (press and release without dragging) picks; a drag still moves the node
    pointer.onClick = () => pickFocus(node, lx, ly);
    return handled || true;
  };
}

function drawMarker(node, ctx) {
  const r = previewRect(node);
  if (!r) return;
  const fx = Number(widget(node, "focus_x")?.value ?? 0.5);
  const fy = Number(widget(node, "focus_y")?.value ?? 0.5);
  const x = r.x + fx * r.w, y = r.y + fy * r.h;
  const pointMode = widget(node, "focus_mode")?.value === "point";
  ctx.save();
  ctx.globalAlpha = pointMode ? 1.0 : 0.4;
  ctx.lineWidth = 2;
  for (const [colour, width] of [["#000", 4], ["#ffeb3b", 2]]) {
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.beginPath();
    ctx.arc(x, y, 7, 0, Math.PI * 2);
    ctx.moveTo(x - 12, y); ctx.lineTo(x - 4, y);
    ctx.moveTo(x + 4, y); ctx.lineTo(x + 12, y);
    ctx.moveTo(x, y - 12); ctx.lineTo(x, y - 4);
    ctx.moveTo(x, y + 4); ctx.lineTo(x, y + 12);
    ctx.stroke();
  }
  ctx.restore();
}

// Remember the preview images of a run ({filename, subfolder, type} on the server, usually temp/).
function rememberPreview(node, images) {
  if (!Array.isArray(images) || !images.length) return;
  node.properties = node.properties ?? {};
  node.properties[PREVIEW_PROPERTY] = images.map(({ filename, subfolder, type }) => ({ filename, subfolder, type }));
  // let the front end persist the workflow (with this property) for the next page load
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}

// Show the remembered preview again when the node has no output of this page session.
function restorePreview(node) {
  const saved = node.properties?.[PREVIEW_PROPERTY];
  if (!Array.isArray(saved) || !saved.length || !app.nodeOutputs) return;
  const key = String(node.id);
  if (app.nodeOutputs[key]?.images?.length) return;
  app.nodeOutputs[key] = { images: saved.map((i) => ({ ...i })) };
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "GenRefocus.FocusPicker",
  loadedGraphNode(node) {
    if (NODE_TYPES.has(node.type)) restorePreview(node);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      rememberPreview(this, message?.images);
      return r;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      if (!this.flags?.collapsed) {
        patchPreviewWidget(this);
        // older front ends draw the image in onDrawBackground, below this
        if (!widget(this, PREVIEW_WIDGET)) drawMarker(this, ctx);
      }
      return r;
    };

    // Older front ends draw the preview themselves and pass clicks to the node.
    const onMouseDown = nodeType.prototype.onMouseDown;
    nodeType.prototype.onMouseDown = function (e, pos, canvas) {
      if (!widget(this, PREVIEW_WIDGET) && pos && pickFocus(this, pos[0], pos[1])) return true;
      return onMouseDown?.apply(this, arguments);
    };
  },
});
