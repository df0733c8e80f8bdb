// hyperhive · the operator's decisions: pending approvals and questions. Every request is the
// host protocol over the page's /ws (bridge.js); `approval_changed` and `question_changed`
// events keep the cards live. Untrusted text (diffs, descriptions, questions) only ever goes
// through textContent.

import { request as host } from "./bridge.js";
import { el, fmtTime, longText, toast, whoClass } from "./hive.js";

const FINAL = new Set(["deployed", "failed", "denied", "rolled_back"]);
// Replies and events race (a `pending` listing can be older than an event): never go back.
const rank = (status) => (status === "pending" ? 0 : FINAL.has(status) ? 2 : 1);
const BUSY_LABEL = { apply_commit: "building", spawn: "spawning" };
const LINGER_MS = 4000; // a resolved card shows its outcome this long, then goes
const DESCRIPTION_PREVIEW = 600;
const QUESTION_PREVIEW = 1200;

const display = (who) => (who === "manager" ? "hm1nd" : who);
const nameSpan = (who) => el("span", `name ${whoClass(who)}`, display(who));

function button(label, className, title) {
  const b = el("button", `btn ${className || ""}`, label);
  b.type = "button";
  if (title) b.title = title;
  return b;
}

function describe(err) {
  return err.code ? `${err.code}: ${err.message}` : err.message;
}

/** The panel's count in its heading and its "nothing pending" line. */
function counter(list, empty, count) {
  return () => {
    const live = list.querySelectorAll(":scope > li:not(.resolved)").length;
    empty.hidden = list.childElementCount > 0;
    count.textContent = live ? `(${live})` : "";
  };
}

// ------------------------------------------------------------------ approvals
const approvalList = document.getElementById("approvals");
const approvals = new Map(); // id → card state
const countApprovals = counter(
  approvalList, document.getElementById("approvals-empty"),
  document.getElementById("approvals-count"),
);

/** `git diff` as text, one span per line, coloured by its first character. */
function renderDiff(pre, diff) {
  const lines = diff.replace(/\n$/, "").split("\n");
  pre.replaceChildren(...lines.map((line) => {
    let cls = "ctx";
    if (line.startsWith("+++") || line.startsWith("---") || /^(diff|index) /.test(line)) {
      cls = "meta";
    } else if (line.startsWith("+")) {
      cls = "add";
    } else if (line.startsWith("-")) {
      cls = "del";
    } else if (line.startsWith("@@")) {
      cls = "hunk";
    }
    return el("span", `dl ${cls}`, `${line}\n`);
  }));
}

function approvalCard(info) {
  const li = el("li", `card approval kind-${info.kind}`);
  li.dataset.id = String(info.id);
  const head = el("div", "line head");
  head.appendChild(el("span", "aid", `#${info.id}`));
  head.appendChild(el("span", "chip kind", info.kind));
  head.appendChild(nameSpan(info.agent || "hive"));
  if (info.kind === "flake_update") {
    head.appendChild(el("span", "chip inputs", info.commit_ref || "all inputs"));
  }
  if (info.sha) {
    const sha = el("span", "sha", info.sha.slice(0, 10));
    sha.title = info.sha;
    head.appendChild(sha);
  }
  const ts = el("span", "ts", fmtTime(info.requested_at));
  ts.title = `requested ${new Date(info.requested_at * 1000).toLocaleString()}`;
  head.appendChild(ts);
  const status = el("span", "pill status");
  head.appendChild(status);
  li.appendChild(head);

  if (info.description) {
    const desc = el("div", "desc");
    longText(desc, info.description, DESCRIPTION_PREVIEW);
    li.appendChild(desc);
  }
  const diff = el("pre", "diff");
  diff.hidden = true;
  li.appendChild(diff);

  const actions = el("div", "line actions");
  const approve = button("✓ APPR0VE", "btn-accent approve", `approve #${info.id}`);
  const deny = button("✗ DENY", "btn-danger deny", `deny #${info.id}`);
  actions.appendChild(approve);
  actions.appendChild(deny);
  li.appendChild(actions);

  const denyForm = el("form", "deny-form");
  denyForm.autocomplete = "off";
  denyForm.hidden = true;
  denyForm.appendChild(el("span", "prompt", "note>"));
  const note = el("input", "note");
  note.name = "note";
  note.maxLength = 4000;
  note.placeholder = "why (optional) · reaches the manager";
  note.setAttribute("aria-label", `note for denying #${info.id}`);
  denyForm.appendChild(note);
  const confirmDeny = button("✗ deny", "btn-danger confirm-deny");
  confirmDeny.type = "submit";
  denyForm.appendChild(confirmDeny);
  const back = button("cancel", "back");
  denyForm.appendChild(back);
  li.appendChild(denyForm);

  const problem = el("div", "problem");
  problem.hidden = true;
  li.appendChild(problem);

  const card = {
    info, diff: null, diffShown: null, busy: false, error: "", removal: null,
    li, status, diffPre: diff, actions, approve, deny, denyForm, note, problem,
  };
  approve.addEventListener("click", () => decide(card, { cmd: "approve", id: info.id }));
  deny.addEventListener("click", () => {
    denyForm.hidden = false;
    note.focus();
  });
  back.addEventListener("click", () => {
    denyForm.hidden = true;
  });
  denyForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    decide(card, { cmd: "deny", id: info.id, note: note.value.trim() });
  });
  return card;
}

function paintApproval(card) {
  const { info } = card;
  const final = FINAL.has(info.status);
  let label = info.status;
  if (card.busy && info.status === "pending") label = BUSY_LABEL[info.kind] || "working";
  const working = !final && label !== "pending";
  card.status.textContent = working ? `${label}…` : label;
  card.status.className = `pill status st-${final ? info.status : label}${working ? " transient" : ""}`;
  card.li.classList.toggle("resolved", final);
  card.li.classList.toggle("busy", working);
  card.actions.hidden = final;
  card.approve.disabled = card.deny.disabled = working || final;
  if (final || working) card.denyForm.hidden = true;
  if (card.diff && card.diff !== card.diffShown) {
    renderDiff(card.diffPre, card.diff);
    card.diffShown = card.diff;
    card.diffPre.hidden = false;
  }
  let problem = card.error;
  if (final && info.note) problem = `${info.status}: ${info.note}`;
  card.problem.textContent = problem;
  card.problem.hidden = !problem;
  card.problem.className = `problem ${final && !card.error ? `st-${info.status}` : ""}`;
  countApprovals();
}

function upsertApproval(info, diff) {
  let card = approvals.get(info.id);
  if (!card) {
    if (FINAL.has(info.status)) return; // resolved before we ever saw it
    card = approvalCard(info);
    approvals.set(info.id, card);
    approvalList.appendChild(card.li);
  }
  if (diff) card.diff = diff;
  if (rank(info.status) < rank(card.info.status)) {
    paintApproval(card);
    return;
  }
  card.info = info;
  if (FINAL.has(info.status)) {
    card.busy = false;
    if (card.removal === null) {
      card.removal = setTimeout(() => {
        card.li.remove();
        approvals.delete(info.id);
        countApprovals();
      }, LINGER_MS);
    }
  }
  paintApproval(card);
}

async function decide(card, request) {
  card.busy = true;
  card.error = "";
  paintApproval(card);
  try {
    const reply = await host(request);
    card.busy = false;
    upsertApproval(reply.approval);
    toast(`#${reply.approval.id} ${reply.approval.status}`, reply.approval.status === "failed"
      ? "error" : "ok");
  } catch (err) {
    card.busy = false;
    card.error = `✗ ${describe(err)}`;
    paintApproval(card);
  }
}

/**
 * Fetch the pending approvals (with their diffs). After a reconnect (`resync`), a card the
 * daemon no longer lists ended while the page was not listening; otherwise only pending ones
 * are dropped, as a building/spawning card waits for its event.
 */
async function refreshApprovals(resync) {
  const reply = await host({ cmd: "pending" });
  const seen = new Set();
  for (const a of reply.approvals) {
    seen.add(a.id);
    upsertApproval(a, a.diff);
  }
  for (const [id, card] of approvals) {
    const stale = resync || card.info.status === "pending";
    if (!seen.has(id) && !card.busy && card.removal === null && stale) {
      card.li.remove();
      approvals.delete(id);
    }
  }
  countApprovals();
}

// ------------------------------------------------------------------ questions
const questionList = document.getElementById("questions");
const questions = new Map(); // id → card state
const countQuestions = counter(
  questionList, document.getElementById("questions-empty"),
  document.getElementById("questions-count"),
);

function questionCard(info) {
  const li = el("li", "card question");
  li.dataset.id = String(info.id);
  const head = el("div", "line head");
  head.appendChild(el("span", "aid", `#${info.id}`));
  head.appendChild(nameSpan(info.asker));
  if (info.target) {
    head.appendChild(el("span", "arrow", "→"));
    head.appendChild(nameSpan(info.target));
    head.appendChild(el("span", "chip peer", "peer"));
  }
  if (info.multi) head.appendChild(el("span", "chip multi", "several"));
  const ts = el("span", "ts", fmtTime(info.asked_at));
  ts.title = `expires ${new Date(info.deadline_at * 1000).toLocaleString()}`;
  head.appendChild(ts);
  // A live countdown to the question's deadline (its TTL), updated every second.
  const ttl = el("span", "ttl");
  ttl.dataset.deadline = String(info.deadline_at);
  head.appendChild(ttl);
  tickTtl(ttl);
  const status = el("span", "pill status st-pending", "pending");
  head.appendChild(status);
  li.appendChild(head);

  const text = el("div", "qtext");
  longText(text, info.question, QUESTION_PREVIEW);
  li.appendChild(text);

  const picked = new Set();
  const card = { info, busy: false, error: "", removal: null, li, status, buttons: [], picked };
  if (info.options.length) {
    const opts = el("div", "options");
    opts.setAttribute("role", "group");
    opts.setAttribute("aria-label", `options for question #${info.id}`);
    for (const option of info.options) {
      const b = button(option, "option");
      if (info.multi) {
        b.setAttribute("aria-pressed", "false");
        b.addEventListener("click", () => {
          if (picked.has(option)) picked.delete(option);
          else picked.add(option);
          b.setAttribute("aria-pressed", String(picked.has(option)));
          send.disabled = card.busy || picked.size === 0;
        });
      } else {
        b.addEventListener("click", () => answer(card, option));
      }
      opts.appendChild(b);
      card.buttons.push(b);
    }
    li.appendChild(opts);
  }
  const send = button("✓ answer with the picked", "btn-accent send-picked");
  if (info.multi && info.options.length) {
    send.disabled = true;
    // Picked in the order the asker listed them.
    send.addEventListener("click", () => {
      answer(card, info.options.filter((o) => picked.has(o)).join(", "));
    });
    li.appendChild(send);
    card.buttons.push(send);
  }

  const form = el("form", "answer-form");
  form.autocomplete = "off";
  form.appendChild(el("span", "prompt", "answer>"));
  const input = el("input", "free");
  input.name = "answer";
  input.placeholder = info.options.length ? "or answer in your own words" : "your answer";
  input.setAttribute("aria-label", `answer to question #${info.id}`);
  form.appendChild(input);
  const submit = button("send ⏎", "submit");
  submit.type = "submit";
  form.appendChild(submit);
  const cancel = button("✗ cancel", "btn-danger cancel", `cancel question #${info.id}`);
  form.appendChild(cancel);
  li.appendChild(form);
  card.buttons.push(submit, cancel);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (input.value.trim()) answer(card, input.value.trim());
  });
  cancel.addEventListener("click", () => resolve(card, { cmd: "cancel_question", id: info.id }));
  card.form = form;

  const problem = el("div", "problem");
  problem.hidden = true;
  li.appendChild(problem);
  card.problem = problem;
  return card;
}

function paintQuestion(card) {
  const { info } = card;
  const done = info.answered_at !== null && info.answered_at !== undefined;
  card.li.classList.toggle("resolved", done);
  card.status.textContent = done ? `${info.answerer}: ${info.answer}` : card.busy ? "sending…" : "pending";
  card.status.className = `pill status ${done ? "st-answered" : card.busy ? "transient" : "st-pending"}`;
  for (const b of card.buttons) {
    const nothingPicked = b.classList.contains("send-picked") && card.picked.size === 0;
    b.disabled = done || card.busy || nothingPicked;
  }
  card.form.hidden = done;
  card.problem.textContent = card.error;
  card.problem.hidden = !card.error;
  countQuestions();
}

function upsertQuestion(info) {
  let card = questions.get(info.id);
  const done = info.answered_at !== null && info.answered_at !== undefined;
  if (!card) {
    if (done) return;
    card = questionCard(info);
    questions.set(info.id, card);
    questionList.appendChild(card.li);
  }
  if (!done && card.info.answered_at) return; // a listing older than the answer
  card.info = info;
  if (done) {
    card.busy = false;
    if (card.removal === null) {
      card.removal = setTimeout(() => {
        card.li.remove();
        questions.delete(info.id);
        countQuestions();
      }, LINGER_MS);
    }
  }
  paintQuestion(card);
}

function answer(card, text) {
  return resolve(card, { cmd: "answer", id: card.info.id, answer: text });
}

async function resolve(card, request) {
  card.busy = true;
  card.error = "";
  paintQuestion(card);
  try {
    const reply = await host(request);
    card.busy = false;
    upsertQuestion(reply.question);
  } catch (err) {
    card.busy = false;
    card.error = `✗ ${describe(err)}`;
    paintQuestion(card);
  }
}

async function refreshQuestions() {
  const reply = await host({ cmd: "questions" });
  const seen = new Set();
  for (const q of reply.questions) {
    seen.add(q.id);
    upsertQuestion(q);
  }
  for (const [id, card] of questions) {
    if (!seen.has(id) && !card.busy && card.removal === null) {
      card.li.remove();
      questions.delete(id);
    }
  }
  countQuestions();
}

// ------------------------------------------------------------------ request a spawn
const spawnForm = document.getElementById("request-spawn-form");
spawnForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = document.getElementById("request-spawn-name");
  const description = document.getElementById("request-spawn-description");
  const submit = spawnForm.querySelector("button");
  submit.disabled = true;
  try {
    const reply = await host({
      cmd: "request_spawn", name: name.value.trim(), description: description.value.trim(),
    });
    toast(`spawn of ${name.value.trim()} queued as #${reply.id}`, "ok");
    name.value = "";
    description.value = "";
  } catch (err) {
    toast(`request spawn: ${describe(err)}`, "error");
  } finally {
    submit.disabled = false;
  }
});

// ------------------------------------------------------------------ events
/** Every (re)connect of the event stream: whatever changed meanwhile is fetched again. */
export async function sync() {
  try {
    await Promise.all([refreshApprovals(true), refreshQuestions()]);
  } catch (err) {
    toast(`approvals and questions: ${describe(err)}`, "error");
    throw err;
  }
}

export function onEvent(ev) {
  if (ev.event === "approval_changed") {
    const known = approvals.has(ev.approval.id);
    upsertApproval(ev.approval);
    // The event carries no diff: a new proposal's diff comes with `pending`.
    if (!known && ev.approval.status === "pending" && ev.approval.kind === "apply_commit") {
      refreshApprovals(false).catch((err) => toast(`approvals: ${describe(err)}`, "error"));
    }
  } else if (ev.event === "question_changed") {
    upsertQuestion(ev.question);
  }
}

countApprovals();
countQuestions();

function tickTtl(span) {
  const left = Number(span.dataset.deadline) - Date.now() / 1000;
  if (left <= 0) {
    span.textContent = "⏳ expiring";
    return;
  }
  const h = Math.floor(left / 3600);
  const m = Math.floor((left % 3600) / 60);
  const sec = Math.floor(left % 60);
  span.textContent = `⏳ ${h ? `${h}h ` : ""}${h || m ? `${m}m ` : ""}${sec}s`;
}

setInterval(() => document.querySelectorAll(".ttl[data-deadline]").forEach(tickTtl), 1000);
