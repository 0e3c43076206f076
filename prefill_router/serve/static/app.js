// The gateway dashboard: plain JavaScript against the gateway's own API, no build step, nothing from a CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const keyField = $("key");
keyField.value = localStorage.getItem("prefill-router-key") || "";
keyField.addEventListener("change", () => {
  localStorage.setItem("prefill-router-key", keyField.value);
  loadModels();
  refresh();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyField.value) h.Authorization = "Bearer " + keyField.value;
  return h;
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error ? data.error.message : "HTTP " + response.status);
  return data;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

const usd = (v) => (v === null || v === undefined ? "n/a" : "$" + Number(v).toFixed(6));

// --- playground --------------------------------------------------------------------------------------
let answerId = null;

function showDecision(d) {
  $("decision").hidden = false;
  $("chosen").textContent = d.target;
  $("policy").textContent = d.policy || "";
  $("latency").textContent = Number(d.latency_ms).toFixed(1);
  const body = $("probabilities").querySelector("tbody");
  body.replaceChildren();
  for (const [target, p] of Object.entries(d.probabilities || {})) {
    const row = document.createElement("tr");
    row.dataset.target = target;
    if (target === d.target) row.className = "chosen";
    cell(row, target);
    cell(row, p.toFixed(3), "num p");
    cell(row, usd((d.estimated_cost || {})[target]), "num cost");
    body.appendChild(row);
  }
}

async function streamAnswer(model, messages) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(data.error ? data.error.message : "HTTP " + response.status);
  }
  answerId = response.headers.get("x-router-request-id");
  $("answered-by").textContent = response.headers.get("x-router-target");
  const answer = $("answer");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const line = event.split("\n").find((l) => l.startsWith("data: "));
      if (!line || line === "data: [DONE]") continue;
      const data = JSON.parse(line.slice(6));
      for (const choice of data.choices || []) {
        if (choice.delta && choice.delta.content) {
          answer.textContent += choice.delta.content;
          answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        }
      }
    }
  }
}

$("send").addEventListener("click", async () => {
  const messages = [{ role: "user", content: $("prompt").value }];
  const model = $("model").value;
  $("error").textContent = "";
  $("answer").textContent = "";
  $("answer").dataset.chunks = "0";
  $("answer-state").textContent = "routing";
  $("feedback-state").textContent = "";
  for (const b of document.querySelectorAll("button.feedback")) b.disabled = true;
  $("send").disabled = true;
  try {
    showDecision(await api("/v1/route", { model, messages }));
    $("answer-state").textContent = "streaming";
    await streamAnswer(model, messages);
    $("answer-state").textContent = "done";
    for (const b of document.querySelectorAll("button.feedback")) b.disabled = !answerId;
  } catch (err) {
    $("error").textContent = err.message;
    $("answer-state").textContent = "failed";
  } finally {
    $("send").disabled = false;
    refresh();
  }
});

async function sendFeedback(id, score) {
  await api("/v1/feedback", { id, score });
  refresh();
}

for (const [button, score] of [["good", 1], ["bad", 0]]) {
  $(button).addEventListener("click", async () => {
    try {
      await sendFeedback(answerId, score);
      $("feedback-state").textContent = "recorded (" + score + ")";
      for (const b of document.querySelectorAll("button.feedback")) b.disabled = true;
    } catch (err) {
      $("feedback-state").textContent = err.message;
    }
  });
}

// --- live figures and recent decisions -----------------------------------------------------------------
function showStats(s) {
  if (!s.targets) {  // a client key: its own figures only
    $("savings").textContent = "Key " + s.key + ": " + s.requests + " requests answered, spent " + usd(s.usd) + ".";
    return;
  }
  $("since").textContent = "since " + new Date(s.since_unix * 1000).toLocaleTimeString();
  const share = $("share");
  share.replaceChildren();
  const spend = $("spend").querySelector("tbody");
  spend.replaceChildren();
  for (const [target, t] of Object.entries(s.targets)) {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.dataset.target = target;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = target;
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = Math.round(t.share * 200) + "px";
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = (100 * t.share).toFixed(0) + "%";
    bar.append(name, fill, pct);
    share.appendChild(bar);
    const row = document.createElement("tr");
    row.dataset.target = target;
    cell(row, target);
    cell(row, String(t.requests), "num");
    cell(row, String(t.prompt_tokens), "num");
    cell(row, String(t.completion_tokens), "num");
    cell(row, usd(t.usd), "num usd");
    spend.appendChild(row);
  }
  const r = s.routed;
  $("savings").textContent = "Routed requests: " + r.requests + ", spent " + usd(r.usd) + " against " +
    usd(r.always_best_usd) + " for always " + s.best_target + ": saved " + usd(r.savings_usd) +
    " (" + (100 * r.savings_share).toFixed(1) + "%).";
}

let shownDecisions = "";

function showDecisions(list) {
  const text = JSON.stringify(list);
  if (text === shownDecisions) return;  // unchanged: keep the rows (and the button under the pointer)
  shownDecisions = text;
  const body = $("decisions").querySelector("tbody");
  body.replaceChildren();
  for (const d of list) {
    const row = document.createElement("tr");
    row.dataset.id = d.id;
    cell(row, new Date(d.unix * 1000).toLocaleTimeString());
    cell(row, d.prompt || "");
    cell(row, d.chosen + (d.routed ? "" : " (named)"));
    cell(row, d.answered_by);
    cell(row, d.probabilities ? d.probabilities[d.chosen].toFixed(3) : "", "num");
    cell(row, usd(d.usd), "num");
    const fb = cell(row, "", "feedback-cell");
    if (d.feedback) {
      fb.textContent = "score " + d.feedback.score;
    } else if (d.routed) {
      for (const [label, score] of [["good", 1], ["bad", 0]]) {
        const b = document.createElement("button");
        b.textContent = label;
        b.className = "score-" + score;
        b.addEventListener("click", () => sendFeedback(d.id, score).catch((err) => { fb.textContent = err.message; }));
        fb.appendChild(b);
      }
    }
    body.appendChild(row);
  }
}

async function refresh() {
  try {
    const [stats, decisions] = await Promise.all([api("/v1/stats"), api("/v1/decisions?limit=20")]);
    showStats(stats);
    showDecisions(decisions.data);
    $("status").textContent = "live: " + stats.requests + " requests answered" + (stats.targets ? "" : " (this key)");
  } catch (err) {
    $("status").textContent = err.message;
  }
}

async function loadModels() {
  try {
    const models = await api("/v1/models");
    const select = $("model");
    select.replaceChildren();
    for (const m of models.data) {
      if (m.owned_by !== "prefill-router") continue;  // router aliases only: a target name is not routed
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      select.appendChild(option);
    }
  } catch (err) {
    $("status").textContent = err.message;
  }
}

loadModels();
refresh();
setInterval(refresh, 2000);
