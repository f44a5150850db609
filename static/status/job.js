// Live progress on a job page: the events stream (EventSource), or, when streaming is
// unavailable, the page's fragment fetched every second. Without JavaScript the page shows
// its state when loaded and a refresh link.
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
  var source = null;
  var timer = null;
  var fetching = false;

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

  // A progress or state event from the stream: the bar and the words, as text only.
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

  // The server-rendered live part (its values are escaped there).
  function refreshFragment() {
    if (fetching) return;
    fetching = true;
    fetch(config.fragment_url, { credentials: "same-origin", headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (response) {
        if (response.redirected) {
          // Signed out meanwhile: stop, and leave the refresh link to the person.
          stop();
          live.setAttribute("data-live", "static");
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
    if (timer !== null) clearInterval(timer);
    timer = null;
    if (source) source.close();
  }

  // Fetch the fragment every second until it shows an ended job; ``fallback`` says the
  // stream is unavailable (rather than ended).
  function poll(fallback) {
    if (timer !== null || finished) return;
    if (fallback) live.setAttribute("data-live", "polling");
    refreshFragment();
    timer = setInterval(refreshFragment, 1000);
  }

  function onEvent(message) {
    var state;
    try {
      state = JSON.parse(message.data);
    } catch (error) {
      return;
    }
    if (terminal.indexOf(state.status) >= 0) {
      source.close();
      source = null;
      show(state);
      poll(false); // the result or the error, rendered by the server
      return;
    }
    show(state);
  }

  if (!window.EventSource || !window.fetch) {
    if (window.fetch) poll(true);
    return;
  }
  source = new EventSource(config.events_url);
  live.setAttribute("data-live", "stream");
  source.addEventListener("state", onEvent);
  source.addEventListener("progress", onEvent);
  source.onerror = function () {
    if (finished || source === null) return;
    // Blocked, or the connection broke: poll instead, for the rest of the job.
    if (source) source.close();
    source = null;
    poll(true);
  };
})();
