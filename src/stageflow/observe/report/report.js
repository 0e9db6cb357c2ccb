// stageflow run report: builds the timeline, the stage table and the details panel from the JSON
// embedded in the page. Every piece of trace text goes in through textContent, never as HTML.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("sf-data").textContent);
  const S = data.spans; // [id, parentIndex, depth, path, kind, type, start, end, status, thread, nChildren, subtreeEnd]
  let C = null; // per span: {inputs, outputs, error, usage} or null, once unpacked (see below)
  let contentError = null;
  const ID = 0, PARENT = 1, DEPTH = 2, PATH = 3, KIND = 4, TYPE = 5, START = 6, END = 7, STATUS = 8,
    THREAD = 9, NKIDS = 10, LAST = 11;
  const KEY = data.keys; // table key per span

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function ms(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const v = seconds * 1000;
    if (v >= 100) return v.toFixed(0) + " ms";
    if (v >= 1) return v.toFixed(1) + " ms";
    return (v * 1000).toFixed(0) + " µs";
  }
  function num(v) {
    return v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US");
  }
  function tail(path) {
    let depth = 0;
    for (let i = path.length - 1; i >= 0; i--) {
      const ch = path[i];
      if (ch === "]") depth++;
      else if (ch === "[") depth--;
      else if (ch === "." && depth === 0) return path.slice(i + 1);
    }
    return path;
  }

  // -- timeline ---------------------------------------------------------------------------------
  const t0 = data.t0, span = Math.max(data.t1 - data.t0, 1e-9);
  const rowsBox = document.getElementById("tl-rows");
  const ticks = document.getElementById("tl-ticks");
  for (let i = 0; i <= 4; i++) {
    const tick = el("div", "tick", ms((span * i) / 4));
    tick.style.left = (i * 25) + "%";
    if (i === 4) { tick.style.left = "auto"; tick.style.right = "2px"; }
    ticks.appendChild(tick);
  }
  const rows = new Array(S.length);
  const collapsed = new Uint8Array(S.length);
  if (S.length > data.collapse_over) {
    for (let i = 0; i < S.length; i++) if (S[i][NKIDS] > data.collapse_children) collapsed[i] = 1;
  }
  let selected = -1;

  function makeRow(i) {
    const s = S[i];
    const row = el("div", "row");
    row.dataset.i = String(i);
    const name = el("div", "name");
    name.style.paddingLeft = (6 + 14 * s[DEPTH]) + "px";
    const tog = el("span", "tog", s[NKIDS] ? (collapsed[i] ? "▸" : "▾") : "");
    name.appendChild(tog);
    const label = s[KIND] === "run" ? "pipeline call" : tail(s[PATH]);
    name.appendChild(el("span", "path", label));
    name.appendChild(el("span", "type", s[TYPE] + (collapsed[i] ? " (" + s[NKIDS] + " inside)" : "")));
    name.title = (s[PATH] || "(pipeline call)") + " · " + ms(s[END] - s[START]);
    row.appendChild(name);
    const track = el("div", "track");
    const bar = el("div", "bar k-" + s[KIND] + (s[NKIDS] ? " parent" : "") + " " + s[STATUS]);
    bar.style.left = ((s[START] - t0) / span * 100) + "%";
    bar.style.width = (Math.max(s[END] - s[START], 0) / span * 100) + "%";
    bar.title = ms(s[END] - s[START]);
    track.appendChild(bar);
    row.appendChild(track);
    rows[i] = row;
    return row;
  }
  function visible(from, to, out) {
    // Rows from..to (a run of siblings' subtrees) that are shown, in order.
    let i = from;
    while (i <= to) {
      out.push(i);
      i = collapsed[i] ? S[i][LAST] + 1 : i + 1;
    }
    return out;
  }
  function renderAll() {
    rowsBox.textContent = "";
    const frag = document.createDocumentFragment();
    for (const i of visible(0, S.length - 1, [])) frag.appendChild(rows[i] || makeRow(i));
    rowsBox.appendChild(frag);
  }
  function toggle(i) {
    const last = S[i][LAST];
    if (collapsed[i]) {
      collapsed[i] = 0;
      const frag = document.createDocumentFragment();
      for (const j of visible(i + 1, last, [])) frag.appendChild(rows[j] || makeRow(j));
      rows[i].after(frag);
    } else {
      collapsed[i] = 1;
      for (let j = i + 1; j <= last; j++) if (rows[j] && rows[j].isConnected) rows[j].remove();
    }
    const old = rows[i];
    rows[i] = null;
    old.replaceWith(makeRow(i));
    if (selected === i) rows[i].classList.add("sel");
  }
  rowsBox.addEventListener("click", function (ev) {
    const row = ev.target.closest(".row");
    if (!row) return;
    const i = Number(row.dataset.i);
    if (ev.target.classList.contains("tog") && S[i][NKIDS]) { toggle(i); return; }
    select(i);
  });
  document.getElementById("expand-all").addEventListener("click", function () { collapsed.fill(0); rows.fill(null); renderAll(); });
  document.getElementById("collapse-all").addEventListener("click", function () {
    for (let i = 0; i < S.length; i++) collapsed[i] = S[i][DEPTH] >= 1 && S[i][NKIDS] ? 1 : 0;
    rows.fill(null); renderAll();
  });

  // -- details ----------------------------------------------------------------------------------
  const details = document.getElementById("details");
  function pretty(value) {
    try { return JSON.stringify(value, null, 2); } catch (e) { return String(value); }
  }
  function select(i) {
    if (selected >= 0 && rows[selected]) rows[selected].classList.remove("sel");
    selected = i;
    if (rows[i]) rows[i].classList.add("sel");
    const s = S[i], c = (C && C[i]) || {};
    details.textContent = "";
    details.appendChild(el("h3", "mono", s[PATH] || "(pipeline call)"));
    const dl = el("dl");
    const facts = [["type", s[TYPE]], ["status", s[STATUS]], ["start", ms(s[START] - t0)], ["duration", ms(s[END] - s[START])],
      ["thread", s[THREAD]], ["span", s[ID]], ["inside", s[NKIDS] ? s[NKIDS] + " spans" : "–"]];
    for (const [k, v] of facts) { dl.appendChild(el("dt", "", k)); dl.appendChild(el("dd", "", v === null ? "–" : v)); }
    details.appendChild(dl);
    if (c.error) { details.appendChild(el("h3", "", "error")); details.appendChild(el("pre", "error", c.error)); }
    if (c.usage) { details.appendChild(el("h3", "", "usage")); details.appendChild(el("pre", "", pretty(c.usage))); }
    for (const part of ["inputs", "outputs"]) {
      details.appendChild(el("h3", "", part));
      const missing = contentError ? el("p", "error", contentError) : C ? el("p", "muted", "not recorded")
        : el("p", "muted", "unpacking…");
      details.appendChild(part in c ? el("pre", part, pretty(c[part])) : missing);
    }
    highlight(KEY[i], false);
  }

  // -- stage table ------------------------------------------------------------------------------
  const tbody = document.getElementById("stage-rows");
  const tableRows = new Map();
  function usage(r, k) { return r.usage ? num(r.usage[k] || 0) : "–"; }
  function cost(r) {
    if (r.cost === null || r.cost === undefined) return "–";
    return (r.cost_partial ? "≥ $" : "$") + r.cost.toFixed(r.cost < 0.01 ? 6 : 4);
  }
  const columns = [
    ["stage", (r) => r.key, (r) => r.first_index],
    ["type", (r) => r.type, (r) => r.type],
    ["calls", (r) => num(r.calls), (r) => r.calls],
    ["errors", (r) => num(r.errors), (r) => r.errors],
    ["total", (r) => ms(r.total), (r) => r.total],
    ["mean", (r) => ms(r.mean), (r) => r.mean],
    ["max", (r) => ms(r.max), (r) => r.max],
    ["LM calls", (r) => usage(r, "lm_calls"), (r) => r.usage ? r.usage.lm_calls || 0 : -1],
    ["in tokens", (r) => usage(r, "input_tokens"), (r) => r.usage ? r.usage.input_tokens || 0 : -1],
    ["out tokens", (r) => usage(r, "output_tokens"), (r) => r.usage ? r.usage.output_tokens || 0 : -1],
    ["cost", cost, (r) => r.cost === null ? -1 : r.cost],
    ["cache hits", (r) => usage(r, "cache_hits"), (r) => r.usage ? r.usage.cache_hits || 0 : -1],
    ["retries", (r) => usage(r, "retries"), (r) => r.usage ? r.usage.retries || 0 : -1],
    ["repairs", (r) => usage(r, "repairs"), (r) => r.usage ? r.usage.repairs || 0 : -1],
  ];
  const head = document.getElementById("stage-head");
  let order = [0, 1];
  columns.forEach(function (col, ci) {
    const th = el("th", "", col[0]);
    th.addEventListener("click", function () { order = [ci, order[0] === ci ? -order[1] : 1]; fillTable(); });
    head.appendChild(th);
  });
  function fillTable() {
    const sorted = data.stages.slice().sort(function (a, b) {
      const f = columns[order[0]][2], x = f(a), y = f(b);
      return (x < y ? -1 : x > y ? 1 : 0) * order[1];
    });
    tbody.textContent = "";
    tableRows.clear();
    for (const r of sorted) {
      const tr = el("tr");
      tr.dataset.key = r.key;
      columns.forEach(function (col, ci) {
        const td = el("td", ci === 0 ? "path" : ci === 1 ? "type" : "", col[1](r));
        if (ci === 3 && r.errors) td.className = "err";
        tr.appendChild(td);
      });
      tableRows.set(r.key, tr);
      tbody.appendChild(tr);
    }
    const t = data.totals, tr = el("tr", "total");
    columns.forEach(function (col, ci) {
      tr.appendChild(el("td", "", ci === 0 ? "leaf stages" : ci === 1 || ci >= 5 && ci <= 6 ? "" : col[1](t)));
    });
    tbody.appendChild(tr);
  }
  tbody.addEventListener("click", function (ev) {
    const tr = ev.target.closest("tr");
    if (tr && tr.dataset.key !== undefined) highlight(tr.dataset.key, true);
  });

  // -- highlighting across graph, table and timeline --------------------------------------------
  let lit = [];
  function highlight(key, reveal) {
    for (const e of lit) e.classList.remove("hl");
    lit = [];
    const tr = tableRows.get(key);
    if (tr) { tr.classList.add("hl"); lit.push(tr); }
    for (const node of document.querySelectorAll("svg.graph .node")) {
      if (node.getAttribute("data-path") === key) { node.classList.add("hl"); lit.push(node); }
    }
    if (!reveal) return;
    let first = -1;
    for (let i = 0; i < S.length; i++) {
      if (KEY[i] === key) {
        if (first < 0) first = i;
        if (rows[i] && rows[i].isConnected) { rows[i].classList.add("hl"); lit.push(rows[i]); }
      }
    }
    if (first >= 0 && rows[first] && rows[first].isConnected) rows[first].scrollIntoView({ block: "nearest" });
  }
  for (const node of document.querySelectorAll("svg.graph .node[data-path]")) {
    node.addEventListener("click", function () {
      const key = node.getAttribute("data-path");
      highlight(key, true);
      const tr = tableRows.get(key);
      if (tr) tr.scrollIntoView({ block: "nearest" });
    });
  }

  // -- inputs and outputs: JSON, or gzip+base64 for large traces (unpacked by the browser) ------
  async function unpack() {
    const node = document.getElementById("sf-content");
    if (node.dataset.encoding !== "gzip-base64") return JSON.parse(node.textContent);
    if (typeof DecompressionStream === "undefined") {
      throw new Error("This report's inputs and outputs are compressed; open it in a browser with " +
        "DecompressionStream (Chrome 80+, Firefox 113+, Safari 16.4+).");
    }
    const bin = atob(node.textContent);
    const bytes = new Uint8Array(bin.length);
    for (let k = 0; k < bin.length; k++) bytes[k] = bin.charCodeAt(k);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return JSON.parse(await new Response(stream).text());
  }

  fillTable();
  renderAll();
  if (S.length) select(0);
  unpack().then(function (c) { C = c; }, function (err) { contentError = err.message; }).then(function () {
    if (selected >= 0) select(selected);
    document.body.dataset.content = C ? "1" : "error";
    window.__sfContentAt = performance.now();
  });
  document.body.dataset.rendered = "1";
  window.__sfRenderedAt = performance.now();
  // The first frame that shows it (a benchmark reads this; nothing else depends on it).
  requestAnimationFrame(function () { requestAnimationFrame(function () { window.__sfPaintedAt = performance.now(); }); });
})();
