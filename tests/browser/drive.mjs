// Drives the real ComfyUI frontend in headless Chromium (playwright-core) for tests/test_browser_workflows.py.
//
// Usage: node tests/browser/drive.mjs JOB.json   (or the job JSON on stdin)
// Job: {"url": "http://127.0.0.1:PORT", "screenshot_dir": "...", "timeout_ms": 120000,
//       "actions": [{"type": "...", ...}, ...]}
// Prints one JSON object: {"results": [{"type", "ok", "error"?, ...action fields}], "console_errors": [...]}.
// Every action runs even when an earlier one failed, so each test sees its own failure.
//
// Actions:
//   load_check  {workflows: [{name, json}]}      load each into the canvas; missing types, widget values, prompt
//   templates   {pack}                           list /workflow_templates[pack], fetch and open each
//   run         {name, workflow, set_widgets?, add_nodes?, screenshot?, expect_preview_nodes?}
//               load, edit widgets / add nodes in the page, press Run (app.queuePrompt), wait for the end,
//               report the page's preview state of the output nodes and the graph as queued
//   drop        {file: {filename, subfolder, type}, mime}  fetch the produced file from /view, clear the canvas,
//               drop it onto the canvas as a user would; report the restored graph
//   drop_outputs {from}                         drop every file the run action with id `from` produced
//   cancel      {workflow, set_widgets}          queue a long run, Cancel (api.interrupt) once sampling has
//               progressed, wait for execution_interrupted

import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "..", "..");
const BROWSER_CACHE = process.env.VRAMWISE_BROWSER_CACHE || path.join(REPO, ".cache", "browser");
const CHROMIUM = process.env.VRAMWISE_CHROMIUM || "/usr/bin/chromium";
const SETUP_HINT = "run `bash scripts/browser_setup.sh` (installs chromium and playwright-core)";

function fail(message) {
  process.stdout.write(JSON.stringify({ fatal: message }) + "\n");
  process.exit(2);
}

function loadPlaywright() {
  const require = createRequire(path.join(BROWSER_CACHE, "package.json"));
  try {
    return require("playwright-core");
  } catch (e) {
    fail(`playwright-core not found under ${BROWSER_CACHE}: ${SETUP_HINT}`);
  }
}

function readJob() {
  const arg = process.argv[2];
  const text = arg && arg !== "-" ? fs.readFileSync(arg, "utf8") : fs.readFileSync(0, "utf8");
  return JSON.parse(text);
}

// ---- in-page helpers (installed once per page as window.__vw) ----------------------------------------
function installHelpers() {
  const app = window.app;
  const api = window.comfyAPI?.api?.api ?? app.api;
  const events = [];
  for (const kind of ["execution_start", "execution_success", "execution_error", "execution_interrupted",
                      "executed", "progress", "execution_cached"]) {
    api.addEventListener(kind, (e) => events.push({ type: kind, detail: e.detail }));
  }

  function optionValues(w) {
    let v = w.options?.values;
    if (typeof v === "function") {
      try { v = v(w); } catch { v = undefined; }
    }
    return Array.isArray(v) ? v : null;
  }

  function graphState() {
    const graph = app.graph;
    const serialized = graph.serialize();
    const nodes = serialized.nodes.map((n) => {
      const live = graph.getNodeById(n.id);
      const combos = (live?.widgets || [])
        .filter((w) => w.type === "combo")
        .map((w) => ({ name: w.name, value: w.value, options: optionValues(w) }));
      return { id: n.id, type: n.type, widgets_values: n.widgets_values ?? null, combos,
               has_live_node: !!live, live_class: live?.constructor?.type ?? live?.type ?? null };
    });
    const links = (serialized.links || []).map((l) => Array.isArray(l) ? l.slice(0, 5) : [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot]);
    return { nodes, links };
  }

  function missingTypes() {
    const registered = window.LiteGraph.registered_node_types;
    return [...new Set(app.graph.serialize().nodes.map((n) => n.type).filter((t) => !registered[t]))];
  }

  async function load(workflow) {
    await app.loadGraphData(structuredClone(workflow), true, true, null);
    await new Promise((r) => setTimeout(r, 50));
  }

  function setWidgets(edits) {
    // edits: {nodeId: {widgetName: value}}
    for (const [id, values] of Object.entries(edits || {})) {
      const node = app.graph.getNodeById(Number(id));
      if (!node) throw new Error(`no node ${id}`);
      for (const [name, value] of Object.entries(values)) {
        const w = node.widgets?.find((x) => x.name === name);
        if (!w) throw new Error(`node ${id} has no widget ${name}`);
        w.value = value;
        w.callback?.(value, app.canvas, node);
      }
    }
    app.graph.setDirtyCanvas(true, true);
  }

  function addNodes(specs) {
    // specs: [{type, widgets: {name: value}, inputs: {inputName: [sourceNodeId, slot]}, pos}]
    const added = [];
    for (const spec of specs || []) {
      const node = window.LiteGraph.createNode(spec.type);
      if (!node) throw new Error(`cannot create ${spec.type}`);
      node.pos = spec.pos || [1250, 420];
      app.graph.add(node);
      for (const [name, value] of Object.entries(spec.widgets || {})) {
        const w = node.widgets?.find((x) => x.name === name);
        if (!w) throw new Error(`${spec.type} has no widget ${name}`);
        w.value = value;
      }
      for (const [name, [src, slot]] of Object.entries(spec.inputs || {})) {
        const target = node.inputs.findIndex((i) => i.name === name);
        if (target < 0) throw new Error(`${spec.type} has no input ${name}`);
        app.graph.getNodeById(src).connect(slot, node, target);
      }
      added.push(node.id);
    }
    app.graph.setDirtyCanvas(true, true);
    return added;
  }

  async function waitFor(pred, timeoutMs, what) {
    const end = Date.now() + timeoutMs;
    while (Date.now() < end) {
      const v = pred();
      if (v) return v;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
  }

  function endEvent(promptId) {
    return events.find((e) => ["execution_success", "execution_error", "execution_interrupted"].includes(e.type)
      && e.detail?.prompt_id === promptId);
  }

  async function queue() {
    const before = events.length;
    const res = await app.queuePrompt(0, 1);
    // queuePrompt resolves after the POST; the prompt id comes with execution_start.
    const start = await waitFor(() => events.slice(before).find((e) => e.type === "execution_start"), 60000,
      "execution_start after queuePrompt");
    return { queued: res, promptId: start.detail.prompt_id };
  }

  function previewState(nodeId) {
    // What the page shows on the output node: node.imgs (image outputs, drawn on the canvas) or the
    // "video-preview" DOM widget holding a <video> (video outputs); app.nodeOutputs holds the outputs behind both.
    const node = app.graph.getNodeById(Number(nodeId));
    const out = app.nodeOutputs?.[String(nodeId)] ?? null;
    const imgs = (node?.imgs || []).map((img) => ({ src: img.src, complete: img.complete, width: img.naturalWidth }));
    const widget = node?.widgets?.find((w) => w.name === "video-preview");
    const holder = node?.videoContainer || widget?.element;
    const videos = holder ? [...holder.querySelectorAll("video")] : [];
    const video = videos.map((v) => ({ src: v.currentSrc || v.src, ready: v.readyState, width: v.videoWidth, height: v.videoHeight }));
    return { output: out, imgs, video, video_widget: !!widget, widgets: (node?.widgets || []).map((w) => w.name) };
  }

  function previewShown(nodeId) {
    const p = previewState(nodeId);
    return !!p.output && (p.imgs.some((i) => i.complete && i.width > 0) || p.video.some((v) => v.ready >= 2 && v.width > 0));
  }

  window.__vw = { app, api, events, graphState, missingTypes, load, setWidgets, addNodes, waitFor, endEvent, queue, previewState, previewShown };
}

// ---- actions -----------------------------------------------------------------------------------------
async function actLoadCheck(page, action) {
  const out = [];
  for (const wf of action.workflows) {
    const r = await page.evaluate(async (workflow) => {
      const vw = window.__vw;
      await vw.load(workflow);
      const state = vw.graphState();
      const prompt = (await vw.app.graphToPrompt()).output;
      return { missing_types: vw.missingTypes(), state, prompt };
    }, wf.json);
    out.push({ name: wf.name, ...r });
  }
  return { workflows: out };
}

async function actTemplates(page, action) {
  return await page.evaluate(async (pack) => {
    const vw = window.__vw;
    const listing = await (await vw.api.fetchApi("/workflow_templates")).json();
    const names = listing[pack] || [];
    const opened = [];
    for (const name of names) {
      const res = await vw.api.fetchApi(`/workflow_templates/${encodeURIComponent(pack)}/${encodeURIComponent(name)}.json`);
      const entry = { name, status: res.status };
      if (res.ok) {
        const wf = await res.json();
        await vw.load(wf);
        entry.file_node_count = wf.nodes.length;
        entry.node_count = vw.app.graph.serialize().nodes.length;
        entry.missing_types = vw.missingTypes();
      }
      opened.push(entry);
    }
    return { listing, names, opened };
  }, action.pack);
}

async function actRun(page, action, job) {
  const r = await page.evaluate(async ({ action, timeoutMs }) => {
    const vw = window.__vw;
    await vw.load(action.workflow);
    vw.setWidgets(action.set_widgets);
    const added = vw.addNodes(action.add_nodes);
    const queuedGraph = vw.graphState();
    const { promptId } = await vw.queue();
    const end = await vw.waitFor(() => vw.endEvent(promptId), timeoutMs, "the run to end");
    const executed = vw.events.filter((e) => e.type === "executed" && e.detail?.prompt_id === promptId)
      .map((e) => ({ node: String(e.detail.node ?? e.detail.display_node), output: e.detail.output }));
    const outputNodes = [...new Set(executed.map((e) => e.node))];
    let previews = {};
    let previewError = null;
    try {
      // The output node's preview: the frontend keeps the outputs in app.nodeOutputs and loads node.imgs.
      const wanted = action.expect_preview_nodes ?? executed.filter((e) => e.output?.images?.length).map((e) => e.node);
      await vw.waitFor(() => wanted.every((id) => vw.previewShown(id)), 20000, `the previews of nodes ${wanted} to load`);
    } catch (e) {
      previewError = String(e);
    }
    for (const id of outputNodes) previews[id] = vw.previewState(id);
    return { prompt_id: promptId, end: end.type, end_detail: end.detail, executed, previews, preview_error: previewError,
             queued_graph: queuedGraph, added };
  }, { action, timeoutMs: job.timeout_ms || 180000 });
  if (action.screenshot) {
    await page.evaluate(() => {
      // Frame the whole graph (node bodies plus title bars) in the visible canvas.
      const { app } = window.__vw;
      const nodes = app.graph._nodes || app.graph.nodes || [];
      if (!nodes.length) return;
      const minX = Math.min(...nodes.map((n) => n.pos[0])), minY = Math.min(...nodes.map((n) => n.pos[1] - 40));
      const maxX = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])), maxY = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
      const el = app.canvas.canvas;
      const scale = Math.min(1, (el.clientWidth - 200) / (maxX - minX), (el.clientHeight - 200) / (maxY - minY));
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [-minX + 90 / scale, -minY + 120 / scale];
      app.graph.setDirtyCanvas(true, true);
    });
    await page.waitForTimeout(500);
    const file = path.join(job.screenshot_dir, action.screenshot);
    fs.mkdirSync(job.screenshot_dir, { recursive: true });
    await page.screenshot({ path: file });
    r.screenshot = file;
  }
  return r;
}

async function actDrop(page, action) {
  return await page.evaluate(async ({ file, mime }) => {
    const vw = window.__vw;
    const params = new URLSearchParams({ filename: file.filename, subfolder: file.subfolder || "", type: file.type || "output" });
    const res = await vw.api.fetchApi(`/view?${params}`);
    if (!res.ok) throw new Error(`/view answered ${res.status}`);
    const blob = await res.blob();
    const f = new File([blob], file.filename, { type: mime || blob.type });
    // Start from an empty canvas so whatever is there afterwards came from the file.
    vw.app.graph.clear();
    const before = vw.app.graph.serialize().nodes.length;
    const dt = new DataTransfer();
    dt.items.add(f);
    const target = document.querySelector("canvas#graph-canvas") || document.body;
    const rect = target.getBoundingClientRect();
    const at = { clientX: rect.left + rect.width / 2, clientY: rect.top + rect.height / 2 };
    for (const kind of ["dragenter", "dragover", "drop"]) {
      target.dispatchEvent(new DragEvent(kind, { bubbles: true, cancelable: true, dataTransfer: dt, ...at }));
    }
    await vw.waitFor(() => vw.app.graph.serialize().nodes.length > 0, 20000, "the dropped file to load a graph");
    await new Promise((r) => setTimeout(r, 300));
    return { bytes: blob.size, mime: f.type, nodes_before: before, restored: vw.graphState(), missing_types: vw.missingTypes() };
  }, action);
}

// Drops every file a previous run action ({from: its id}) produced, one at a time.
async function actDropOutputs(page, action, job, results) {
  const run = results.find((r) => r.id === action.from);
  if (!run || !run.ok) throw new Error(`no successful run '${action.from}' to take the files from`);
  const drops = [];
  for (const ex of run.executed) {
    for (const file of ex.output?.images || []) {
      const mime = /\.mp4$/i.test(file.filename) ? "video/mp4" : /\.webm$/i.test(file.filename) ? "video/webm"
        : /\.webp$/i.test(file.filename) ? "image/webp" : /\.png$/i.test(file.filename) ? "image/png" : "";
      const r = await actDrop(page, { file, mime });
      drops.push({ node: ex.node, file, ...r });
    }
  }
  return { drops, original: run.queued_graph };
}

async function actCancel(page, action, job) {
  return await page.evaluate(async ({ action, timeoutMs }) => {
    const vw = window.__vw;
    await vw.load(action.workflow);
    vw.setWidgets(action.set_widgets);
    const { promptId } = await vw.queue();
    const startedAt = Date.now();
    // Cancel once the sampler is visibly working (progress events), like a user watching the bar.
    await vw.waitFor(() => vw.events.some((e) => e.type === "progress" && e.detail?.prompt_id === promptId
      && e.detail.value >= (action.cancel_after_steps || 2)), timeoutMs, "sampling progress");
    const progressBefore = Math.max(...vw.events.filter((e) => e.type === "progress" && e.detail?.prompt_id === promptId).map((e) => e.detail.value));
    await vw.api.interrupt(promptId);
    const interruptedAt = Date.now();
    const end = await vw.waitFor(() => vw.endEvent(promptId), 60000, "the run to stop after Cancel");
    const steps = vw.events.filter((e) => e.type === "progress" && e.detail?.prompt_id === promptId);
    return { prompt_id: promptId, end: end.type, progress_at_cancel: progressBefore,
             max_progress: Math.max(...steps.map((e) => e.detail.value)), progress_max: steps.at(-1)?.detail?.max ?? null,
             seconds_to_stop: (Date.now() - interruptedAt) / 1000, seconds_running: (interruptedAt - startedAt) / 1000 };
  }, { action, timeoutMs: job.timeout_ms || 180000 });
}

const ACTIONS = { load_check: actLoadCheck, templates: actTemplates, run: actRun, drop: actDrop, drop_outputs: actDropOutputs, cancel: actCancel };

async function main() {
  const job = readJob();
  if (!fs.existsSync(CHROMIUM)) fail(`no Chromium at ${CHROMIUM}: ${SETUP_HINT}`);
  const { chromium } = loadPlaywright();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
  });
  const consoleErrors = [];
  const results = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
    page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text().slice(0, 500)); });
    page.on("pageerror", (e) => consoleErrors.push(`pageerror: ${String(e).slice(0, 500)}`));
    page.setDefaultTimeout(job.timeout_ms || 180000);
    const t0 = Date.now();
    await page.goto(job.url, { waitUntil: "load" });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types
      && Object.keys(window.LiteGraph.registered_node_types).length > 10 && window.app.canvas, null, { timeout: 120000 });
    await page.evaluate(installHelpers);
    const frontendSeconds = (Date.now() - t0) / 1000;
    for (const action of job.actions) {
      const t = Date.now();
      try {
        const fn = ACTIONS[action.type];
        if (!fn) throw new Error(`unknown action ${action.type}`);
        const r = await fn(page, action, job, results);
        results.push({ type: action.type, id: action.id ?? null, ok: true, seconds: (Date.now() - t) / 1000, ...r });
      } catch (e) {
        results.push({ type: action.type, id: action.id ?? null, ok: false, seconds: (Date.now() - t) / 1000, error: String(e?.stack || e) });
      }
    }
    process.stdout.write(JSON.stringify({ frontend_seconds: frontendSeconds, results, console_errors: consoleErrors }) + "\n");
  } finally {
    await browser.close();
  }
}

main().catch((e) => fail(String(e?.stack || e)));
