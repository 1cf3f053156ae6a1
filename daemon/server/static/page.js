// mtpd's page: the status (GET /mtpd/status, every 2 s) and a playground that streams a chat answer
// with each token coloured by where it came from (stream_options.include_origins, docs/serving.md).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "mtpd-api-key";
let offEstimate = null; // the cost model's plain decoding rate, tokens/s

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.textContent = text;
  return node;
}

const bytes = (n) => `${(n / 2 ** 20).toFixed(0)} MiB`;
const rate = (drafted, accepted) => (drafted ? (accepted / drafted).toFixed(2) : "–");

function askForKey(message) {
  $("main").hidden = true;
  $("key-form").hidden = false;
  $("key-error").textContent = message;
}

async function refresh() {
  let response;
  try {
    response = await fetch("/mtpd/status", { headers: headers() });
  } catch {
    $("uptime").textContent = "the daemon does not answer";
    return;
  }
  if (response.status === 401) {
    askForKey(sessionStorage.getItem(KEY) ? "that key was refused" : "");
    return;
  }
  if (!response.ok) return;
  $("key-form").hidden = true;
  $("main").hidden = false;
  show(await response.json());
}

function show(s) {
  $("model").textContent = s.model;
  $("drafter").textContent = s.drafter ? `drafter: ${s.drafter} (${s.drafter_kind})` : "no drafter";
  $("policy").textContent = `policy: ${s.speculation}`;
  $("uptime").textContent = `up ${Math.round(s.uptime_s)} s`;
  $("rate").textContent = s.tokens_per_second.toFixed(1);
  $("load").textContent = `${s.running} / ${s.waiting}`;
  $("served").textContent = s.requests_served;
  $("memory").textContent = `${bytes(s.memory.rss_bytes)} / ${bytes(s.memory.mlx_active_bytes)}`;
  offEstimate = s.off_tokens_per_second;

  const positions = $("positions");
  positions.replaceChildren(...s.acceptance.by_position.map((c, j) => bar(c.drafted ? c.accepted / c.drafted : 0,
    `${j + 1}: ${rate(c.drafted, c.accepted)}`)));
  const rows = Object.entries(s.acceptance.by_class).map(([klass, sources]) => {
    const row = el("tr");
    row.append(el("td", {}, klass));
    for (const source of ["mtp", "lookup"]) {
      const c = sources[source];
      row.append(el("td", {}, c ? `${rate(c.drafted, c.accepted)} (${c.accepted}/${c.drafted})` : "–"));
    }
    return row;
  });
  $("classes").tBodies[0].replaceChildren(...rows);

  if (s.costs) {
    const c = s.costs;
    $("costs").textContent = `one drafter forward ${c.draft_ms.toFixed(2)} ms${c.block ? " (a block)" : ""}; ` +
      `a round of k drafts, drafted and verified (k = 0: a plain step, ${offEstimate} tok/s):`;
    const top = Math.max(...c.round_ms);
    $("cost-bars").replaceChildren(...c.round_ms.map((ms, k) => bar(ms / top, `${k}: ${ms.toFixed(1)}`)));
  }
}

function bar(share, label) {
  const node = el("div", { class: "bar" });
  const fill = el("div", { class: "fill" });
  fill.style.height = `${Math.max(2, Math.round(share * 48))}px`;
  node.append(fill, el("span", {}, label));
  return node;
}

function policy() {
  const choice = $("speculation").value;
  return choice === "fixed" ? `fixed:${$("k").value}` : choice;
}

// One streamed answer: spans per token, a strip of rounds, and the figures at the end.
class Answer {
  constructor() {
    this.box = $("answer");
    this.strip = $("rounds");
    this.box.replaceChildren();
    this.strip.replaceChildren();
    this.drafted = this.accepted = this.tokens = 0;
    this.counts = { target: 0, draft: 0, lookup: 0 };
    this.last = null;
  }

  step(text, marks) {
    let used = 0;
    marks.pieces.forEach((piece, i) => {
      const origin = marks.origins[i];
      this.last = el("span", { class: "tok", "data-origin": origin }, piece);
      this.box.append(this.last);
      this.counts[origin] += 1;
      used += piece.length;
    });
    this.tokens += marks.token_ids.length;
    const rest = text.slice(used); // text held back earlier, released with this step
    if (rest) {
      if (this.last) this.last.textContent += rest;
      else this.box.append(el("span", {}, rest));
    }
    const round = marks.round;
    this.drafted += round.drafted;
    this.accepted += round.accepted;
    const mark = el("div", { class: round.drafted ? "round" : "round plain", "data-drafted": round.drafted,
      "data-accepted": round.accepted, "data-source": round.source || "none" });
    if (round.drafted) {
      mark.style.height = `${6 * round.drafted}px`;
      const kept = el("div", { class: "kept" });
      kept.style.height = `${6 * round.accepted}px`;
      mark.append(kept);
    }
    this.strip.append(mark);
    this.box.scrollTop = this.box.scrollHeight;
  }

  end(usage, figures) {
    $("sum-tokens").textContent = usage.completion_tokens;
    $("sum-speed").textContent = figures.tokens_per_second.toFixed(1);
    $("sum-off").textContent = offEstimate ?? "–";
    $("sum-drafted").textContent = this.drafted;
    $("sum-accepted").textContent = this.accepted;
    $("sum-draft-tokens").textContent = this.counts.draft;
    $("sum-lookup-tokens").textContent = this.counts.lookup;
    $("sum-policy").textContent = figures.speculation;
    $("summary").hidden = false;
    this.box.dataset.done = "true";
  }
}

async function send() {
  $("send").disabled = true;
  $("chat-error").textContent = "";
  $("summary").hidden = true;
  const answer = new Answer();
  const body = {
    messages: [{ role: "user", content: $("prompt").value }],
    max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value), stream: true,
    stream_options: { include_usage: true, include_origins: true },
  };
  if (policy()) body.speculation = policy();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error?.message || `HTTP ${response.status}`);
    }
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) answer.end(event.usage, event.mtpd);
      else if (event.mtpd) answer.step(event.choices[0].delta.content || "", event.mtpd);
    });
  } catch (e) {
    $("chat-error").textContent = e.message;
  } finally {
    $("send").disabled = false;
    refresh();
  }
}

// Server-sent events from a fetch: each `data:` line's JSON, until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  refresh();
});
$("speculation").addEventListener("change", () => { $("k-label").hidden = $("speculation").value !== "fixed"; });
$("send").addEventListener("click", send);
refresh();
setInterval(refresh, 2000);
