// The lung and heart outlines on the review and study pages (SVG groups #lungs and #heart).
const SVG_NS = "http://www.w3.org/2000/svg";

// An outline whose mask failed its quality check is drawn dashed and grey, with the reason on hover.
function untrusted(reasons) {
  for (const [id, word] of [["lungs", "lung mask"], ["heart", "heart mask"]]) {
    const reason = reasons.find((r) => r.startsWith(word));
    const g = document.getElementById(id);
    g.setAttribute("stroke-dasharray", reason ? "8 6" : "");
    g.setAttribute("stroke", reason ? "#9aa0a6" : (id === "lungs" ? "#20e080" : "#ff5050"));
    g.dataset.untrusted = reason || "";
    g.querySelector("title")?.remove();
    if (reason) { const t = document.createElementNS(SVG_NS, "title"); t.textContent = reason; g.prepend(t); }
  }
}

function polygons(group, list) {
  group.replaceChildren(...list.map((points) => {
    const p = document.createElementNS(SVG_NS, "polygon");
    p.setAttribute("points", points.map((xy) => xy.join(",")).join(" "));
    return p;
  }));
}
