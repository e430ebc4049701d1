/* The jobs page: the table refreshes itself every few seconds while visible. */
(function () {
  "use strict";
  var PERIOD = 10000;

  function refresh() {
    if (document.hidden) { return; }
    fetch(location.href, { cache: "no-store", credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html) {
          window.reflservd.refreshFrom("#jobs tbody", html);
          window.reflservd.refreshFrom(".counts", html);
        }
      })
      .catch(function () { /* the next round tries again */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    window.setInterval(refresh, PERIOD);
  });
}());
