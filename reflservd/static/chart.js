/* A small χ²-versus-step chart on a canvas: no library, nothing external. */
(function () {
  "use strict";

  function niceTicks(low, high, count, whole) {
    var span = high - low || Math.abs(high) || 1;
    var step = Math.pow(10, Math.floor(Math.log10(span / count)));
    var ratio = span / count / step;
    step *= ratio >= 5 ? 10 : ratio >= 2 ? 5 : ratio >= 1 ? 2 : 1;
    if (whole) { step = Math.max(1, step); }
    var ticks = [];
    for (var t = Math.ceil(low / step) * step; t <= high + step * 1e-9; t += step) { ticks.push(t); }
    return ticks;
  }

  function label(value) {
    if (value === 0) { return "0"; }
    var a = Math.abs(value);
    if (a >= 1e5 || a < 1e-3) { return value.toExponential(1); }
    return String(Number(value.toPrecision(4)));
  }

  function ChiChart(canvas) {
    this.canvas = canvas;
    this.points = [];
    var self = this;
    window.addEventListener("resize", function () { self.draw(); });
  }

  ChiChart.prototype.setPoints = function (points) {
    this.points = points;
    this.draw();
  };

  /* A canvas sized to its box at the screen's pixel ratio, cleared: its
     context and its size in CSS pixels. */
  function prepare(canvas, width, height) {
    var ratio = window.devicePixelRatio || 1;
    width = canvas.clientWidth || width;
    height = canvas.clientHeight || height;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    var g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    g.font = "12px system-ui, sans-serif";
    return { g: g, width: width, height: height };
  }

  ChiChart.prototype.draw = function () {
    var area = prepare(this.canvas, 640, 260);
    var g = area.g, width = area.width, height = area.height;
    var points = this.points.filter(function (p) { return isFinite(p[0]) && isFinite(p[1]); });
    var left = 62, right = 16, top = 14, bottom = 38;
    var plotW = width - left - right, plotH = height - top - bottom;
    if (points.length === 0) {
      g.fillStyle = "#5f6c7b";
      g.textAlign = "center";
      g.fillText("χ² appears here as the fit reports progress", width / 2, height / 2);
      return;
    }
    var xs = points.map(function (p) { return p[0]; });
    var ys = points.map(function (p) { return p[1]; });
    var xMin = Math.min.apply(null, xs), xMax = Math.max.apply(null, xs);
    var yMin = Math.min.apply(null, ys), yMax = Math.max.apply(null, ys);
    if (xMax === xMin) { xMin -= 1; xMax += 1; }
    var logY = yMin > 0 && yMax / yMin > 20;
    var f = logY ? Math.log10 : function (v) { return v; };
    var lo = f(yMin), hi = f(yMax);
    if (hi === lo) { lo -= logY ? 0.5 : Math.abs(lo) * 0.1 || 1; hi += logY ? 0.5 : Math.abs(hi) * 0.1 || 1; }
    var pad = (hi - lo) * 0.06;
    lo -= pad; hi += pad;
    function X(v) { return left + (v - xMin) / (xMax - xMin) * plotW; }
    function Y(v) { return top + (1 - (f(v) - lo) / (hi - lo)) * plotH; }

    g.strokeStyle = "#e3e7ec";
    g.fillStyle = "#5f6c7b";
    g.lineWidth = 1;
    g.textAlign = "right";
    g.textBaseline = "middle";
    var yTicks = logY ? niceTicks(Math.ceil(lo), Math.floor(hi), 5).filter(function (t) { return t === Math.round(t); })
      : niceTicks(lo, hi, 5);
    if (logY && yTicks.length < 2) { yTicks = niceTicks(lo, hi, 4); }
    yTicks.forEach(function (t) {
      var value = logY ? Math.pow(10, t) : t;
      var y = Y(value);
      if (y < top - 1 || y > top + plotH + 1) { return; }
      g.beginPath(); g.moveTo(left, y); g.lineTo(left + plotW, y); g.stroke();
      g.fillText(label(value), left - 6, y);
    });
    g.textAlign = "center";
    g.textBaseline = "top";
    niceTicks(xMin, xMax, Math.max(2, Math.floor(plotW / 90)), true).forEach(function (t) {
      var x = X(t);
      if (x < left - 1 || x > left + plotW + 1) { return; }
      g.beginPath(); g.moveTo(x, top); g.lineTo(x, top + plotH); g.stroke();
      g.fillText(label(t), x, top + plotH + 5);
    });
    g.strokeStyle = "#8a96a3";
    g.strokeRect(left, top, plotW, plotH);
    g.fillStyle = "#1f2933";
    g.fillText("step", left + plotW / 2, top + plotH + 21);
    g.save();
    g.translate(14, top + plotH / 2);
    g.rotate(-Math.PI / 2);
    g.textBaseline = "middle";
    g.fillText(logY ? "χ² (log)" : "χ²", 0, 0);
    g.restore();

    g.strokeStyle = "#1d64c8";
    g.lineWidth = 2;
    g.beginPath();
    points.forEach(function (p, i) {
      if (i === 0) { g.moveTo(X(p[0]), Y(p[1])); } else { g.lineTo(X(p[0]), Y(p[1])); }
    });
    g.stroke();
    var last = points[points.length - 1];
    g.fillStyle = "#1d64c8";
    g.beginPath();
    g.arc(X(last[0]), Y(last[1]), 3.5, 0, 2 * Math.PI);
    g.fill();
  };

  window.ChiChart = ChiChart;
  window.ChiChart.niceTicks = niceTicks;
  window.ChiChart.prepare = prepare;
  window.ChiChart.label = label;
}());
