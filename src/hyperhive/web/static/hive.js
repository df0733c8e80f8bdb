// hyperhive · shared browser helpers. Agent-controlled text only ever goes through textContent.
"use strict";

const Hive = (() => {
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.getAttribute("content") : "";

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
    if (!resp.ok) {
      const msg = data && data.error ? data.error : `HTTP ${resp.status}`;
      throw new HttpError(resp.status, msg);
    }
    return data;
  }

  async function getJSON(url) {
    const resp = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    return parse(resp);
  }

  async function post(url, data) {
    const resp = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(data || {}),
    });
    return parse(resp);
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
   * backfill what it missed, `onEvent` gets each parsed JSON payload.
   */
  function stream(url, { onOpen, onEvent, onDown }) {
    let retry = 1000;
    function connect() {
      const source = new EventSource(url);
      source.onopen = () => {
        retry = 1000;
        onOpen();
      };
      source.onerror = () => {
        onDown();
        // The browser retries dropped streams by itself, but gives up for good on an error
        // status (say, the daemon was briefly away): then we retry, backing off to 30 s.
        if (source.readyState === EventSource.CLOSED) {
          setTimeout(connect, retry);
          retry = Math.min(retry * 2, 30000);
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
    if (!link) return;
    link.className = `link ${up ? "up" : "down"}`;
    link.textContent = up ? "● l1nk up" : "○ l1nk d0wn";
  }

  return {
    csrf, el, getJSON, post, fmtTime, fmtAge, toast, whoClass, terminal, row, longText, stream,
    setLink, HttpError,
  };
})();
