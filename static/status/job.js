// Live progress on a job page, from the first of these that works:
//
// 1. The job's WebSocket (config.ws_url, signed in by the session). Its first frame is the
//    job's state now; then each event, every frame with its "seq". The server closes with 1000
//    after the terminal state. If the socket drops after it has worked (any other close: 1006
//    when the network goes, 1001/1012 when the server restarts), the page connects again after
//    0.5, 1, 2 and 4 s with "?after_seq=<the last seq it applied>", and the server replays every
//    event after it first: no progress mark is lost. After those four tries it steps down.
// 2. The events stream (EventSource on config.events_url). Coming down from the socket, it asks
//    for "?last_event_id=<last seq>" so that it, too, starts with what the page missed; on its
//    own reconnects EventSource sends Last-Event-ID itself. Three failed reconnects in a row,
//    and it steps down.
// 3. The page's fragment, fetched every second (rendered by the server; it carries no seq).
//
// The page steps down at once, without retrying, when a way never worked here (blocked, or a
// server without WebSockets: an error or close before the first message, or nothing said
// within 5 s), and when the socket is refused for good: a 4xxx close (after an error frame:
// signed out, not found, malformed) or 1011 (the server lost its event source). The stream
// and the fragment then say, with the page's session, what can still be said.
//
// Events only ever write text. The live section records, as a cheap debugging aid (the
// browser tests read it), how it follows the job (data-live: websocket, stream, polling, or
// static as the server rendered it) and the seqs it applied: the first, the last, how many,
// any jump between them ("5>9": 6 to 8 never applied) and how many times it reconnected.
// Without JavaScript the page shows its state when loaded and a refresh link.
(function () {
  "use strict";
  var configNode = document.getElementById("job-config");
  var live = document.getElementById("job-live");
  if (!configNode || !live) return;
  var config = JSON.parse(configNode.textContent);
  var terminal = config.terminal;
  var loadedAt = Date.now();
  var runningSince = config.elapsed_seconds === null ? null : loadedAt - config.elapsed_seconds * 1000;
  var finished = terminal.indexOf(config.status) >= 0;
  var FIRST_MESSAGE_MS = 5000;
  var SOCKET_RETRY_MS = [500, 1000, 2000, 4000];
  var STREAM_RETRIES = 3;
  var socket = null;
  var socketWorked = false; // a socket of this page delivered a frame: a later close is a drop
  var socketRetries = 0;
  var retryTimer = null;
  var source = null;
  var timer = null;
  var fetching = false;
  var streaming = true; // false once the terminal state arrived, or the page is left
  var lastSeq = null;
  var applied = { first: null, count: 0, gaps: [], reconnects: 0 };

  if (finished) return;

  function field(name) {
    return live.querySelector('[data-field="' + name + '"]');
  }

  function setText(name, text) {
    var node = field(name);
    if (node) node.textContent = text;
  }

  function words(seconds) {
    if (seconds < 60) return Math.max(1, Math.round(seconds)) + " s";
    var minutes = Math.floor(seconds / 60);
    var rest = Math.round(seconds % 60);
    return minutes + " min" + (rest ? " " + rest + " s" : "");
  }

  // A progress or state event: the bar and the words, as text only.
  function show(state) {
    var bar = live.querySelector("progress");
    var percent = typeof state.progress === "number" ? Math.round(state.progress) : null;
    if (state.status) {
      var status = field("status");
      if (status) {
        status.textContent = state.status;
        status.className = "status status-" + state.status.toLowerCase();
      }
      if (state.status === "RUNNING" && runningSince === null) runningSince = Date.now();
      var note = field("queued-note");
      if (note) note.hidden = state.status !== "QUEUED";
    }
    if (percent !== null && bar) {
      bar.value = percent;
      bar.textContent = percent + " %";
      setText("percent", percent + " %");
    }
    if (typeof state.current_step === "string") setText("step", state.current_step);
    if (state.steps_total) {
      // "step i of n", unless the step's own name already says just that
      var steps = "step " + (state.step_index || 0) + " of " + state.steps_total;
      var step = (field("step") || {}).textContent || "";
      setText("steps", step.trim().toLowerCase() === steps ? "" : steps);
    }
    var eta = typeof state.eta_seconds === "number" ? state.eta_seconds : null;
    if (eta === null && percent > 0 && percent < 100 && runningSince !== null) {
      var elapsed = (Date.now() - runningSince) / 1000;
      eta = (elapsed * (100 - percent)) / percent;
    }
    setText("eta", eta === null ? "" : "about " + words(eta) + " left");
  }

  function mode(name) {
    live.setAttribute("data-live", name);
  }

  function record(seq) {
    if (applied.first === null) applied.first = seq;
    else if (seq !== lastSeq + 1) applied.gaps.push(lastSeq + ">" + seq);
    applied.count += 1;
    lastSeq = seq;
    live.setAttribute("data-seq-first", String(applied.first));
    live.setAttribute("data-seq-last", String(seq));
    live.setAttribute("data-seq-count", String(applied.count));
    live.setAttribute("data-seq-gaps", applied.gaps.join(" "));
  }

  function reconnected() {
    applied.reconnects += 1;
    live.setAttribute("data-reconnects", String(applied.reconnects));
  }

  // One message of the socket or the stream. ``snapshot``: the state now (a connection's first
  // message when it does not resume, or one the server could not replay), shown whatever its
  // seq; any other message is an event, shown once: a replay may overlap what came live.
  function apply(state, snapshot) {
    var seq = typeof state.seq === "number" ? state.seq : null;
    if (seq !== null && lastSeq !== null && seq <= lastSeq) {
      if (!snapshot) return;
    } else if (seq !== null) {
      record(seq);
    }
    show(state);
    if (terminal.indexOf(state.status) >= 0) {
      streaming = false;
      closeSocket();
      closeStream();
      poll(false); // the result or the error, rendered by the server
    }
  }

  function parse(data) {
    try {
      var parsed = JSON.parse(data);
      return parsed && typeof parsed === "object" ? parsed : null;
    } catch (error) {
      return null;
    }
  }

  // --- 1. The WebSocket -----------------------------------------------------------------

  function socketUrl() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var resume = lastSeq === null ? "" : "?after_seq=" + lastSeq;
    return scheme + window.location.host + config.ws_url + resume;
  }

  function closeSocket() {
    if (retryTimer !== null) clearTimeout(retryTimer);
    retryTimer = null;
    var open = socket;
    socket = null;
    if (open) open.close(1000);
  }

  function openSocket() {
    retryTimer = null;
    var resuming = lastSeq !== null;
    var heard = false;
    var refused = false;
    var ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (error) {
      openStream();
      return;
    }
    socket = ws;
    var silence = setTimeout(function () {
      if (socket === ws && !heard) ws.close(); // reported as a close before any frame
    }, FIRST_MESSAGE_MS);
    ws.onmessage = function (message) {
      if (socket !== ws || !streaming) return;
      var frame = parse(message.data);
      if (!frame) return;
      if (frame.type === "error") {
        refused = true; // the close that follows says why; no retry would change it
        return;
      }
      var snapshot = (!heard && !resuming) || frame.replayed === false;
      if (!heard) {
        heard = true;
        clearTimeout(silence);
        socketWorked = true;
        socketRetries = 0;
        mode("websocket");
      }
      apply(frame, snapshot);
    };
    ws.onclose = function (event) {
      clearTimeout(silence);
      if (socket !== ws) return; // closed by the page itself
      socket = null;
      if (!streaming || finished) return;
      var forGood = refused || event.code === 1011 || (event.code >= 4000 && event.code < 5000);
      if (!socketWorked || forGood || socketRetries >= SOCKET_RETRY_MS.length) {
        openStream();
        return;
      }
      // A drop (or a retry that failed): connect again, resuming after the last seq applied.
      retryTimer = setTimeout(function () {
        reconnected();
        openSocket();
      }, SOCKET_RETRY_MS[socketRetries]);
      socketRetries += 1;
    };
  }

  // --- 2. The events stream --------------------------------------------------------------

  function closeStream() {
    var open = source;
    source = null;
    if (open) open.close();
  }

  function openStream() {
    if (!window.EventSource) {
      poll(true);
      return;
    }
    var resuming = lastSeq !== null;
    var url = config.events_url;
    if (resuming) url += (url.indexOf("?") < 0 ? "?" : "&") + "last_event_id=" + lastSeq;
    var es = new EventSource(url);
    var heard = false;
    var failures = 0;
    source = es;
    var silence = setTimeout(function () {
      if (source === es && !heard) giveUp();
    }, FIRST_MESSAGE_MS);

    function giveUp() {
      clearTimeout(silence);
      closeStream();
      poll(true);
    }

    function onEvent(message) {
      if (source !== es || !streaming) return;
      var state = parse(message.data);
      if (!state) return;
      var snapshot = (!heard && !resuming) || state.replayed === false;
      if (!heard) {
        heard = true;
        clearTimeout(silence);
        mode("stream");
      }
      failures = 0;
      apply(state, snapshot);
    }

    es.addEventListener("state", onEvent);
    es.addEventListener("progress", onEvent);
    es.onopen = function () {
      if (heard && source === es) reconnected();
    };
    es.onerror = function () {
      if (source !== es || !streaming) return;
      // Blocked or refused (never heard; or CLOSED: an HTTP error), or dropping again and again.
      failures += 1;
      if (!heard || es.readyState === EventSource.CLOSED || failures > STREAM_RETRIES) giveUp();
      // Otherwise EventSource connects again by itself, sending Last-Event-ID.
    };
  }

  // --- 3. The fragment ---------------------------------------------------------------------

  // The server-rendered live part (its values are escaped there).
  function refreshFragment() {
    if (fetching) return;
    fetching = true;
    fetch(config.fragment_url, { credentials: "same-origin", headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (response) {
        if (response.redirected) {
          // Signed out meanwhile: stop, and leave the refresh link to the person.
          stop();
          mode("static");
          throw new Error("signed out");
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        live.innerHTML = html;
        var state = live.querySelector(".job-state");
        if (state && terminal.indexOf(state.getAttribute("data-status")) >= 0) stop();
      })
      .catch(function () {
        /* a missed poll is retried on the next tick */
      })
      .then(function () {
        fetching = false;
      });
  }

  function stop() {
    finished = true;
    streaming = false;
    if (timer !== null) clearInterval(timer);
    timer = null;
    closeSocket();
    closeStream();
  }

  // Fetch the fragment every second until it shows an ended job; ``fallback`` says the
  // socket and the stream are unavailable (rather than the job ended).
  function poll(fallback) {
    if (timer !== null || finished) return;
    if (fallback) mode("polling");
    refreshFragment();
    timer = setInterval(refreshFragment, 1000);
  }

  function follow() {
    if (window.WebSocket && config.ws_url) openSocket();
    else openStream();
  }

  if (!window.fetch) return;
  // Leaving the page closes the socket (1001): no drop to reconnect after. A page the browser
  // shows again from its back-forward cache follows on, after the last seq it applied.
  window.addEventListener("pagehide", function () {
    streaming = false;
    closeSocket();
    closeStream();
  });
  window.addEventListener("pageshow", function (event) {
    if (!event.persisted || finished || timer !== null) return;
    streaming = true;
    socketRetries = 0;
    follow();
  });
  follow();
})();
