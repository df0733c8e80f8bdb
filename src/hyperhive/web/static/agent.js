// hyperhive · agent UI. A live terminal of the harness's events, plus the operator's controls.
"use strict";

(() => {
  const { el, post, getJSON, toast, fmtAge, fmtTime, whoClass } = Hive;

  const LIMIT = 2000;
  const RESULT_PREVIEW_LINES = 4;
  const RESULT_PREVIEW_CHARS = 400;
  const STATE_LABELS = {
    idle: "● idle",
    thinking: "◉ thinking",
    compacting: "◌ compacting",
    rate_limited: "⏸ rate limited",
    needs_login: "⚠ needs login",
    offline: "✗ offline",
  };
  const COMMANDS = {
    "/help": "list these commands",
    "/clear": "clear the terminal view (history stays on the agent)",
    "/cancel": "cancel the running turn",
    "/model": "/model <name> · switch the model for the next turn",
    "/new-session": "start a fresh claude session on the next turn",
    "/compact": "compact claude's context now (or right after the running turn)",
  };

  const term = Hive.terminal(
    document.getElementById("live"), document.getElementById("live-pill"), LIMIT,
  );
  let lastSeq = 0;
  let turnState = "idle";
  let stateSince = Date.now() / 1000;

  // ------------------------------------------------------------------ state row
  const badge = document.getElementById("state-badge");
  const age = document.getElementById("state-age");
  const cancelBtn = document.getElementById("cancel-btn");
  const modelChip = document.getElementById("model-chip");
  const unreadChip = document.getElementById("unread-chip");
  const lastTurn = document.getElementById("last-turn");

  function setState(state, since) {
    turnState = state;
    stateSince = since || Date.now() / 1000;
    badge.className = `badge state state-${state}`;
    badge.textContent = STATE_LABELS[state] || state;
    cancelBtn.hidden = state !== "thinking" && state !== "compacting";
    tickAge();
  }
  function tickAge() {
    age.textContent = `· ${fmtAge(Date.now() / 1000 - stateSince)}`;
  }
  setInterval(tickAge, 1000);

  function setUnread(n) {
    unreadChip.hidden = !n;
    unreadChip.textContent = `✉ ${n} unread`;
  }

  async function refreshState() {
    try {
      const s = await getJSON("/api/state");
      const state = s.login_state === "needs_login" && s.turn_state === "idle"
        ? "needs_login" : s.turn_state;
      setState(state, s.turn_state_since);
      modelChip.textContent = `model · ${s.model}`;
      if (s.context_tokens !== null) {
        modelChip.title = `context ${s.context_tokens} tokens · compacts above ${s.compact_at_tokens}`;
      }
      showLogin(s.login_state === "needs_login");
      if (s.unread !== null) setUnread(s.unread);
      renderInbox(s.inbox);
      if (s.socket_error) toast(`agent socket: ${s.socket_error}`, "error");
    } catch (err) {
      toast(`state: ${err.message}`, "error");
    }
  }

  // ------------------------------------------------------------------ claude login
  // `claude auth login` runs in the container; we show its sign-in URL and pass the code on.
  const loginPanel = document.getElementById("claude-login");
  const loginStart = document.getElementById("login-start");
  const loginCancel = document.getElementById("login-cancel");
  const loginUrlRow = document.getElementById("login-url-row");
  const loginUrl = document.getElementById("login-url");
  const loginForm = document.getElementById("login-code-form");
  const loginCode = document.getElementById("login-code");
  const loginOutput = document.getElementById("login-output");
  const loginNote = document.getElementById("login-note");
  let loginTimer = null;

  function showLogin(needed) {
    loginPanel.hidden = !needed;
    if (needed && loginTimer === null) pollLogin();
  }

  function renderLogin(login) {
    loginStart.hidden = login.running;
    loginCancel.hidden = !login.running;
    const url = login.url && login.url.startsWith("https://") ? login.url : null;
    loginUrlRow.hidden = !(login.running && url);
    if (url) loginUrl.href = url;
    loginForm.hidden = !(login.running && url);
    loginOutput.hidden = !login.output;
    loginOutput.textContent = login.output;
    loginNote.textContent = login.code_sent && login.running
      ? "code sent; waiting for claude to finish signing in…"
      : login.exit_note;
  }

  async function pollLogin() {
    clearTimeout(loginTimer);
    loginTimer = null;
    try {
      const { login } = await getJSON("/api/login");
      renderLogin(login);
      if (login.running && !loginPanel.hidden) loginTimer = setTimeout(pollLogin, 1000);
    } catch (err) {
      loginNote.textContent = err.message;
    }
  }

  loginStart.addEventListener("click", async () => {
    loginStart.disabled = true;
    try {
      renderLogin((await post("/api/login/start")).login);
      pollLogin();
    } catch (err) {
      toast(`login: ${err.message}`, "error");
    } finally {
      loginStart.disabled = false;
    }
  });
  loginCancel.addEventListener("click", async () => {
    try {
      await post("/api/login/cancel");
      pollLogin();
    } catch (err) {
      toast(`login: ${err.message}`, "error");
    }
  });
  loginForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      renderLogin((await post("/api/login/code", { code: loginCode.value })).login);
      loginCode.value = "";
    } catch (err) {
      toast(`login: ${err.message}`, "error");
    }
  });

  // ------------------------------------------------------------------ inbox
  function renderInbox(messages) {
    const grid = document.getElementById("inbox");
    const cells = [];
    for (const m of [...messages].sort((a, b) => b.id - a.id)) {
      cells.push(el("span", "ts", fmtTime(m.sent_at)));
      cells.push(el("span", `from ${whoClass(m.from)}`, m.from));
      const body = el("span", "body");
      Hive.longText(body, m.body, 300);
      cells.push(body);
    }
    grid.replaceChildren(...cells);
    document.getElementById("inbox-count").textContent = `(${messages.length})`;
    document.getElementById("inbox-details").hidden = messages.length === 0;
  }

  // ------------------------------------------------------------------ terminal rendering
  function add(ts, glyph, className, fill) {
    const { row, content } = Hive.row(ts, glyph, className);
    fill(content);
    term.insert(row, null);
  }
  const text = (s) => (c) => Hive.longText(c, s, 4000);

  function summarizeArgs(input) {
    if (input === undefined || input === null) return "";
    if (typeof input !== "object") return String(input);
    const keys = Object.keys(input);
    if (keys.length === 1 && typeof input[keys[0]] === "string") return input[keys[0]];
    return JSON.stringify(input);
  }

  function resultText(content) {
    if (typeof content === "string") return content;
    if (Array.isArray(content)) {
      return content.map((b) => (b && b.type === "text" ? b.text : `[${b && b.type}]`)).join("\n");
    }
    return content === undefined ? "" : JSON.stringify(content);
  }

  function renderToolResult(ts, block) {
    const body = resultText(block.content);
    const err = block.is_error ? " err" : "";
    add(ts, "←", `k-result${err}`, (c) => {
      const lines = body.split("\n");
      if (lines.length <= RESULT_PREVIEW_LINES && body.length <= RESULT_PREVIEW_CHARS) {
        c.textContent = body || "(no output)";
        return;
      }
      const details = el("details");
      const first = lines[0].slice(0, 120);
      details.appendChild(el("summary", "", `${first} … (${lines.length} lines)`));
      details.appendChild(el("div", "", body));
      c.appendChild(details);
    });
  }

  function renderClaude(ts, data) {
    if (!data || typeof data !== "object") return;
    switch (data.type) {
      case "system":
        if (data.subtype !== "init") add(ts, "·", "k-summary", text(`system · ${data.subtype || "?"}`));
        return;
      case "assistant": {
        const blocks = (data.message && data.message.content) || [];
        for (const b of blocks) {
          if (b.type === "text" && b.text) {
            add(ts, "◆", "k-text", text(b.text));
          } else if (b.type === "thinking" && b.thinking) {
            add(ts, "∴", "k-thinking", text(b.thinking));
          } else if (b.type === "tool_use") {
            add(ts, "→", "k-tool", (c) => {
              c.appendChild(el("span", "tool-name", b.name));
              const args = summarizeArgs(b.input);
              c.appendChild(el("span", "args",
                `(${args.length > 240 ? `${args.slice(0, 240)}…` : args})`));
            });
          }
        }
        return;
      }
      case "user": {
        const blocks = (data.message && data.message.content) || [];
        if (Array.isArray(blocks)) {
          for (const b of blocks) if (b.type === "tool_result") renderToolResult(ts, b);
        }
        return;
      }
      case "result": {
        const parts = [data.is_error ? "✗ result" : "✓ result"];
        if (data.subtype && data.subtype !== "success") parts.push(data.subtype);
        if (data.num_turns !== undefined) parts.push(`${data.num_turns} turns`);
        if (data.duration_ms !== undefined) parts.push(`${(data.duration_ms / 1000).toFixed(1)}s`);
        if (data.total_cost_usd !== undefined) parts.push(`$${Number(data.total_cost_usd).toFixed(4)}`);
        add(ts, "·", "k-summary", text(parts.join(" · ")));
        return;
      }
      case "stream_event":
        return;
      default:
        add(ts, "?", "k-unknown", text(JSON.stringify(data)));
    }
  }

  function renderEvent(ev) {
    const ts = ev.ts;
    switch (ev.kind) {
      case "turn_start":
        term.insert(el("div", "divider"), null);
        add(ts, "→", "k-turn", (c) => {
          const head = el("div", "k-turn-head");
          head.appendChild(document.createTextNode("turn · from "));
          head.appendChild(el("span", whoClass(ev.from), ev.from));
          if (ev.in_reply_to) {
            head.appendChild(document.createTextNode(` · ↩ in reply to #${ev.in_reply_to}`));
          }
          if (ev.redelivery) head.appendChild(document.createTextNode(" · redelivery"));
          if (ev.unread) head.appendChild(document.createTextNode(` · ${ev.unread} unread`));
          c.appendChild(head);
          Hive.longText(c, ev.body, 1200);
        });
        setUnread(ev.unread || 0);
        break;
      case "stream":
        renderClaude(ts, ev.data);
        break;
      case "note": {
        const level = ev.level || "info";
        const glyph = { info: "·", warn: "!", error: "✗" }[level] || "·";
        add(ts, glyph, `k-note ${level}`, text(ev.text));
        break;
      }
      case "turn_end": {
        const parts = [ev.ok ? "turn done" : "turn failed"];
        if (ev.duration_ms) parts.push(`${(ev.duration_ms / 1000).toFixed(1)}s`);
        if (ev.note) parts.push(ev.note);
        add(ts, ev.ok ? "✓" : "✗", `k-end ${ev.ok ? "ok" : "fail"}`, text(parts.join(" · ")));
        if (ev.duration_ms) {
          lastTurn.hidden = false;
          lastTurn.textContent = `last turn · ${(ev.duration_ms / 1000).toFixed(1)}s`;
        }
        break;
      }
      case "compacted": {
        const size = (n) => (n === null || n === undefined ? "?" : `${n}`);
        const what = `${ev.trigger} compaction ${ev.ok ? "done" : "failed"}`;
        const parts = [what, `context ${size(ev.tokens_before)} → ${size(ev.tokens_after)} tokens`];
        if (ev.note) parts.push(ev.note);
        add(ts, ev.ok ? "◌" : "✗", `k-note ${ev.ok ? "info" : "warn"}`, text(parts.join(" · ")));
        break;
      }
      case "state":
        setState(ev.state, ev.since);
        if (ev.state !== "offline") showLogin(ev.state === "needs_login");
        if (ev.state === "needs_login" || ev.state === "offline" || ev.state === "rate_limited") {
          add(ts, "!", "k-state", text(`state → ${ev.state}`));
        }
        break;
      default:
        add(ts, "?", "k-unknown", text(JSON.stringify(ev)));
    }
  }

  function accept(ev) {
    if (typeof ev.seq === "number") {
      if (ev.seq <= lastSeq) return;
      lastSeq = ev.seq;
    }
    renderEvent(ev);
  }

  // Live events that arrive while the history is loading wait here, so nothing is shown twice
  // or out of order.
  let pending = null;

  async function backfill() {
    pending = [];
    try {
      const history = await getJSON("/events/history");
      if (history.seq < lastSeq) {
        // The harness restarted with a fresh sequence.
        lastSeq = 0;
        localNote("— harness restarted —");
      }
      for (const ev of history.events) accept(ev);
    } catch (err) {
      toast(`history: ${err.message}`, "error");
    } finally {
      const queued = pending || [];
      pending = null;
      for (const ev of queued) accept(ev);
      term.toBottom();
    }
  }

  Hive.stream("/events/stream", {
    onOpen: () => {
      Hive.setLink(true);
      refreshState();
      backfill();
    },
    onEvent: (ev) => {
      if (pending) pending.push(ev);
      else accept(ev);
    },
    onDown: () => Hive.setLink(false),
  });

  // ------------------------------------------------------------------ controls
  function localNote(message) {
    add(Date.now() / 1000, "⌁", "k-local", text(message));
  }

  async function cancelTurn() {
    const r = await post("/api/cancel");
    localNote(r.cancelled ? "cancel requested" : "nothing to cancel");
  }

  async function newSession() {
    await post("/api/new-session");
    localNote("a fresh session starts with the next turn");
  }

  async function compact() {
    await post("/api/compact");
    localNote("compaction requested · runs now, or right after the running turn");
  }

  async function setModel(model) {
    const r = await post("/api/model", { model });
    modelChip.textContent = `model · ${r.model}`;
    localNote(`model → ${r.model}`);
  }

  async function guarded(run) {
    try {
      await run();
    } catch (err) {
      toast(err.message, "error");
    }
  }

  cancelBtn.addEventListener("click", () => guarded(cancelTurn));
  document.getElementById("new-session-btn").addEventListener("click", () => guarded(newSession));

  // ------------------------------------------------------------------ prompt
  const prompt = document.getElementById("prompt");
  const promptForm = document.getElementById("prompt-form");

  function autosize() {
    prompt.style.height = "auto";
    prompt.style.height = `${Math.min(prompt.scrollHeight, 200)}px`;
  }
  prompt.addEventListener("input", autosize);

  async function runCommand(line) {
    const [cmd, ...rest] = line.trim().split(/\s+/);
    const arg = rest.join(" ");
    switch (cmd) {
      case "/help":
        for (const [name, help] of Object.entries(COMMANDS)) localNote(`${name} — ${help}`);
        return;
      case "/clear":
        term.clear();
        return;
      case "/cancel":
        await cancelTurn();
        return;
      case "/model":
        if (!arg) {
          localNote(`model is ${modelChip.textContent.replace(/^model · /, "")}`);
          return;
        }
        await setModel(arg);
        return;
      case "/new-session":
        await newSession();
        return;
      case "/compact":
        await compact();
        return;
      default:
        localNote(`unknown command ${cmd} · try /help`);
    }
  }

  async function submit() {
    const value = prompt.value;
    if (!value.trim()) return;
    prompt.disabled = true;
    try {
      if (/^\/[a-z-]+(\s|$)/.test(value.trim())) {
        await runCommand(value);
      } else {
        await post("/api/send", { body: value });
        localNote("sent · waiting in the inbox for the next turn");
        refreshState();
      }
      prompt.value = "";
      autosize();
    } catch (err) {
      toast(err.message, "error");
    } finally {
      prompt.disabled = false;
      prompt.focus();
    }
  }

  prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      submit();
    } else if (ev.key === "Tab" && prompt.value.startsWith("/") && !/\s/.test(prompt.value)) {
      const matches = Object.keys(COMMANDS).filter((c) => c.startsWith(prompt.value));
      if (matches.length) {
        ev.preventDefault();
        prompt.value = matches.length === 1 ? `${matches[0]} ` : prompt.value;
        if (matches.length > 1) localNote(matches.join("  "));
      }
    }
  });
  promptForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    submit();
  });

  setState("idle");
})();
