/* One job's page, kept up to date from the events long-poll
   (GET /api/v1/jobs/{id}/events?after=N&timeout=25): progress goes into the
   figures, the χ² chart and the best parameters as it comes; a change of
   status brings the server's fresh rendering of the page in place. */
(function () {
  "use strict";
  var FINISHED = { COMPLETE: true, ERROR: true, CANCEL: true };
  var POLL = 25;
  var jobId, status, after = 0, points = [], chart = null, last = null, backoff = 1000;

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function duration(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) { return "–"; }
    var s = Math.max(0, Math.round(seconds));
    return Math.floor(s / 3600) + ":" + pad(Math.floor(s / 60) % 60) + ":" + pad(s % 60);
  }

  /* A progress value as the server renders it: any JSON type (an object as JSON). */
  function number(value) {
    if (value === null || value === undefined) { return "–"; }
    if (typeof value === "object") { return JSON.stringify(value); }
    if (typeof value !== "number") { return String(value); }
    return String(Number(value.toPrecision(6)));
  }

  function setText(id, text) {
    var node = document.getElementById(id);
    if (node) { node.textContent = text; }
  }

  function setLive(state) {
    var live = document.getElementById("live");
    if (!live) { return; }
    live.hidden = state === "off";
    live.classList.toggle("stale", state === "stale");
    live.textContent = state === "stale" ? "reconnecting" : "live";
  }

  function bind() {
    var section = document.querySelector("section.progress");
    if (!section) { return false; }
    jobId = section.dataset.job;
    status = section.dataset.status;
    var canvas = document.getElementById("chart");
    chart = canvas ? new window.ChiChart(canvas) : null;
    if (points.length) { section.hidden = false; }
    if (chart) { chart.setPoints(points); }
    if (last) { showProgress(last); }
    return true;
  }

  function showProgress(progress) {
    last = progress;
    var section = document.querySelector("section.progress");
    if (section) { section.hidden = false; }
    setText("step", number(progress.step));
    setText("chisq", number(progress.chisq));
    setText("elapsed", duration(progress.elapsed));
    var body = document.querySelector("#best tbody");
    if (body && progress.parameters) {
      var rows = Object.keys(progress.parameters).map(function (name) {
        var row = document.createElement("tr");
        var th = document.createElement("th");
        var td = document.createElement("td");
        th.textContent = name;
        td.textContent = number(progress.parameters[name]);
        td.className = "num";
        row.appendChild(th);
        row.appendChild(td);
        return row;
      });
      body.replaceChildren.apply(body, rows);
    }
  }

  function addProgress(progress) {
    if (typeof progress.step === "number" && typeof progress.chisq === "number") {
      var previous = points[points.length - 1];
      if (previous && progress.step < previous[0]) { points = []; }   /* a new attempt starts over */
      points.push([progress.step, progress.chisq]);
    }
    showProgress(progress);
  }

  function refreshPage() {
    return fetch(location.href, { cache: "no-store", credentials: "same-origin" })
      .then(function (response) { return response.text(); })
      .then(function (html) {
        window.reflservd.refreshFrom("main", html);
        bind();
        if (FINISHED[status]) { setLive("off"); }
      });
  }

  function poll(first) {
    var wait = first || FINISHED[status] ? 0 : POLL;
    fetch("/api/v1/jobs/" + jobId + "/events?after=" + after + "&timeout=" + wait,
          { cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 404) { throw new Error("gone"); }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();     /* the server writes NaN and infinities as null */
      })
      .then(function (answer) {
        backoff = 1000;
        answer.events.forEach(function (event) {
          if (event.type === "progress" && event.progress) { addProgress(event.progress); }
        });
        if (chart) { chart.setPoints(points); }
        var canvas = document.getElementById("chart");
        if (canvas) { canvas.hidden = FINISHED[answer.status] && points.length === 0; }
        after = answer.next;
        var changed = answer.status !== status;
        status = answer.status;
        var next = function () {
          if (FINISHED[status]) { setLive("off"); } else { setLive("on"); poll(false); }
        };
        if (changed) { refreshPage().then(next, next); } else { next(); }
      })
      .catch(function (error) {
        if (error.message === "gone") {
          setLive("off");
          setText("status", "DELETED");
          return;
        }
        setLive("stale");
        window.setTimeout(function () { poll(false); }, backoff);
        backoff = Math.min(backoff * 2, 30000);
      });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("#cancel");
    if (!button) { return; }
    if (!window.confirm("Cancel job " + button.dataset.job + "?")) { return; }
    button.disabled = true;
    fetch("/api/v1/jobs/" + button.dataset.job + "/cancel", { method: "POST", credentials: "same-origin" })
      .then(function () { return refreshPage(); })
      .catch(function () { button.disabled = false; });
  });

  document.addEventListener("DOMContentLoaded", function () {
    if (bind()) { poll(true); }
  });
}());
