// The console: chat with streaming and Stop, conversations, branches, settings, keys.
// Talks to this server's own HTTP API only (same origin).
import { render } from "./markdown.js";
import { apply, setLanguage, language, t } from "./i18n.js";

const $ = (id) => document.getElementById(id);
const KEY = "easybackend.key";
// The answer being received ({id, turn, prompt}), kept in this tab so that a reload (or a
// dropped connection) picks it up where it is: the console asks in the background.
const ANSWER = "easybackend.answer";
const REATTACHES = 5; // tries to follow an answer again after its stream broke

const state = {
  id: null, conversation: null, controller: null, answer: null, models: null,
  keyDismissed: false, // the key prompt was closed without a key: 401s only say why
  stopWanted: false, // Stop was pressed before the answer's start named its turn
};

// -- requests ----------------------------------------------------------------------------

function headers(key, extra = {}) {
  return { ...(key ? { Authorization: "Bearer " + key } : {}), ...extra };
}

let keyPrompt = null; // the key prompt while it is open: requests refused meanwhile wait for it

// Asks for a key (refused: the one kept was refused); true once one was typed. Requests that
// need a key while the prompt is open wait for the same answer.
function askKey(refused = false) {
  keyPrompt ??= new Promise((resolve) => {
    const box = $("keybox");
    $("key").value = "";
    $("key-why").textContent = t(refused ? "keyRefused" : "keyNeeded");
    box.addEventListener("close", () => {
      const key = $("key").value.trim();
      if (key) sessionStorage.setItem(KEY, key);
      state.keyDismissed = !key;
      keyPrompt = null;
      resolve(Boolean(key));
    }, { once: true });
    box.showModal();
  });
  return keyPrompt;
}

// fetch on this server. On a 401 the key is asked for and the request sent again with it: a
// key that was refused is forgotten and another asked for; after the prompt was closed without
// one, the notice says why requests fail (its button opens the prompt again).
async function call(path, options = {}) {
  const send = (key) => fetch(path, {
    ...options,
    headers: headers(key, {
      ...(options.body ? { "Content-Type": "application/json" } : {}),
      ...(options.headers ?? {}),
    }),
  });
  let key = sessionStorage.getItem(KEY);
  let response = await send(key);
  while (response.status === 401) {
    if (sessionStorage.getItem(KEY) === key) { // not replaced meanwhile: this one is no good
      if (key === null && state.keyDismissed) break;
      if (key !== null) sessionStorage.removeItem(KEY);
      if (!(await askKey(key !== null))) break;
    }
    key = sessionStorage.getItem(KEY);
    response = await send(key);
  }
  if (response.status === 401) notice(t("unauthorized"), { label: t("enterKey"), run: enterKey });
  else if (response.ok) notice("");
  return response;
}

// The notice's button after a 401: ask for a key, then show the conversation and list with it.
async function enterKey() {
  if (await askKey()) await openConversation(state.id);
}

async function json(path, options) {
  const response = await call(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body?.error?.message || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

// A line above the messages (empty: hidden), with a button when ``action`` ({label, run}) is given.
function notice(text, action = null) {
  $("notice").textContent = text;
  if (action) $("notice").append(" ", button(action.label, action.run, "notice-action"));
  $("notice").hidden = !text;
}

const jsonBody = (value) => ({ method: "PUT", body: JSON.stringify(value) });
const conv = (suffix = "") => "/conversations/" + encodeURIComponent(state.id) + suffix;

// -- conversations ------------------------------------------------------------------------

function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return "c-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

let listings = 0; // listings asked for so far: only the newest one is drawn

async function loadList() {
  const q = $("search").value.trim();
  const listing = ++listings;
  let page;
  try {
    page = await json("/conversations?limit=100" + (q ? "&q=" + encodeURIComponent(q) : ""));
  } catch (error) {
    if (error.status !== 401) notice(t("failed") + ": " + error.message);
    return;
  }
  // An older listing answering after a newer one would draw the list as it was before.
  if (listing !== listings) return;
  const list = $("conversations");
  list.replaceChildren();
  for (const c of page.conversations) {
    const item = document.createElement("li");
    item.dataset.id = c.conversation_id;
    item.textContent = c.title || c.conversation_id;
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = new Date(c.last_activity).toLocaleString(language() === "zh" ? "zh-CN" : "en");
    item.append(when);
    if (c.conversation_id === state.id) item.classList.add("active");
    item.addEventListener("click", () => openConversation(c.conversation_id));
    list.append(item);
  }
}

async function openConversation(id) {
  state.id = id;
  location.hash = encodeURIComponent(id);
  await reload();
  await loadList();
  if (!$("settings").hidden) await loadSettings();
}

async function reload() {
  try {
    state.conversation = await json(conv());
  } catch (error) {
    state.conversation = null; // a new conversation: stored with its first ask
    if (error.status && error.status !== 404 && error.status !== 401) notice(error.message);
  }
  draw();
}

function newConversation() {
  state.id = newId();
  state.conversation = null;
  location.hash = state.id;
  draw();
  loadList();
  if (!$("settings").hidden) loadSettings();
  $("prompt").focus();
}

// -- drawing ------------------------------------------------------------------------------

function bubble(role, text) {
  const node = document.createElement("div");
  node.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "assistant") body.append(render(text));
  else body.textContent = text;
  node.append(body);
  return node;
}

function tools(node) {
  const bar = document.createElement("div");
  bar.className = "tools";
  node.append(bar);
  return bar;
}

function button(label, onclick, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (className) b.className = className;
  b.addEventListener("click", onclick);
  return b;
}

function draw() {
  const c = state.conversation;
  $("title").textContent = c?.title || (c ? c.conversation_id : t("untitled"));
  const box = $("messages");
  box.replaceChildren();
  for (const turn of c?.history ?? []) {
    const prompt = turn.messages.find((m) => m.role === "user")?.text ?? "";
    const answer = turn.messages.find((m) => m.role === "assistant")?.text ?? "";
    const user = bubble("user", prompt);
    user.dataset.turn = turn.id;
    const userTools = tools(user);
    if (turn.siblings.length > 1) {
      const at = turn.siblings.indexOf(turn.id);
      const nav = document.createElement("span");
      nav.className = "siblings";
      nav.append(
        button("‹", () => switchTo(turn.siblings[at - 1]), "prev"),
        document.createTextNode(` ${at + 1}/${turn.siblings.length} `),
        button("›", () => switchTo(turn.siblings[at + 1]), "next"),
      );
      nav.querySelector(".prev").disabled = at === 0;
      nav.querySelector(".next").disabled = at === turn.siblings.length - 1;
      userTools.append(nav);
    }
    userTools.append(button(t("edit"), () => editPrompt(user, turn, prompt), "edit"));
    const reply = bubble("assistant", answer);
    reply.dataset.turn = turn.id;
    reply.dataset.finish = turn.finish_reason;
    const replyTools = tools(reply);
    if (turn.finish_reason === "cancelled") {
      reply.classList.add("cancelled");
      const label = document.createElement("span");
      label.className = "stopped";
      label.textContent = t("cancelled");
      replyTools.append(label);
    }
    replyTools.append(button(t("regenerate"), () => regenerate(turn.id), "regenerate"));
    box.append(user, reply);
  }
  box.scrollTop = box.scrollHeight;
}

function editPrompt(node, turn, prompt) {
  const form = document.createElement("div");
  form.className = "edit-box";
  const area = document.createElement("textarea");
  area.value = prompt;
  form.append(area, button(t("send"), () => {
    const text = area.value.trim();
    if (text) ask(text, turn.parent_id ?? "root");
  }, "edit-send"));
  node.replaceChildren(form);
  area.focus();
}

async function switchTo(turnId) {
  if (!turnId) return;
  await json(conv("/head"), jsonBody({ turn_id: turnId }));
  await reload();
}

// -- asking -------------------------------------------------------------------------------

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("stop").disabled = false;
  $("stop").textContent = t("stop");
}

// Reads Server-Sent Events from a fetch response; calls onEvent(name, data, id) for each.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      let id = null;
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        else if (line.startsWith("id:")) id = Number(line.slice(3).trim());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")), id);
    }
  }
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Asks in the background and shows the answer as it streams; when the stream breaks (a network
// drop), follows the answer again from the last event received (Last-Event-ID).
async function stream(path, body, promptText) {
  if (state.controller) return;
  const answer = { id: state.id, turn: null, prompt: promptText };
  await receive(answer, (signal) => call(path, {
    method: "POST", body: JSON.stringify({ ...body, background: true }), signal,
  }));
}

// Follows the answer of this tab that a reload interrupted (see ANSWER), from its start: live
// if it is still being written (the conversation itself is read once it is stored), else
// replayed. One that is gone (its conversation deleted) is forgotten quietly.
async function resumeAnswer() {
  const kept = JSON.parse(sessionStorage.getItem(ANSWER) || "null");
  if (!kept || kept.id !== state.id || state.controller) return;
  await receive(kept, async (signal) => {
    const response = await call(conv("/turns/" + encodeURIComponent(kept.turn) + "/stream"), { signal });
    if (response.status === 404) {
      sessionStorage.removeItem(ANSWER);
      const gone = new Error("gone");
      gone.name = "AbortError"; // nothing to say
      throw gone;
    }
    return response;
  });
}

async function receive(answer, open) {
  const box = $("messages");
  if (answer.prompt !== null) box.append(bubble("user", answer.prompt));
  const reply = bubble("assistant", "");
  reply.classList.add("streaming");
  box.append(reply);
  box.scrollTop = box.scrollHeight;
  let text = "";
  let seen = 0;
  let ended = false;
  state.controller = new AbortController();
  state.answer = answer;
  state.stopWanted = false;
  const signal = state.controller.signal;
  busy(true);
  try {
    let response = await open(signal);
    for (let attempt = 0; ; attempt++) {
      if (!response.ok) {
        const error = await response.json().catch(() => ({}));
        throw new Error(error?.error?.message || response.statusText);
      }
      try {
        await readEvents(response, (name, data, id) => {
          if (id) seen = id;
          if (name === "start") {
            answer.turn = data.turn_id;
            sessionStorage.setItem(ANSWER, JSON.stringify(answer));
            if (state.stopWanted) cancel(answer); // Stop came first: cancel it now
          } else if (name === "delta") {
            text += data.text;
            reply.querySelector(".body").replaceChildren(render(text));
            box.scrollTop = box.scrollHeight;
          } else if (name === "end") {
            ended = true;
          } else if (name === "error") {
            ended = true;
            notice(t("failed") + ": " + data.message);
          }
        });
      } catch (error) {
        if (error.name === "AbortError") throw error; // else the connection broke: follow again
      }
      if (ended || !answer.turn || attempt >= REATTACHES) break;
      await pause(500 * (attempt + 1));
      const follow = conv("/turns/" + encodeURIComponent(answer.turn) + "/stream");
      response = await call(follow, { headers: { "Last-Event-ID": String(seen) }, signal });
    }
  } catch (error) {
    if (error.name !== "AbortError") notice(t("failed") + ": " + error.message);
  } finally {
    if (ended || !answer.turn) sessionStorage.removeItem(ANSWER);
    state.controller = null;
    state.answer = null;
    state.stopWanted = false;
    busy(false);
  }
  await reload();
  await loadList();
}

function ask(prompt, parentId) {
  const body = { prompt };
  if (parentId) body.parent_id = parentId;
  return stream("/ask/" + encodeURIComponent(state.id) + "/stream", body, prompt);
}

function regenerate(turnId) {
  return stream(conv("/turns/" + encodeURIComponent(turnId) + "/regenerate/stream"), {}, null);
}

// Stop: the answer is cancelled on the server (stored as cancelled, or not at all when none of
// it was written yet); its stream then ends. Before its first event the turn is not known, and
// giving the request up would not cancel it (the console asks in the background): the request
// goes on, and the answer is cancelled as soon as its start names the turn (see receive).
function stop() {
  const answer = state.answer;
  if (!answer) return;
  $("stop").disabled = true;
  $("stop").textContent = t("stopping"); // until the answer's end reaches the page
  if (answer.turn) cancel(answer);
  else state.stopWanted = true;
}

// Cancels the answer on the server; when that fails (it ended already, say), stops reading it.
async function cancel(answer) {
  const path = "/conversations/" + encodeURIComponent(answer.id) + "/turns/" +
    encodeURIComponent(answer.turn) + "/cancel";
  const response = await call(path, { method: "POST" }).catch(() => null);
  if (!response?.ok && state.answer === answer) state.controller?.abort();
}

// -- settings -----------------------------------------------------------------------------

let settingsLoads = 0; // loads asked for so far: only the newest one fills the form

// The form stays disabled while it loads: what a user typed before the stored values arrived
// would otherwise be overwritten by them (and saved as the old values).
async function loadSettings() {
  const load = ++settingsLoads;
  $("settings-form").disabled = true;
  $("settings-status").textContent = "";
  if (!state.models) {
    try {
      state.models = await json("/models");
    } catch {
      state.models = { default: null, models: [] };
    }
  }
  let summary = "";
  if (state.conversation) {
    try {
      summary = (await json(conv("/summary"))).summary ?? "";
    } catch { /* no summary */ }
  }
  if (load !== settingsLoads) return;
  const s = state.conversation?.settings ?? {};
  const select = $("set-model");
  select.replaceChildren();
  const first = new Option(t("serverDefault") + (state.models.default ? ` (${state.models.default})` : ""), "");
  select.append(first);
  for (const m of state.models.models) select.append(new Option(m.name, m.name));
  select.value = s.model ?? "";
  $("set-title").value = s.title ?? state.conversation?.title ?? "";
  $("set-system").value = s.system ?? state.conversation?.system_prompt ?? "";
  $("set-temperature").value = s.temperature ?? "";
  $("set-memory").value = s.memory ?? "";
  $("summary").value = summary;
  $("settings-form").disabled = false;
}

async function saveSettings() {
  const temperature = $("set-temperature").value;
  const body = {
    title: $("set-title").value.trim() || null,
    system: $("set-system").value,
    model: $("set-model").value || null,
    temperature: temperature === "" ? null : Number(temperature),
    memory: $("set-memory").value || null,
  };
  try {
    await json(conv("/settings"), jsonBody(body));
    $("settings-status").textContent = t("saved");
  } catch (error) {
    $("settings-status").textContent = t("failed") + ": " + error.message;
  }
  await reload();
  await loadList();
}

async function saveSummary() {
  const summary = $("summary").value.trim();
  if (!summary) return;
  try {
    await json(conv("/summary"), jsonBody({ summary }));
    $("settings-status").textContent = t("saved");
  } catch (error) {
    $("settings-status").textContent = t("failed") + ": " + error.message;
  }
}

// -- the rest -----------------------------------------------------------------------------

async function exportConversation() {
  const data = await json(conv("?view=tree"));
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  link.download = state.id + ".json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function deleteConversation() {
  if (!state.conversation || !confirm(t("confirmDelete"))) return;
  await call(conv(), { method: "DELETE" });
  newConversation();
}

// Moves the head back one turn; the turn stays in the tree as a branch (‹ › reaches it).
async function rollback() {
  if (!state.conversation?.turns) return;
  await json(conv("/rollback"), { method: "POST", body: JSON.stringify({ turns: 1 }) });
  await reload();
  await loadList();
}

async function rename() {
  const title = prompt(t("renamePrompt"), state.conversation?.title ?? "");
  if (title === null) return;
  await json(conv("/settings"), jsonBody({ title: title.trim() || null }));
  await reload();
  await loadList();
}

function start() {
  $("lang").value = language();
  apply();
  $("lang").addEventListener("change", (e) => {
    setLanguage(e.target.value);
    draw();
    loadList();
  });
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || state.controller) return;
    $("prompt").value = "";
    ask(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newConversation);
  let timer;
  $("search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(loadList, 250);
  });
  $("export").addEventListener("click", exportConversation);
  $("delete").addEventListener("click", deleteConversation);
  $("rename").addEventListener("click", rename);
  $("rollback").addEventListener("click", rollback);
  $("settings-toggle").addEventListener("click", () => {
    $("settings").hidden = !$("settings").hidden;
    if (!$("settings").hidden) loadSettings();
  });
  $("save-settings").addEventListener("click", saveSettings);
  $("save-summary").addEventListener("click", saveSummary);
  const fromHash = decodeURIComponent(location.hash.slice(1));
  if (fromHash) {
    openConversation(fromHash);
    resumeAnswer(); // an answer a reload cut off: not after the conversation, which waits for it
  } else newConversation();
}

start();
