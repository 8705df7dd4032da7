// Checks, in headless Chromium, that every mermaid diagram of the built site renders as
// an SVG from the site's own files: `make docs` runs it after `mkdocs build`.
//
//   NODE_PATH=build/docs-npm/node_modules node docs/npm/check-diagrams.cjs SITE_DIR CHROMIUM
//
// The site is served from 127.0.0.1 by this script; every request elsewhere (unpkg, a
// font CDN) is refused and fails the check, so a diagram that only renders with the
// network fails here too. Each page with a `<pre class="mermaid">` block is opened; the
// theme replaces each block with a <div class="mermaid"> holding the SVG in a closed
// shadow root, which the DevTools protocol reads (DOM.getDocument with pierce). The
// protocol page must show its sequence and state diagrams.
"use strict";

const fs = require("node:fs");
const http = require("node:http");
const path = require("node:path");
const { chromium } = require("playwright-core");

const [siteDir, executablePath] = process.argv.slice(2);
if (!siteDir || !executablePath) {
  console.error("usage: check-diagrams.cjs SITE_DIR CHROMIUM");
  process.exit(2);
}

// Pages that must have these diagrams (by the SVG's aria-roledescription).
const REQUIRED = { "protocol/": ["sequence", "stateDiagram"] };
// The first word of a diagram's source -> the SVG's aria-roledescription (mermaid 11).
const ROLE = {
  sequenceDiagram: "sequence",
  "stateDiagram-v2": "stateDiagram",
  flowchart: "flowchart-v2",
};
const WAIT_MS = 30000;
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript",
  ".css": "text/css",
  ".json": "application/json",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".txt": "text/plain; charset=utf-8",
  ".xml": "application/xml",
};

// {"protocol/": ["sequenceDiagram", "stateDiagram-v2"], ...}, read from the built HTML.
function diagramPages(dir, base = "") {
  const found = {};
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      Object.assign(found, diagramPages(full, `${base}${entry.name}/`));
    } else if (entry.name === "index.html") {
      const html = fs.readFileSync(full, "utf8");
      const blocks = html.matchAll(/<pre class="mermaid"><code>([^\s<]+)/g);
      const kinds = [...blocks].map((m) => m[1]);
      if (kinds.length) found[base] = kinds;
    }
  }
  return found;
}

// A static file server for the site on 127.0.0.1 (a free port).
function serve(root) {
  const server = http.createServer((req, res) => {
    let file = path.join(root, decodeURIComponent(new URL(req.url, "http://x").pathname));
    if (!file.startsWith(root)) file = root;
    if (fs.existsSync(file) && fs.statSync(file).isDirectory()) {
      file = path.join(file, "index.html");
    }
    fs.readFile(file, (err, body) => {
      if (err) {
        res.writeHead(404).end();
        return;
      }
      const type = TYPES[path.extname(file)] || "application/octet-stream";
      res.writeHead(200, { "Content-Type": type }).end(body);
    });
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

const attributes = (node) => {
  const list = node.attributes || [];
  const out = {};
  for (let i = 0; i < list.length; i += 2) out[list[i]] = list[i + 1];
  return out;
};
const below = (node) => [
  ...(node.children || []),
  ...(node.shadowRoots || []),
  ...(node.contentDocument ? [node.contentDocument] : []),
];

// For each <div class="mermaid"> of a DOM.getDocument tree, in document order: the
// <svg> elements under its shadow root, as {role, parts}.
function renderedDiagrams(node, out = []) {
  const classes = (attributes(node).class || "").split(" ");
  if (node.nodeName === "DIV" && classes.includes("mermaid")) {
    const svgs = [];
    const walk = (n) => {
      if (n.nodeName.toLowerCase() === "svg") {
        svgs.push({ role: attributes(n)["aria-roledescription"], parts: below(n).length });
      }
      below(n).forEach(walk);
    };
    (node.shadowRoots || []).forEach(walk);
    out.push(svgs);
  }
  for (const child of below(node)) renderedDiagrams(child, out);
  return out;
}

async function checkPage(context, base, page, kinds, problems) {
  const tab = await context.newPage();
  const errors = [];
  const scripts = [];
  let failed;
  const failure = new Promise((resolve) => (failed = resolve));
  tab.on("pageerror", (e) => {
    errors.push(String(e));
    failed(); // a diagram that cannot load or parse never renders: stop waiting
  });
  tab.on("request", (r) => r.resourceType() === "script" && scripts.push(r.url()));
  await tab.goto(base + page, { waitUntil: "load" });
  const rendered = tab.waitForFunction(
    (n) => document.querySelectorAll("div.mermaid").length >= n,
    kinds.length,
    { timeout: WAIT_MS },
  );
  rendered.catch(() => {}); // timed out or cut short: the count below says what rendered
  await Promise.race([rendered.catch(() => {}), failure]);
  if (errors.length) await tab.waitForTimeout(500); // let the other diagrams finish

  const cdp = await context.newCDPSession(tab);
  const { root } = await cdp.send("DOM.getDocument", { depth: -1, pierce: true });
  const diagrams = renderedDiagrams(root);
  if (diagrams.length !== kinds.length) {
    problems.push(`${page}: ${kinds.length} diagram(s) in the HTML, ${diagrams.length} rendered`);
  }
  kinds.forEach((kind, i) => {
    const want = ROLE[kind] || kind;
    const svg = diagrams[i] && diagrams[i][0];
    if (!svg || !svg.parts) {
      problems.push(`${page}: diagram ${i + 1} (${kind}) is not an SVG in the page`);
    } else if (svg.role !== want) {
      problems.push(`${page}: diagram ${i + 1} (${kind}) rendered as ${svg.role}, not ${want}`);
    }
  });
  if (!scripts.some((u) => /\/assets\/javascripts\/mermaid-[^/]*\.min\.js$/.test(u))) {
    problems.push(`${page}: mermaid was not loaded from the site's assets/javascripts/`);
  }
  for (const e of errors) problems.push(`${page}: script error: ${e}`);
  await tab.close();
  return `${page} (${diagrams.map((d) => (d[0] ? d[0].role : "no svg")).join(", ")})`;
}

async function main() {
  const root = path.resolve(siteDir);
  const pages = diagramPages(root);
  const problems = [];
  for (const [page, roles] of Object.entries(REQUIRED)) {
    const have = (pages[page] || []).map((k) => ROLE[k] || k);
    for (const role of roles) {
      if (!have.includes(role)) problems.push(`${page}: no ${role} diagram in the HTML`);
    }
  }
  const server = await serve(root);
  const base = `http://127.0.0.1:${server.address().port}/`;
  const browser = await chromium.launch({ executablePath, timeout: 60000 });
  const version = browser.version();
  const outside = [];
  const report = [];
  try {
    const context = await browser.newContext();
    await context.route("**/*", (route) => {
      const url = route.request().url();
      if (url.startsWith(base)) return route.continue();
      outside.push(url);
      return route.abort("blockedbyclient");
    });
    for (const [page, kinds] of Object.entries(pages)) {
      report.push(await checkPage(context, base, page, kinds, problems));
    }
  } finally {
    await browser.close();
    server.close();
  }
  for (const url of outside) problems.push(`a page asked for ${url}, outside the site`);
  if (problems.length) {
    console.error(`docs: the diagrams do not render from the site alone:\n  ${problems.join("\n  ")}`);
    process.exit(1);
  }
  console.log(
    `docs: every diagram rendered as SVG in headless Chromium ${version}, ` +
      `with no request leaving the site: ${report.join("; ")}`,
  );
}

main().catch((e) => {
  console.error(`docs: the diagram check could not run: ${e.stack || e}`);
  process.exit(1);
});
