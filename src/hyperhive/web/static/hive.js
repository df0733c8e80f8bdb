// hyperhive · shared browser helpers, an ES module: the login (token, proof, tickets), DOM
// helpers and the agent page's event stream. Agent-controlled text only ever goes through
// textContent. The agent page's script is a classic one: it finds these as `window.Hive`.

const meta = document.querySelector('meta[name="csrf-token"]');
const csrf = meta ? meta.getAttribute("content") : "";

// ------------------------------------------------------------------ login
// The operator logs in with a URL ending in `#token=…`: a fragment never reaches a server or
// a log. The token is kept in localStorage, which is per origin *including the port*, so an
// agent's UI cannot read the dashboard's token nor another agent's (cookies would be shared
// across the ports of a host). It travels only as `Authorization: Bearer`, never in a URL,
// and only to a server that has just proven it knows it (see `ready`): whatever takes the
// port while the daemon is away gets nothing from a tab that keeps retrying. Event streams
// and websockets, which cannot send the header, open with a single-use ticket instead.
const TOKEN_KEY = "hyperhive.token";
const PROOF_CONTEXT = "hyperhive-proof:";
const PROOF_MS = 1000;

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

// ------------------------------------------------------------------ proof
// SHA-256 and HMAC in plain JS, for pages without WebCrypto: `crypto.subtle` exists only in
// secure contexts (https, localhost, 127.0.0.1), not on http://<a LAN name>.
const K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);
const ror = (x, n) => (x >>> n) | (x << (32 - n));

function sha256(bytes) {
  const length = bytes.length;
  const size = ((length + 9 + 63) >> 6) << 6;
  const block = new Uint8Array(size);
  block.set(bytes);
  block[length] = 0x80;
  const view = new DataView(block.buffer);
  view.setUint32(size - 8, Math.floor(length / 0x20000000));
  view.setUint32(size - 4, (length * 8) >>> 0);
  const h = new Uint32Array([
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
  ]);
  const w = new Uint32Array(64);
  for (let offset = 0; offset < size; offset += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(offset + i * 4);
    for (let i = 16; i < 64; i++) {
      const s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) | 0;
    }
    let [a, b, c, d, e, f, g, k] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (k + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) | 0;
      const t2 = ((ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      k = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
  }
  const out = new Uint8Array(32);
  const outView = new DataView(out.buffer);
  for (let i = 0; i < 8; i++) outView.setUint32(i * 4, h[i]);
  return out;
}

function hex(bytes) {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

function hmacSha256(key, message) {
  const padded = new Uint8Array(64);
  padded.set(key.length > 64 ? sha256(key) : key);
  const inner = new Uint8Array(64 + message.length);
  const outer = new Uint8Array(64 + 32);
  for (let i = 0; i < 64; i++) {
    inner[i] = padded[i] ^ 0x36;
    outer[i] = padded[i] ^ 0x5c;
  }
  inner.set(message, 64);
  outer.set(sha256(inner), 64);
  return sha256(outer);
}

/** Hex HMAC-SHA256 of two strings (UTF-8): WebCrypto where the page has it, else plain JS. */
async function hmacHex(key, message) {
  const enc = new TextEncoder();
  if (window.crypto && crypto.subtle) {
    const k = await crypto.subtle.importKey(
      "raw", enc.encode(key), { name: "HMAC", hash: "SHA-256" }, false, ["sign"],
    );
    return hex(await crypto.subtle.sign("HMAC", k, enc.encode(message)));
  }
  return hex(hmacSha256(enc.encode(key), enc.encode(message)));
}

function challenge() {
  return hex(crypto.getRandomValues(new Uint8Array(32)));
}

let provenAt = 0;
let proving = null;

/**
 * Ask the server to prove it knows our token before we send it: it answers a fresh random
 * challenge with HMAC-SHA256(token, "hyperhive-proof:" + challenge + ":" + its per-start
 * nonce). A server that cannot (something else took the port, or a restarted daemon, whose
 * tokens are all new) gets nothing, and the page logs out; one that is away is asked again
 * later.
 */
async function prove() {
  const mine = challenge();
  let resp;
  try {
    resp = await fetch("/api/hello", {
      method: "POST",
      credentials: "omit",
      cache: "no-store",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ challenge: mine }),
    });
  } catch (_) {
    throw new HttpError(0, "no connection");
  }
  if (resp.status >= 500) throw new HttpError(resp.status, `HTTP ${resp.status}`);
  let data = null;
  try {
    data = await resp.json();
  } catch (_) {
    data = null;
  }
  const proven = resp.ok && data && typeof data.proof === "string"
    && typeof data.nonce === "string"
    && data.proof === await hmacHex(token, `${PROOF_CONTEXT}${mine}:${data.nonce}`);
  if (!proven) {
    logOut();
    throw new HttpError(401, "this server could not prove it is the hive: not logged in");
  }
  provenAt = Date.now();
}

/**
 * Resolves once the token may be sent: a proof from the last PROOF_MS (the requests of one
 * moment share it) with no connection failure since. Any failure (`lost`) voids the proof.
 */
async function ready() {
  if (!loggedIn) throw new HttpError(401, "not logged in");
  if (Date.now() - provenAt < PROOF_MS) return;
  if (!proving) proving = prove().finally(() => { proving = null; });
  await proving;
}

function lost() {
  provenAt = 0;
}

/** `fetch` with the token, once the server has proven it may have it. */
async function send(url, init) {
  await ready();
  try {
    return await fetch(url, {
      ...init, credentials: "omit", cache: "no-store", headers: authHeaders(init.headers),
    });
  } catch (err) {
    lost();
    throw err;
  }
}

/** A ticket for one stream or websocket at `path`: single use, good for 30 s. */
async function ticket(path) {
  return (await post("/api/ticket", { path })).ticket;
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
  return parse(await send(url, {}));
}

async function post(url, data) {
  const resp = await send(url, {
    method: "POST",
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
 * backfill what it missed, `onEvent` gets each parsed JSON payload. Without a login it does
 * not connect at all. Each connection proves the server, takes a fresh ticket and opens the
 * stream with it; when the stream drops, the page starts over (the browser's own reconnect
 * would replay a spent ticket to whatever holds the port by then), backing off to 30 s.
 */
function stream(url, { onOpen, onEvent, onDown }) {
  let retry = 1000;
  function reconnectLater() {
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 30000);
  }
  async function connect() {
    if (!loggedIn) return;
    let pass;
    try {
      pass = await ticket(url);
    } catch (_) {
      // Away, or no longer ours (a 401 or a failed proof has logged the page out).
      if (!loggedIn) return;
      onDown();
      reconnectLater();
      return;
    }
    const source = new EventSource(`${url}?ticket=${encodeURIComponent(pass)}`);
    sources.add(source);
    source.onopen = () => {
      retry = 1000;
      onOpen();
    };
    source.onerror = () => {
      source.close();
      sources.delete(source);
      lost();
      if (!loggedIn) return;
      onDown();
      reconnectLater();
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
  // Modules run deferred, so the page is parsed and the wall is there to show.
  logOut();
}

/** Is there a token the page may still use (no 401, no failed proof so far)? */
export function isLoggedIn() {
  return loggedIn;
}

/** Close `closable` (a stream or a websocket) when the page logs out; returns a forget(). */
export function track(closable) {
  sources.add(closable);
  return () => sources.delete(closable);
}

/** The plain-JS HMAC (the fallback of `hmacHex`), hex, for tests. */
export function hmacFallbackHex(key, message) {
  const enc = new TextEncoder();
  return hex(hmacSha256(enc.encode(key), enc.encode(message)));
}

export {
  csrf, el, getJSON, post, ready, lost, ticket, fmtTime, fmtAge, toast, whoClass, terminal, row,
  longText, stream, setLink, HttpError, hmacHex,
};

/** The same, for classic scripts (the agent page) and the browser tests' `page.evaluate`. */
export const Hive = {
  csrf, el, getJSON, post, fmtTime, fmtAge, toast, whoClass, terminal, row, longText, stream,
  setLink, HttpError, hmacHex, hmacFallbackHex,
};
window.Hive = Hive;
