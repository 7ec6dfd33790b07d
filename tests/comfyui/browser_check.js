// Drives ComfyUI's front end in headless Debian chromium (playwright-core) for the browser tests.
// Usage: node browser_check.js <mode> <url> <args...>   (NODE_PATH must reach playwright-core)
//   load <url> <out.json> <workflow.json>...   load each UI workflow; record the "Some Nodes Are Missing"
//       dialog, the front end's own API conversion (app.graphToPrompt) and, with SHOTS=<dir>, a screenshot
//   serialize <url> <out_dir> <workflow.json>...   load each and write app.graph.serialize() (canonical UI JSON)
//   picker <url> <out.json> <workflow.json>   queue the workflow, wait for the Defocus Map preview, click on
//       the image at 25 % / 75 %, record the focus widgets before and after
//   view <url> <out.json> <workflow.json>...   open each at the default window size (1600x1000) and its stored
//       view: canvas, the overlays on it (minimap, zoom buttons) and every node's rectangle on screen (title
//       included); with SHOTS=<dir>, a screenshot of each
//   missing <url> <out.json> <workflow.json>   open a workflow on a server without its files: the missing-models
//       dialog's text, then queue it: the error the user sees
//   templates <url> <out.json> <module>   open the template browser: for each card of the module, its title and
//       the line below it as shown, whether the title is cut, whether its thumbnail loaded
//   search <url> <out.json> <query>...   type each query into the node search box: the result titles in order;
//       then add a Tiled Sampler through the box and record its seed control
//   reload <url> <out.json> <workflow.json>   run the workflow, reload the page: is the Defocus Map preview back?
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const [mode, url, outArg, ...files] = process.argv.slice(2);

// the default window of the checks on layouts; the older modes keep their wider window
const VIEWPORTS = { view: [1600, 1000], missing: [1600, 1000], templates: [1600, 1000], search: [1600, 1000], reload: [1600, 1000] };

async function openPage(browser) {
  const [width, height] = VIEWPORTS[mode] ?? [1800, 1000];
  const page = await browser.newPage({ viewport: { width, height } });
  page.on('pageerror', (e) => console.error('pageerror:', e.message));
  await page.goto(url, { waitUntil: 'networkidle', timeout: 60000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas, null, { timeout: 60000 });
  await page.waitForTimeout(500);
  // first-run dialogs (template browser) would cover the canvas
  await page.evaluate(async () => {
    try { await window.app.extensionManager.setting.set('Comfy.TutorialCompleted', true); } catch (e) { /* older */ }
  });
  await closeDialogs(page);
  return page;
}

async function fitView(page) {
  await page.evaluate(() => {
    const app = window.app;
    const nodes = app.graph._nodes;
    const minX = Math.min(...nodes.map((n) => n.pos[0])), minY = Math.min(...nodes.map((n) => n.pos[1] - 30));
    const maxX = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])), maxY = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const el = app.canvas.canvas.getBoundingClientRect();
    const W = el.width - 60, H = el.height - 60;
    const scale = Math.min(W / (maxX - minX), H / (maxY - minY), 1.1);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(el.width / scale - (maxX - minX)) / 2 - minX, (el.height / scale - (maxY - minY)) / 2 - minY];
    app.canvas.setDirty(true, true);
  });
  await page.waitForTimeout(500);
}

async function load(page, wf) {
  await page.evaluate(async (w) => { await window.app.loadGraphData(w); }, wf);
  await page.waitForTimeout(1200);
  const text = await page.evaluate(() => document.body.innerText);
  const m = text.match(/Some Nodes Are Missing[\s\S]{0,400}/);
  return m ? m[0] : null;
}

// In the page: where the canvas, the overlays on it and every node (title bar included) are on screen.
function screenLayout() {
  const app = window.app;
  const rect = (el) => { const b = el.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
  app.canvas.draw(true, true);
  const c = app.canvas.canvas.getBoundingClientRect();
  const overlays = [...document.querySelectorAll('.minimap-main-container, .p-buttongroup')]
    .filter((el) => el.offsetParent !== null).map(rect)
    .filter(([l, t, r, b]) => r > c.left && l < c.right && b > c.top && t < c.bottom && (r - l) * (b - t) > 100);
  const titleH = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const toScreen = (x, y) => {
    const p = app.canvas.ds.convertOffsetToCanvas([x, y]);
    return [c.left + p[0] * c.width / app.canvas.canvas.width * (window.devicePixelRatio || 1),
      c.top + p[1] * c.height / app.canvas.canvas.height * (window.devicePixelRatio || 1)];
  };
  const nodes = app.graph._nodes.map((n) => {
    const [l, t] = toScreen(n.pos[0], n.pos[1] - titleH);
    const [r, b] = toScreen(n.pos[0] + n.size[0], n.pos[1] + n.size[1]);
    return { id: n.id, type: n.type, title: n.title, rect: [l, t, r, b] };
  });
  return { canvas: [c.left, c.top, c.right, c.bottom], overlays, nodes, scale: app.canvas.ds.scale,
    font_px: (window.LiteGraph?.NODE_TEXT_SIZE ?? 14) * app.canvas.ds.scale };
}

// Open the node search box on the canvas, type a query; the titles it offers, or (add) pick the first.
async function searchBox(page, query, add) {
  await closeDialogs(page);
  const c = await page.evaluate(() => { const b = window.app.canvas.canvas.getBoundingClientRect(); return [b.left + b.width / 2, b.top + b.height - 120]; });
  await page.evaluate(() => { window.app.canvas.ds.offset = [-5000, -5000]; window.app.canvas.setDirty(true, true); });
  const input = page.locator('.comfy-vue-node-search-container input, input.comfy-vue-node-search-box, .p-autocomplete-input').first();
  // a double click on empty canvas opens the box; on a busy machine the first one can be missed
  for (let attempt = 0; ; attempt++) {
    await page.mouse.dblclick(c[0], c[1]);
    try {
      await input.waitFor({ timeout: 15000 });
      break;
    } catch (e) {
      if (attempt >= 2) throw e;
      await closeDialogs(page);
    }
  }
  await input.fill(query);
  await page.waitForTimeout(800);
  const titles = await page.evaluate(() => [...document.querySelectorAll('.p-autocomplete-option')]
    .map((el) => (el.querySelector('.option-display-name') ?? el).innerText.split('\n')[0].trim()).filter(Boolean));
  if (add) {
    await page.keyboard.press('Enter');
    await page.waitForTimeout(800);
  } else {
    await page.keyboard.press('Escape');
    await page.waitForTimeout(300);
  }
  return titles;
}

async function closeDialogs(page) {
  await page.keyboard.press('Escape');
  await page.waitForTimeout(200);
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const page = await openPage(browser);
  const result = {};
  if (mode === 'load' || mode === 'serialize') {
    for (const f of files) {
      const wf = JSON.parse(fs.readFileSync(f, 'utf8'));
      const missing = await load(page, wf);
      const name = path.basename(f);
      if (mode === 'serialize') {
        const g = await page.evaluate(() => window.app.graph.serialize());
        fs.writeFileSync(path.join(outArg, name), JSON.stringify(g, null, 2) + '\n');
      }
      const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
      result[name] = { missing, prompt, nodes: await page.evaluate(() => window.app.graph._nodes.map((n) => n.type)) };
      if (process.env.SHOTS) {
        await closeDialogs(page);
        await fitView(page);
        await page.screenshot({ path: path.join(process.env.SHOTS, name.replace(/\.json$/, '.png')) });
      }
      await closeDialogs(page);
    }
  } else if (mode === 'picker') {
    const wf = JSON.parse(fs.readFileSync(files[0], 'utf8'));
    result.missing = await load(page, wf);
    const nodeId = await page.evaluate(() => window.app.graph._nodes.find((n) => n.type === 'GenRefocusDefocusMap').id);
    const read = () => page.evaluate((id) => {
      const n = window.app.graph.getNodeById(id);
      const w = (k) => n.widgets.find((x) => x.name === k).value;
      return { focus_x: w('focus_x'), focus_y: w('focus_y'), focus_mode: w('focus_mode'), focus_distance_m: w('focus_distance_m') };
    }, nodeId);
    result.before = await read();
    // focused by distance first: a click must replace it (the node refuses two focus choices in lens mode)
    await page.evaluate((id) => {
      const ws = window.app.graph.getNodeById(id).widgets;
      ws.find((x) => x.name === 'focus_mode').value = 'distance';
      ws.find((x) => x.name === 'focus_distance_m').value = 3.0;
    }, nodeId);
    // a fresh K so that the server cannot answer from its cache (cached nodes send no preview)
    await page.evaluate((id) => {
      const w = window.app.graph.getNodeById(id).widgets.find((x) => x.name === 'K');
      w.value = Math.round((10 + Math.random() * 30) * 10) / 10;
    }, nodeId);
    await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
    await page.waitForFunction((id) => {
      const n = window.app.graph.getNodeById(id);
      return n.imgs && n.imgs.length > 0 && n.imgs[0].naturalWidth > 0;
    }, nodeId, { timeout: 180000 });
    await page.waitForTimeout(800);
    // where the preview image is drawn (node-local), then on screen
    const target = await page.evaluate((id) => {
      const app = window.app;
      const n = app.graph.getNodeById(id);
      app.canvas.ds.scale = 1.0;
      app.canvas.ds.offset = [40 - n.pos[0], 60 - n.pos[1]];
      app.canvas.setDirty(true, true);
      app.canvas.draw(true, true);
      const widget = n.widgets.find((w) => w.name === '$$canvas-image-preview');
      const img = n.imgs[0];
      const shiftY = widget ? (widget.y ?? widget.last_y) : 0;
      const dw = n.size[0], dh = n.size[1] - shiftY - 15;
      const s = Math.min(dw / img.naturalWidth, dh / img.naturalHeight, 1);
      const w = img.naturalWidth * s, h = img.naturalHeight * s;
      const x = (dw - w) / 2, y = (dh - h) / 2 + shiftY;
      const gx = n.pos[0] + x + 0.25 * w, gy = n.pos[1] + y + 0.75 * h;
      const c = app.canvas.ds.convertOffsetToCanvas([gx, gy]);
      const r = app.canvas.canvas.getBoundingClientRect();
      const dpr = window.devicePixelRatio || 1;
      return { x: r.left + c[0] / dpr * (r.width * dpr / app.canvas.canvas.width), y: r.top + c[1] / dpr * (r.height * dpr / app.canvas.canvas.height), rect: [x, y, w, h], widget: !!widget };
    }, nodeId);
    result.target = target;
    await page.waitForTimeout(300);
    await page.mouse.click(target.x, target.y);
    await page.waitForTimeout(600);
    result.after = await read();
    if (process.env.SHOTS) {
      // the whole graph after a run with the new focus: previews and the result visible
      await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
      await page.waitForTimeout(8000);
      await fitView(page);
      await page.screenshot({ path: path.join(process.env.SHOTS, 'classical_after_run.png') });
    }
  } else if (mode === 'view') {
    for (const f of files) {
      const name = path.basename(f);
      result[name] = { missing: await load(page, JSON.parse(fs.readFileSync(f, 'utf8'))) };
      await closeDialogs(page);
      Object.assign(result[name], await page.evaluate(screenLayout));
      if (process.env.SHOTS) {
        // the thumbnails (tools/workflow_thumbnails.py) show the graph without the minimap
        await page.evaluate(async () => { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false); });
        await page.waitForTimeout(300);
        await page.screenshot({ path: path.join(process.env.SHOTS, name.replace(/\.json$/, '.png')) });
        await page.evaluate(async () => { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', true); });
        await page.waitForTimeout(300);
      }
    }
  } else if (mode === 'missing') {
    await page.evaluate(async () => { await window.app.extensionManager.setting.set('Comfy.Workflow.ShowMissingModelsWarning', true); });
    result.missing_nodes = await load(page, JSON.parse(fs.readFileSync(files[0], 'utf8')));
    result.dialog = await page.evaluate(() => [...document.querySelectorAll('.p-dialog')].map((d) => d.innerText).join('\n'));
    await closeDialogs(page);
    await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
    await page.waitForTimeout(3000);
    result.after_queue = await page.evaluate(() => [...document.querySelectorAll('.p-dialog')].map((d) => d.innerText).join('\n'));
    result.node_errors = await page.evaluate(() => window.app.lastNodeErrors);
    result.execution_error = await page.evaluate(() => window.app.lastExecutionError);
    if (process.env.SHOTS) await page.screenshot({ path: path.join(process.env.SHOTS, 'missing_after_queue.png') });
  } else if (mode === 'templates') {
    const module = files[0];
    await page.evaluate(async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); });
    // the pack's category in the dialog's list (the dialog fills once the template lists arrive), then its cards
    const named = (mod) => [...document.querySelectorAll('.p-dialog *')]
      .some((el) => el.children.length === 0 && el.textContent.trim() === mod);
    await page.waitForFunction(named, module, { timeout: 30000 }).catch(() => { /* recorded below */ });
    result.category_found = await page.evaluate((mod) => {
      const items = [...document.querySelectorAll('.p-dialog *')].filter((el) => el.children.length === 0 && el.textContent.trim() === mod);
      if (!items.length) return [...document.querySelectorAll('.p-dialog li, .p-dialog [role="option"]')].map((el) => el.textContent.trim()).slice(0, 40);
      items[0].scrollIntoView();
      items[0].click();
      return true;
    }, module);
    await page.waitForSelector('.p-dialog [data-testid^="template-workflow-"]', { timeout: 30000 })
      .catch(() => { /* no cards: recorded below */ });
    await page.waitForTimeout(1000);
    // each card (data-testid template-workflow-<name>): its thumbnail (alt text: the title), the title and the
    // line below it as shown, and whether the two-line clamp cut the title
    // the dialog renders the cards in view only: scroll through it and collect every card seen
    const seen = {};
    for (let step = 0; step < 12; step++) {
      const cards = await page.evaluate(() => {
        const all = document.querySelectorAll('.p-dialog [data-testid^="template-workflow-"]');
        return [...all].map((card) => {
          const img = card.querySelector('img');
          const h3 = card.querySelector('h3');
          return {
            name: card.dataset.testid.slice('template-workflow-'.length),
            alt: img?.alt, loaded: !!img && img.complete && img.naturalWidth > 0, width: img?.naturalWidth ?? 0,
            title: h3?.innerText.trim(), description: card.querySelector('h3 + p')?.innerText.trim(),
            title_cut: !!h3 && h3.scrollHeight > h3.clientHeight + 1,
          };
        });
      });
      for (const c of cards) if (!seen[c.name] || c.loaded) seen[c.name] = c;
      const moved = await page.evaluate(() => {
        const boxes = [...document.querySelectorAll('.p-dialog *')].filter((el) => el.scrollHeight > el.clientHeight + 4
          && ['auto', 'scroll'].includes(getComputedStyle(el).overflowY));
        let moved = false;
        for (const b of boxes) { const before = b.scrollTop; b.scrollTop += b.clientHeight * 0.8; moved = moved || b.scrollTop !== before; }
        return moved;
      });
      await page.waitForTimeout(800);
      if (!moved && step > 0) break;
    }
    result.cards = Object.values(seen);
    result.requests = await page.evaluate(async (mod) => {
      const names = (await (await fetch('/api/workflow_templates')).json())[mod] ?? [];
      const out = {};
      for (const n of names) {
        const r = await fetch(`/api/workflow_templates/${mod}/${n}.jpg`);
        out[n] = { status: r.status, type: r.headers.get('content-type'), bytes: (await r.arrayBuffer()).byteLength };
      }
      return out;
    }, module);
    if (process.env.SHOTS) await page.screenshot({ path: path.join(process.env.SHOTS, 'templates.png') });
  } else if (mode === 'search') {
    result.queries = {};
    for (const q of files) result.queries[q] = await searchBox(page, q, false);
    const before = await page.evaluate(() => window.app.graph._nodes.length);
    result.added = await searchBox(page, 'Tiled Sampler', true);
    result.sampler = await page.evaluate((n) => {
      const node = window.app.graph._nodes.slice(n).find((x) => x.type === 'GenRefocusTiledSampler');
      if (!node) return null;
      const w = (k) => node.widgets.find((x) => x.name === k)?.value;
      return { seed: w('seed'), control: w('control_after_generate') };
    }, before);
  } else if (mode === 'reload') {
    const wf = JSON.parse(fs.readFileSync(files[0], 'utf8'));
    result.missing = await load(page, wf);
    // a fresh K, so that the server cannot answer from its cache (cached nodes send no preview)
    await page.evaluate(async () => {
      const n = window.app.graph._nodes.find((x) => x.type === 'GenRefocusDefocusMap');
      n.widgets.find((x) => x.name === 'K').value = Math.round((10 + Math.random() * 30) * 10) / 10;
      await window.app.queuePrompt(0, 1);
    });
    const hasPreview = () => page.evaluate(() => {
      const n = window.app.graph._nodes.find((x) => x.type === 'GenRefocusDefocusMap');
      return !!(n && n.imgs && n.imgs.length && n.imgs[0].naturalWidth > 0);
    });
    await page.waitForFunction(() => {
      const n = window.app.graph._nodes.find((x) => x.type === 'GenRefocusDefocusMap');
      return n && n.imgs && n.imgs.length > 0 && n.imgs[0].naturalWidth > 0;
    }, null, { timeout: 240000 });
    result.before_reload = await hasPreview();
    await page.waitForTimeout(1500);  // the front end persists the workflow on its change checks
    await page.reload({ waitUntil: 'networkidle' });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.graph._nodes.length > 0, null, { timeout: 60000 });
    await page.evaluate(() => window.app.canvas.setDirty(true, true));
    try {
      await page.waitForFunction(() => {
        const n = window.app.graph._nodes.find((x) => x.type === 'GenRefocusDefocusMap');
        window.app.canvas.setDirty(true, true);
        return n && n.imgs && n.imgs.length > 0 && n.imgs[0].naturalWidth > 0;
      }, null, { timeout: 20000 });
    } catch (e) { /* recorded below */ }
    result.after_reload = await hasPreview();
    result.nodes_after_reload = await page.evaluate(() => window.app.graph._nodes.map((n) => n.type));
    if (process.env.SHOTS) await page.screenshot({ path: path.join(process.env.SHOTS, 'after_reload.png') });
  } else {
    throw new Error('unknown mode ' + mode);
  }
  await browser.close();
  fs.writeFileSync(mode === 'serialize' ? path.join(outArg, '_result.json') : outArg, JSON.stringify(result, null, 2));
})().catch((e) => { console.error(e); process.exit(2); });
