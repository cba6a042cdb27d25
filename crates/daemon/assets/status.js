// hintfed status page: loads /api/info, /api/state and /api/origins, then applies /events
// (server-sent events, JSON StatusEvent objects) live. No framework, no build step; every
// value from the server is inserted with textContent (never as HTML).
"use strict";
(function () {
  const devices = new Map();   // key -> DeviceView
  const presence = new Map();  // key -> PresenceView
  const origins = new Map();   // name -> OriginView
  let buffered = null;         // events received while a full load is in flight
  let filter = "";
  const $ = (id) => document.getElementById(id);
  const LABEL = { NOT_INUSE: "idle", INUSE: "in use", BUSY: "busy", RINGING: "ringing",
    RINGINUSE: "ring+use", ONHOLD: "on hold", UNAVAILABLE: "unavail", UNKNOWN: "unknown",
    INVALID: "invalid" };

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function lamp(state) {
    if (!state) return el("span", "lamp none", "–");
    const span = el("span", "lamp " + (/^[A-Z_]+$/.test(state) ? state : "UNKNOWN"), LABEL[state] || state);
    span.title = state;
    return span;
  }
  function ago(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms < 1000) return ms + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    if (ms < 3600000) return Math.round(ms / 60000) + " min";
    return Math.round(ms / 3600000) + " h";
  }
  function when(ms) {
    if (!ms) return "–";
    return ago(Math.max(0, Date.now() - ms)) + " ago";
  }
  function matches(key) { return !filter || key.toLowerCase().includes(filter); }
  // Device columns: the origins that report devices (a hub, or an origin without devices
  // yet, has no column of empty cells).
  function columns() {
    const names = new Set();
    for (const d of devices.values()) for (const o of Object.keys(d.origins || {})) names.add(o);
    return Array.from(names).sort();
  }
  function emptyRow(tbody, span, text) {
    const tr = el("tr", "empty");
    const td = el("td", null, text);
    td.colSpan = span;
    tr.appendChild(td);
    tbody.appendChild(tr);
  }

  function renderDevices(flashKey) {
    const cols = columns();
    const head = $("devices").tHead.rows[0];
    // Aggregate first (what every lamp shows; visible without scrolling on a phone), then
    // the state reported by each origin.
    head.replaceChildren(el("th", "key", "Device"), el("th", "agg", "Aggregate"));
    for (const c of cols) head.appendChild(el("th", null, c));
    const tbody = $("devices").tBodies[0];
    tbody.replaceChildren();
    const keys = Array.from(devices.keys()).filter(matches).sort();
    for (const k of keys) {
      const d = devices.get(k);
      const tr = el("tr");
      tr.dataset.key = k;
      tr.appendChild(el("td", "key", k));
      const agg = el("td", "agg");
      agg.appendChild(lamp(d.aggregate));
      tr.appendChild(agg);
      for (const c of cols) {
        const td = el("td");
        td.appendChild(lamp((d.origins || {})[c]));
        tr.appendChild(td);
      }
      if (k === flashKey) tr.classList.add("flash");
      tbody.appendChild(tr);
    }
    if (keys.length === 0) emptyRow(tbody, cols.length + 2, devices.size ? "no match" : "no devices yet");
    $("device-count").textContent = "(" + devices.size + ")";
  }

  function renderPresence(flashKey) {
    const tbody = $("presence").tBodies[0];
    tbody.replaceChildren();
    const keys = Array.from(presence.keys()).filter(matches).sort();
    for (const k of keys) {
      const p = presence.get(k);
      const tr = el("tr");
      tr.dataset.key = k;
      tr.appendChild(el("td", "key", k));
      const st = el("td");
      const pill = el("span", "lamp presence p-" + (/^[a-z_]+$/.test(p.status) ? p.status : "not_set"), p.status);
      st.appendChild(pill);
      tr.appendChild(st);
      tr.appendChild(el("td", null, p.subtype || ""));
      tr.appendChild(el("td", "msg", p.message || ""));
      tr.appendChild(el("td", null, p.origin || ""));
      const ch = el("td", "changed", when(p.changed_ms));
      ch.dataset.ms = p.changed_ms || "";
      tr.appendChild(ch);
      if (k === flashKey) tr.classList.add("flash");
      tbody.appendChild(tr);
    }
    if (keys.length === 0) emptyRow(tbody, 6, presence.size ? "no match" : "no presence yet");
    $("presence-count").textContent = "(" + presence.size + ")";
  }

  function renderOrigins(flashKey) {
    const tbody = $("origins").tBodies[0];
    tbody.replaceChildren();
    const names = Array.from(origins.keys()).sort();
    let up = 0;
    for (const n of names) {
      const o = origins.get(n);
      if (o.up) up++;
      const tr = el("tr");
      tr.dataset.key = n;
      tr.appendChild(el("td", "key", n));
      const h = el("td");
      h.appendChild(el("span", "lamp " + (o.up ? "up" : "down"), o.up ? "up" : "down"));
      tr.appendChild(h);
      tr.appendChild(el("td", null, o.last_seen_ms_ago === null || o.last_seen_ms_ago === undefined ? "–" : ago(o.last_seen_ms_ago) + " ago"));
      tr.appendChild(el("td", null, ago(o.lag_ms)));
      tr.appendChild(el("td", "msg", o.detail || ""));
      tr.appendChild(el("td", null, o.last_seq));
      tr.appendChild(el("td", null, o.epoch));
      if (n === flashKey) tr.classList.add("flash");
      tbody.appendChild(tr);
    }
    if (names.length === 0) emptyRow(tbody, 7, "no origins yet");
    $("origin-count").textContent = "(" + up + "/" + names.length + " up)";
  }

  function renderAll() { renderDevices(); renderPresence(); renderOrigins(); touched(); }
  function touched() { $("updated").textContent = new Date().toLocaleTimeString(); }

  // Apply one StatusEvent; an older item never overwrites a newer one.
  function apply(ev) {
    switch (ev.type) {
      case "device": {
        const cur = devices.get(ev.key);
        if (cur && cur.changed_ms > ev.changed_ms) return;
        devices.set(ev.key, ev);
        renderDevices(ev.key);
        break;
      }
      case "presence": {
        const cur = presence.get(ev.key);
        if (cur && cur.changed_ms > ev.changed_ms) return;
        presence.set(ev.key, ev);
        renderPresence(ev.key);
        break;
      }
      case "origin":
        origins.set(ev.name, ev);
        renderOrigins(ev.name);
        renderDevices();
        break;
      case "resync":
        load();
        return;
      default:
        return;
    }
    touched();
  }

  async function getJSON(path) {
    const r = await fetch(path, { cache: "no-store" });
    if (!r.ok) throw new Error(path + ": " + r.status);
    return r.json();
  }

  // Clone pattern: subscribe first, load the snapshot, then replay what arrived meanwhile.
  async function load() {
    if (buffered) return;
    buffered = [];
    try {
      const [state, orig] = await Promise.all([getJSON("api/state"), getJSON("api/origins")]);
      devices.clear(); presence.clear(); origins.clear();
      for (const d of state.devices || []) devices.set(d.key, d);
      for (const p of state.presence || []) presence.set(p.key, p);
      for (const o of orig || []) origins.set(o.name, o);
      renderAll();
    } catch (e) {
      $("live").textContent = "load failed";
    } finally {
      const pending = buffered;
      buffered = null;
      for (const ev of pending) apply(ev);
    }
  }

  // Origins' last seen and lag change with every message, which is not pushed as an event
  // (only health and epoch changes are): refetch the (short) origin list now and then.
  async function refreshOrigins() {
    if (buffered) return;
    try {
      const orig = await getJSON("api/origins");
      if (buffered) return;
      origins.clear();
      for (const o of orig || []) origins.set(o.name, o);
      renderOrigins();
    } catch (e) { /* the next event or refresh tries again */ }
  }

  function connect() {
    const live = $("live");
    const es = new EventSource("events");
    es.onopen = () => { live.textContent = "live"; live.className = "live on"; load(); };
    es.onerror = () => { live.textContent = "reconnecting…"; live.className = "live off"; };
    es.onmessage = (m) => {
      let ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      if (buffered) buffered.push(ev); else apply(ev);
    };
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("filter").addEventListener("input", (e) => {
      filter = e.target.value.trim().toLowerCase();
      renderDevices(); renderPresence();
    });
    getJSON("api/info").then((i) => {
      $("daemon").textContent = i.daemon;
      $("version").textContent = "v" + i.version;
      document.title = i.daemon + " status";
    }).catch(() => {});
    load();
    connect();
    // Keep the relative times, origins' last seen and lag honest.
    setInterval(() => {
      for (const td of document.querySelectorAll("#presence td.changed")) td.textContent = when(Number(td.dataset.ms));
      refreshOrigins();
    }, 5000);
  });
})();
