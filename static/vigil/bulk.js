// Bulk actions on a table (the anomaly list's verdicts, the proposal queue's decisions): a form marked
// data-bulk holds the action buttons ([data-bulk-action]), an "all on this page" box ([data-bulk-all]), a
// count ([data-bulk-count], its data-empty text when nothing is selected) and a status line
// ([data-bulk-status]); the rows' checkboxes join it with form="<its id>". Without this script the forms
// still work: the server refuses an empty selection with a message. Runs again after every htmx swap.
(function () {
  "use strict";
  function boxes(form) {
    return Array.prototype.slice.call(document.querySelectorAll('input[type="checkbox"][form="' + form.id + '"]'));
  }
  function refreshForm(form) {
    var all = boxes(form);
    var selected = all.filter(function (box) { return box.checked; }).length;
    var count = form.querySelector("[data-bulk-count]");
    if (count) {
      count.textContent = selected ? selected + " of " + all.length + " on this page selected" : count.dataset.empty;
    }
    form.querySelectorAll("[data-bulk-action]").forEach(function (button) { button.disabled = selected === 0; });
    var head = form.querySelector("[data-bulk-all]");
    if (head) {
      head.checked = selected > 0 && selected === all.length;
      head.indeterminate = selected > 0 && selected < all.length;
    }
  }
  function refresh() {
    document.querySelectorAll("form[data-bulk]").forEach(refreshForm);
  }
  function say(form, text) {
    var status = form.querySelector("[data-bulk-status]");
    if (!status) return;
    var note = document.createElement("div");
    note.className = "notice notice-error";
    note.setAttribute("role", "alert");
    note.textContent = text;
    status.replaceChildren(note);
  }
  document.addEventListener("change", function (event) {
    var target = event.target;
    if (!target.matches) return;
    if (target.matches("[data-bulk-all]") && target.form) {
      boxes(target.form).forEach(function (box) { box.checked = target.checked; });
      refreshForm(target.form);
    } else if (target.matches('input[type="checkbox"][form]') && target.form && target.form.matches("[data-bulk]")) {
      refreshForm(target.form);
    }
  });
  document.addEventListener("htmx:afterSettle", refresh);
  function bulkForm(event) {
    var form = event.target;
    return form && form.matches && form.matches("form[data-bulk]") ? form : null;
  }
  document.addEventListener("htmx:afterRequest", function (event) {
    // hx-disabled-elt re-enables the buttons after the request; keep them off while nothing is selected.
    var form = bulkForm(event);
    if (form) refreshForm(form);
  });
  // Unlike a single verdict (pwa.js queues those), a bulk action is not kept offline: say it was not saved.
  document.addEventListener("htmx:sendError", function (event) {
    var form = bulkForm(event);
    if (form) say(form, "No connection: nothing was saved. Try again when you are back online.");
  });
  document.addEventListener("htmx:responseError", function (event) {
    var form = bulkForm(event);
    if (form) say(form, "The server could not save this (" + event.detail.xhr.status + "); nothing was changed.");
  });
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", refresh);
  else refresh();
})();
