// The overview's cards and charts refresh themselves from /api/overview every 5 s. Values go in with
// textContent only: nothing from the server's JSON is ever parsed as HTML.
(function () {
  "use strict";
  const root = document.querySelector("[data-refresh]");
  if (!root) return;
  const url = root.getAttribute("data-refresh");

  // As node.units.size, which renders the page first.
  function size(n) {
    const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let v = Number(n) || 0, i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return i === 0 ? v.toFixed(0) + " bytes" : v.toFixed(1) + " " + units[i];
  }

  function lookup(ov, key) {
    if (key.startsWith("dest.")) {
      const rest = key.slice(5), dot = rest.lastIndexOf(".");
      const name = rest.slice(0, dot), state = rest.slice(dot + 1);
      const d = (ov.destinations || []).find((x) => x.name === name);
      if (!d) return 0;
      if (state === "delivered") {
        return (d.states.delivered || 0) + (d.states.committed || 0) + (d.states["awaiting commitment"] || 0);
      }
      return d.states[state] || 0;
    }
    return key.split(".").reduce((o, k) => (o == null ? undefined : o[k]), ov);
  }

  function chart(id, points, field) {
    const svg = document.getElementById(id);
    if (!svg) return;
    const values = points.map((p) => p[field]);
    const max = Math.max(1, ...values);
    const n = Math.max(values.length - 1, 1);
    const coords = values.map((v, i) => (i * 300 / n).toFixed(1) + "," + (58 - v / max * 56).toFixed(1));
    let line = svg.querySelector("polyline");
    if (!line) {
      line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      svg.appendChild(line);
    }
    line.setAttribute("points", coords.join(" "));
  }

  function apply(ov) {
    root.ownerDocument.querySelectorAll("[data-k]").forEach((el) => {
      const key = el.getAttribute("data-k"), fmt = el.getAttribute("data-fmt");
      if (fmt === "usedpct") {
        const d = ov.disk || {};
        el.style.width = d.total_bytes ? (100 * d.used_bytes / d.total_bytes).toFixed(1) + "%" : "0";
        return;
      }
      if (key === "rate.received" || key === "rate.sent") {
        const last = (ov.rates || []).slice(-1)[0];
        const v = last ? last[key === "rate.received" ? "received_per_s" : "sent_per_s"] : 0;
        el.textContent = "now " + v.toFixed(1);
        return;
      }
      const v = lookup(ov, key);
      if (v === undefined) return;
      el.textContent = fmt === "size" ? size(v) : String(v);
    });
    chart("chart-received", ov.rates || [], "received_per_s");
    chart("chart-sent", ov.rates || [], "sent_per_s");
  }

  function refresh() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : null))
      .then((ov) => { if (ov) apply(ov); })
      .catch(() => {});
  }
  refresh();
  setInterval(refresh, 5000);
})();


// Every page's live regions ([data-live="BLOCK"]) follow the data: /api/changes is polled every 2.5 s;
// when its version differs from the one the page was rendered at (main[data-version]), each region is
// fetched again as the server renders it (the same page, only that block: header X-Live) and swapped in.
// The HTML is the node's own autoescaped template output, as in the first load; a swapped-in <script>
// would not run (and the CSP allows only this file).
(function () {
  "use strict";
  const main = document.querySelector("main[data-version]");
  const regions = document.querySelectorAll("[data-live]");
  if (!main || !regions.length) return;
  let version = main.getAttribute("data-version");
  let busy = false;

  function refetch(region) {
    return fetch(window.location.href, {
      credentials: "same-origin",
      headers: { "X-Live": region.getAttribute("data-live") },
    })
      .then((r) => {
        if (r.redirected) {  // the session ended: the server sent the login page; show it as a page
          window.location.reload();
          return Promise.reject(new Error("logged out"));
        }
        return r.ok ? r.text() : Promise.reject(new Error("HTTP " + r.status));
      })
      .then((html) => {
        region.innerHTML = html;
        region.dispatchEvent(new CustomEvent("live-updated", { bubbles: true }));
      });
  }

  function poll() {
    if (busy || document.hidden) return;
    busy = true;
    fetch("/api/changes", { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : null))
      .then((c) => {
        if (!c || c.version === version) return null;
        // Take the new version only once every region shows data at least that new.
        return Promise.all([...regions].map(refetch)).then(() => {
          version = c.version;
          main.setAttribute("data-version", version);
        });
      })
      .catch(() => {})
      .finally(() => { busy = false; });
  }
  setInterval(poll, 2500);
})();

// A form with data-confirm asks first; nothing is sent unless the operator says yes.
document.addEventListener("submit", (e) => {
  const message = e.target.getAttribute && e.target.getAttribute("data-confirm");
  if (message && !window.confirm(message)) e.preventDefault();
});
