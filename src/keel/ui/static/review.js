// Reviewer page shortcuts (keel/ui/review.py): j/k next/previous, 1-5 or y/n score, c comment,
// s submit, Esc leaves the comment box. The page works without this file (plain forms and links).
(function () {
  "use strict";

  function ready(fn) {
    if (document.readyState !== "loading") fn();
    else document.addEventListener("DOMContentLoaded", fn);
  }

  ready(function () {
    var root = document.getElementById("review");
    var form = document.getElementById("review-form");
    if (!root || !form) return;
    var comment = document.getElementById("review-comment");

    function go(attr) {
      var url = root.getAttribute(attr);
      if (url) window.location.href = url;
    }

    function pick(key) {
      var input = form.querySelector('input[name="value"][data-key="' + key + '"]');
      if (!input) return false;
      input.checked = true;
      input.dispatchEvent(new Event("change", { bubbles: true }));
      return true;
    }

    function submit() {
      var button = form.querySelector('button[value="submit"]');
      if (form.requestSubmit) form.requestSubmit(button);
      else button.click();
    }

    document.addEventListener("keydown", function (ev) {
      if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
      var typing = ev.target && ev.target.closest && ev.target.closest("textarea, input[type=text], select");
      if (typing) {
        if (ev.key === "Escape") ev.target.blur();
        return;
      }
      var key = ev.key.toLowerCase();
      var handled = true;
      if (key === "j") go("data-next");
      else if (key === "k") go("data-prev");
      else if (key === "c" && comment) comment.focus();
      else if (key === "s") submit();
      else handled = pick(key);
      if (handled) ev.preventDefault();
    });
    root.setAttribute("data-shortcuts", "on"); // the keys work from here on
  });
})();
