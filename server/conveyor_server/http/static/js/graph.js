// A workflow's canvas as an SVG graph, laid out from its tree: a chain left to right with
// arrows, a group top to bottom, a chord's header fanning into its callback. Task nodes are
// coloured by state (style.css) and link to their task.

const NS = "http://www.w3.org/2000/svg";
const BOX_W = 150;
const BOX_H = 40;
const PAD = 12;
const LABEL = 16;
const GAP_X = 40;
const GAP_Y = 12;

function el(tag, attrs = {}, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

function edge(from, to) {
  const mid = (from.x + to.x) / 2;
  return el("path", { class: "edge", d: `M${from.x},${from.y} C${mid},${from.y} ${mid},${to.y} ${to.x - 4},${to.y}` });
}

// Each layout knows its size and draws itself at (x, y), returning its entry and exit points
// and, for a group, the exits of its members (a chord fans them into its callback).
function layout(node) {
  if (node.kind === "task") return taskBox(node);
  const children = node.children.map(layout);
  if (node.kind === "chain") return row(node, children, false);
  if (node.kind === "chord") return row(node, children, true);
  return column(node, children);
}

function taskBox(node) {
  return {
    w: BOX_W, h: BOX_H,
    draw(svg, x, y) {
      const task = node.task || { id: "", name: "(not created)", state: node.state };
      const label = task.name.length > 20 ? `${task.name.slice(0, 19)}…` : task.name;
      const box = el("g", { class: `box ${task.state}`, "data-test": "node", "data-name": task.name, "data-state": task.state },
        el("rect", { x, y, width: BOX_W, height: BOX_H, rx: 6 }),
        el("text", { x: x + 10, y: y + 17 }, label),
        el("text", { x: x + 10, y: y + 32, class: "sub" }, task.state.toLowerCase()));
      svg.append(task.id ? el("a", { href: `#/tasks/${task.id}` }, el("title", {}, `${task.name} ${task.id}`), box) : box);
      const ends = { in: { x, y: y + BOX_H / 2 }, out: { x: x + BOX_W, y: y + BOX_H / 2 } };
      return { ...ends, exits: [ends.out] };
    },
  };
}

function frame(svg, node, x, y, w, h) {
  svg.append(el("rect", { class: `frame ${node.state}`, x, y, width: w, height: h, rx: 8 }),
    el("text", { class: "frame-label", x: x + 8, y: y + 12 }, `${node.kind} · ${node.state.toLowerCase()}`));
}

function row(node, children, fanIn) {
  const w = children.reduce((sum, c) => sum + c.w, 0) + GAP_X * Math.max(0, children.length - 1) + 2 * PAD;
  const h = Math.max(BOX_H, ...children.map((c) => c.h)) + 2 * PAD + LABEL;
  return {
    w, h,
    draw(svg, x, y) {
      frame(svg, node, x, y, w, h);
      let cx = x + PAD;
      let previous = null;
      const inner = y + LABEL + PAD;
      const height = h - LABEL - 2 * PAD;
      let first = null;
      for (const child of children) {
        const drawn = child.draw(svg, cx, inner + (height - child.h) / 2);
        if (previous) {
          for (const exit of fanIn ? previous.exits : [previous.out]) svg.append(edge(exit, drawn.in));
        }
        first = first || drawn;
        previous = drawn;
        cx += child.w + GAP_X;
      }
      const mid = y + h / 2;
      return { in: { x, y: first ? first.in.y : mid }, out: { x: x + w, y: previous ? previous.out.y : mid },
        exits: [{ x: x + w, y: previous ? previous.out.y : mid }] };
    },
  };
}

function column(node, children) {
  const w = Math.max(BOX_W, ...children.map((c) => c.w)) + 2 * PAD;
  const h = children.reduce((sum, c) => sum + c.h, 0) + GAP_Y * Math.max(0, children.length - 1) + 2 * PAD + LABEL;
  return {
    w, h,
    draw(svg, x, y) {
      frame(svg, node, x, y, w, h);
      let cy = y + LABEL + PAD;
      const exits = [];
      for (const child of children) {
        const drawn = child.draw(svg, x + (w - child.w) / 2, cy);
        exits.push(drawn.out);
        cy += child.h + GAP_Y;
      }
      const mid = { x, y: y + h / 2 };
      return { in: mid, out: { x: x + w, y: mid.y }, exits: exits.length ? exits : [{ x: x + w, y: mid.y }] };
    },
  };
}

export function drawGraph(root) {
  const shape = layout(root);
  const margin = 10;
  const svg = el("svg", { class: "graph", width: shape.w + 2 * margin, height: shape.h + 2 * margin,
    viewBox: `0 0 ${shape.w + 2 * margin} ${shape.h + 2 * margin}`, "data-test": "graph" },
  el("defs", {}, el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
    el("path", { d: "M0,0 L10,5 L0,10 z", fill: "#94a3b8" }))));
  shape.draw(svg, margin, margin);
  return svg;
}
