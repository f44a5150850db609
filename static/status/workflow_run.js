// Live steps on a workflow run's page: the run's events stream (EventSource) moves each step's
// state and progress on the graph and in the steps table; when streaming is unavailable, the
// page's fragment is fetched every second instead. Once the run ends, the fragment (rendered
// by the server) shows its outcome. Without JavaScript the page shows its state when loaded
// and a refresh link. As the job page's script (job.js), it only ever writes text.
(function () {
  "use strict";
  var configNode = document.getElementById("run-config");
  var live = document.getElementById("run-live");
  if (!configNode || !live) return;
  var config = JSON.parse(configNode.textContent);
  var terminal = config.terminal;
  var stepTerminal = config.step_terminal;
  var finished = terminal.indexOf(config.status) >= 0;
  var source = null;
  var timer = null;
  var fetching = false;
  var model = {};
  var FIRST_EVENT_MS = 5000;

  if (finished) return;

  // Per step: {fan_out, total, rows: {iteration: [status, progress, current step]}}, as the
  // server rendered it (pages.live_state); the stream's events are applied to it.
  function readModel() {
    var node = live.querySelector("#run-state-data");
    model = node ? JSON.parse(node.textContent) : {};
  }

  function ended(status) {
    return stepTerminal.indexOf(status) >= 0;
  }

  function inFlight(status) {
    return status === "QUEUED" || status === "RUNNING";
  }

  // How far a row has come (pages.row_progress says it the same way).
  function rowProgress(row) {
    if (row[0] === "SUCCEEDED" || row[0] === "REUSED") return 100;
    return inFlight(row[0]) ? row[1] || 0 : 0;
  }

  function words(status) {
    return status ? status.replace(/_/g, " ").toLowerCase() : "not started";
  }

  // One status for a step from its rows' (pages.step_status says it the same way).
  function stepStatus(statuses) {
    var counts = {};
    var kinds = 0;
    statuses.forEach(function (status) {
      if (!counts[status]) kinds += 1;
      counts[status] = (counts[status] || 0) + 1;
    });
    if (!statuses.length) return "";
    if (kinds === 1) return statuses[0];
    if (counts.FAILED) return "FAILED";
    var waiting = (counts.PENDING || 0) + (counts.QUEUED || 0);
    if (counts.RUNNING || (waiting && waiting < statuses.length)) return "RUNNING";
    if (waiting) return "QUEUED";
    if (counts.CANCELLED) return "CANCELLED";
    if (counts.UPSTREAM_FAILED) return "UPSTREAM_FAILED";
    if (counts.SUCCEEDED) return "SUCCEEDED";
    return counts.REUSED ? "REUSED" : "SKIPPED";
  }

  function rowWords(row) {
    if (row[0] === "QUEUED") return row[2] || "waiting for a worker";
    if (row[0] === "PENDING") return "waiting its turn";
    if (row[0] === "RUNNING") return row[2] || "";
    return null; // ended: what the server says once the run ends
  }

  function setBadge(node, status) {
    if (!node) return;
    node.textContent = status || "NOT STARTED";
    node.className = "status status-" + (status || "none").toLowerCase();
  }

  function setProgress(node, percent) {
    if (!node) return;
    node.value = percent;
    node.textContent = percent + " %";
  }

  function showStep(stepId) {
    var step = model[stepId];
    if (!step) return;
    var keys = Object.keys(step.rows);
    var statuses = keys.map(function (key) {
      return step.rows[key][0];
    });
    var status = stepStatus(statuses);
    var total = step.fan_out && typeof step.total === "number" ? step.total : keys.length;
    var sum = 0;
    var done = 0;
    var failed = 0;
    keys.forEach(function (key) {
      var row = step.rows[key];
      sum += rowProgress(row);
      if (ended(row[0])) done += 1;
      if (row[0] === "FAILED") failed += 1;
    });
    var percent = keys.length && total ? Math.round(sum / total) : keys.length ? 100 : 0;
    var detail = null;
    if (step.fan_out) {
      detail = total === 0 ? "no items" : done + " of " + total + " items done" + (failed ? ", " + failed + " failed" : "");
    } else if (keys.length) {
      detail = rowWords(step.rows[keys[0]]);
    }

    var node = live.querySelector('.workflow-graph .node[data-step="' + CSS.escape(stepId) + '"]');
    if (node) {
      node.setAttribute("class", "node s-" + (status || "none").toLowerCase());
      var state = node.querySelector('[data-field="state"]');
      var busy = status === "RUNNING" || status === "QUEUED";
      if (state) state.textContent = words(status) + (busy ? " · " + percent + " %" : "");
      var bar = node.querySelector('[data-field="bar"]');
      if (bar) bar.setAttribute("width", String(Math.round((config.bar_width * percent) / 100)));
    }
    var body = live.querySelector('tbody[data-step="' + CSS.escape(stepId) + '"]');
    if (body) {
      setBadge(body.querySelector('[data-field="status"]'), status);
      setProgress(body.querySelector('[data-field="progress"]'), percent);
      var percentNode = body.querySelector('[data-field="percent"]');
      if (percentNode) percentNode.textContent = percent + " %";
      var detailNode = body.querySelector('[data-field="detail"]');
      if (detailNode && detail !== null) detailNode.textContent = detail;
    }
  }

  function showIteration(stepId, key) {
    var row = model[stepId].rows[key];
    var body = live.querySelector('tbody[data-step="' + CSS.escape(stepId) + '"]');
    var item = body && body.querySelector('li[data-iteration="' + CSS.escape(key) + '"]');
    if (!item) return;
    setBadge(item.querySelector('[data-field="status"]'), row[0]);
    setProgress(item.querySelector('[data-field="progress"]'), rowProgress(row));
    var text = rowWords(row);
    var wordsNode = item.querySelector('[data-field="words"]');
    if (wordsNode && text !== null) wordsNode.textContent = text;
  }

  function showJobLink(stepId, jobId) {
    var body = live.querySelector('tbody[data-step="' + CSS.escape(stepId) + '"]');
    var link = body && body.querySelector('a[data-field="link"][hidden]');
    if (!link || !/^[0-9a-f-]{36}$/i.test(jobId)) return;
    link.href = config.job_url.replace("00000000-0000-0000-0000-000000000000", jobId);
    link.hidden = false;
  }

  function showStepsDone() {
    var ids = Object.keys(model);
    var done = ids.filter(function (id) {
      var rows = model[id].rows;
      var statuses = Object.keys(rows).map(function (key) {
        return rows[key][0];
      });
      return ended(stepStatus(statuses));
    }).length;
    var node = live.querySelector('[data-field="steps-done"]');
    if (node) node.textContent = done + " of " + ids.length + " steps ended";
  }

  function showRun(status) {
    setBadge(live.querySelector('[data-field="run-status"]'), status);
    var note = live.querySelector('[data-field="queued-note"]');
    if (note) note.hidden = status !== "QUEUED";
  }

  // A step's change ({step_id, iteration, status, ...}: a "step" event, or a step of the
  // run's state), or the progress of its job ({step_id, iteration, progress, current_step}, a
  // "progress" event, whose status is the job's, not the step's).
  function applyStep(event) {
    var fromJob = event.event === "progress";
    var stepId = String(event.step_id);
    var step = model[stepId];
    if (!step) step = model[stepId] = { fan_out: false, total: null, rows: {} };
    var key = String(event.iteration || 0);
    if (key !== "0") step.fan_out = true;
    if (typeof event.items_total === "number") step.total = event.items_total;
    var row = step.rows[key];
    if (!row) row = step.rows[key] = ["PENDING", 0, ""];
    if (fromJob) {
      // The job runs: so does its step, whatever the last step event said.
      if (event.status === "RUNNING" && (row[0] === "PENDING" || row[0] === "QUEUED")) row[0] = "RUNNING";
    } else if (typeof event.status === "string") {
      if (event.status !== row[0] && !ended(event.status)) row[2] = "";
      row[0] = event.status;
    }
    if (typeof event.progress === "number") row[1] = Math.round(event.progress);
    if (typeof event.current_step === "string") row[2] = event.current_step;
    showStep(stepId);
    showIteration(stepId, key);
    if (event.job_id) showJobLink(stepId, String(event.job_id));
    showStepsDone();
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
        readModel();
        var state = live.querySelector(".run-state");
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
    source = null;
  }

  // Fetch the fragment every second until it shows an ended run; ``fallback`` says the
  // stream is unavailable (rather than ended).
  function poll(fallback) {
    if (timer !== null || finished) return;
    if (fallback) live.setAttribute("data-live", "polling");
    refreshFragment();
    timer = setInterval(refreshFragment, 1000);
  }

  function onEvent(message) {
    heard();
    var event;
    try {
      event = JSON.parse(message.data);
    } catch (error) {
      return;
    }
    if (!event || typeof event !== "object") return;
    if (event.step_id !== undefined && event.step_id !== null) {
      applyStep(event);
      return;
    }
    if (Array.isArray(event.steps)) event.steps.forEach(applyStep);
    if (typeof event.status !== "string") return;
    showRun(event.status);
    if (terminal.indexOf(event.status) >= 0) {
      if (source) source.close();
      source = null;
      poll(false); // the outcome, rendered by the server
    }
  }

  readModel();
  if (!window.EventSource || !window.fetch || !window.CSS || !CSS.escape) {
    if (window.fetch) poll(true);
    return;
  }
  // The stream sends the run's state as soon as it opens; a stream that says nothing (held
  // back by a buffering proxy or server) is given up for polling.
  var silence = setTimeout(function () {
    if (finished || source === null) return;
    source.close();
    source = null;
    poll(true);
  }, FIRST_EVENT_MS);

  function heard() {
    if (silence !== null) clearTimeout(silence);
    silence = null;
  }

  source = new EventSource(config.events_url);
  live.setAttribute("data-live", "stream");
  ["state", "run", "step", "progress", "message"].forEach(function (name) {
    source.addEventListener(name, onEvent);
  });
  source.onerror = function () {
    heard();
    if (finished || source === null) return;
    // Blocked, or the connection broke: poll instead, for the rest of the run.
    source.close();
    source = null;
    poll(true);
  };
})();
