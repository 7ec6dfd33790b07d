// GenRefocus seeds stay fixed: the front end gives every INT input named "seed" a "control after
// generate" widget that defaults to "randomize". For the Tiled Sampler that would re-sample new noise on
// every click-to-focus re-run (only the blur should change), for the Test Scene a new scene. New nodes
// (from the search box or the menu) start with "fixed"; loaded workflows keep what they store, because
// the stored widget values are applied after this hook.
import { app } from "../../scripts/app.js";

const FIXED_SEED_NODES = new Set(["GenRefocusTiledSampler", "GenRefocusScene"]);

app.registerExtension({
  name: "GenRefocus.FixedSeeds",
  nodeCreated(node) {
    if (!FIXED_SEED_NODES.has(node.comfyClass ?? node.type)) return;
    for (const w of node.widgets ?? []) {
      if (w.name === "control_after_generate" && w.options?.values?.includes?.("fixed")) w.value = "fixed";
    }
  },
});
