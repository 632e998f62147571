// Keyboard shortcuts: a key clicks the element marked data-shortcut="<key>" (links navigate, buttons submit).
// On the anomaly detail page: j / k older / newer anomaly of the run, t / f true / false positive.
(function () {
  "use strict";
  document.addEventListener("keydown", function (event) {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    var target = event.target;
    if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) return;
    if (!/^[a-z]$/.test(event.key)) return;
    var element = document.querySelector('[data-shortcut="' + event.key + '"]');
    if (!element || element.disabled) return;
    event.preventDefault();
    element.click();
  });
})();
