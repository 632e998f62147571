// Keyboard focus across htmx swaps and live pushes. hx-disabled-elt disables the pressed button while its
// request runs, which drops the focus to <body>; an outerHTML swap, or a websocket push of the same block,
// replaces the focused element. A keyboard or screen-reader user who pressed a verdict button would then
// carry on from the top of the page.
// When the focused element loses the focus because it was disabled or taken out of the page, the focus
// goes back to the element with its id once that is in the page and enabled again (the new content of a
// swap, or the same button after its request), else to its nearest ancestor with an id that is still
// there (Explain replaced by the pending panel: the panel; a bulk verdict button disabled again because
// the selection is gone: the bulk form; each given tabindex="-1"). Nothing moves once
// anything else has the focus, and a focus the user moves away (a click, Tab) is left alone.
(function () {
  "use strict";
  var STEP_MS = 50, OWN_TRIES = 6, MAX_TRIES = 200;  // 0.3 s for the element itself to come back; 10 s in all

  function ids(element) {
    var chain = [];
    for (var node = element; node && node !== document.body; node = node.parentElement) {
      if (node.id) chain.push(node.id);
    }
    return chain;
  }

  function focusable(element) {
    return element && !element.disabled && document.body.contains(element);
  }

  function restore(chain, tries) {
    var active = document.activeElement;
    if (active && active !== document.body) return;
    var own = document.getElementById(chain[0]);
    var fallback = null;
    for (var i = 1; i < chain.length && !fallback; i++) fallback = document.getElementById(chain[i]);
    // A disabled element may be waiting for its request (hx-disabled-elt); once none is running it stays
    // disabled for its own reasons (a bulk verdict with nothing selected), and its ancestor takes the focus.
    var waiting = own && document.querySelector(".htmx-request");
    var element = focusable(own) ? own : (tries >= OWN_TRIES && !waiting ? fallback : null);
    if (element) {
      if (element.tabIndex < 0 && !element.hasAttribute("tabindex")) element.setAttribute("tabindex", "-1");
      element.focus({preventScroll: true});
      return;
    }
    if (tries < MAX_TRIES) setTimeout(function () { restore(chain, tries + 1); }, STEP_MS);
  }

  document.addEventListener("focusout", function (event) {
    var element = event.target;
    if (event.relatedTarget || !element.id) return;
    // Lost to a disable or a swap, not to the user: the blur comes before the change is visible, so look
    // once the current task is done.
    var chain = ids(element);
    setTimeout(function () {
      if (!element.disabled && document.body.contains(element)) return;
      restore(chain, 0);
    }, 0);
  });
})();
