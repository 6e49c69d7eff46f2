// Line charts as SVG drawn by the page (no library): series of [x, y] points, linear or log x, a legend as text.

const NS = "http://www.w3.org/2000/svg";
const W = 720, H = 260, L = 56, R = 14, T = 12, B = 36;

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const step = (hi - lo) / (n - 1);
  return Array.from({ length: n }, (_, i) => lo + i * step);
}

const label = (v) => (Math.abs(v) >= 1000 ? Math.round(v).toString() : Math.abs(v) < 0.01 && v !== 0 ? v.toExponential(1) : (+v.toPrecision(3)).toString());

// series: [{name, points: [[x, y], ...]}]; opts: {title, xLabel, yLabel, logX, xTicks, best: [x, y], id, empty}
export function lineChart(series, opts = {}) {
  const all = series.flatMap((se) => se.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const fx = opts.logX ? (x) => Math.log10(x) : (x) => x;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": opts.title || "chart" });
  if (opts.id) svg.setAttribute("id", opts.id);
  svg.append(s("title", {}, opts.title || "chart"));
  if (!all.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, opts.empty || "no points yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...all.map((p) => fx(p[0]))), Math.max(...all.map((p) => fx(p[0])))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.06; y0 -= pad; y1 += pad;
  const px = (x) => L + ((fx(x) - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const v of ticks(y0, y1)) {
    svg.append(s("line", { x1: L, x2: W - R, y1: py(v), y2: py(v), class: "gridline" }));
    svg.append(s("text", { x: L - 6, y: py(v) + 4, "text-anchor": "end" }, label(v)));
  }
  for (const v of opts.xTicks ? opts.xTicks.map(fx) : ticks(x0, x1)) {  // xTicks: the points' own x (sizes, rates)
    const x = opts.logX ? 10 ** v : v;
    svg.append(s("text", { x: px(x), y: H - B + 16, "text-anchor": "middle" }, label(x)));
  }
  svg.append(s("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  svg.append(s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  if (opts.xLabel) svg.append(s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, opts.xLabel));
  if (opts.yLabel) svg.append(s("text", { x: 12, y: T + (H - T - B) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${T + (H - T - B) / 2})` }, opts.yLabel));
  series.forEach((se, i) => {
    const pts = se.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const line = s("polyline", { class: `s${i % 4}`, points: pts.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" "),
      "data-series": se.name, "data-points": pts.length });
    svg.append(line);
    if (pts.length <= 40) for (const [x, y] of pts) svg.append(s("circle", { cx: px(x), cy: py(y), r: 3, class: `s${i % 4}` }, undefined));
  });
  if (opts.best) svg.append(s("circle", { cx: px(opts.best[0]), cy: py(opts.best[1]), r: 7, class: "best" }));
  return svg;
}

export function legend(names) {
  const box = document.createElement("div");
  box.className = "legend";
  names.forEach((n, i) => { const sp = document.createElement("span"); sp.className = `k${i % 4}`; sp.textContent = `● ${n}`; box.append(sp); });
  return box;
}
