// ibasis explorer: the interaction graphs of one run drawn on canvases, no library, no network.
// Data: the JSON block #ibasis-data written by src/experiments/explorer.rs (large arrays as
// base64 of little-endian binary).
(function () {
  'use strict';
  const t0 = performance.now();
  const D = JSON.parse(document.getElementById('ibasis-data').textContent);

  function bytes(s) {
    const bin = atob(s);
    const n = bin.length;
    const u = new Uint8Array(n);
    for (let i = 0; i < n; i++) u[i] = bin.charCodeAt(i);
    return u;
  }
  const f32 = (s) => new Float32Array(bytes(s).buffer);
  const u32 = (s) => new Uint32Array(bytes(s).buffer);
  const u16 = (s) => new Uint16Array(bytes(s).buffer);
  const i32 = (s) => new Int32Array(bytes(s).buffer);
  const i8 = (s) => new Int8Array(bytes(s).buffer);

  const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
    '#17becf', '#bcbd22', '#393b79', '#ad494a', '#637939'];
  const GREY = '#8a8f98';
  const MAX_DRAW = 150000; // lines per pane and frame

  // ---- the graphs ---------------------------------------------------------------------
  const graphs = D.graphs.map((g, gi) => {
    const layers = g.layers.map((L) => {
      const lam = L.lambda;
      let maxLam = 0;
      if (lam) for (let j = L.has_constant ? 1 : 0; j < lam.length; j++) maxLam = Math.max(maxLam, Math.abs(lam[j]));
      return Object.assign({}, L, { maxLam, decoded: {} });
    });
    const edges = g.edges.map((E) => {
      const idx = E.index_bytes === 2 ? u16 : u32;
      const src = idx(E.src), dst = idx(E.dst), w = f32(E.w);
      // Cumulative mass (in units of w_max) for the slider's prefix.
      const cum = new Float64Array(w.length);
      let acc = 0;
      for (let k = 0; k < w.length; k++) { acc += w[k]; cum[k] = acc; }
      return Object.assign({}, E, { src, dst, w, cum });
    });
    return { gi, name: g.name, n_modules: g.n_modules, q: g.q, layers, edges, order: null, rank: null };
  });

  const ui = {
    shown: graphs.map((_, i) => i < 3),
    orderBy: 'lambda',
    mass: 0.8,
    view: null, // {sx, sy, tx, ty}
    sel: null, // {g, l, j}
  };

  function layout() {
    for (const g of graphs) {
      g.order = []; g.rank = [];
      g.layers.forEach((L, l) => {
        const first = L.has_constant ? 1 : 0;
        const ids = [];
        for (let j = first; j < L.d_lib; j++) ids.push(j);
        const lam = (j) => (L.lambda ? Math.abs(L.lambda[j]) : 0);
        if (ui.orderBy === 'module' && L.module) {
          const m = (j) => (L.module[j] < 0 ? 1e9 : L.module[j]);
          ids.sort((a, b) => m(a) - m(b) || lam(b) - lam(a) || a - b);
        } else if (L.lambda) {
          ids.sort((a, b) => lam(b) - lam(a) || a - b);
        }
        const rank = new Int32Array(L.d_lib).fill(-1);
        ids.forEach((j, r) => { rank[j] = r; });
        g.order[l] = Int32Array.from(ids);
        g.rank[l] = rank;
      });
    }
  }

  // Edges of matrix E drawn at mass share s: the prefix whose mass is at most s of the
  // matrix's total (edges are stored strongest first).
  function prefix(E, s) {
    if (!E.w_max || !E.total) return 0;
    const target = s * E.total / E.w_max * (1 + 1e-9);
    let lo = 0, hi = E.cum.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (E.cum[mid] <= target) lo = mid + 1; else hi = mid; }
    return Math.max(lo, E.cum.length ? 1 : 0);
  }

  // ---- panes --------------------------------------------------------------------------
  const panesEl = document.getElementById('panes');
  let panes = [];
  function buildPanes() {
    panesEl.textContent = '';
    panes = [];
    graphs.forEach((g, gi) => {
      if (!ui.shown[gi]) return;
      const div = document.createElement('div');
      div.className = 'pane';
      const canvas = document.createElement('canvas');
      canvas.dataset.graph = g.name;
      const name = document.createElement('span');
      name.className = 'name';
      name.textContent = g.name + (g.n_modules != null ? ` (${g.n_modules} modules, Q = ${g.q.toFixed(3)})` : '');
      div.append(canvas, name);
      panesEl.append(div);
      const pane = { g, div, canvas, ctx: canvas.getContext('2d') };
      attach(pane);
      panes.push(pane);
    });
    resize();
  }

  function maxRows() {
    let m = 1;
    for (const g of graphs) for (const o of g.order) m = Math.max(m, o.length);
    return m;
  }
  function nLayers() { return Math.max(...graphs.map((g) => g.layers.length)); }

  function fit() {
    const p = panes[0];
    if (!p) return;
    const W = p.div.clientWidth, H = p.div.clientHeight;
    const mx = 50, top = 44, bottom = 26;
    const n = nLayers();
    ui.view = {
      sx: n > 1 ? (W - 2 * mx) / (n - 1) : 1,
      sy: Math.max(1e-3, (H - top - bottom) / maxRows()),
      tx: n > 1 ? mx : W / 2,
      ty: top,
    };
    draw();
  }

  function resize() {
    const dpr = window.devicePixelRatio || 1;
    for (const p of panes) {
      p.canvas.width = Math.max(1, Math.round(p.div.clientWidth * dpr));
      p.canvas.height = Math.max(1, Math.round(p.div.clientHeight * dpr));
      p.ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    }
    if (!ui.view) fit(); else draw();
  }

  const X = (l) => ui.view.tx + ui.view.sx * l;
  const Y = (r) => ui.view.ty + ui.view.sy * r;

  function color(L, j) {
    if (!L.module || L.module[j] < 0) return GREY;
    return PALETTE[L.module[j] % PALETTE.length];
  }

  let pending = false;
  function draw() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; drawNow(); });
  }

  let drawnInfo = '';
  function drawNow() {
    const info = [];
    for (const p of panes) info.push(drawPane(p));
    drawnInfo = info.join('; ');
    status();
  }

  function drawPane(p) {
    const { g, ctx } = p;
    const W = p.div.clientWidth, H = p.div.clientHeight;
    ctx.fillStyle = '#ffffff';
    ctx.fillRect(0, 0, W, H);
    const v = ui.view;
    // Edges, matrix by matrix, weakest bucket first (edges are sorted strongest first, so
    // each intensity bucket is a contiguous range).
    let drawn = 0, shown = 0;
    const perMatrix = Math.floor(MAX_DRAW / Math.max(1, g.edges.length));
    g.edges.forEach((E, m) => {
      const n = prefix(E, ui.mass);
      shown += n;
      const nd = Math.min(n, perMatrix);
      drawn += nd;
      const xa = X(E.in), xb = X(E.out);
      if (Math.max(xa, xb) < 0 || Math.min(xa, xb) > W) return;
      const ra = g.rank[E.in], rb = g.rank[E.out];
      // Intensity buckets by sqrt(w / w_max), strongest first; drawn weakest first.
      const BUCKETS = 8;
      const ranges = [];
      let k = 0;
      for (let b = 0; b < BUCKETS; b++) {
        const floor = (BUCKETS - b - 1) / BUCKETS;
        const start = k;
        while (k < nd && (b === BUCKETS - 1 || Math.sqrt(E.w[k]) >= floor)) k++;
        ranges.push([start, k, (BUCKETS - b - 0.5) / BUCKETS]);
      }
      for (let b = BUCKETS - 1; b >= 0; b--) {
        const [start, end, strength] = ranges[b];
        if (start === end) continue;
        ctx.strokeStyle = `rgba(40, 70, 160, ${(0.06 + 0.74 * strength * strength).toFixed(3)})`;
        ctx.lineWidth = 0.6 + 2.4 * strength * strength;
        ctx.beginPath();
        for (let q = start; q < end; q++) {
          const ya = Y(ra[E.src[q]]), yb = Y(rb[E.dst[q]]);
          if ((ya < 0 && yb < 0) || (ya > H && yb > H)) continue;
          ctx.moveTo(xa, ya);
          ctx.lineTo(xb, yb);
        }
        ctx.stroke();
      }
    });
    // The selected feature's edges (all kept ones, whatever the slider).
    if (ui.sel && ui.sel.g === g.gi) {
      const { l, j } = ui.sel;
      ctx.strokeStyle = 'rgba(230, 120, 0, 0.9)';
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      for (const E of g.edges) {
        if (E.out === l) for (let k = 0; k < E.dst.length; k++) if (E.dst[k] === j) { ctx.moveTo(X(E.in), Y(g.rank[E.in][E.src[k]])); ctx.lineTo(X(l), Y(g.rank[l][j])); }
        if (E.in === l) for (let k = 0; k < E.src.length; k++) if (E.src[k] === j) { ctx.moveTo(X(l), Y(g.rank[l][j])); ctx.lineTo(X(E.out), Y(g.rank[E.out][E.dst[k]])); }
      }
      ctx.stroke();
    }
    // Nodes.
    const s = Math.max(2, Math.min(10, v.sy * 0.8));
    g.layers.forEach((L, l) => {
      const x = X(l);
      if (x < -20 || x > W + 20) return;
      const order = g.order[l];
      const r0 = Math.max(0, Math.floor((-20 - v.ty) / v.sy));
      const r1 = Math.min(order.length, Math.ceil((H + 20 - v.ty) / v.sy));
      // Where nodes overlap (more than one per pixel), draw one per pixel row at most.
      const step = Math.max(1, Math.floor(1 / Math.max(v.sy, 1e-9)));
      for (let r = r0; r < r1; r += step) {
        const j = order[r];
        const rel = L.maxLam > 0 ? Math.sqrt(Math.sqrt(Math.abs(L.lambda[j]) / L.maxLam)) : 0.6;
        const w = s * (0.6 + 0.8 * rel);
        ctx.fillStyle = color(L, j);
        ctx.fillRect(x - w / 2, Y(r) - Math.min(w, Math.max(1, s)) / 2, w, Math.min(w, Math.max(1, s)));
      }
    });
    if (ui.sel && ui.sel.g === g.gi) {
      const { l, j } = ui.sel;
      ctx.strokeStyle = '#e67800';
      ctx.lineWidth = 2;
      ctx.strokeRect(X(l) - s - 3, Y(g.rank[l][j]) - s / 2 - 3, 2 * s + 6, s + 6);
    }
    // Layer names.
    ctx.fillStyle = '#222';
    ctx.font = '12px system-ui, sans-serif';
    ctx.textAlign = 'center';
    // Names staggered on two rows when the columns are narrower than the names.
    const widest = Math.max(...g.layers.map((L) => ctx.measureText(L.name).width)) + 8;
    const stagger = v.sx < widest;
    g.layers.forEach((L, l) => {
      const x = X(l);
      const y = stagger && l % 2 ? 28 : 14;
      ctx.fillStyle = 'rgba(250,250,250,0.85)';
      const tw = ctx.measureText(L.name).width + 6;
      ctx.fillRect(x - tw / 2, y - 12, tw, 16);
      ctx.fillStyle = '#222';
      ctx.fillText(L.name, x, y);
    });
    return `${g.name}: ${drawn.toLocaleString()} of ${shown.toLocaleString()} edges drawn`;
  }

  // ---- interaction --------------------------------------------------------------------
  function hit(p, x, y) {
    const v = ui.view;
    const l = Math.round((x - v.tx) / v.sx);
    if (l < 0 || l >= p.g.layers.length) return null;
    if (Math.abs(x - X(l)) > Math.max(8, v.sy)) return null;
    const r = Math.round((y - v.ty) / v.sy);
    const order = p.g.order[l];
    if (r < 0 || r >= order.length) return null;
    if (Math.abs(y - Y(r)) > Math.max(6, v.sy)) return null;
    return { g: p.g.gi, l, j: order[r] };
  }

  function attach(p) {
    const c = p.canvas;
    let drag = null;
    c.addEventListener('mousedown', (e) => { drag = { x: e.clientX, y: e.clientY, tx: ui.view.tx, ty: ui.view.ty, moved: false }; c.style.cursor = 'grabbing'; });
    window.addEventListener('mousemove', (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      if (drag.moved) { ui.view.tx = drag.tx + dx; ui.view.ty = drag.ty + dy; draw(); }
    });
    window.addEventListener('mouseup', (e) => {
      if (!drag) return;
      const d = drag;
      drag = null;
      c.style.cursor = 'grab';
      if (!d.moved && e.target === c) {
        const rect = c.getBoundingClientRect();
        const h = hit(p, e.clientX - rect.left, e.clientY - rect.top);
        if (h) select(h.g, h.l, h.j, false);
      }
    });
    c.addEventListener('wheel', (e) => {
      e.preventDefault();
      const rect = c.getBoundingClientRect();
      const x = e.clientX - rect.left, y = e.clientY - rect.top;
      const f = Math.exp(-e.deltaY * 0.0015);
      const v = ui.view;
      if (!e.shiftKey) { v.tx = x - (x - v.tx) * f; v.sx *= f; }
      v.ty = y - (y - v.ty) * f; v.sy *= f;
      draw();
    }, { passive: false });
  }

  // Puts feature j of layer l mid-height, zoomed in far enough to click it alone.
  function centreOn(gi, l, j) {
    if (!panes[0]) return;
    const H = panes[0].div.clientHeight, W = panes[0].div.clientWidth;
    const v = ui.view;
    if (v.sy < 8) v.sy = 8;
    v.ty = H / 2 - v.sy * graphs[gi].rank[l][j];
    const x = X(l);
    if (x < 40 || x > W - 40) v.tx += W / 2 - x;
  }

  function select(gi, l, j, centre) {
    ui.sel = { g: gi, l, j };
    if (centre) centreOn(gi, l, j);
    card(gi, l, j);
    draw();
  }

  // ---- the feature card ---------------------------------------------------------------
  const cardEl = document.getElementById('card');
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    if (attrs) for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text != null) e.textContent = text;
    return e;
  };
  const fmt = (x) => (x == null || !isFinite(x) ? '-' : Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(4) : x.toPrecision(5));

  function label(L, j) { return L.labels ? L.labels[j] : ''; }

  function edgeList(title, rows) {
    const frag = document.createDocumentFragment();
    frag.append(el('h3', null, title));
    if (!rows.length) { frag.append(el('p', { class: 'hint' }, 'none kept in the file')); return frag; }
    const t = el('table');
    for (const r of rows) {
      const tr = el('tr');
      const a = el('a', { 'data-layer': r.L.name, 'data-index': String(r.j) }, `${r.L.name} #${r.j}`);
      a.addEventListener('click', () => select(r.gi, r.l, r.j, true));
      const td = el('td'); td.append(a);
      tr.append(td, el('td', null, label(r.L, r.j)), el('td', { class: 'num' }, fmt(r.w)));
      t.append(tr);
    }
    frag.append(t);
    return frag;
  }

  function card(gi, l, j) {
    const g = graphs[gi], L = g.layers[l];
    cardEl.textContent = '';
    cardEl.dataset.graph = g.name; cardEl.dataset.layer = L.name; cardEl.dataset.index = String(j);
    cardEl.append(el('h2', null, `${g.name} · ${L.name} · feature ${j}`));
    const t = el('table');
    const row = (k, v, attrs) => { const tr = el('tr'); tr.append(el('td', null, k), el('td', attrs || null, v)); t.append(tr); };
    row('node layer', `${L.name} (${l + 1} of ${g.layers.length}), ${L.d_lib} features, ${L.pos} position(s)`);
    row('index', String(j));
    if (L.lambda) row('Lambda', fmt(L.lambda[j]), { class: 'lambda', 'data-value': String(L.lambda[j]) });
    else row('Lambda', '- (none stored)', { class: 'lambda', 'data-value': '' });
    row('Leiden module', L.module ? (L.module[j] >= 0 ? String(L.module[j]) : 'none') : '- (not clustered)', { class: 'module' });
    if (L.labels) row('Fourier label', L.labels[j]);
    cardEl.append(t);
    // Strongest kept edges in and out.
    const inc = [], out = [];
    for (const E of g.edges) {
      if (E.out === l) for (let k = 0; k < E.dst.length; k++) if (E.dst[k] === j) inc.push({ gi, l: E.in, L: g.layers[E.in], j: E.src[k], w: E.w[k] * E.w_max });
      if (E.in === l) for (let k = 0; k < E.src.length; k++) if (E.src[k] === j) out.push({ gi, l: E.out, L: g.layers[E.out], j: E.dst[k], w: E.w[k] * E.w_max });
    }
    inc.sort((a, b) => b.w - a.w); out.sort((a, b) => b.w - a.w);
    const K = 12;
    cardEl.append(edgeList(`strongest incoming edges (${inc.length} kept)`, inc.slice(0, K)));
    cardEl.append(edgeList(`strongest outgoing edges (${out.length} kept)`, out.slice(0, K)));
    if (L.fourier) fourierCard(L, j);
    if (L.direction) directionCard(L, j);
    if (L.top && D.images) imagesCard(L, j);
    if (L.top && D.tokens) textCard(L, j);
  }

  function heat(t) {
    // A perceptual dark-blue -> teal -> yellow ramp.
    const stops = [[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137], [219, 92, 104], [244, 136, 73], [254, 188, 43], [240, 249, 33]];
    const x = Math.max(0, Math.min(1, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
    return stops[i].map((c, k) => Math.round(c + f * (stops[i + 1][k] - c)));
  }

  function fourierCard(L, j) {
    const F = L.fourier;
    cardEl.append(el('h3', null, 'Fourier spectrum over (a, b)'));
    const split = F.split[j];
    cardEl.append(el('p', null, `power: constant ${(100 * split[0]).toFixed(1)}%, a ${(100 * split[1]).toFixed(1)}%, b ${(100 * split[2]).toFixed(1)}%, cross ${(100 * split[3]).toFixed(1)}%`));
    const dom = el('p', { class: 'dominant' });
    dom.textContent = 'dominant (k_a, k_b): ' + F.dominant[j].slice(0, 5).map((d) => `(${d[0]}, ${d[1]}) ${(100 * d[2]).toFixed(1)}%`).join(', ');
    cardEl.append(dom);
    if (j >= F.n) { cardEl.append(el('p', { class: 'hint' }, `spectrum stored for the ${F.n} leading features of this layer`)); return; }
    if (!F.bytes) F.bytes = bytes(F.power);
    const p = F.p, h = F.h, c = Math.floor(p / 2);
    const canvas = el('canvas', { width: String(p), height: String(p), class: 'spectrum' });
    canvas.style.width = `${2 * p}px`; canvas.style.height = `${2 * p}px`;
    const ctx = canvas.getContext('2d');
    const img = ctx.createImageData(p, p);
    const base = j * p * h;
    for (let y = 0; y < p; y++) {
      for (let x = 0; x < p; x++) {
        // Row: k_a from -c (top) to c; column: k_b from -c to c.
        const ka = ((y - c) % p + p) % p, kb = ((x - c) % p + p) % p;
        const q = kb < h ? F.bytes[base + ka * h + kb] : F.bytes[base + ((p - ka) % p) * h + (p - kb)];
        const [r, g, b] = heat(q / 255);
        const o = 4 * (y * p + x);
        img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b; img.data[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    cardEl.append(canvas);
    cardEl.append(el('p', { class: 'hint' }, `k_a down, k_b across, both from -${c} to ${c} (0 in the middle); log scale, 4 decades below the largest power ${fmt(F.max[j])}`));
  }

  function directionCard(L, j) {
    const Dn = L.direction;
    if (!Dn.vals) Dn.vals = i8(Dn.data);
    const { h, w } = Dn;
    cardEl.append(el('h3', null, `input-space direction (row ${j} of C_pinv), ${h} x ${w}`));
    const canvas = el('canvas', { width: String(w), height: String(h), class: 'direction' });
    canvas.style.width = `${5 * w}px`; canvas.style.height = `${5 * h}px`;
    const ctx = canvas.getContext('2d');
    const img = ctx.createImageData(w, h);
    for (let i = 0; i < h * w; i++) {
      const v = Dn.vals[j * h * w + i] / 127;
      const a = Math.abs(v);
      const o = 4 * i;
      // Red positive, blue negative, white zero.
      img.data[o] = v >= 0 ? 255 : Math.round(255 * (1 - a));
      img.data[o + 1] = Math.round(255 * (1 - a));
      img.data[o + 2] = v <= 0 ? 255 : Math.round(255 * (1 - a));
      img.data[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    cardEl.append(canvas);
    cardEl.append(el('p', { class: 'hint' }, `red positive, blue negative; largest |entry| ${fmt(Dn.scale[j])}`));
  }

  function topOf(L) {
    if (!L.top.dec) L.top.dec = { value: f32(L.top.value), row: i32(L.top.row), pos: i32(L.top.pos) };
    return L.top.dec;
  }

  function imagesCard(L, j) {
    const T = topOf(L), k = L.top.k, I = D.images;
    if (!I.px) I.px = bytes(I.pixels);
    cardEl.append(el('h3', null, `top-activating test images (largest |f C|, ${k} kept)`));
    const box = el('div', { class: 'images' });
    for (let s = 0; s < k; s++) {
      const r = T.row[j * k + s];
      if (r < 0) continue;
      const fig = el('figure');
      const canvas = el('canvas', { width: String(I.w), height: String(I.h) });
      canvas.style.width = `${2 * I.w}px`; canvas.style.height = `${2 * I.h}px`;
      const ctx = canvas.getContext('2d');
      const img = ctx.createImageData(I.w, I.h);
      for (let i = 0; i < I.w * I.h; i++) {
        const v = 255 - I.px[r * I.w * I.h + i];
        img.data.set([v, v, v, 255], 4 * i);
      }
      ctx.putImageData(img, 0, 0);
      fig.append(canvas, el('figcaption', null, `#${I.samples[r]}: ${fmt(T.value[j * k + s])}`));
      box.append(fig);
    }
    cardEl.append(box);
  }

  function textCard(L, j) {
    const T = topOf(L), k = L.top.k, X0 = D.tokens;
    if (!X0.idv) X0.idv = u32(X0.ids);
    const [before, after] = D.settings.context;
    cardEl.append(el('h3', null, `top-activating token contexts (largest |f C|, ${k} kept)`));
    const show = (id) => (X0.vocab[id] ?? `<${id}>`).replace(/\n/g, '⏎');
    for (let s = 0; s < k; s++) {
      const r = T.row[j * k + s];
      if (r < 0) continue;
      const p = T.pos[j * k + s];
      const line = el('div', { class: 'ctx' });
      line.append(el('span', { class: 'v' }, fmt(T.value[j * k + s])));
      const a = Math.max(0, p - before), b = Math.min(X0.n_ctx - 1, p + after);
      for (let t = a; t <= b; t++) {
        const txt = show(X0.idv[r * X0.n_ctx + t]);
        line.append(t === p ? el('mark', null, txt) : document.createTextNode(txt));
      }
      cardEl.append(line);
    }
  }

  // ---- toolbar ------------------------------------------------------------------------
  const massEl = document.getElementById('mass');
  const massLabel = document.getElementById('mass-label');
  function keptRange() {
    let lo = 1, hi = 0;
    for (const g of graphs) for (const E of g.edges) { lo = Math.min(lo, E.kept_share); hi = Math.max(hi, E.kept_share); }
    return hi >= lo ? [lo, hi] : null;
  }
  function massText() {
    const k = keptRange();
    const pct = (x) => `${(100 * x).toFixed(1)}%`;
    massLabel.textContent = `${pct(ui.mass)} of each matrix` + (k ? ` (file keeps ${pct(k[0])}-${pct(k[1])})` : ' (no edges)');
  }
  massEl.addEventListener('input', () => { ui.mass = massEl.value / 100; massText(); draw(); });
  document.getElementById('order').addEventListener('change', (e) => { ui.orderBy = e.target.value; layout(); draw(); });
  document.getElementById('fit').addEventListener('click', fit);
  const searchEl = document.getElementById('search');
  function find() {
    const q = searchEl.value.trim();
    if (!q) return;
    for (const g of graphs) {
      if (!ui.shown[g.gi]) continue;
      const m = q.match(/^(.+)[:#/](\d+)$/);
      for (let l = 0; l < g.layers.length; l++) {
        const L = g.layers[l];
        if (m && L.name === m[1]) { const j = +m[2]; if (j < L.d_lib && g.rank[l][j] >= 0) return select(g.gi, l, j, true); }
      }
      if (/^\d+$/.test(q)) {
        for (let l = 0; l < g.layers.length; l++) if (+q < g.layers[l].d_lib && g.rank[l][+q] >= 0) return select(g.gi, l, +q, true);
      }
      for (let l = 0; l < g.layers.length; l++) {
        const labs = g.layers[l].labels;
        if (labs) { const j = labs.findIndex((x, i) => x === q && g.rank[l][i] >= 0); if (j >= 0) return select(g.gi, l, j, true); }
      }
    }
    statusExtra = `no feature "${q}"`;
    status();
  }
  document.getElementById('go').addEventListener('click', find);
  searchEl.addEventListener('keydown', (e) => { if (e.key === 'Enter') find(); });
  const graphsEl = document.getElementById('graphs');
  graphs.forEach((g, gi) => {
    const lab = el('label');
    const box = el('input', { type: 'checkbox' });
    box.checked = ui.shown[gi];
    box.dataset.graph = g.name;
    box.addEventListener('change', () => {
      ui.shown[gi] = box.checked;
      if (!ui.shown.some((x) => x)) { ui.shown[gi] = true; box.checked = true; }
      buildPanes();
    });
    lab.append(box, document.createTextNode(' ' + g.name));
    graphsEl.append(lab);
  });

  let statusExtra = '';
  const statusEl = document.getElementById('status');
  function status() {
    const s = D.settings;
    statusEl.textContent = `${drawnInfo}. File: incoming edges of each feature pruned to ${(100 * s.edge_mass).toFixed(0)}% of its mass, at most ${s.max_in_edges}; constant feature hidden.` + (statusExtra ? ` ${statusExtra}` : '');
    statusExtra = '';
  }

  window.addEventListener('resize', resize);
  layout();
  massText();
  buildPanes();
  // What a test (or a console user) can ask of the page.
  window.ibasisExplorer = {
    data: D,
    loadMs: null,
    ready: false,
    select: (graph, layer, j) => {
      const g = graphs.find((x) => x.name === graph);
      const l = g.layers.findIndex((L) => L.name === layer);
      select(g.gi, l, j, true);
    },
    focus: (graph, layer, j) => {
      const g = graphs.find((x) => x.name === graph);
      centreOn(g.gi, g.layers.findIndex((L) => L.name === layer), j);
      drawNow();
    },
    // Client coordinates of a feature's node in its graph's pane.
    nodeScreenPos: (graph, layer, j) => {
      const p = panes.find((x) => x.g.name === graph);
      if (!p) return null;
      const l = p.g.layers.findIndex((L) => L.name === layer);
      const rect = p.canvas.getBoundingClientRect();
      return { x: rect.left + X(l), y: rect.top + Y(p.g.rank[l][j]) };
    },
    view: () => Object.assign({}, ui.view),
  };
  requestAnimationFrame(() => {
    drawNow();
    window.ibasisExplorer.loadMs = performance.now();
    window.ibasisExplorer.parseMs = performance.now() - t0;
    window.ibasisExplorer.ready = true;
  });
})();
