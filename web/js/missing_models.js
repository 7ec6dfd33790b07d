// GenRefocus: the missing-models list also when queuing. The front end shows its "Missing Models" dialog
// (file, folder, download link from the nodes' `properties.models`) only when a workflow is opened; a user
// who closed it and queues gets ComfyUI's "Value not in list" or a loader's error. After each queue this
// shows the same dialog again for the files the graph names that are not on the server, unless the user
// turned the warning off ("Don't show this again" / setting Comfy.Workflow.ShowMissingModelsWarning).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// Model entries of the graph's nodes whose file is named by one of the node's widget values.
function namedModels(graph) {
  const out = new Map();
  for (const node of graph?._nodes ?? graph?.nodes ?? []) {
    const models = node.properties?.models;
    if (!Array.isArray(models) || !models.length || node.mode === 2 || node.mode === 4) continue;
    const values = new Set((node.widgets ?? []).map((w) => w.value).filter((v) => typeof v === "string"));
    for (const m of models) {
      if (m?.name && m?.directory && values.has(m.name)) out.set(`${m.directory}/${m.name}`, { ...m });
    }
  }
  return [...out.values()];
}

export async function missingModels(graph) {
  const wanted = namedModels(graph);
  if (!wanted.length) return [];
  const folders = new Set((await api.getModelFolders()).map((f) => f.name));
  const listed = {};
  const missing = [];
  for (const m of wanted) {
    if (!folders.has(m.directory)) {
      missing.push({ ...m, directory_invalid: true });
      continue;
    }
    listed[m.directory] ??= new Set((await api.getModels(m.directory)).map((f) => f.name));
    if (!listed[m.directory].has(m.name)) missing.push(m);
  }
  return missing;
}

async function showMissingAfterQueue() {
  const settings = app.extensionManager?.setting;
  if (settings?.get?.("Comfy.Workflow.ShowMissingModelsWarning") === false) return;
  const missing = await missingModels(app.graph);
  if (!missing.length) return;
  app.extensionManager?.dialog?.showMissingModelsWarning?.({ missingModels: missing, paths: await api.getFolderPaths() });
}

app.registerExtension({
  name: "GenRefocus.MissingModelsOnQueue",
  setup() {
    const queuePrompt = app.queuePrompt;
    app.queuePrompt = async function (...args) {
      const result = await queuePrompt.apply(this, args);
      try {
        await showMissingAfterQueue();
      } catch (e) {
        console.warn("GenRefocus: could not check the workflow's model files", e);
      }
      return result;
    };
  },
});
