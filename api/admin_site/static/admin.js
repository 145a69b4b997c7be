// Keeps the open page current: every few seconds the page is fetched again and its <main>
// replaced, unless the operator is busy with a form (focus in it, or a field changed),
// the tab is hidden, or a text selection is being made. Without this script the page
// still works (the overview reloads itself through a <noscript> meta refresh).
(function () {
  "use strict";
  var main = document.querySelector("main[data-refresh]");
  if (!main || !window.fetch || !window.DOMParser) {
    return;
  }
  var seconds = Math.max(2, Number(main.getAttribute("data-refresh")) || 10);
  var running = false;

  function changed(form) {
    for (var i = 0; i < form.elements.length; i++) {
      var field = form.elements[i];
      if (field.type === "hidden" || field.type === "submit") {
        continue;
      }
      if (field.tagName === "SELECT") {
        // Without a `selected` attribute the first option is the one shown at first.
        var initial = 0;
        for (var j = 0; j < field.options.length; j++) {
          if (field.options[j].defaultSelected) {
            initial = j;
          }
        }
        if (field.selectedIndex !== initial) {
          return true;
        }
      } else if ("defaultValue" in field && field.value !== field.defaultValue) {
        return true;
      }
    }
    return false;
  }

  function busy() {
    if (document.hidden) {
      return true;
    }
    var active = document.activeElement;
    if (active && active !== document.body && active.closest && active.closest("form")) {
      return true;
    }
    var selection = window.getSelection && window.getSelection();
    if (selection && !selection.isCollapsed) {
      return true;
    }
    var forms = main.querySelectorAll("form");
    for (var i = 0; i < forms.length; i++) {
      if (changed(forms[i])) {
        return true;
      }
    }
    return false;
  }

  function refresh() {
    if (running || busy()) {
      return;
    }
    running = true;
    fetch(window.location.href, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "text/html" }
    })
      .then(function (response) {
        var url = new URL(response.url);
        if (url.pathname !== window.location.pathname) {
          // Signed out meanwhile (the session ended): show the sign-in page.
          window.location.reload();
          return null;
        }
        if (!response.ok) {
          throw new Error(String(response.status));
        }
        return response.text();
      })
      .then(function (html) {
        if (html === null || busy()) {
          return;
        }
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        if (!fresh) {
          return;
        }
        var open = [];
        main.querySelectorAll("details").forEach(function (element, index) {
          if (element.open) {
            open.push(index);
          }
        });
        main.replaceChildren.apply(main, Array.prototype.slice.call(fresh.childNodes));
        var details = main.querySelectorAll("details");
        open.forEach(function (index) {
          if (details[index]) {
            details[index].open = true;
          }
        });
        main.classList.remove("stale");
      })
      .catch(function () {
        main.classList.add("stale"); // kept on screen, marked as old; tried again later
      })
      .then(function () {
        running = false;
      });
  }

  window.setInterval(refresh, seconds * 1000);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) {
      refresh();
    }
  });
})();
