/* What every page shares: times shown in the reader's own time zone. */
(function () {
  "use strict";

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function localTime(date) {
    return date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) + " " +
      pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
  }

  function localizeTimes(root) {
    (root || document).querySelectorAll("time[datetime]").forEach(function (node) {
      var date = new Date(node.getAttribute("datetime"));
      if (!isNaN(date.getTime())) {
        node.title = node.textContent;
        node.textContent = localTime(date);
      }
    });
  }

  /* Replace the children of `target` with those of the same element in a
     fresh copy of this page (one rendering path: the server's). */
  function refreshFrom(selector, html) {
    var fresh = new DOMParser().parseFromString(html, "text/html").querySelector(selector);
    var target = document.querySelector(selector);
    if (!fresh || !target) { return false; }
    target.replaceChildren.apply(target, Array.prototype.slice.call(fresh.childNodes));
    localizeTimes(target);
    return true;
  }

  window.reflservd = { localizeTimes: localizeTimes, refreshFrom: refreshFrom };
  document.addEventListener("DOMContentLoaded", function () { localizeTimes(document); });
}());
