// hyperhive · shared browser helpers. Agent-controlled text only ever goes through textContent.
"use strict";

const Hive = (() => {
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.getAttribute("content") : "";

  // ------------------------------------------------------------------ login
  // The operator logs in with a URL ending in `#token=…`: a fragment never reaches a server or
  // a log. The token is kept in localStorage, which is per origin *including the port*, so an
  // agent's UI cannot read the dashboard's token nor another agent's (cookies would be shared
  // across the ports of a host). It travels as `Authorization: Bearer`, or as `?token=` where a
  // header cannot be set (EventSource).
  const TOKEN_KEY = "hyperhive.token";
  const PROBE = "/api/state";

  function stored() {
    try {
      return localStorage.getItem(TOKEN_KEY) || "";
    } catch (_) {
      return "";
    }
  }

  function takeToken() {
    const params = new URLSearchParams(location.hash.slice(1));
    const fresh = params.get("token");
    if (fresh === null) return stored();
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
    try {
      localStorage.setItem(TOKEN_KEY, fresh);
    } catch (_) {
      // No storage (a locked-down profile): this tab stays logged in until it is reloaded.
    }
    return fresh;
  }

  const token = takeToken();
  let loggedIn = token !== "";
  const sources = new Set();

  /** Show the "not logged in" state: no token, or the server refused the one we had. */
  function logOut() {
    loggedIn = false;
    try {
      if (localStorage.getItem(TOKEN_KEY) === token) localStorage.removeItem(TOKEN_KEY);
    } catch (_) {
      // Nothing stored, nothing to forget.
    }
    for (const source of sources) source.close();
    sources.clear();
    document.body.classList.add("logged-out");
    const wall = document.getElementById("login-wall");
    if (wall) wall.hidden = false;
    const link = document.getElementById("link");
    if (link) {
      link.className = "link down";
      link.textContent = "○ n0t l0gged 1n";
    }
  }

  function authHeaders(extra) {
    return { ...(extra || {}), Authorization: `Bearer ${token}` };
  }

  function withToken(url) {
    return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
  }

  /** Build an element; `text` is set with textContent, never parsed as HTML. */
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function parse(resp) {
    let data = null;
    try {
      data = await resp.json();
    } catch (_) {
      data = null;
    }
    if (resp.status === 401) logOut();
    if (!resp.ok) {
      const msg = data && data.error ? data.error : `HTTP ${resp.status}`;
      throw new HttpError(resp.status, msg);
    }
    return data;
  }

  async function getJSON(url) {
    const resp = await fetch(url, {
      credentials: "omit",
      cache: "no-store",
      headers: authHeaders(),
    });
    return parse(resp);
  }

  async function post(url, data) {
    const resp = await fetch(url, {
      method: "POST",
      credentials: "omit",
      headers: authHeaders({ "Content-Type": "application/json", "X-CSRF-Token": csrf }),
      body: JSON.stringify(data || {}),
    });
    return parse(resp);
  }

  class HostError extends Error {
    constructor(code, message) {
      super(message);
      this.code = code;
    }
  }

  /**
   * One host-protocol request over the dashboard's `/ws` bridge, on a connection of its own (a
   * slow `approve` then holds up nothing else); resolves with the daemon's reply, rejects with a
   * HostError carrying the daemon's `code`.
   */
  function host(request) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = `csrf=${encodeURIComponent(csrf)}&token=${encodeURIComponent(token)}`;
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(`${scheme}//${location.host}/ws?${query}`);
      let answered = false;
      ws.onopen = () => ws.send(JSON.stringify(request));
      ws.onmessage = (ev) => {
        answered = true;
        ws.close();
        let reply;
        try {
          reply = JSON.parse(ev.data);
        } catch (_) {
          reject(new HostError("parse_error", "the daemon's reply is not JSON"));
          return;
        }
        if (reply.ok) resolve(reply);
        else reject(new HostError(reply.code || "error", reply.error || "request failed"));
      };
      ws.onclose = () => {
        if (answered) return;
        // A refused handshake looks like any other drop: a plain request tells (401 logs out).
        getJSON(PROBE).catch(() => {});
        reject(new HostError("connection_lost", "no reply from the daemon"));
      };
    });
  }

  const pad = (n) => String(n).padStart(2, "0");

  function fmtTime(ts) {
    const d = new Date(ts * 1000);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtAge(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  let toastTimer = null;
  function toast(message, level) {
    const box = document.getElementById("toast");
    if (!box) return;
    box.textContent = message;
    box.className = `toast ${level || ""}`;
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, level === "error" ? 8000 : 3000);
  }

  /** A CSS class for a principal's name: fixed for the broker's principals, hashed for agents. */
  function whoClass(name) {
    if (name === "operator" || name === "manager" || name === "system" || name === "reminder") {
      return `who-${name}`;
    }
    let h = 2166136261;
    for (let i = 0; i < name.length; i++) {
      h ^= name.charCodeAt(i);
      h = Math.imul(h, 16777619) >>> 0;
    }
    return `who-${h % 8}`;
  }

  /**
   * A terminal pane that sticks to the bottom while the reader is there, and otherwise counts
   * new rows in a pill instead of yanking the view away.
   */
  function terminal(pane, pill, limit) {
    let unseen = 0;
    const nearBottom = () => pane.scrollHeight - pane.scrollTop - pane.clientHeight < 48;
    const toBottom = () => {
      pane.scrollTop = pane.scrollHeight;
      unseen = 0;
      pill.hidden = true;
    };
    pane.addEventListener("scroll", () => { if (nearBottom()) toBottom(); });
    pill.addEventListener("click", toBottom);
    function trim() {
      while (pane.childElementCount > limit) pane.removeChild(pane.firstElementChild);
    }
    function insert(node, before) {
      const stick = nearBottom();
      if (before) pane.insertBefore(node, before);
      else pane.appendChild(node);
      trim();
      if (stick) {
        toBottom();
      } else {
        unseen += 1;
        pill.textContent = `↓ ${unseen} new`;
        pill.hidden = false;
      }
    }
    function clear() {
      pane.replaceChildren();
      toBottom();
    }
    return { pane, insert, clear, toBottom };
  }

  /** A row of a terminal: time column, glyph column, content. */
  function row(ts, glyph, className) {
    const r = el("div", `row ${className || ""}`);
    r.appendChild(el("span", "ts", ts ? fmtTime(ts) : ""));
    r.appendChild(el("span", "g", glyph));
    const content = el("div", "content");
    r.appendChild(content);
    return { row: r, content };
  }

  /** Long text collapsed behind a toggle, still rendered only as text. */
  function longText(parent, text, max) {
    if (text.length <= max) {
      parent.appendChild(document.createTextNode(text));
      return;
    }
    const span = el("span", "", `${text.slice(0, max)}…`);
    const more = el("button", "more", "more");
    more.type = "button";
    more.addEventListener("click", () => {
      const open = more.textContent === "more";
      span.textContent = open ? text : `${text.slice(0, max)}…`;
      more.textContent = open ? "less" : "more";
    });
    parent.appendChild(span);
    parent.appendChild(more);
  }

  /**
   * An EventSource that reports link state; `onOpen` runs on every (re)connect so the page can
   * backfill what it missed, `onEvent` gets each parsed JSON payload. Without a login it does
   * not connect at all.
   */
  function stream(url, { onOpen, onEvent, onDown }) {
    let retry = 1000;
    function reconnectLater() {
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 30000);
    }
    function connect() {
      if (!loggedIn) return;
      const source = new EventSource(withToken(url));
      sources.add(source);
      source.onopen = () => {
        retry = 1000;
        onOpen();
      };
      source.onerror = () => {
        if (!loggedIn) return;
        onDown();
        // The browser retries dropped streams by itself, but gives up for good on an error
        // status: the daemon was briefly away, or our token is no longer valid (it restarted),
        // which EventSource cannot tell us. Ask with a plain request (a 401 logs out), then
        // retry, backing off to 30 s.
        if (source.readyState === EventSource.CLOSED) {
          sources.delete(source);
          getJSON(PROBE).then(reconnectLater, (err) => {
            if (!(err instanceof HttpError && err.status === 401)) reconnectLater();
          });
        }
      };
      source.onmessage = (ev) => {
        let data;
        try {
          data = JSON.parse(ev.data);
        } catch (_) {
          return;
        }
        onEvent(data);
      };
    }
    connect();
  }

  function setLink(up) {
    const link = document.getElementById("link");
    if (!link || !loggedIn) return;
    link.className = `link ${up ? "up" : "down"}`;
    link.textContent = up ? "● l1nk up" : "○ l1nk d0wn";
  }

  if (!loggedIn) {
    // Scripts run deferred, so the page is parsed and the wall is there to show.
    logOut();
  }

  return {
    csrf, el, getJSON, post, host, fmtTime, fmtAge, toast, whoClass, terminal, row, longText,
    stream, setLink, HttpError, HostError,
  };
})();
