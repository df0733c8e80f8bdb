// hyperhive · the dashboard's one path to the daemon: host.sock's protocol over /ws (SPEC §7),
// one websocket per page, carrying the page's requests and the hive's events. Each connection
// proves the server and takes a fresh single-use ticket (hive.js); when it drops, the page
// starts over with back-off, subscribes, re-syncs, and only then applies events again.

import { csrf, isLoggedIn, lost, setLink, ticket, track } from "./hive.js";

export class HostError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const RETRY_MS = 1000;
const RETRY_MAX_MS = 30000;

let socket = null; // the open websocket, once its handshake is done
let nextRef = 1;
const waiting = new Map(); // ref → { resolve, reject }

/**
 * One host request over the page's websocket; resolves with the daemon's reply, rejects with a
 * HostError carrying the daemon's `code` (`connection_lost` when the link is down or drops).
 * Requests run side by side (a slow `approve` holds up nothing else); `ref` matches replies.
 */
export function request(req) {
  if (!socket) {
    return Promise.reject(new HostError("connection_lost", "not connected to the daemon"));
  }
  const ref = nextRef++;
  return new Promise((resolve, reject) => {
    waiting.set(ref, { resolve, reject });
    socket.send(JSON.stringify({ ...req, ref }));
  });
}

function answer(reply) {
  const pending = waiting.get(reply.ref);
  if (!pending) return;
  waiting.delete(reply.ref);
  if (reply.ok) pending.resolve(reply);
  else pending.reject(new HostError(reply.code || "error", reply.error || "request failed"));
}

function failAll() {
  for (const pending of waiting.values()) {
    pending.reject(new HostError("connection_lost", "no reply from the daemon"));
  }
  waiting.clear();
}

/**
 * Keep the page's one websocket open: `sync()` fetches the state at each (re)connect, after
 * the subscription is made and before any event is applied; `onEvent` gets each event after
 * that (those that came during the sync first, in order). Without a login it does nothing.
 */
export function connect({ sync, onEvent }) {
  let retry = RETRY_MS;

  function down() {
    lost();
    if (!isLoggedIn()) return;
    setLink(false);
    setTimeout(open, retry);
    retry = Math.min(retry * 2, RETRY_MAX_MS);
  }

  async function open() {
    if (!isLoggedIn()) return;
    let pass;
    try {
      pass = await ticket("/ws");
    } catch (_) {
      // Away, or no longer ours (a 401 or a failed proof has logged the page out).
      down();
      return;
    }
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = `csrf=${encodeURIComponent(csrf)}&ticket=${encodeURIComponent(pass)}`;
    const ws = new WebSocket(`${scheme}//${location.host}/ws?${query}`);
    const forget = track(ws);
    let early = []; // events that came before the state they follow
    ws.onopen = async () => {
      socket = ws;
      try {
        await request({ cmd: "subscribe" });
        await sync();
      } catch (_) {
        ws.close();
        return;
      }
      retry = RETRY_MS;
      setLink(true);
      const backlog = early;
      early = null;
      for (const ev of backlog) onEvent(ev);
    };
    ws.onmessage = (msg) => {
      let data;
      try {
        data = JSON.parse(msg.data);
      } catch (_) {
        return;
      }
      if (typeof data.event !== "string") {
        answer(data);
      } else if (early) {
        early.push(data);
      } else {
        onEvent(data);
      }
    };
    ws.onclose = () => {
      forget();
      if (socket === ws) socket = null;
      failAll();
      down();
    };
  }

  open();
}
