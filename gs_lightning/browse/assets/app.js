// The feature browser: an index of latents, one view per latent and a summary page.
// Runs from file:// with no server: data/summary.js and data/index.js set globals, and a
// latent's record is loaded on demand by adding data/latents/chunk_NNNNN.js, which calls
// GS_CHUNK (fetch() of local files is blocked from file://, script tags are not).
"use strict";

const PAGE = 100;
const SORTABLE = { id: "id", frequency: "frequency", max: "max act", mean: "mean act", l0_share: "L0 share" };
const state = { sort: "frequency", asc: false, query: "", page: 0 };
const chunks = {};       // chunk number -> array of latent records
const waiting = {};      // chunk number -> callbacks waiting for it

function fmt(x) {
  // Four significant digits, trailing zeros of the fraction dropped: 0.0123, 1000, 1.5e-7.
  if (x === null || x === undefined) return "–";
  const s = Number(x).toPrecision(4);
  if (!s.includes(".")) return s;
  return s.replace(/0+(e|$)/, "$1").replace(/\.(e|$)/, "$1");
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k === "onclick" || k === "oninput") node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// -- data ----------------------------------------------------------------------------

const rows = GS_INDEX.rows.map(r => Object.fromEntries(GS_INDEX.columns.map((c, i) => [c, r[i]])));

window.GS_CHUNK = function (number, records) {
  chunks[number] = records;
  (waiting[number] || []).forEach(f => f(records));
  delete waiting[number];
};

function withLatent(id, callback) {
  const number = Math.floor(id / GS_SUMMARY.chunk_size);
  const found = records => callback(records[id - number * GS_SUMMARY.chunk_size]);
  if (chunks[number]) return found(chunks[number]);
  (waiting[number] = waiting[number] || []).push(found);
  if (waiting[number].length === 1) {
    const script = el("script", { src: `data/latents/chunk_${String(number).padStart(5, "0")}.js` });
    script.onerror = () => { document.getElementById("view").textContent = `latent ${id}: its data file is missing`; };
    document.body.append(script);
  }
}

// -- views ---------------------------------------------------------------------------

function matching() {
  const q = state.query.trim().toLowerCase();
  let out = rows;
  if (/^\d+$/.test(q)) out = rows.filter(r => r.id === Number(q));
  else if (q) out = rows.filter(r => r.search.toLowerCase().includes(q));
  const sign = state.asc ? 1 : -1;
  return [...out].sort((a, b) => sign * (a[state.sort] - b[state.sort]) || a.id - b.id);
}

function indexView(view) {
  const search = el("input", { type: "search", id: "search", placeholder: "latent id, or a token its top examples fire on",
                               value: state.query });
  search.oninput = () => { state.query = search.value; state.page = 0; drawTable(); };
  const table = el("table", { id: "latents" });
  const pager = el("div", { class: "controls", id: "pager" });
  const dead = rows.filter(r => r.flag === "dead").length, dense = rows.filter(r => r.flag === "dense").length;
  view.append(el("div", { class: "controls" }, search, ` ${rows.length} latents, ${dead} dead, ${dense} dense`),
              table, pager);

  function drawTable() {
    const found = matching();
    const pages = Math.max(1, Math.ceil(found.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    table.replaceChildren();
    const head = el("tr", {});
    for (const [key, label] of Object.entries(SORTABLE)) {
      const th = el("th", { "data-key": key, class: key === state.sort ? `sorted ${state.asc ? "asc" : ""}` : "" }, label);
      th.onclick = () => {
        state.asc = key === state.sort ? !state.asc : key === "id";
        state.sort = key; drawTable();
      };
      head.append(th);
    }
    head.append(el("th", { class: "text" }, "flag"), el("th", { class: "text" }, "top tokens"));
    table.append(head);
    for (const r of found.slice(state.page * PAGE, (state.page + 1) * PAGE)) {
      const link = el("a", { href: `#latent=${r.id}` }, r.id);
      const flag = r.flag ? el("span", { class: `badge ${r.flag}` }, r.flag) : "";
      table.append(el("tr", { class: "latent-row", "data-id": r.id },
        el("td", {}, link), el("td", {}, fmt(r.frequency)), el("td", {}, fmt(r.max)), el("td", {}, fmt(r.mean)),
        el("td", {}, fmt(r.l0_share)), el("td", { class: "text" }, flag), el("td", { class: "text" }, r.search)));
    }
    pager.replaceChildren(`${found.length} shown · page ${state.page + 1} of ${pages} `);
    if (state.page > 0) pager.append(el("button", { onclick: () => { state.page--; drawTable(); } }, "previous"));
    if (state.page < pages - 1) pager.append(el("button", { onclick: () => { state.page++; drawTable(); } }, "next"));
  }
  drawTable();
}

function histogram(edges, counts, width = 360, height = 90) {
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "hist"); svg.setAttribute("width", width); svg.setAttribute("height", height + 16);
  const top = Math.max(1, ...counts), w = width / Math.max(1, counts.length);
  counts.forEach((c, i) => {
    const rect = document.createElementNS(svgNS, "rect");
    const h = height * c / top;
    rect.setAttribute("x", i * w); rect.setAttribute("y", height - h);
    rect.setAttribute("width", Math.max(1, w - 1)); rect.setAttribute("height", h);
    const title = document.createElementNS(svgNS, "title");
    title.textContent = `${fmt(edges[i])} to ${fmt(edges[i + 1])}: ${c}`;
    rect.append(title); svg.append(rect);
  });
  const label = document.createElementNS(svgNS, "text");
  label.setAttribute("x", 0); label.setAttribute("y", height + 13); label.setAttribute("font-size", 11);
  label.textContent = `${fmt(edges[0])} … ${fmt(edges[edges.length - 1])}`;
  svg.append(label);
  return svg;
}

function example(ex, scale) {
  const line = el("div", { class: "example" });
  ex.tokens.forEach((t, i) => {
    const v = ex.values[i];
    const span = el("span", { class: i === ex.peak ? "tok peak" : "tok", "data-value": v, title: fmt(v) }, t);
    if (v > 0) span.style.background = `rgba(255, 110, 0, ${Math.min(1, v / scale).toFixed(3)})`;
    line.append(span);
  });
  return line;
}

function tokenTable(title, pairs, cls) {
  const table = el("table", { class: cls }, el("tr", {}, el("th", { class: "text" }, title), el("th", {}, "")));
  for (const [token, value] of pairs) table.append(el("tr", {}, el("td", { class: "text" }, JSON.stringify(token)),
                                                     el("td", {}, fmt(value))));
  return table;
}

function latentView(view, id) {
  if (!(id >= 0 && id < rows.length)) { view.textContent = `no latent ${id}: this SAE has ${rows.length}`; return; }
  view.textContent = "Loading…";
  withLatent(id, rec => {
    view.replaceChildren();
    const box = el("div", { id: "latent-view", "data-id": rec.id });
    const flag = rows[id].flag ? el("span", { class: `badge ${rows[id].flag}` }, rows[id].flag) : "";
    box.append(el("h2", {}, `latent ${rec.id} `, flag));
    const stats = el("table", { id: "stats" });
    for (const [key, label, value] of [["count", "tokens fired on", rec.count], ["frequency", "frequency", rec.frequency],
                                       ["mean", "mean activation (when firing)", rec.mean], ["max", "max activation", rec.max]]) {
      stats.append(el("tr", {}, el("td", { class: "text" }, label), el("td", { id: `stat-${key}` }, fmt(value))));
    }
    box.append(el("div", { class: "cols" }, stats,
                  el("div", {}, el("div", { class: "muted" }, "activation histogram (firing tokens)"),
                     histogram(rec.histogram.edges, rec.histogram.counts))));
    const effects = el("div", { class: "cols" });
    for (const side of rec.effects || []) {
      effects.append(el("div", {}, el("h4", {}, side.title), el("div", { class: "cols" },
        tokenTable("promotes", side.promoted, "promoted"), tokenTable("suppresses", side.suppressed, "suppressed"))));
    }
    // Nearest latents by decoder direction (what they write) and, for a transcoder, by
    // encoder direction (what they read: its input side).
    for (const [key, title, label] of [["neighbours", "neighbours", "decoder cos"],
                                       ["input_neighbours", "input side: neighbours", "encoder cos"]]) {
      if (!(rec[key] && rec[key].length)) continue;
      const near = el("table", { class: key }, el("tr", {}, el("th", { class: "text" }, "nearest latents"),
                                                  el("th", {}, label)));
      for (const [other, cos] of rec[key]) {
        near.append(el("tr", {}, el("td", { class: "text" }, el("a", { href: `#latent=${other}` }, other)),
                       el("td", {}, fmt(cos))));
      }
      effects.append(el("div", {}, el("h4", {}, title), near));
    }
    box.append(effects);
    for (const group of rec.groups) {
      const g = el("div", { class: "group", "data-kind": group.kind });
      g.append(el("h4", {}, group.title));
      if (!group.examples.length) g.append(el("div", { class: "muted" }, "none"));
      for (const ex of group.examples) g.append(example(ex, rec.max || 1));
      box.append(g);
    }
    view.append(box);
  });
}

function summaryView(view) {
  const s = GS_SUMMARY;
  const table = el("table", { id: "summary" });
  for (const [label, value] of s.facts) {
    table.append(el("tr", {}, el("td", { class: "text" }, label), el("td", { class: "text" }, value)));
  }
  view.append(el("h2", {}, s.name), table);
  if (s.run) view.append(el("p", {}, "run: ", el("a", { href: s.run }, s.run)));
  view.append(el("h4", {}, "feature density (log10 frequency; dead latents left out)"),
              histogram(s.density.edges, s.density.counts, 480, 120));
}

function route() {
  const view = document.getElementById("view");
  view.replaceChildren();
  const hash = decodeURIComponent(location.hash.slice(1));
  if (hash.startsWith("latent=")) latentView(view, Number(hash.slice(7)));
  else if (hash === "summary") summaryView(view);
  else indexView(view);
  window.scrollTo(0, 0);
}

document.getElementById("sae-name").textContent = GS_SUMMARY.name;
window.addEventListener("hashchange", route);
route();
