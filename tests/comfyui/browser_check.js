// Drives ComfyUI's front end in headless Debian chromium (playwright-core) for the browser tests.
// Usage: node browser_check.js <mode> <url> <args...>   (NODE_PATH must reach playwright-core)
//   load <url> <out.json> <workflow.json>...   load each UI workflow; record the "Some Nodes Are Missing"
//       dialog, the front end's own API conversion (app.graphToPrompt) and, with SHOTS=<dir>, a screenshot
//   serialize <url> <out_dir> <workflow.json>...   load each and write app.graph.serialize() (canonical UI JSON)
//   picker <url> <out.json> <workflow.json>   queue the workflow, wait for the Defocus Map preview, click on
//       the image at 25 % / 75 %, record the focus widgets before and after
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const [mode, url, outArg, ...files] = process.argv.slice(2);

async function openPage(browser) {
  const page = await browser.newPage({ viewport: { width: 1800, height: 1000 } });
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
      return { focus_x: w('focus_x'), focus_y: w('focus_y'), focus_mode: w('focus_mode') };
    }, nodeId);
    result.before = await read();
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
  } else {
    throw new Error('unknown mode ' + mode);
  }
  await browser.close();
  fs.writeFileSync(mode === 'serialize' ? path.join(outArg, '_result.json') : outArg, JSON.stringify(result, null, 2));
})().catch((e) => { console.error(e); process.exit(2); });
