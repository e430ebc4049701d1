/* A fit series' page: for each fitted parameter, its value with error bars
   against the member, drawn from GET /api/v1/series/{id}/table.json; while
   members are still to finish the table is read again every few seconds,
   the plots redrawn and the members' table brought from the server's fresh
   rendering of the page. */
(function () {
  "use strict";
  var FINISHED = { COMPLETE: true, ERROR: true, CANCEL: true, DELETED: true };
  var REFRESH = 3000;
  var ticks = window.ChiChart.niceTicks, label = window.ChiChart.label;
  var shown = null;

  function finite(v) { return typeof v === "number" && isFinite(v); }

  /* One parameter: points [member, value, uncertainty or null]. */
  function drawParameter(canvas, name, points) {
    var area = window.ChiChart.prepare(canvas, 480, 220);
    var g = area.g, width = area.width, height = area.height;
    var left = 70, right = 14, top = 22, bottom = 36;
    var plotW = width - left - right, plotH = height - top - bottom;
    var xs = points.map(function (p) { return p[0]; });
    var values = points.map(function (p) { return p[1]; });
    var xMin = Math.min.apply(null, xs) - 0.5, xMax = Math.max.apply(null, xs) + 0.5;
    /* The values set the range; error bars widen it at most to three times the
       values' spread, so one member's huge uncertainty does not flatten the rest
       (its bar runs off the plot, clipped). */
    var vLo = Math.min.apply(null, values), vHi = Math.max.apply(null, values);
    var spread = vHi - vLo || Math.abs(vHi) * 0.1 || 1;
    var lo = vLo, hi = vHi;
    points.forEach(function (p) {
      if (finite(p[2])) { lo = Math.min(lo, p[1] - p[2]); hi = Math.max(hi, p[1] + p[2]); }
    });
    lo = Math.max(lo, vLo - spread); hi = Math.min(hi, vHi + spread);
    if (hi === lo) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
    var pad = (hi - lo) * 0.08;
    lo -= pad; hi += pad;
    function X(v) { return left + (v - xMin) / (xMax - xMin) * plotW; }
    function Y(v) { return top + (1 - (v - lo) / (hi - lo)) * plotH; }
    g.strokeStyle = "#e3e7ec"; g.fillStyle = "#5f6c7b"; g.lineWidth = 1;
    g.textAlign = "right"; g.textBaseline = "middle";
    ticks(lo, hi, 4).forEach(function (t) {
      var y = Y(t);
      if (y < top - 1 || y > top + plotH + 1) { return; }
      g.beginPath(); g.moveTo(left, y); g.lineTo(left + plotW, y); g.stroke();
      g.fillText(label(t), left - 6, y);
    });
    g.textAlign = "center"; g.textBaseline = "top";
    ticks(xMin + 0.5, xMax - 0.5, Math.max(2, Math.floor(plotW / 60)), true).forEach(function (t) {
      g.fillText(label(t), X(t), top + plotH + 5);
    });
    g.strokeStyle = "#8a96a3";
    g.strokeRect(left, top, plotW, plotH);
    g.fillStyle = "#1f2933";
    g.fillText("member", left + plotW / 2, top + plotH + 20);
    g.textAlign = "left"; g.textBaseline = "alphabetic";
    g.fillText(name, left, top - 7);
    g.save();
    g.beginPath(); g.rect(left, top, plotW, plotH); g.clip();
    g.strokeStyle = "#1d64c8"; g.fillStyle = "#1d64c8"; g.lineWidth = 1.5;
    points.forEach(function (p) {
      var x = X(p[0]);
      if (finite(p[2]) && p[2] > 0) {
        g.beginPath();
        g.moveTo(x, Y(p[1] - p[2])); g.lineTo(x, Y(p[1] + p[2]));
        g.moveTo(x - 4, Y(p[1] - p[2])); g.lineTo(x + 4, Y(p[1] - p[2]));
        g.moveTo(x - 4, Y(p[1] + p[2])); g.lineTo(x + 4, Y(p[1] + p[2]));
        g.stroke();
      }
      g.beginPath(); g.arc(x, Y(p[1]), 3.5, 0, 2 * Math.PI); g.fill();
    });
    g.restore();
    canvas.dataset.points = String(points.length);
  }

  function drawAll(table) {
    var plots = document.getElementById("plots");
    var figures = table.parameters.map(function (name) {
      var points = [];
      table.rows.forEach(function (row) {
        var fit = row.parameters[name];
        if (fit && finite(fit.value)) { points.push([row.member, fit.value, fit.uncertainty]); }
      });
      return { name: name, points: points };
    }).filter(function (f) { return f.points.length > 0; });
    if (!figures.length) { return; }
    var canvases = figures.map(function (f) {
      var canvas = document.createElement("canvas");
      canvas.className = "param";
      canvas.setAttribute("aria-label", f.name + " by member");
      canvas.dataset.parameter = f.name;
      return canvas;
    });
    plots.replaceChildren.apply(plots, canvases);
    figures.forEach(function (f, i) { drawParameter(canvases[i], f.name, f.points); });
    plots.dataset.drawn = String(figures.length);
  }

  function refresh(seriesId) {
    var opts = { cache: "no-store", credentials: "same-origin" };
    var table = null;
    /* The page after the table: a page read later shows at least the members the table shows ended. */
    return fetch("/api/v1/series/" + seriesId + "/table.json", opts)
      .then(function (r) { return r.json(); })
      .then(function (answer) {
        table = shown = answer;
        return fetch(location.href, opts);
      })
      .then(function (r) { return r.text(); })
      .then(function (html) {
        window.reflservd.refreshFrom("#series", html);
        drawAll(table);
        var done = table.rows.every(function (row) { return FINISHED[row.status]; });
        if (!done) { window.setTimeout(function () { refresh(seriesId); }, REFRESH); }
      }, function () {
        window.setTimeout(function () { refresh(seriesId); }, REFRESH * 4);
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var counts = document.getElementById("counts");
    if (counts) { refresh(counts.dataset.series); }
  });
  window.addEventListener("resize", function () { if (shown) { drawAll(shown); } });
}());
