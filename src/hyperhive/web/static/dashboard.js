// hyperhive · dashboard. Everything goes over the page's one /ws (bridge.js): the state with
// `list`/`recent`/`flow` at each (re)connect, then the hive's events; actions are host requests.

import { connect, request as host } from "./bridge.js";
import * as Decisions from "./decisions.js";
import {
  Hive, el, fmtAge, fmtTime, longText, row as termRow, terminal, toast, whoClass,
} from "./hive.js";

// For the browser's console and the browser tests: the page's own host request.
Hive.host = host;

const MANAGER = "manager";
const MANAGER_NAME = "hm1nd";
// Per agent: its turn records' aggregates (host `stats`), fetched with every snapshot.
const usage = new Map();
const TRANSIENT = new Set([
  "spawning", "starting", "stopping", "restarting", "rebuilding", "destroying",
]);
const FLOW_LIMIT = 500;
const HISTORY_LIMIT = 200;
const INBOX_LIMIT = 50;
const OPERATOR = "operator";
const BODY_PREVIEW = 600;
const RECIPIENT_KEY = "hyperhive.recipient";

const agents = new Map(); // name → agent record (+ url)
const flowRows = new Map(); // message id → row element
const inboxIds = new Set();

const agentList = document.getElementById("agents");
const flow = terminal(
  document.getElementById("flow"), document.getElementById("flow-pill"), FLOW_LIMIT,
);

// ------------------------------------------------------------------ naming
const display = (who) => (who === MANAGER ? MANAGER_NAME : who);
function nameSpan(who, className) {
  const shown = display(who);
  return el("span", `${className} ${whoClass(who === MANAGER_NAME ? MANAGER : who)}`, shown);
}

/** The agent UI's login link (its own token in the fragment), from /ws's `list` only. */
function agentUrl(agent) {
  if (agent.url && /^https?:\/\//.test(agent.url)) return agent.url;
  return null;
}

// ------------------------------------------------------------------ containers
function stateClass(state) {
  if (TRANSIENT.has(state)) return "st-transient";
  return `st-${state}`;
}

function actionButton(label, title, className, run) {
  const b = el("button", `btn ${className || ""}`, label);
  b.type = "button";
  b.title = title;
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await run();
    } catch (err) {
      toast(err.message, "error");
    } finally {
      b.disabled = false;
    }
  });
  return b;
}

function lifecycle(verb, name, fields) {
  return async () => {
    await host({ ...fields, cmd: verb, name });
    toast(`${verb} ${name} ✓`, "ok");
    refreshState();
  };
}

function renderAgent(agent) {
  const li = el("li", `agent ${stateClass(agent.state)}`);
  li.dataset.name = agent.name;

  const top = el("div", "line");
  top.appendChild(el("span", "glyph", "◆"));
  const url = agentUrl(agent);
  if (url && agent.state !== "destroyed") {
    const a = el("a", "name", agent.name);
    a.href = url;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    a.title = `open ${agent.name}'s UI`;
    top.appendChild(a);
  } else {
    top.appendChild(el("span", "name", agent.name));
  }
  if (agent.role === "manager") top.appendChild(el("span", "chip role role-manager", "m1nd"));
  if (agent.host) {
    // Swarm mode (SPEC §11): the host whose daemon runs it; its page is served there.
    const chip = el("span", "chip host", `⌂ ${agent.host}`);
    chip.title = `runs on host ${agent.host}`;
    top.appendChild(chip);
  }
  if (agent.host_down) {
    const badge = el("span", "badge host-down", "✗ host down");
    badge.title = `host ${agent.host} stopped answering; messages for ${agent.name} wait for it`;
    top.appendChild(badge);
  }
  if (TRANSIENT.has(agent.state)) {
    top.appendChild(el("span", "pill transient", `${agent.state}…`));
  } else {
    top.appendChild(el("span", "state", agent.state));
  }
  if (agent.needs_login && agent.attention !== "needs_login") {
    top.appendChild(el("span", "badge login", "⚠ needs login"));
  }
  if (agent.attention) {
    // What it needs, as the daemon derives it (SPEC §4.4), with its age.
    const label = {
      working: "working…", idle: "idle", waiting_on_operator: "⚑ waiting on you",
      waiting_on_agent: `waiting on ${agent.attention_detail}`, stalled: "⚠ stalled",
      needs_login: "⚠ needs login", rate_limited: "rate limited", crash_looping: "✗ crash-looping",
      compacting: "compacting…", stopped: "",
    }[agent.attention];
    if (label) {
      const badge = el("span", `badge attention att-${agent.attention}`, label);
      const since = agent.attention_since ? new Date(agent.attention_since * 1000) : null;
      badge.title = [agent.attention_detail, since ? `since ${since.toLocaleString()}` : ""]
        .filter(Boolean).join(" · ");
      top.appendChild(badge);
    }
  }
  if (agent.unread > 0) top.appendChild(el("span", "badge unread", `✉ ${agent.unread} unread`));
  if (agent.port) top.appendChild(el("span", "port", `:${agent.port}`));
  if (agent.network) {
    // Its network as enforced (SPEC §4.1b); `host` means no network isolation at all.
    const mode = agent.network.split(" ")[0];
    const chip = el("span", `chip network net-${mode}`, `⌁ ${agent.network}`);
    chip.title = mode === "host" ? "shares the host's network: no isolation" : `network: ${agent.network}`;
    top.appendChild(chip);
  }
  if (agent.deployed) {
    // The meta repo's pin: which deploy this agent runs ("deployed/7 1a2b3c4d5e6f").
    const [tag, sha] = agent.deployed.split(" ");
    const chip = el("span", "chip deployed", `⎇ ${tag} · ${(sha || "").slice(0, 8)}`);
    chip.title = `runs ${agent.deployed} (the meta repo's pin)`;
    top.appendChild(chip);
  }
  li.appendChild(top);

  const bottom = el("div", "line");
  const meta = [agent.backend, agent.container];
  if (agent.pid) meta.push(`pid ${agent.pid}`);
  if (agent.restarts) meta.push(`↻ ${agent.restarts}`);
  if (agent.last_turn_at) {
    meta.push(`last turn ${new Date(agent.last_turn_at * 1000).toLocaleTimeString()}`);
  }
  const spent = usage.get(agent.name);
  if (spent && spent.total.turns) {
    // Tokens and cost from the turn records: today / 7 days / total.
    const tokens = (u) => u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens;
    const cost = (u) => `$${u.cost_usd.toFixed(2)}`;
    meta.push(`${cost(spent.today)} today · ${cost(spent.week)} 7d · ${cost(spent.total)} total`);
    meta.push(`${tokens(spent.total).toLocaleString()} tokens in ${spent.total.turns} turns`);
  } else if (agent.cost_today) {
    meta.push(`$${agent.cost_today.toFixed(2)} today`);
  }
  bottom.appendChild(el("span", "meta", meta.filter(Boolean).join(" · ")));
  const actions = el("span", "actions");
  const name = agent.name;
  if (agent.state !== "destroyed") {
    if (agent.state === "stopped" || agent.state === "crashed") {
      actions.appendChild(actionButton("▶ start", `start ${name}`, "", lifecycle("start", name)));
    } else {
      actions.appendChild(actionButton("■ stop", `stop ${name}`, "", lifecycle("kill", name)));
    }
    actions.appendChild(
      actionButton("↻ restart", `restart ${name}`, "btn-warn", lifecycle("restart", name)),
    );
    actions.appendChild(actionButton("▤ logs", `${name}'s container log`, "",
      async () => inspectLogs(name)));
    actions.appendChild(actionButton("⚙ config", `${name}'s deployed config and history`, "",
      async () => inspectConfig(name)));
    if (agent.role !== "manager") {
      actions.appendChild(actionButton("⟳ rebuild", `re-apply ${name}'s config and restart it`,
        agent.needs_update ? "btn-warn" : "", lifecycle("rebuild", name)));
    }
  }
  if (agent.role !== "manager" && agent.state === "destroyed") {
    // A tombstone comes back only through a spawn approval, with its kept state.
    actions.appendChild(actionButton("R3V1V3", `queue a spawn approval reviving ${name}`,
      "", async () => {
        const reply = await host({
          cmd: "request_spawn", name, description: "revive from its kept state",
        });
        toast(`revive ${name}: approval #${reply.id} queued`, "ok");
      }));
  }
  if (agent.role !== "manager") {
    if (agent.state !== "destroyed") {
      actions.appendChild(actionButton("DESTR0Y", `destroy ${name}, keep its state`,
        "btn-danger", async () => {
          if (!confirm(`DESTR0Y ${name}?\n\nThe container goes away; its state dir and ` +
                       "claude login are kept.")) return;
          await lifecycle("destroy", name, { purge: false })();
        }));
    }
    actions.appendChild(actionButton("PURG3", `destroy ${name} and delete its state`,
      "btn-danger", async () => {
        if (!confirm(`PURG3 ${name}?\n\nThis deletes its state dir and credentials ` +
                     "for good. There is no undo.")) return;
        await lifecycle("destroy", name, { purge: true })();
      }));
  }
  bottom.appendChild(actions);
  li.appendChild(bottom);

  if (agent.needs_update) {
    li.appendChild(el("div", "limits", "↑ runs an older hyperhive than the daemon: rebuild it"));
  }
  if (agent.port_conflict) {
    li.appendChild(el("div", "problem",
      `✗ its UI port :${agent.port} is held by a process outside the hive`));
  }
  if (agent.last_error) li.appendChild(el("div", "problem", `✗ ${agent.last_error}`));
  if (agent.limits_note) li.appendChild(el("div", "limits", `! ${agent.limits_note}`));
  return li;
}

function renderAgents() {
  const sorted = [...agents.values()].sort((a, b) => {
    if (a.role !== b.role) return a.role === "manager" ? -1 : 1;
    return a.name.localeCompare(b.name);
  });
  agentList.replaceChildren(...sorted.map(renderAgent));
  document.getElementById("agents-empty").hidden = sorted.length > 0;
  const live = sorted.filter((a) => a.state !== "destroyed");
  const running = live.filter((a) => a.state === "running").length;
  renderTotals();
}

// Hive totals for the header: containers, running, cost today, messages in the last minute.
const sentTimes = [];

function renderTotals() {
  const live = [...agents.values()].filter((a) => a.state !== "destroyed");
  const running = live.filter((a) => a.state === "running").length;
  const cost = live.reduce((sum, a) => sum + (a.cost_today || 0), 0);
  const cutoff = Date.now() - 60_000;
  while (sentTimes.length && sentTimes[0] < cutoff) sentTimes.shift();
  document.getElementById("counts").textContent =
    `${live.length} container${live.length === 1 ? "" : "s"} · ${running} running` +
    ` · $${cost.toFixed(2)} today · ${sentTimes.length} msg/min`;
}
setInterval(renderTotals, 10_000);

// ------------------------------------------------------------------ logs and config viewers
const inspect = document.getElementById("inspect");
let inspecting = null; // { kind, name }
let logLines = [];

function openInspect(kind, name) {
  inspecting = { kind, name };
  inspect.hidden = false;
  document.getElementById("inspect-what").textContent = `${name} · ${kind}`;
  document.getElementById("inspect-logs").hidden = kind !== "logs";
  document.getElementById("inspect-config").hidden = kind !== "config";
  inspect.scrollIntoView({ block: "start" });
}

document.getElementById("inspect-close").addEventListener("click", () => {
  inspecting = null;
  inspect.hidden = true;
});

function showLogs() {
  const filter = document.getElementById("logs-filter").value.toLowerCase();
  const shown = filter ? logLines.filter((l) => l.toLowerCase().includes(filter)) : logLines;
  const pre = document.getElementById("logs-text");
  pre.textContent = shown.join("\n");
  if (document.getElementById("logs-follow").checked) pre.scrollTop = pre.scrollHeight;
}
document.getElementById("logs-filter").addEventListener("input", showLogs);

async function inspectLogs(name) {
  openInspect("logs", name);
  const reply = await host({ cmd: "logs", name, lines: 2000 });
  logLines = reply.lines;
  showLogs();
}

// While the log panel is open and follows, it fetches the tail again every 3 s.
setInterval(async () => {
  if (!inspecting || inspecting.kind !== "logs") return;
  if (!document.getElementById("logs-follow").checked) return;
  try {
    logLines = (await host({ cmd: "logs", name: inspecting.name, lines: 2000 })).lines;
    showLogs();
  } catch (err) {
    // The link is down or the agent is gone: the next tick tries again.
  }
}, 3000);

async function inspectConfig(name) {
  openInspect("config", name);
  const view = await host({ cmd: "config", name });
  document.getElementById("config-deployed").textContent =
    view.deployed ? `runs ${view.deployed}` : "not deployed through approvals";
  document.getElementById("config-toml").textContent = view.agent_toml || "(none)";
  document.getElementById("config-nix").textContent = view.agent_nix || "(none)";
  document.getElementById("config-tags").replaceChildren(...view.tags.map((t) => {
    const li = el("li", `tag tag-${t.tag.split("/")[0]}`);
    li.appendChild(el("span", "ts", fmtTime(t.at)));
    li.appendChild(el("span", "name", ` ${t.tag} `));
    li.appendChild(el("code", "sha", t.sha.slice(0, 12)));
    if (t.note) li.appendChild(el("span", "note", ` — ${t.note}`));
    return li;
  }));
  const deploys = [...view.tags.filter((t) => t.tag.startsWith("deployed/")).map((t) => t.tag),
    "main"];
  for (const [id, pick] of [["diff-old", deploys[0]], ["diff-new", "main"]]) {
    const select = document.getElementById(id);
    select.replaceChildren(...deploys.map((d) => {
      const option = el("option", "", d);
      option.value = d;
      return option;
    }));
    select.value = pick;
  }
  document.getElementById("config-diff").textContent = "";
}

document.getElementById("config-diff-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!inspecting) return;
  const old = document.getElementById("diff-old").value;
  const next = document.getElementById("diff-new").value;
  try {
    const reply = await host({ cmd: "config_diff", name: inspecting.name, old, new: next });
    document.getElementById("config-diff").textContent = reply.diff;
  } catch (err) {
    toast(`diff: ${err.message}`, "error");
  }
});

// ------------------------------------------------------------------ dead letters, reminders
function renderDecided(approvals) {
  // Who decided is always the operator (host.sock's only principal) or the daemon itself
  // (a rollback): the status and note say which.
  document.getElementById("decided-list").replaceChildren(...approvals.map((a) => {
    const what = a.kind === "spawn" ? `spawn ${a.agent}`
      : a.kind === "flake_update" ? `update ${a.commit_ref || "all inputs"}`
        : `${a.agent} ${a.sha.slice(0, 12)}`;
    const li = el("li", `tag tag-${a.status}`);
    li.appendChild(el("span", "ts", fmtTime(a.resolved_at || a.requested_at)));
    li.appendChild(el("span", "name", ` #${a.id} ${what} · ${a.status}`));
    if (a.note) li.appendChild(el("span", "note", ` — ${a.note}`));
    return li;
  }));
}

/** The meta flake's inputs (nixos): locked rev and age, each with its update request. */
function renderMetaInputs(listed) {
  const section = document.getElementById("meta-section");
  section.hidden = !listed.updatable && listed.inputs.length === 0;
  document.getElementById("meta-update-all").hidden = !listed.updatable;
  const now = Date.now() / 1000;
  document.getElementById("meta-inputs").replaceChildren(...listed.inputs.map((i) => {
    const li = el("li", "tag meta-input");
    li.dataset.input = i.name;
    li.appendChild(el("span", "name", i.name));
    li.appendChild(el("span", "sha", ` ${i.rev}`));
    const age = i.last_modified ? ` · ${fmtAge(now - i.last_modified)} old` : "";
    li.appendChild(el("span", "ts", age));
    li.appendChild(el("span", "note", ` ${i.url}`));
    if (i.agents.length) li.title = `an update rebuilds: ${i.agents.join(", ")}`;
    if (listed.updatable) {
      li.appendChild(actionButton("↻ update", `queue an update of ${i.name}`, "",
        () => requestFlakeUpdate([i.name])));
    }
    return li;
  }));
}

async function requestFlakeUpdate(inputs) {
  try {
    const queued = await host({ cmd: "request_flake_update", inputs });
    toast(`flake update queued as approval #${queued.id}`, "ok");
  } catch (err) {
    toast(`flake update: ${err.message}`, "error");
  }
}
document.getElementById("meta-update-all").addEventListener("click", () => requestFlakeUpdate([]));

function renderDead(messages) {
  const list = document.getElementById("dead");
  list.replaceChildren(...messages.map((m) => {
    const li = el("li", "card");
    const head = el("div", "head");
    head.appendChild(el("span", "ts", `#${m.id} ${fmtTime(m.sent_at)}`));
    head.appendChild(nameSpan(m.from, "from"));
    head.appendChild(el("span", "arrow", " → "));
    head.appendChild(nameSpan(m.to, "to"));
    head.appendChild(actionButton("↺ requeue", `give #${m.id} another round of attempts`, "",
      async () => {
        await host({ cmd: "requeue", id: m.id });
        toast(`#${m.id} requeued`, "ok");
        refreshState();
      }));
    li.appendChild(head);
    const body = el("div", "body");
    longText(body, m.body, BODY_PREVIEW);
    li.appendChild(body);
    return li;
  }));
  document.getElementById("dead-empty").hidden = messages.length > 0;
  document.getElementById("dead-count").textContent = messages.length ? `(${messages.length})` : "";
}

function renderReminders(reminders) {
  const list = document.getElementById("reminders");
  list.replaceChildren(...reminders.map((r) => {
    const li = el("li", "card");
    const head = el("div", "head");
    head.appendChild(el("span", "ts", `#${r.id} due ${fmtTime(r.due_at)}`));
    head.appendChild(nameSpan(r.to, "to"));
    head.appendChild(actionButton("✗ cancel", `drop reminder #${r.id}`, "btn-danger",
      async () => {
        await host({ cmd: "cancel_reminder", id: r.id });
        toast(`reminder #${r.id} cancelled`, "ok");
        refreshState();
      }));
    li.appendChild(head);
    li.appendChild(el("div", "body", r.message));
    return li;
  }));
  document.getElementById("reminders-empty").hidden = reminders.length > 0;
  document.getElementById("reminders-count").textContent =
    reminders.length ? `(${reminders.length})` : "";
}

// ------------------------------------------------------------------ threads
let replyTo = null;

function threadChip(id) {
  // A reply names the message it answers (SPEC §4.2 `send`): a link to it in the flow.
  const chip = el("span", "chip thread", `↩ #${id}`);
  chip.title = `in reply to message #${id}`;
  chip.addEventListener("click", () => {
    const row = document.querySelector(`#flow [data-id="${id}"]`);
    if (row) row.scrollIntoView({ block: "center" });
  });
  return chip;
}

// ------------------------------------------------------------------ operator inbox
const inboxList = document.getElementById("inbox");

function inboxItem(msg) {
  const li = el("li");
  const head = el("div", "head");
  head.appendChild(el("span", "ts", fmtTime(msg.sent_at)));
  head.appendChild(nameSpan(msg.from, "from"));
  const reply = el("button", "reply", "↩ reply");
  reply.type = "button";
  reply.title = `reply to ${display(msg.from)}`;
  reply.addEventListener("click", () => {
    setRecipient(display(msg.from));
    // The next message to them answers this one (its thread), until the recipient changes.
    replyTo = { id: msg.id, to: display(msg.from) };
    promptSpan.textContent = `@${display(msg.from)} ↩#${msg.id}>`;
    compose.focus();
  });
  head.appendChild(reply);
  if (msg.in_reply_to) head.appendChild(threadChip(msg.in_reply_to));
  li.appendChild(head);
  const body = el("div", "body");
  longText(body, msg.body, BODY_PREVIEW);
  li.appendChild(body);
  return li;
}

function renderInbox(messages) {
  inboxIds.clear();
  const newest = [...messages].sort((a, b) => b.id - a.id);
  newest.forEach((m) => inboxIds.add(m.id));
  inboxList.replaceChildren(...newest.map(inboxItem));
  updateInboxCount();
}

function addToInbox(msg) {
  if (inboxIds.has(msg.id)) return;
  inboxIds.add(msg.id);
  inboxList.insertBefore(inboxItem(msg), inboxList.firstChild);
  updateInboxCount();
}

function updateInboxCount() {
  document.getElementById("inbox-empty").hidden = inboxIds.size > 0;
  document.getElementById("inbox-count").textContent = inboxIds.size ? `(${inboxIds.size})` : "";
}

// ------------------------------------------------------------------ message flow
function flowRow(msg, fresh) {
  const { row, content } = termRow(msg.sent_at, msg.broadcast ? "⌁" : "→",
    `msg ${msg.state === "queued" ? "queued" : ""} ${fresh ? "fresh" : ""}`);
  row.dataset.id = String(msg.id);
  content.appendChild(nameSpan(msg.from, "from"));
  content.appendChild(el("span", "arrow", " → "));
  content.appendChild(nameSpan(msg.to, "to"));
  content.appendChild(el("span", "colon", ":"));
  if (msg.in_reply_to) content.appendChild(threadChip(msg.in_reply_to));
  longText(content, msg.body, BODY_PREVIEW);
  const tick = el("span", "tick", msg.state === "queued" ? "·" : "✓");
  tick.title = msg.state;
  content.appendChild(tick);
  return row;
}

function addMessage(msg, fresh) {
  if (flowRows.has(msg.id)) return;
  const row = flowRow(msg, fresh);
  // Keep rows ordered by id: a backfill can arrive after newer live events.
  let before = null;
  for (const [id, other] of flowRows) {
    if (id > msg.id && other.isConnected && (!before || id < Number(before.dataset.id))) {
      before = other;
    }
  }
  flowRows.set(msg.id, row);
  flow.insert(row, before);
  if (flowRows.size > FLOW_LIMIT * 2) {
    for (const [id, other] of flowRows) if (!other.isConnected) flowRows.delete(id);
  }
  if (msg.to === "operator") addToInbox(msg);
}

function markDelivered(id) {
  const row = flowRows.get(id);
  if (!row) return;
  row.classList.remove("queued");
  const tick = row.querySelector(".tick");
  if (tick) {
    tick.textContent = "✓";
    tick.title = "delivered";
  }
}

function systemRow(text) {
  const { row, content } = termRow(Date.now() / 1000, "!", "sys");
  content.textContent = text;
  flow.insert(row, null);
}

// ------------------------------------------------------------------ state & events
let refreshTimer = null;
/** The containers (with their UI links) and the operator's inbox, as the daemon has them. */
async function loadState() {
  const [listed, inbox, dead, reminders, decided, stats, metaInputs] = await Promise.all([
    host({ cmd: "list" }),
    host({ cmd: "recent", name: OPERATOR, limit: INBOX_LIMIT }),
    host({ cmd: "dead_letters", limit: 100 }),
    host({ cmd: "reminders" }),
    host({ cmd: "approval_history", limit: 50 }),
    host({ cmd: "stats" }),
    host({ cmd: "meta_inputs" }),
  ]);
  renderMetaInputs(metaInputs);
  usage.clear();
  for (const s of stats.agents) usage.set(s.name, s);
  renderDecided(decided.approvals);
  renderDead(dead.messages);
  renderReminders(reminders.reminders);
  agents.clear();
  for (const a of listed.agents) agents.set(a.name, a);
  renderAgents();
  renderInbox(inbox.messages);
  renderForge(listed.forge);
  renderPort(listed.dashboard);
}
async function refreshState() {
  try {
    await loadState();
  } catch (err) {
    toast(`state: ${err.message}`, "error");
  }
}
/** A failed hive-forge: what is wrong and the fix (text only; the daemon wrote it). */
function renderForge(forge) {
  const box = document.getElementById("forge-alert");
  const failed = Boolean(forge && forge.state === "failed");
  box.hidden = !failed;
  document.getElementById("forge-problem").textContent = failed ? forge.problem || "" : "";
  document.getElementById("forge-fix").textContent = failed ? forge.fix || "" : "";
}
/** This page came up only after waiting for its port: say when, how long, and why. */
function renderPort(port) {
  const box = document.getElementById("port-alert");
  const waited = Boolean(port && port.state === "serving" && port.failed_attempts > 0);
  box.hidden = !waited;
  document.getElementById("port-note").textContent = waited
    ? `The dashboard came up at ${fmtTime(port.since)} after waiting ${fmtAge(port.waited)}`
      + ` for port ${port.port}: ${port.error || ""}`
    : "";
}
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshState, 800);
}

/** The hive's recent traffic, for the flow pane (what happened while the page was away). */
async function backfill() {
  const history = await host({ cmd: "flow", limit: HISTORY_LIMIT });
  for (const msg of history.messages) addMessage(msg, false);
  flow.toBottom();
}

/** Each (re)connect, subscribed and before any event is applied: the state as it is now. */
async function sync() {
  try {
    await Promise.all([loadState(), backfill()]);
  } catch (err) {
    toast(`state: ${err.message}`, "error");
    throw err;
  }
  await Decisions.sync();
}

// ------------------------------------------------------------------ notifications
// What needs the operator, as the daemon tells it (SPEC §4.3): a browser notification when she
// opted in (it shows while the tab is in the background), a toast otherwise.
const notifyButton = document.getElementById("notify");

function showNotifyState() {
  const state = "Notification" in window ? Notification.permission : "unsupported";
  notifyButton.textContent = state === "granted" ? "🔔 on" : "🔔 notify me";
  notifyButton.disabled = state === "granted" || state === "denied" || state === "unsupported";
  notifyButton.title = state === "denied" ? "notifications are blocked for this page" : notifyButton.title;
}

notifyButton.addEventListener("click", async () => {
  if (!("Notification" in window)) return;
  await Notification.requestPermission();
  showNotifyState();
});
showNotifyState();

function notify(ev) {
  const body = ev.items.length > 1 ? ev.items.map((i) => `• ${i.text}`).join("\n") : "";
  if ("Notification" in window && Notification.permission === "granted") {
    // One per notification id: a reconnect that replays it does not show it twice.
    new Notification(ev.title, { body, tag: `hyperhive-${ev.id}` });
  } else {
    toast(ev.title, "warn");
  }
}

function onEvent(ev) {
  switch (ev.event) {
    case "message_sent":
      sentTimes.push(Date.now());
      addMessage(ev.message, true);
      refreshSoon(); // unread counts moved
      break;
    case "message_delivered":
      markDelivered(ev.id);
      refreshSoon();
      break;
    case "agent_changed": {
      const old = agents.get(ev.agent.name);
      agents.set(ev.agent.name, { ...ev.agent, url: old ? old.url : null });
      renderAgents();
      // Events carry no links (they are the daemon's, relayed verbatim): fetch a newcomer's.
      if (!old || !old.url) refreshSoon();
      break;
    }
    case "agent_removed":
      agents.delete(ev.name);
      renderAgents();
      break;
    case "dropped":
      systemRow(`event stream dropped (${ev.reason}); reconnecting…`);
      break;
    case "notification":
      notify(ev);
      break;
    default:
      Decisions.onEvent(ev);
      if (ev.event === "approval_changed") refreshSoon(); // the decided list
      break;
  }
}

connect({ sync, onEvent });

// ------------------------------------------------------------------ compose box
const compose = document.getElementById("compose");
const composeForm = document.getElementById("compose-form");
const promptSpan = document.getElementById("compose-prompt");
const completeList = document.getElementById("complete");
let recipient = localStorage.getItem(RECIPIENT_KEY) || MANAGER_NAME;
let choices = [];
let active = 0;

function setRecipient(name) {
  recipient = name;
  localStorage.setItem(RECIPIENT_KEY, name);
  promptSpan.textContent = `@${name}>`;
}
setRecipient(recipient);

function candidates() {
  const names = [...agents.values()].filter((a) => a.state !== "destroyed").map((a) => a.name);
  return [...new Set([MANAGER_NAME, ...names])].sort();
}

function closeCompletion() {
  choices = [];
  completeList.hidden = true;
}

function renderCompletion() {
  completeList.replaceChildren(...choices.map((name, i) => {
    const li = el("li", i === active ? "active" : "", `@${name}`);
    li.setAttribute("role", "option");
    li.addEventListener("mousedown", (ev) => {
      ev.preventDefault();
      pick(name);
    });
    return li;
  }));
  completeList.hidden = choices.length === 0;
}

function pick(name) {
  compose.value = `@${name} `;
  closeCompletion();
  compose.focus();
}

compose.addEventListener("input", () => {
  const m = /^@([a-z0-9-]*)$/.exec(compose.value);
  if (!m) {
    closeCompletion();
    return;
  }
  choices = candidates().filter((n) => n.startsWith(m[1]));
  active = 0;
  renderCompletion();
});

compose.addEventListener("keydown", (ev) => {
  if (completeList.hidden || choices.length === 0) return;
  if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
    ev.preventDefault();
    active = (active + (ev.key === "ArrowDown" ? 1 : choices.length - 1)) % choices.length;
    renderCompletion();
  } else if (ev.key === "Tab" || (ev.key === "Enter" && compose.value !== `@${choices[active]}`)) {
    ev.preventDefault();
    pick(choices[active]);
  } else if (ev.key === "Escape") {
    ev.preventDefault();
    closeCompletion();
  }
});
compose.addEventListener("blur", closeCompletion);

composeForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  closeCompletion();
  const text = compose.value;
  const m = /^@(\S+)(?:\s+([\s\S]*))?$/.exec(text.trim());
  const to = m ? m[1] : recipient;
  const body = m ? (m[2] || "") : text;
  if (!body.trim()) {
    if (m) {
      setRecipient(to);
      compose.value = "";
    }
    return;
  }
  compose.disabled = true;
  try {
    const thread = replyTo && replyTo.to === to ? { in_reply_to: replyTo.id } : {};
    await host({ cmd: "send", to, body, ...thread });
    replyTo = null;
    setRecipient(to);
    compose.value = "";
  } catch (err) {
    toast(`send: ${err.message}`, "error");
  } finally {
    compose.disabled = false;
    compose.focus();
  }
});

// ------------------------------------------------------------------ spawn
const spawnForm = document.getElementById("spawn-form");
const spawnName = document.getElementById("spawn-name");
spawnForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = spawnName.value.trim();
  if (!name) return;
  const button = spawnForm.querySelector("button");
  button.disabled = true;
  try {
    await host({ cmd: "spawn", name });
    toast(`sp4wn ${name} ✓`, "ok");
    spawnName.value = "";
    refreshState();
  } catch (err) {
    toast(`spawn: ${err.message}`, "error");
  } finally {
    button.disabled = false;
  }
});

// ------------------------------------------------------------------ clock
const clock = document.getElementById("clock");
const tick = () => { clock.textContent = fmtTime(Date.now() / 1000); };
tick();
setInterval(tick, 1000);
