// The chat page: talks to this server's /v1/chat/completions (streaming), renders replies as sanitised Markdown,
// and shows what each reply cost: its FLOPs and, per token, the width each layer ran at (the compute mode's
// choice, or its exit layer or loops; hover a token). Nothing here loads from outside the server.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} as sent to the API
let modelId = null;
let contextLength = 256;
let busy = false;

function markdown(text) {
  return DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }));
}

function formatFlops(value) {
  const units = [["P", 1e15], ["T", 1e12], ["G", 1e9], ["M", 1e6]];
  for (const [unit, size] of units) if (value >= size) return `${(value / size).toFixed(2)} ${unit}FLOPs`;
  return `${Math.round(value)} FLOPs`;
}

async function loadModel() {
  const response = await fetch("/v1/models");
  const data = (await response.json()).data[0];
  modelId = data.id;
  contextLength = data.max_model_len;
  $("model-name").textContent = `${data.id} · context ${data.max_model_len}`;
  const select = $("mode");
  const modes = Object.entries(data.compute_modes || {});
  for (const [name, width] of [...modes, ["full", null]]) {
    const option = document.createElement("option");
    option.value = name === "full" ? "" : name;
    option.textContent = width === null ? "full" : `${name} (${width})`;
    select.appendChild(option);
  }
  select.value = "";
  for (const draft of data.speculative_drafts || []) {
    const option = document.createElement("option");
    option.value = option.textContent = draft;
    $("draft").appendChild(option);
  }
}

function addMessage(role, text, index) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "user") body.textContent = text; else body.innerHTML = markdown(text);
  box.appendChild(body);
  const meta = document.createElement("div");
  meta.className = "meta";
  box.appendChild(meta);
  if (role === "user") {
    const edit = document.createElement("button");
    edit.type = "button";
    edit.textContent = "edit";
    edit.addEventListener("click", () => editFrom(index));
    meta.appendChild(edit);
  }
  $("messages").appendChild(box);
  box.scrollIntoView({ block: "end" });
  return { box, body, meta };
}

function redraw() {
  $("messages").replaceChildren();
  history.forEach((m, i) => {
    const shown = addMessage(m.role, m.content, i);
    if (m.usage) finishReply(shown, m.usage, m.tokens);
  });
}

function finishReply(reply, usage, tokens) {
  // a reply's cost, its regenerate button and where its compute went
  const cost = document.createElement("span");
  cost.setAttribute("data-testid", "flops");
  cost.textContent = `${usage.completion_tokens} tokens · ${formatFlops(usage.flops)}`;
  const drafted = usage.compute && usage.compute.speculative;
  if (drafted) cost.textContent += ` · draft ${drafted.draft}: ${drafted.accepted} of ${drafted.drafted} accepted`;
  reply.meta.appendChild(cost);
  const again = document.createElement("button");
  again.type = "button";
  again.textContent = "regenerate";
  again.addEventListener("click", () => regenerate(reply.box));
  reply.meta.appendChild(again);
  showTokens(reply.meta, tokens, usage.compute);
}

function regenerate(box) {
  // the reply in `box` and everything after it go; the model answers the same history again
  if (busy) return;
  const index = [...$("messages").children].indexOf(box);
  history.splice(index);
  send(null);
}

function editFrom(index) {
  if (busy) return;
  $("input").value = history[index].content;
  history.splice(index);
  redraw();
  $("input").focus();
}

function widthColour(fraction) {
  // narrow = pale, full = saturated: the share of the full width each token's attention layers ran at
  const lightness = 92 - 40 * fraction;
  return `hsl(210, 70%, ${lightness}%)`;
}

function showTokens(meta, tokens, compute) {
  // each token coloured by the compute that produced it: its exit layer (early exit), its iterations (a looped
  // model's adaptive exit), or the share of full width its attention layers ran at (the compute mode)
  if (!compute || !tokens.length) return;
  const blocks = compute.blocks || "";
  const widths = compute.layer_widths || [];
  const full = Math.max(...widths, 1);
  const attention = widths.filter((_, i) => blocks[i] === "T");
  const widthShare = attention.length ? attention.reduce((a, b) => a + b, 0) / (attention.length * full) : 1;
  const layers = widths.map((w, i) => `${i}:${blocks[i] || "?"}@${w}`).join(" ");
  const exits = compute.token_exit_layers, loops = compute.token_loops;
  const mostLoops = loops ? Math.max(...loops, 1) : 1;
  const view = document.createElement("div");
  view.className = "tokens";
  view.setAttribute("data-testid", "token-view");
  tokens.forEach((token, i) => {
    const span = document.createElement("span");
    span.textContent = token;
    let share = widthShare, title = compute.loops ? `${compute.loops} loops` : `layer widths ${layers}`;
    if (exits && i < exits.length) {
      share = exits[i] / blocks.length;
      title = exits[i] >= blocks.length ? "ran every layer" : `exited after layer ${exits[i]} of ${blocks.length}`;
    } else if (loops && i < loops.length) {
      share = loops[i] / mostLoops;
      title = `${loops[i]} loops`;
    }
    span.style.background = widthColour(share);
    span.title = title;
    view.appendChild(span);
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  legend.textContent = exits ? "per token: darker = more layers run before it exited (hover for its layer)" :
    loops ? `per token: darker = more loops (up to ${mostLoops}; hover for its count)` :
    compute.loops ? `${compute.loops} loops per token` :
    `per token: attention at ${Math.round(100 * widthShare)}% of full width (${layers})`;
  meta.after(view, legend);
}

function room(messages) {
  // the server refuses a reply that cannot fit the context; this rough bound (4 characters a token) keeps the
  // request within it, and the server still cuts the reply at the context (finish_reason "length")
  const characters = messages.reduce((n, m) => n + m.content.length, 0);
  return Math.max(1, contextLength - 16 - Math.ceil(characters / 2));
}

async function send(text) {
  busy = true;
  $("send").disabled = true;
  if (text !== null) history.push({ role: "user", content: text });
  redraw();
  const system = $("system").value.trim();
  const turns = history.map((m) => ({ role: m.role, content: m.content }));
  const messages = system ? [{ role: "system", content: system }, ...turns] : turns;
  const reply = addMessage("assistant", "", history.length);
  let content = "";
  const tokens = [];
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: modelId, messages, stream: true, stream_options: { include_usage: true },
                             temperature: Number($("temperature").value), top_k: 50, logprobs: true,
                             max_tokens: Math.min(Number($("max-tokens").value) || 256, room(messages)),
                             compute: { mode: $("mode").value,
                                        ...($("draft").value ? { speculative: $("draft").value } : {}) } }),
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) content += choice.delta.content;
          for (const t of (choice.logprobs && choice.logprobs.content) || []) tokens.push(t.token);
        }
        reply.body.innerHTML = markdown(content);
        reply.box.scrollIntoView({ block: "end" });
      }
    }
    if (!usage) throw new Error("the stream ended without its usage");
    history.push({ role: "assistant", content, usage, tokens });
    finishReply(reply, usage, tokens);
  } catch (error) {
    reply.body.innerHTML = "";
    const message = document.createElement("span");
    message.className = "error";
    message.textContent = `error: ${error.message}`;
    reply.body.appendChild(message);
  } finally {
    busy = false;
    $("send").disabled = false;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || busy) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("clear").addEventListener("click", () => { if (!busy) { history.length = 0; redraw(); } });
loadModel();
