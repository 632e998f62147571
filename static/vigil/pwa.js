// The installable app's page side: registers the service worker (/sw.js), and keeps review verdicts given
// offline in IndexedDB, each with a client_id (UUID), replaying them as JSON to the feedback URL when the
// connection returns. The server records a client_id once (services.feedback_give), so a replay that
// races another tab, or repeats after a lost answer, cannot duplicate a verdict.
(function () {
  "use strict";
  var DB = "vigil", STORE = "feedback-queue";
  var body = document.body;
  var user = body.getAttribute("data-user") || "";
  var syncing = false;
  var lastSubmit = null;

  // Saved pages belong to whoever was signed in: a different user on this browser starts without them.
  try {
    var last = localStorage.getItem("vigil-user");
    if (user && last && last !== user && window.caches) caches.delete("vigil-pages");
    if (user) localStorage.setItem("vigil-user", user);
  } catch (e) { /* storage disabled: nothing was saved either */ }

  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register(body.getAttribute("data-sw") || "/sw.js", {scope: "/"}).catch(function (e) {
      console.warn("service worker not registered", e);
    });
  }

  function uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function open() {
    return new Promise(function (resolve, reject) {
      var request = indexedDB.open(DB, 1);
      request.onupgradeneeded = function () { request.result.createObjectStore(STORE, {keyPath: "client_id"}); };
      request.onsuccess = function () { resolve(request.result); };
      request.onerror = function () { reject(request.error); };
    });
  }

  function tx(mode, work) {
    return open().then(function (db) {
      return new Promise(function (resolve, reject) {
        var t = db.transaction(STORE, mode), result;
        var store = t.objectStore(STORE);
        result = work(store);
        t.oncomplete = function () { db.close(); resolve(result && "result" in result ? result.result : undefined); };
        t.onerror = function () { db.close(); reject(t.error); };
      });
    });
  }

  function queued() { return tx("readonly", function (s) { return s.getAll(); }).then(function (items) {
    return (items || []).filter(function (i) { return i.user === user; });
  }); }

  function status(text, kind) {
    var el = document.getElementById("offline-status");
    if (!el) return;
    el.textContent = text;
    el.className = "offline-status" + (text ? " offline-status-" + (kind || "info") : "");
  }

  function showQueue() {
    return queued().then(function (items) {
      if (items.length) {
        status(items.length + " verdict" + (items.length === 1 ? "" : "s") + " saved on this device, waiting to sync" +
               (navigator.onLine ? "…" : " (offline)"), "warn");
      } else if (!navigator.onLine) {
        status("Offline: showing saved pages; verdicts are kept on this device until you are back online.", "warn");
      } else {
        status("");
      }
      return items;
    });
  }

  function csrf() {
    try { return JSON.parse(body.getAttribute("hx-headers") || "{}")["x-csrftoken"] || ""; } catch (e) { return ""; }
  }

  function enqueue(item) {
    item.user = user;
    item.queued_at = new Date().toISOString();
    return tx("readwrite", function (s) { s.put(item); }).then(function () {
      var form = document.querySelector("form[data-offline-queue]");
      if (form && form.getAttribute("data-anomaly") === String(item.anomaly)) {
        form.querySelectorAll("button[name=verdict]").forEach(function (b) {
          b.setAttribute("aria-pressed", b.value === item.verdict ? "true" : "false");
        });
      }
      return showQueue();
    });
  }

  function swapFeedback(anomaly, html) {
    var current = document.getElementById("feedback");
    var form = current && current.querySelector("form[data-offline-queue]");
    if (!current || !html || (form && form.getAttribute("data-anomaly") !== String(anomaly))) return;
    var holder = document.createElement("div");
    holder.innerHTML = html;
    var fresh = holder.querySelector("#feedback");
    if (!fresh) return;
    current.replaceWith(fresh);
    if (window.htmx) window.htmx.process(fresh);
  }

  function sync() {
    if (syncing || !navigator.onLine || !user) return Promise.resolve();
    syncing = true;
    var sent = 0;
    return queued().then(function (items) {
      return items.reduce(function (chain, item) {
        return chain.then(function () {
          return fetch(item.url, {
            method: "POST", credentials: "same-origin",
            headers: {"Content-Type": "application/json", "X-CSRFToken": csrf() || item.csrf, "Accept": "application/json"},
            body: JSON.stringify({verdict: item.verdict, comment: item.comment, client_id: item.client_id})
          }).then(function (response) {
            var json = (response.headers.get("Content-Type") || "").indexOf("json") >= 0;
            if (response.ok && json) {
              return response.json().then(function (data) {
                sent += 1;
                swapFeedback(item.anomaly, data.html);
                return tx("readwrite", function (s) { s.delete(item.client_id); });
              });
            }
            if (response.status === 400 && json) {
              // Refused for good (e.g. no longer an anomaly): drop it and say why.
              return response.json().then(function (data) {
                status("A verdict saved offline was refused: " + data.error, "error");
                return tx("readwrite", function (s) { s.delete(item.client_id); });
              });
            }
            // Signed out, role removed, CSRF: keep it for later and say so.
            throw new Error("HTTP " + response.status);
          });
        });
      }, Promise.resolve());
    }).then(function () {
      syncing = false;
      return showQueue().then(function (items) {
        if (sent && !items.length) status(sent + " verdict" + (sent === 1 ? "" : "s") + " synced.", "ok");
      });
    }, function (error) {
      syncing = false;
      status("Verdicts saved on this device could not be synced yet (" + error.message + "); they are kept.", "error");
    });
  }

  // Capture phase: runs before htmx's own submit handler on the form.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.matches("form.logout")) {
      if (navigator.serviceWorker && navigator.serviceWorker.controller) {
        navigator.serviceWorker.controller.postMessage({type: "clear-pages"});
      }
      return;
    }
    if (!form.matches("form[data-offline-queue]")) return;
    var id = form.querySelector("input[name=client_id]");
    if (!id) {
      id = document.createElement("input");
      id.type = "hidden"; id.name = "client_id";
      form.appendChild(id);
    }
    id.value = uuid();
    var comment = form.querySelector("[name=comment]");
    lastSubmit = {client_id: id.value, anomaly: form.getAttribute("data-anomaly"), url: form.getAttribute("action"),
                  verdict: event.submitter ? event.submitter.value : "", comment: comment ? comment.value : "",
                  csrf: csrf()};
    if (!navigator.onLine) {
      event.preventDefault();
      event.stopImmediatePropagation();
      enqueue(lastSubmit);
    }
  }, true);

  // Online according to the browser, but the request never got an answer: queue it too (same client_id).
  document.addEventListener("htmx:sendError", function (event) {
    var form = event.detail && event.detail.elt;
    if (lastSubmit && form && form.matches && form.matches("form[data-offline-queue]")) enqueue(lastSubmit);
  });

  window.addEventListener("online", function () { sync(); });
  window.addEventListener("offline", function () { showQueue(); });
  if (window.indexedDB && user) { showQueue().then(function () { sync(); }); }
  window.vigilOffline = {sync: sync, queued: queued};
})();
