/* The submit form: only the options the chosen fitter uses are shown. */
(function () {
  "use strict";

  function showOptions() {
    var fit = document.getElementById("fit").value || "amoeba";
    document.querySelectorAll("label.option").forEach(function (label) {
      var fitters = (label.dataset.fitters || "").split(" ").filter(Boolean);
      var used = fitters.length === 0 || fitters.indexOf(fit) >= 0;
      label.hidden = !used;
      label.querySelectorAll("input, select").forEach(function (input) { input.disabled = !used; });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var fit = document.getElementById("fit");
    if (!fit) { return; }
    fit.addEventListener("change", showOptions);
    showOptions();
    document.getElementById("submit").addEventListener("submit", function (event) {
      var button = event.target.querySelector("button[type=submit]");
      button.disabled = true;
      button.textContent = "Uploading…";
    });
  });
}());
