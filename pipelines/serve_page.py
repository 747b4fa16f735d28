"""The page `featstore serve` answers at `/`: HTML + inline JS, no external resources.

Every value from the store is put in the page with `textContent` or as an encoded URL, never as HTML.
"""

from __future__ import annotations

import json

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>featstore</title>
<style>
body { font-family: sans-serif; margin: 1.5em; max-width: 1100px; }
form, #drop { margin: .5em 0; } input[type=text] { width: 28em; }
#drop { border: 2px dashed #999; padding: 1em; color: #555; }
#drop.over { background: #eef; }
#hits { display: flex; flex-wrap: wrap; gap: 12px; list-style: none; padding: 0; }
#hits li { width: 170px; font-size: 12px; }
#hits img { width: 160px; height: 160px; object-fit: contain; background: #eee; display: block; }
.uid { font-family: monospace; } .error { color: #b00; } #plots img { max-width: 100%; }
</style></head>
<body>
<h1>featstore</h1>
<p>Store <span id="store"></span> (read-only)</p>
<form id="q">
  <label>feature set <select id="set" name="set"></select></label>
  <input id="text" type="text" name="text" placeholder="a text query, or uid:SAMPLE_UID" autofocus>
  <label>k <input id="k" type="number" name="k" value="8" min="1" max="100" style="width:4em"></label>
  <button id="go" type="submit">search</button>
</form>
<div id="drop">or drop an image here</div>
<p id="status" role="status"></p>
<ol id="hits"></ol>
<h2>Summary plots</h2>
<div id="plots"></div>
<script>
"use strict";
const DEFAULT_SET = __DEFAULT__;
const $ = (id) => document.getElementById(id);
let sets = [];

function status(msg, isError) {
  $("status").textContent = msg;
  $("status").className = isError ? "error" : "";
}

function showPlots() {
  const box = $("plots");
  box.replaceChildren();
  const s = sets.find((x) => x.name === $("set").value);
  if (!s || !s.plots.length) { box.textContent = "no summary plots for this feature set (featstore inspect --store STORE --plots draws them)"; return; }
  for (const file of s.plots) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "/plots/" + encodeURIComponent(s.name) + "/" + encodeURIComponent(file);
    img.alt = file;
    const cap = document.createElement("figcaption");
    cap.textContent = file;
    fig.append(img, cap);
    box.append(fig);
  }
}

function showHits(hits) {
  const list = $("hits");
  list.replaceChildren();
  hits.forEach((h, i) => {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.uid = h.uid;
    const img = document.createElement("img");
    img.src = "/thumb/" + h.row;
    img.alt = h.uid;
    const uid = document.createElement("div");
    uid.className = "uid";
    uid.textContent = (i + 1) + ". " + h.uid + "  (" + h.score.toFixed(3) + ")";
    const cap = document.createElement("div");
    cap.className = "caption";
    cap.textContent = h.caption || h.source_ref || "";
    li.append(img, uid, cap);
    list.append(li);
  });
  status(hits.length + " hits", false);
}

async function answer(resp) {
  const body = await resp.json();
  if (!resp.ok) { $("hits").replaceChildren(); status(body.error || resp.statusText, true); return; }
  showHits(body);
}

function params() {
  const p = new URLSearchParams({ set: $("set").value, k: $("k").value });
  const t = $("text").value.trim();
  if (t.startsWith("uid:")) p.set("uid", t.slice(4)); else p.set("text", t);
  return p;
}

$("q").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  status("searching...", false);
  await answer(await fetch("/api/query?" + params()));
});

const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  const file = ev.dataTransfer.files[0];
  if (!file) return;
  status("searching with " + file.name + "...", false);
  const p = new URLSearchParams({ set: $("set").value, k: $("k").value });
  await answer(await fetch("/api/query?" + p, { method: "POST", body: file }));
});

$("set").addEventListener("change", showPlots);

fetch("/api/sets").then((r) => r.json()).then((info) => {
  $("store").textContent = info.store;
  sets = info.sets;
  for (const s of sets) {
    const opt = document.createElement("option");
    opt.value = s.name;
    opt.textContent = s.name + " (" + s.field + (s.indexed ? ", indexed" : ", not indexed") + ")";
    opt.disabled = !s.indexed;
    $("set").append(opt);
  }
  $("set").value = DEFAULT_SET;
  showPlots();
  document.body.dataset.ready = "1";
});
</script>
</body></html>
"""


def page(default_set: str) -> str:
    """The page, with the default feature set (JSON in the script; `<` escaped so it cannot close it)."""
    return PAGE.replace("__DEFAULT__", json.dumps(default_set).replace("<", "\\u003c"))


__all__ = ["page"]
