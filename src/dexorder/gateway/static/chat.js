// The Dexorder web chat: the documented WebSocket protocol (schemas/ws-protocol.schema.json)
// with first-frame auth. No build step, no framework: the DOM, a socket, and markdown.js.
"use strict";

(function () {
  const md = window.DexorderMarkdown;
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"),
    input: $("input"),
    send: $("send"),
    stop: $("stop"),
    conn: $("conn"),
    status: $("status"),
    statusText: $("status-text"),
    offline: $("offline-banner"),
    newChat: $("new-chat"),
    tokenForm: $("token-form"),
    tokenInput: $("token-input"),
    composer: $("composer"),
    reconnectNow: $("reconnect-now"),
  };

  const STORE = window.sessionStorage;
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  const CLOSE_UNAUTHORIZED = 4401;
  const CLOSE_LICENSE_REFUSED = 4403;
  const STAGE_LABELS = {
    provisioning: "Provisioning your agent",
    waking: "Waking your agent",
    starting: "Starting your agent",
    ready: "Your agent is ready",
    queued: "Queued",
    retrying: "Retrying",
  };
  const ERROR_LABELS = {
    bad_request: "The gateway did not understand a message",
    unauthorized: "Not signed in",
    rate_limited: "Too many messages",
    agent_unavailable: "Your agent is unavailable",
    llm_error: "The model failed",
    service_unavailable: "The service is unavailable",
    license_refused: "Your license does not allow this",
    queue_full: "Too many messages waiting",
    approval_invalid: "Nothing is waiting for approval",
    internal: "Something went wrong in the gateway",
    too_many_sockets: "Too many open connections",
    agents_at_capacity: "No room for a new agent",
  };

  const state = {
    demo: false,
    token: STORE.getItem("dexorder.token") || "",
    sessionId: STORE.getItem("dexorder.session") || newSessionId(),
    transcript: [],
    ws: null,
    connected: false,
    attempt: 0,
    reconnectTimer: null,
    authFailures: 0,
    stopped: false, // no reconnect: refused for good
    turns: [], // assistant entries waiting for their frames, oldest first
    stages: [], // every status stage seen, for tests and curious people
  };
  STORE.setItem("dexorder.session", state.sessionId);
  window.dexorderChat = state; // for tests and curious people

  function newSessionId() {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // --- the transcript, kept per session so a reload shows it again --------------------------

  function transcriptKey() {
    return "dexorder.transcript." + state.sessionId;
  }

  function saveTranscript() {
    try {
      STORE.setItem(transcriptKey(), JSON.stringify(state.transcript.map(({ node, ...rest }) => rest)));
    } catch (error) {
      console.warn("transcript not saved", error);
    }
  }

  function loadTranscript() {
    let saved = [];
    try {
      saved = JSON.parse(STORE.getItem(transcriptKey()) || "[]");
    } catch (error) {
      saved = [];
    }
    for (const entry of saved) {
      if (entry.pending) {
        entry.pending = false;
        entry.interrupted = entry.interrupted || "interrupted by a reload";
      }
      state.transcript.push(entry);
      ui.messages.appendChild(renderEntry(entry));
    }
    scrollToEnd(true);
  }

  // --- rendering ----------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function nearEnd() {
    const m = ui.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  // Whether the reader is at the end of the conversation (and so should follow new text).
  let following = true;

  function scrollToEnd(force) {
    if (force || nearEnd()) ui.messages.scrollTop = ui.messages.scrollHeight;
    following = nearEnd();
  }

  function renderEntry(entry) {
    let node;
    if (entry.role === "user") {
      node = el("div", "msg user");
      node.appendChild(el("div", "who", "You"));
      node.appendChild(el("div", "body plain", entry.text));
    } else if (entry.role === "error") {
      node = el("div", "msg error");
      node.setAttribute("role", "alert");
      node.appendChild(el("strong", "", entry.title + ". "));
      node.appendChild(el("span", "", entry.text));
    } else {
      node = el("div", "msg assistant");
      node.appendChild(el("div", "who", "Agent"));
      node.appendChild(el("div", "turn-status"));
      node.appendChild(el("div", "parts"));
      node.appendChild(el("div", "meta"));
      entry.node = node;
      for (const part of entry.parts) appendPart(entry, part);
      renderMeta(entry);
    }
    entry.node = node;
    return node;
  }

  function appendPart(entry, part) {
    const parts = entry.node.querySelector(".parts");
    if (part.kind === "text") {
      const node = el("div", "part text md");
      node.innerHTML = md.render(part.text);
      part.node = node;
      parts.appendChild(node);
    } else if (part.kind === "tool") {
      const details = el("details", "part tool");
      details.dataset.toolId = part.id;
      const summary = el("summary");
      summary.appendChild(el("span", "tool-icon", "⚙"));
      summary.appendChild(el("span", "tool-name", part.name));
      summary.appendChild(el("span", "tool-state", ""));
      details.appendChild(summary);
      details.appendChild(el("div", "tool-label", "arguments"));
      details.appendChild(el("pre", "tool-args", JSON.stringify(part.args, null, 2)));
      details.appendChild(el("div", "tool-label", "result"));
      details.appendChild(el("pre", "tool-result", ""));
      part.node = details;
      parts.appendChild(details);
      renderToolResult(part);
    } else if (part.kind === "sources") {
      const details = el("details", "part sources");
      details.appendChild(el("summary", "", "Sources (" + part.items.length + ")"));
      const list = el("ol");
      for (const item of part.items) {
        const li = el("li", "", (item.title || item.source) + " — score " + Number(item.score).toFixed(2));
        if (item.excerpt) li.appendChild(el("div", "excerpt", item.excerpt));
        list.appendChild(li);
      }
      details.appendChild(list);
      part.node = details;
      parts.appendChild(details);
    } else if (part.kind === "approval") {
      const box = el("div", "part approval");
      box.appendChild(el("div", "approval-summary", part.summary));
      if (part.details && Object.keys(part.details).length) {
        box.appendChild(el("pre", "approval-details", JSON.stringify(part.details, null, 2)));
      }
      const buttons = el("div", "approval-buttons");
      const answer = (approve) => {
        if (send({ type: "approval", request_id: part.requestId, approve })) {
          part.answered = approve ? "approved" : "rejected";
          renderApproval(part);
          saveTranscript();
        }
      };
      const yes = el("button", "approve", "Approve");
      yes.type = "button";
      yes.addEventListener("click", () => answer(true));
      const no = el("button", "reject", "Reject");
      no.type = "button";
      no.addEventListener("click", () => answer(false));
      buttons.append(yes, no);
      box.appendChild(buttons);
      box.appendChild(el("div", "approval-answer"));
      part.node = box;
      parts.appendChild(box);
      renderApproval(part);
    }
  }

  function renderApproval(part) {
    const answered = Boolean(part.answered);
    for (const button of part.node.querySelectorAll("button")) button.disabled = answered;
    const answer = answered ? "You " + part.answered + " this." : "";
    part.node.querySelector(".approval-answer").textContent = answer + (part.result ? " " + part.result : "");
  }

  function findApproval(requestId) {
    for (const entry of state.transcript) {
      for (const part of entry.parts || []) {
        if (part.kind === "approval" && part.requestId === requestId) return part;
      }
    }
    return null;
  }

  // An agent message that belongs to no reply of ours (a reminder, a late result).
  function standaloneEntry() {
    const entry = { role: "assistant", parts: [], pending: false };
    state.transcript.push(entry);
    ui.messages.appendChild(renderEntry(entry));
    return entry;
  }

  function renderToolResult(part) {
    const stateNode = part.node.querySelector(".tool-state");
    const result = part.node.querySelector(".tool-result");
    if (part.result === undefined) {
      stateNode.textContent = "running…";
      result.textContent = "";
    } else {
      stateNode.textContent = part.isError ? "failed" : "done";
      part.node.classList.toggle("failed", Boolean(part.isError));
      result.textContent = part.result;
    }
  }

  function renderMeta(entry) {
    const meta = entry.node.querySelector(".meta");
    const status = entry.node.querySelector(".turn-status");
    entry.node.classList.toggle("pending", Boolean(entry.pending));
    status.textContent = entry.pending ? entry.stage || "" : "";
    const bits = [];
    if (entry.cancelled) bits.push("stopped");
    if (entry.interrupted) bits.push(entry.interrupted);
    if (entry.model) bits.push(entry.model + (isOfflineModel(entry.model) ? " (offline, scripted)" : ""));
    if (entry.tokens) bits.push(entry.tokens + " tokens");
    if (entry.route) bits.push("group " + entry.route);
    meta.textContent = bits.join(" · ");
  }

  let renderQueued = new Set();
  function scheduleRender(part) {
    renderQueued.add(part);
    if (renderQueued.size === 1) {
      requestAnimationFrame(() => {
        const follow = nearEnd();
        for (const queued of renderQueued) queued.node.innerHTML = md.render(queued.text);
        renderQueued = new Set();
        scrollToEnd(follow);
      });
    }
  }

  function isOfflineModel(model) {
    return /(^|\/)offline$/.test(model || "");
  }

  function showOffline() {
    ui.offline.hidden = false;
  }

  function setStatus(text, busy) {
    ui.status.hidden = !text;
    ui.statusText.textContent = text || "";
    ui.status.classList.toggle("busy", Boolean(busy));
  }

  function setConn(text, kind) {
    ui.conn.textContent = text;
    ui.conn.dataset.state = kind;
  }

  function refreshControls() {
    const generating = state.turns.length > 0;
    ui.stop.disabled = !(generating && state.connected);
    ui.send.disabled = !state.connected;
    ui.composer.classList.toggle("generating", generating);
  }

  function addError(title, text) {
    const entry = { role: "error", title, text };
    state.transcript.push(entry);
    ui.messages.appendChild(renderEntry(entry));
    scrollToEnd(true);
    saveTranscript();
  }

  // --- frames from the gateway -------------------------------------------------------------

  function currentTurn() {
    return state.turns[0];
  }

  function lastPart(entry, kind) {
    const last = entry.parts[entry.parts.length - 1];
    if (last && last.kind === kind) return last;
    return null;
  }

  function finishTurn(entry) {
    entry.pending = false;
    state.turns = state.turns.filter((turn) => turn !== entry);
    renderMeta(entry);
    saveTranscript();
    refreshControls();
  }

  const handlers = {
    ready(frame) {
      state.connected = true;
      state.attempt = 0;
      state.authFailures = 0;
      performance.mark("dexorder:ready");
      setConn("Connected as " + frame.user + " (" + frame.tier + ")", "connected");
      refreshControls();
    },
    status(frame) {
      const label = STAGE_LABELS[frame.stage] || frame.stage;
      state.stages.push(frame.stage);
      const busy = ["provisioning", "waking", "starting", "retrying", "queued"].includes(frame.stage);
      setStatus(label + (frame.message ? ": " + frame.message : ""), busy);
      // "queued" is about the message just sent; the rest about the reply being made.
      const entry = frame.stage === "queued" ? state.turns[state.turns.length - 1] : currentTurn();
      if (entry) {
        entry.stage = label + "…";
        renderMeta(entry);
      }
      if (frame.stage === "ready") setTimeout(() => { if (ui.statusText.textContent.startsWith(label)) setStatus(""); }, 4000);
    },
    delta(frame) {
      const entry = currentTurn();
      if (!entry) return;
      let part = lastPart(entry, "text");
      if (!part) {
        part = { kind: "text", text: "" };
        entry.parts.push(part);
        appendPart(entry, part);
      }
      part.text += frame.content;
      if (entry.stage) {
        entry.stage = "";
        renderMeta(entry);
      }
      scheduleRender(part);
    },
    tool_call(frame) {
      const entry = currentTurn();
      if (!entry) return;
      const part = { kind: "tool", id: frame.id, name: frame.name, args: frame.arguments };
      entry.parts.push(part);
      appendPart(entry, part);
      entry.stage = "Running " + frame.name + "…";
      renderMeta(entry);
      scrollToEnd(false);
    },
    tool_result(frame) {
      const entry = currentTurn();
      if (!entry) return;
      const part = entry.parts.find((p) => p.kind === "tool" && p.id === frame.id);
      if (!part) return;
      part.result = frame.content;
      part.isError = frame.is_error;
      renderToolResult(part);
      entry.stage = "Thinking…";
      renderMeta(entry);
    },
    sources(frame) {
      const entry = currentTurn();
      if (!entry) return;
      const part = { kind: "sources", items: frame.items };
      entry.parts.push(part);
      appendPart(entry, part);
    },
    approval_request(frame) {
      // Also outside a reply: a reminder of a review still waiting comes on its own.
      const entry = currentTurn() || standaloneEntry();
      const part = { kind: "approval", requestId: frame.request_id, summary: frame.summary, details: frame.details };
      entry.parts.push(part);
      appendPart(entry, part);
      scrollToEnd(true);
      saveTranscript();
    },
    approval_result(frame) {
      const part = findApproval(frame.request_id);
      if (part) {
        part.answered = frame.decision;
        part.result = frame.message;
        renderApproval(part);
      } else {
        const entry = standaloneEntry();
        const text = { kind: "text", text: frame.message };
        entry.parts.push(text);
        appendPart(entry, text);
      }
      saveTranscript();
    },
    done(frame) {
      const entry = currentTurn();
      if (!entry) return;
      entry.cancelled = frame.cancelled;
      entry.model = frame.model;
      entry.tokens = frame.usage ? frame.usage.total_tokens : 0;
      entry.route = frame.route ? frame.route.group : "";
      if (isOfflineModel(frame.model)) showOffline();
      for (const part of entry.parts) if (part.kind === "text") part.node.innerHTML = md.render(part.text);
      finishTurn(entry);
      setStatus("");
    },
    error(frame) {
      const title = ERROR_LABELS[frame.code] || "Error (" + frame.code + ")";
      let text = frame.message;
      if (frame.retry_after) text += " Try again in " + Math.ceil(frame.retry_after) + " s.";
      addError(title, text);
      // Every refused or failed message ends its turn with an error instead of `done`.
      const ends = ["rate_limited", "agent_unavailable", "agents_at_capacity", "llm_error", "service_unavailable", "license_refused", "queue_full", "internal"];
      // A full queue refuses the message just sent, not the one being answered.
      const entry = frame.code === "queue_full" ? state.turns[state.turns.length - 1] : currentTurn();
      if (entry && ends.includes(frame.code)) {
        entry.interrupted = entry.parts.length ? "failed" : "no reply: see the error below";
        finishTurn(entry);
      }
      setStatus("");
    },
    pong() {},
  };

  // Frames handed in as if the gateway sent them: for tests of what the page shows.
  state.receive = (frame) => onFrame({ data: JSON.stringify(frame) });

  function onFrame(event) {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch (error) {
      addError("Unreadable frame from the gateway", String(error));
      return;
    }
    const handler = handlers[frame.type];
    if (handler) handler(frame);
    else console.warn("unknown frame", frame);
  }

  // --- the connection ------------------------------------------------------------------------

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + "/ws/chat?session=" + encodeURIComponent(state.sessionId);
  }

  function send(frame) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN || !state.connected) return false;
    state.ws.send(JSON.stringify(frame));
    return true;
  }

  async function fetchDemoToken() {
    const response = await fetch("/api/demo-token", { method: "POST" });
    if (!response.ok) throw new Error("the demo token endpoint answered " + response.status);
    const body = await response.json();
    return body.token;
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    ui.reconnectNow.hidden = true;
    if (state.ws && state.ws.readyState <= WebSocket.OPEN) return;
    if (!state.token) {
      askForToken();
      return;
    }
    setConn(state.attempt ? "Reconnecting…" : "Connecting…", "connecting");
    performance.mark("dexorder:connect");
    const ws = new WebSocket(socketUrl());
    state.ws = ws;
    ws.addEventListener("open", () => {
      performance.mark("dexorder:socket-open");
      ws.send(JSON.stringify({ type: "auth", token: state.token }));
    });
    ws.addEventListener("message", onFrame);
    ws.addEventListener("close", (event) => onClose(ws, event));
  }

  function onClose(ws, event) {
    if (state.ws !== ws) return;
    state.ws = null;
    state.connected = false;
    for (const entry of state.turns) {
      entry.pending = false;
      entry.interrupted = "interrupted: the connection dropped";
      renderMeta(entry);
    }
    if (state.turns.length) saveTranscript();
    state.turns = [];
    refreshControls();
    if (event.code === CLOSE_LICENSE_REFUSED) {
      state.stopped = true;
      setConn("Refused", "closed");
      return;
    }
    if (event.code === CLOSE_UNAUTHORIZED) {
      state.authFailures += 1;
      if (!state.demo || state.authFailures > 2) {
        state.token = "";
        STORE.removeItem("dexorder.token");
        addError("Not signed in", event.reason || "the gateway refused the token");
        askForToken();
        return;
      }
      state.token = ""; // demo: fetch a fresh one on the retry below
    }
    scheduleReconnect(event.reason);
  }

  function scheduleReconnect(reason) {
    if (state.stopped) return;
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** state.attempt);
    const delay = Math.round(base * (0.75 + Math.random() * 0.5));
    state.attempt += 1;
    const seconds = Math.max(1, Math.round(delay / 1000));
    setConn("Disconnected" + (reason ? " (" + reason + ")" : "") + ". Reconnecting in " + seconds + " s…", "disconnected");
    ui.reconnectNow.hidden = false;
    state.reconnectTimer = setTimeout(reconnect, delay);
  }

  async function reconnect() {
    if (!state.token && state.demo) {
      try {
        state.token = await fetchDemoToken();
      } catch (error) {
        scheduleReconnect("no demo token: " + error.message);
        return;
      }
    }
    connect();
  }

  function askForToken() {
    setConn("Not connected: paste a token", "closed");
    ui.tokenForm.hidden = false;
    ui.tokenInput.focus();
  }

  // --- the user's side ------------------------------------------------------------------------

  function submitMessage() {
    const text = ui.input.value;
    if (!text.trim()) return;
    if (!send({ type: "message", content: text })) {
      addError("Not connected", "the message was not sent; it is still in the box");
      return;
    }
    const user = { role: "user", text };
    const agent = { role: "assistant", parts: [], pending: true, stage: "Thinking…" };
    state.transcript.push(user, agent);
    ui.messages.appendChild(renderEntry(user));
    ui.messages.appendChild(renderEntry(agent));
    state.turns.push(agent);
    ui.input.value = "";
    autosize();
    scrollToEnd(true);
    saveTranscript();
    refreshControls();
  }

  function stopGeneration() {
    if (state.turns.length && send({ type: "cancel" })) {
      const entry = currentTurn();
      entry.stage = "Stopping…";
      renderMeta(entry);
    }
  }

  function autosize() {
    ui.input.style.height = "auto";
    ui.input.style.height = Math.min(ui.input.scrollHeight, 200) + "px";
  }

  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitMessage();
    } else if (event.key === "Escape" && state.turns.length) {
      event.preventDefault();
      stopGeneration();
    }
  });
  ui.input.addEventListener("input", autosize);
  ui.messages.addEventListener("scroll", () => { following = nearEnd(); });
  window.addEventListener("resize", () => scrollToEnd(following));
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submitMessage();
  });
  ui.stop.addEventListener("click", stopGeneration);
  ui.reconnectNow.addEventListener("click", () => {
    state.attempt = 0;
    refreshControls();
    reconnect();
  });
  ui.newChat.addEventListener("click", () => {
    STORE.removeItem(transcriptKey());
    state.sessionId = newSessionId();
    STORE.setItem("dexorder.session", state.sessionId);
    state.transcript = [];
    ui.messages.replaceChildren();
    // A new session id means a new socket: close this one and open the next at once.
    const old = state.ws;
    state.ws = null;
    state.connected = false;
    state.turns = [];
    if (old) old.close(1000, "new chat");
    state.attempt = 0;
    refreshControls();
    reconnect();
    ui.input.focus();
  });
  ui.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = ui.tokenInput.value.trim();
    if (!token) return;
    state.token = token;
    state.stopped = false;
    state.attempt = 0;
    STORE.setItem("dexorder.token", token);
    ui.tokenInput.value = "";
    ui.tokenForm.hidden = true;
    connect();
  });
  window.addEventListener("online", () => {
    if (!state.ws && !state.stopped) {
      state.attempt = 0;
      reconnect();
    }
  });

  async function start() {
    loadTranscript();
    refreshControls();
    // Both demo routes at once (outside demo mode both are 404s), to open the socket sooner.
    const [info, demoToken] = await Promise.allSettled([
      fetch("/api/info").then((response) => (response.ok ? response.json() : null)),
      state.token ? Promise.resolve(null) : fetchDemoToken(),
    ]);
    if (info.status === "fulfilled" && info.value) {
      state.demo = Boolean(info.value.demo);
      if (info.value.offline) showOffline();
      document.body.classList.add("demo");
    }
    if (state.demo && !state.token) {
      if (demoToken.status === "fulfilled") state.token = demoToken.value;
      else addError("No demo token", demoToken.reason.message);
    }
    connect();
    ui.input.focus();
  }

  start();
})();
