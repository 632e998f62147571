{% autoescape off %}// Vigil's service worker, served at /sw.js (scope: the whole site) by detection.views.service_worker.
// Install: precache the app shell under its hashed static URLs. Pages of the review app (fleets, anomaly
// lists and details, devices) are network-first with the last copy kept as the fallback; other pages
// fall back to the offline page. Static files are cache-first (their names change when they do).
// Verdicts given offline are queued by static/vigil/pwa.js in IndexedDB, not here.
"use strict";
const VERSION = "{{ version }}";
const SHELL = "vigil-shell-" + VERSION;
const PAGES = "vigil-pages";
const PRECACHE = {{ precache_json }};
const OFFLINE_URL = "{{ offline_url }}";
const MAX_PAGES = 60;
const REVIEW_PAGES = [/^\/$/, /^\/fleets\/[^/]+\/$/, /^\/fleets\/[^/]+\/anomalies\/$/, /^\/anomalies\/\d+\/$/,
                      /^\/fleets\/[^/]+\/devices\/$/, /^\/devices\/\d+\/$/];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(SHELL).then((cache) => cache.addAll(PRECACHE)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys()
      .then((keys) => Promise.all(keys.filter((k) => k.startsWith("vigil-shell-") && k !== SHELL).map((k) => caches.delete(k))))
      .then(() => self.clients.claim())
  );
});

self.addEventListener("message", (event) => {
  // pwa.js asks for this on logout: another user of the device must not read the cached pages.
  if (event.data && event.data.type === "clear-pages") event.waitUntil(caches.delete(PAGES));
});

async function trim(cache) {
  const keys = await cache.keys();
  await Promise.all(keys.slice(0, Math.max(0, keys.length - MAX_PAGES)).map((k) => cache.delete(k)));
}

async function networkFirst(request, url) {
  const cache = await caches.open(PAGES);
  try {
    const response = await fetch(request);
    // Only full pages that really rendered (not the login redirect, not an htmx fragment).
    if (response.ok && !response.redirected && !request.headers.get("HX-Request")) {
      await cache.delete(url.pathname + url.search);
      await cache.put(url.pathname + url.search, response.clone());
      trim(cache);
    }
    return response;
  } catch (error) {
    const cached = await cache.match(url.pathname + url.search) || (await cache.match(url.pathname));
    if (cached) return cached;
    if (request.mode === "navigate") return (await caches.match(OFFLINE_URL)) || Response.error();
    throw error;
  }
}

self.addEventListener("fetch", (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (request.method !== "GET" || url.origin !== self.location.origin) return;
  if (url.pathname.startsWith("{{ static_prefix }}")) {
    event.respondWith(caches.match(request).then((hit) => hit || fetch(request)));
    return;
  }
  if (REVIEW_PAGES.some((re) => re.test(url.pathname))) {
    event.respondWith(networkFirst(request, url));
    return;
  }
  if (request.mode === "navigate") {
    event.respondWith(fetch(request).catch(async () => (await caches.match(OFFLINE_URL)) || Response.error()));
  }
});
{% endautoescape %}
