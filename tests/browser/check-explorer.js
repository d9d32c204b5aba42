// Opens an ibasis explorer page in Debian's chromium (through puppeteer-core) and checks it:
// no console errors or page errors, no network requests, the first pane's canvas is not blank
// (pixels of a screenshot), and clicking a feature shows its card with the expected Lambda;
// its first incoming edge in the card is clickable; search finds a feature.
//
//   node check-explorer.js --html FILE --shot OUT.png [--expect GRAPH:LAYER:INDEX:LAMBDA ...]
//
// Prints one JSON line (load time, checks) and exits non-zero on any failure.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const zlib = require('zlib');
const puppeteer = require('puppeteer-core');

function args() {
  const a = { expect: [], chromium: process.env.CHROMIUM || '/usr/bin/chromium', width: 1400, height: 850 };
  const v = process.argv.slice(2);
  for (let i = 0; i < v.length; i++) {
    const k = v[i];
    if (k === '--html') a.html = v[++i];
    else if (k === '--shot') a.shot = v[++i];
    else if (k === '--expect') a.expect.push(v[++i]);
    else if (k === '--chromium') a.chromium = v[++i];
    else throw new Error(`unknown argument ${k}`);
  }
  if (!a.html || !a.shot) throw new Error('need --html FILE --shot OUT.png');
  return a;
}

// A PNG (8-bit RGB or RGBA, non-interlaced, as chromium writes them) as {width, height, rgba}.
function decodePng(buf) {
  if (buf.readUInt32BE(0) !== 0x89504e47) throw new Error('not a PNG');
  let off = 8, width = 0, height = 0, ctype = 0, depth = 0;
  const idat = [];
  while (off < buf.length) {
    const len = buf.readUInt32BE(off);
    const type = buf.toString('ascii', off + 4, off + 8);
    const body = buf.subarray(off + 8, off + 8 + len);
    if (type === 'IHDR') {
      width = body.readUInt32BE(0); height = body.readUInt32BE(4); depth = body[8]; ctype = body[9];
      if (body[12] !== 0) throw new Error('interlaced PNG');
    } else if (type === 'IDAT') idat.push(body);
    else if (type === 'IEND') break;
    off += 12 + len;
  }
  if (depth !== 8 || (ctype !== 2 && ctype !== 6)) throw new Error(`PNG colour type ${ctype} depth ${depth}`);
  const bpp = ctype === 6 ? 4 : 3;
  const raw = zlib.inflateSync(Buffer.concat(idat));
  const stride = width * bpp;
  const out = Buffer.alloc(width * height * 4);
  const prev = Buffer.alloc(stride), cur = Buffer.alloc(stride);
  for (let y = 0; y < height; y++) {
    const f = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let i = 0; i < stride; i++) {
      const a = i >= bpp ? cur[i - bpp] : 0, b = prev[i], c = i >= bpp ? prev[i - bpp] : 0;
      let p;
      switch (f) {
        case 0: p = 0; break;
        case 1: p = a; break;
        case 2: p = b; break;
        case 3: p = (a + b) >> 1; break;
        case 4: { const q = a + b - c, pa = Math.abs(q - a), pb = Math.abs(q - b), pc = Math.abs(q - c); p = pa <= pb && pa <= pc ? a : pb <= pc ? b : c; break; }
        default: throw new Error(`PNG filter ${f}`);
      }
      cur[i] = (line[i] + p) & 255;
    }
    for (let x = 0; x < width; x++) {
      out[4 * (y * width + x)] = cur[x * bpp];
      out[4 * (y * width + x) + 1] = cur[x * bpp + 1];
      out[4 * (y * width + x) + 2] = cur[x * bpp + 2];
      out[4 * (y * width + x) + 3] = bpp === 4 ? cur[x * bpp + 3] : 255;
    }
    cur.copy(prev);
  }
  return { width, height, rgba: out };
}

async function main() {
  const a = args();
  const failures = [];
  const fail = (m) => failures.push(m);
  const userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ibasis-chromium-'));
  const browser = await puppeteer.launch({
    executablePath: a.chromium,
    headless: true,
    userDataDir: userDir,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      `--window-size=${a.width},${a.height}`],
  });
  const result = { html: a.html };
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: a.width, height: a.height, deviceScaleFactor: 1 });
    const consoleErrors = [];
    const requests = [];
    const url = 'file://' + path.resolve(a.html);
    page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
    page.on('pageerror', (e) => consoleErrors.push(String(e)));
    page.on('request', (r) => { if (r.url() !== url && !r.url().startsWith('data:') && !r.url().startsWith('blob:')) requests.push(r.url()); });
    const t = Date.now();
    await page.goto(url, { waitUntil: 'load', timeout: 120000 });
    await page.waitForFunction('window.ibasisExplorer && window.ibasisExplorer.ready', { timeout: 120000 });
    result.wallMs = Date.now() - t;
    result.loadMs = await page.evaluate('window.ibasisExplorer.loadMs');
    result.bytes = fs.statSync(a.html).size;

    // Not blank: the first pane's pixels in a screenshot.
    const box = await page.evaluate(() => { const r = document.querySelector('.pane canvas').getBoundingClientRect(); return { x: r.left, y: r.top, width: r.width, height: r.height }; });
    const png = decodePng(await page.screenshot({ type: 'png', clip: box }));
    let ink = 0;
    const colours = new Set();
    for (let i = 0; i < png.width * png.height; i++) {
      const r = png.rgba[4 * i], g = png.rgba[4 * i + 1], b = png.rgba[4 * i + 2];
      if (r < 235 || g < 235 || b < 235) ink++;
      colours.add((r >> 4) * 256 + (g >> 4) * 16 + (b >> 4));
    }
    result.inkShare = ink / (png.width * png.height);
    result.colours = colours.size;
    if (result.inkShare < 0.002 || colours.size < 4) fail(`canvas looks blank: ${ink} inked pixels, ${colours.size} colours`);
    await page.screenshot({ path: a.shot.replace(/\.png$/, '-graph.png') });

    // Click features: the card must name them and show their Lambda.
    result.clicked = [];
    for (const e of a.expect) {
      const [graph, layer, index, lambda] = e.split(':');
      const j = Number(index);
      await page.evaluate((g, l, k) => window.ibasisExplorer.focus(g, l, k), graph, layer, j);
      await new Promise((r) => setTimeout(r, 100));
      const pos = await page.evaluate((g, l, k) => window.ibasisExplorer.nodeScreenPos(g, l, k), graph, layer, j);
      if (!pos) { fail(`${e}: graph ${graph} is not shown`); continue; }
      await page.mouse.click(pos.x, pos.y);
      await new Promise((r) => setTimeout(r, 100));
      const card = await page.evaluate(() => {
        const c = document.getElementById('card');
        const lam = c.querySelector('.lambda');
        return { graph: c.dataset.graph, layer: c.dataset.layer, index: c.dataset.index, lambda: lam ? lam.dataset.value : null, lambdaText: lam ? lam.textContent : null };
      });
      result.clicked.push(card);
      if (card.graph !== graph || card.layer !== layer || Number(card.index) !== j) fail(`${e}: the card shows ${card.graph}:${card.layer}:${card.index}`);
      else if (Number(card.lambda) !== Number(lambda)) fail(`${e}: the card's Lambda is ${card.lambda}`);
      else if (Math.abs(Number(card.lambdaText) - Number(lambda)) > 1e-3 * Math.abs(Number(lambda))) fail(`${e}: the card reads Lambda ${card.lambdaText}`);
    }
    if (a.expect.length) {
      await page.screenshot({ path: a.shot });
      // The strongest incoming edge is a link to its source feature.
      const link = await page.evaluate(() => { const x = document.querySelector('#card a[data-layer]'); return x ? { layer: x.dataset.layer, index: x.dataset.index } : null; });
      if (link) {
        await page.click('#card a[data-layer]');
        const now = await page.evaluate(() => ({ layer: document.getElementById('card').dataset.layer, index: document.getElementById('card').dataset.index }));
        if (now.layer !== link.layer || now.index !== link.index) fail(`edge link to ${link.layer}#${link.index} opened ${now.layer}#${now.index}`);
        result.followedEdge = link;
      }
      // Search by id.
      const [graph, layer] = a.expect[0].split(':');
      await page.click('#search', { clickCount: 3 });
      await page.type('#search', `${layer}:1`);
      await page.keyboard.press('Enter');
      const found = await page.evaluate(() => ({ graph: document.getElementById('card').dataset.graph, layer: document.getElementById('card').dataset.layer, index: document.getElementById('card').dataset.index }));
      if (found.layer !== layer || found.index !== '1') fail(`search ${layer}:1 opened ${JSON.stringify(found)} (graph ${graph})`);
    } else {
      await page.screenshot({ path: a.shot });
    }
    // The other controls run without errors: module order, the mass slider, one graph only,
    // a wheel zoom and a drag.
    await page.select('#order', 'module');
    await page.evaluate(() => { const m = document.getElementById('mass'); m.value = '100'; m.dispatchEvent(new Event('input')); });
    const c = await page.evaluate(() => { const r = document.querySelector('.pane canvas').getBoundingClientRect(); return { x: r.left + r.width / 2, y: r.top + r.height / 2 }; });
    await page.mouse.move(c.x, c.y);
    await page.mouse.wheel({ deltaY: -200 });
    await page.mouse.down(); await page.mouse.move(c.x + 40, c.y + 30, { steps: 4 }); await page.mouse.up();
    await page.screenshot({ path: a.shot.replace(/\.png$/, '-modules.png') });
    const boxes = await page.$$('#graphs input');
    for (const b of boxes.slice(1)) await b.click();
    await new Promise((r) => setTimeout(r, 100));
    result.panes = await page.evaluate(() => document.querySelectorAll('.pane').length);
    if (result.panes !== 1) fail(`${result.panes} panes after unticking all graphs but the first`);
    result.consoleErrors = consoleErrors;
    result.requests = requests;
    if (consoleErrors.length) fail(`console errors: ${consoleErrors.join(' | ')}`);
    if (requests.length) fail(`network requests: ${requests.join(' ')}`);
  } finally {
    await browser.close();
    fs.rmSync(userDir, { recursive: true, force: true });
  }
  result.failures = failures;
  result.ok = failures.length === 0;
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
}

main().catch((e) => { console.error(String(e && e.stack || e)); process.exit(2); });
