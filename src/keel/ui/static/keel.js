// keel web UI: small progressive enhancements. Every page works without this file.
(function () {
  "use strict";

  function ready(fn) {
    if (document.readyState !== "loading") fn();
    else document.addEventListener("DOMContentLoaded", fn);
  }

  ready(function () {
    // Whole table rows are links (the id cell holds the real <a> for keyboard and no-JS use).
    document.querySelectorAll("tr[data-href]").forEach(function (row) {
      row.addEventListener("click", function (ev) {
        if (ev.target.closest("a, button, input, select")) return;
        if (window.getSelection && String(window.getSelection()).length > 0) return;
        var href = row.getAttribute("data-href");
        if (ev.metaKey || ev.ctrlKey || ev.button === 1) window.open(href, "_blank");
        else window.location.href = href;
      });
    });

    // Times: show the local time next to UTC in the tooltip.
    document.querySelectorAll("time[datetime]").forEach(function (el) {
      var d = new Date(el.getAttribute("datetime"));
      if (!isNaN(d.getTime())) el.title = d.toLocaleString() + " (local)\n" + el.title;
    });

    // Filters: drop empty fields so shared URLs stay short; selects apply at once.
    var filters = document.querySelector("form.filters");
    if (filters) {
      filters.addEventListener("submit", function () {
        filters.querySelectorAll("input, select").forEach(function (el) {
          if (!el.value) el.disabled = true;
        });
        var rng = filters.querySelector("input[name=range]");
        var start = filters.querySelector("input[name=start]");
        var end = filters.querySelector("input[name=end]");
        if (rng && ((start && start.value) || (end && end.value))) rng.disabled = true;
      });
      filters.querySelectorAll("select[data-autosubmit]").forEach(function (sel) {
        sel.addEventListener("change", function () {
          if (filters.requestSubmit) filters.requestSubmit();
          else filters.submit();
        });
      });
    }

    // Trace page: pick a span without reloading.
    var rows = document.querySelectorAll(".span-row[data-span]");
    rows.forEach(function (row) {
      row.addEventListener("click", function (ev) {
        if (ev.metaKey || ev.ctrlKey) return;
        ev.preventDefault();
        var id = row.getAttribute("data-span");
        rows.forEach(function (r) {
          var on = r === row;
          r.classList.toggle("selected", on);
          r.setAttribute("aria-current", on ? "true" : "false");
        });
        document.querySelectorAll("[data-span-panel]").forEach(function (p) {
          p.hidden = p.getAttribute("data-span-panel") !== id;
        });
        if (window.history && history.replaceState) {
          var url = new URL(window.location.href);
          url.searchParams.set("span", id);
          history.replaceState(null, "", url.toString());
        }
      });
    });

    // Copy buttons.
    document.querySelectorAll("[data-copy]").forEach(function (btn) {
      btn.addEventListener("click", function () {
        var text = btn.getAttribute("data-copy");
        var done = function () {
          var old = btn.textContent;
          btn.textContent = "Copied";
          setTimeout(function () { btn.textContent = old; }, 1200);
        };
        if (navigator.clipboard && navigator.clipboard.writeText) {
          navigator.clipboard.writeText(text).then(done, function () {});
        }
      });
    });
  });
})();
