// vsproxy operator dashboard: renders the state the server pushes once a second over
// Server-Sent Events (GET /dashboard/api/events; shapes in dashboard/README.md). No libraries.
// Rows are keyed by session ID and updated in place, so buttons and thumbnails survive updates.
"use strict";

(() => {
  const EVENTS_URL = "/dashboard/api/events";
  const STALE_AFTER_MS = 5000; // no event for this long: the numbers on screen are old
  const REOPEN_AFTER_MS = 3000; // EventSource gives up on some errors (a 502 from a proxy)

  const $ = (id) => document.getElementById(id);
  const sessionsBody = document.querySelector("#sessions tbody");
  const upstreamsBody = document.querySelector("#upstreams tbody");
  const sessionRows = new Map(); // session ID -> <tr>
  const upstreamRows = new Map(); // upstream name -> <tr>
  let sort = { key: "ageSeconds", dir: 1 };
  let filterText = "";
  let lastState = null;
  let lastEventAt = 0;

  // -- formatting ---------------------------------------------------------------------------

  const fps = (n) => (n == null ? "–" : n.toFixed(1));
  function bitrate(bytesPerSecond) {
    const bits = (bytesPerSecond || 0) * 8;
    if (bits >= 1e6) return (bits / 1e6).toFixed(1) + " Mbit/s";
    if (bits >= 1e3) return (bits / 1e3).toFixed(0) + " kbit/s";
    return bits.toFixed(0) + " bit/s";
  }
  const pad = (n) => String(n).padStart(2, "0");
  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + pad(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + pad(Math.floor((s % 3600) / 60)) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }
  function ago(iso, nowIso) {
    // Against the server's clock (generatedAt), so a skewed laptop clock does not matter.
    const seconds = (Date.parse(nowIso) - Date.parse(iso)) / 1000;
    return seconds < 2 ? "now" : duration(seconds) + " ago";
  }
  // Display names of the transports, sent by the server with every state (outputs/wire.py).
  let TRANSPORT_NAMES = {};
  function transports(cell, viewers) {
    cell.replaceChildren();
    for (const [transport, count] of Object.entries(viewers)) {
      if (!count) continue;
      const tag = document.createElement("span");
      tag.className = "transport";
      tag.textContent = (TRANSPORT_NAMES[transport] || transport) + " " + count;
      cell.append(tag);
    }
    if (!cell.childElementCount) cell.textContent = "–";
  }
  function stateBadge(badge, state) {
    badge.className = "badge " + state;
    badge.textContent = state;
  }

  // -- small DOM helpers --------------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props);
    node.append(...children);
    return node;
  }
  function cell(className, label) {
    const td = el("td", { className });
    td.dataset.label = label; // shown before the value in the phone layout
    return td;
  }
  function toast(message, isError = false) {
    const box = $("toast");
    box.textContent = message;
    box.className = "show" + (isError ? " error" : "");
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => (box.className = ""), 2200);
  }
  async function copy(text, what) {
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
      } else {
        // Plain http on a LAN address is not a secure context: no Clipboard API there.
        const area = el("textarea", { value: text });
        area.setAttribute("readonly", "");
        area.style.position = "fixed";
        area.style.opacity = "0";
        document.body.append(area);
        area.select();
        const ok = document.execCommand("copy");
        area.remove();
        if (!ok) throw new Error("copy refused");
      }
      toast("Copied " + what);
    } catch (err) {
      window.prompt("Copy " + what + ":", text);
    }
  }

  // -- sparkline ----------------------------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  const SPARK_W = 100, SPARK_H = 30, SPARK_POINTS = 60;
  function sparkline() {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", `0 0 ${SPARK_W} ${SPARK_H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    for (const name of ["in", "out"]) {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", name);
      svg.append(line);
    }
    svg.append(document.createElementNS(SVG, "title"));
    return svg;
  }
  function drawSpark(svg, series) {
    // series: {in: [...], out: [...]}, one sample a second, newest last, right-aligned.
    const all = [...(series.in || []), ...(series.out || [])];
    const top = Math.max(30, ...all) * 1.1;
    const step = SPARK_W / (SPARK_POINTS - 1);
    for (const line of svg.querySelectorAll("polyline")) {
      const values = series[line.getAttribute("class")] || [];
      const start = SPARK_POINTS - values.length;
      const points = values.map((v, i) =>
        `${((start + i) * step).toFixed(1)},${(SPARK_H - 1 - (v / top) * (SPARK_H - 2)).toFixed(1)}`);
      line.setAttribute("points", points.join(" "));
    }
    const last = (values) => (values && values.length ? values[values.length - 1].toFixed(1) : "–");
    svg.querySelector("title").textContent =
      `fps over the last ${Math.max((series.in || []).length, (series.out || []).length)} s` +
      (series.out ? ` (grey: in ${last(series.in)}, blue: out ${last(series.out)})` : ` (${last(series.in)} now)`);
  }

  // -- sessions -----------------------------------------------------------------------------

  function streamUrls(session) {
    // With viewer tokens on (auth.viewer_tokens), every stream URL carries the session's token.
    const base = new URL("/stream/" + encodeURIComponent(session.id), location.href).href;
    const token = session.viewerToken ? "token=" + encodeURIComponent(session.viewerToken) : "";
    const query = token ? "?" + token : "";
    const ws = base.replace(/^http/, "ws");
    return {
      ws: ws + query,
      wsBinary: ws + "?format=binary" + (token ? "&" + token : ""),
      mjpeg: base + "/mjpeg" + query,
      embed: base + "/embed" + query,
    };
  }

  async function destroy(session) {
    const label = `${session.userId} / ${session.robotName}`;
    if (!window.confirm(`Destroy session ${session.id} (${label})?\nIts viewers are disconnected.`)) return;
    let response;
    try {
      // The dashboard's own endpoint, under the dashboard's login (the API's may want a token,
      // auth.api_tokens, this browser does not have).
      response = await fetch("/dashboard/api/sessions/" + encodeURIComponent(session.id), { method: "DELETE" });
    } catch (err) {
      toast("Destroy failed: " + err.message, true);
      return;
    }
    if (response.ok || response.status === 404) {
      removeSession(session.id);
      toast("Session destroyed");
    } else {
      const body = await response.json().catch(() => ({}));
      toast("Destroy failed: " + (body.error || response.status), true);
    }
  }

  function removeSession(id) {
    const row = sessionRows.get(id);
    if (row) row.remove();
    sessionRows.delete(id);
  }

  function createSessionRow(session) {
    const row = el("tr", { className: "session" });
    row.dataset.sessionId = session.id;
    const c = {
      thumb: cell("thumb-cell", "Preview"),
      id: cell("id", "Session"),
      user: cell("user", "User"),
      robot: cell("robot", "Robot"),
      upstream: cell("upstream", "Upstream"),
      viewers: cell("viewers", "Viewers"),
      fpsIn: cell("fps-in num", "fps in"),
      fpsOut: cell("fps-out num", "fps out"),
      bitrate: cell("bitrate num", "Bitrate out"),
      dropped: cell("dropped num", "Dropped"),
      frameAge: cell("frame-age num", "Frame age p50 / p95"),
      age: cell("age num", "Age"),
      activity: cell("last-activity", "Last activity"),
      spark: cell("spark-cell", "fps, last minute"),
      actions: cell("actions-cell", "Actions"),
    };
    const img = el("img", { className: "thumb", alt: "Preview of " + session.upstream });
    img.addEventListener("error", () => img.classList.add("missing"));
    img.addEventListener("load", () => img.classList.remove("missing"));
    c.thumb.append(el("div", { className: "thumb-box" }, img,
      el("span", { className: "thumb-label", textContent: "upstream down" })));
    c.id.append(el("code", { title: session.id, textContent: "…" + session.id.slice(-8) }),
      el("button", { className: "icon copy-id", type: "button", title: "Copy the full session ID",
        textContent: "Copy", onclick: () => copy(session.id, "session ID") }));
    c.upstream.append(el("span", { className: "name" }), el("span", { className: "badge" }));
    c.spark.append(sparkline());
    const copyUrls = () => {
      const urls = streamUrls(row.session);
      copy(`WebSocket: ${urls.ws}\nWebSocket (binary): ${urls.wsBinary}\nMJPEG: ${urls.mjpeg}\n` +
        `Embed: ${urls.embed}`, "stream URLs");
    };
    const actions = el("div", { className: "actions" },
      el("button", { className: "destroy", type: "button", textContent: "Destroy", onclick: () => destroy(row.session) }),
      el("a", { className: "button embed", target: "_blank", rel: "noopener", textContent: "Open embed" }),
      el("button", { className: "copy-urls", type: "button", textContent: "Copy URLs", onclick: copyUrls }));
    c.actions.append(actions);
    row.append(...Object.values(c));
    row.parts = c;
    return row;
  }

  function updateSessionRow(row, s, state, thumbStamp) {
    const c = row.parts;
    row.session = s;
    row.dataset.state = s.upstreamState;
    const embed = streamUrls(s).embed;
    if (c.actions.querySelector("a.embed").href !== embed) c.actions.querySelector("a.embed").href = embed;
    row.classList.toggle("down", Boolean(s.upstreamDown));
    c.user.textContent = s.userId;
    c.robot.textContent = s.robotName;
    c.upstream.querySelector(".name").textContent = s.upstream;
    stateBadge(c.upstream.querySelector(".badge"), s.upstreamState);
    transports(c.viewers, s.viewers);
    c.fpsIn.textContent = fps(s.fpsIn);
    c.fpsOut.textContent = fps(s.fpsOut);
    c.bitrate.textContent = bitrate(s.bytesPerSecondOut);
    c.dropped.textContent = String(s.framesDropped);
    const frameAge = s.frameAgeMs || {};
    c.frameAge.textContent = frameAge.p50 == null ? "–"
      : `${Math.round(frameAge.p50)} / ${Math.round(frameAge.p95)} ms`;
    c.age.textContent = duration(s.ageSeconds);
    c.activity.textContent = ago(s.lastActivity, state.generatedAt);
    c.activity.title = s.lastActivity;
    drawSpark(c.spark.firstChild, s.fpsHistory);
    // One stamp per update: sessions sharing an upstream load its thumbnail once, at most once a
    // second (the server also makes it at most once a second).
    const img = c.thumb.querySelector("img.thumb");
    if (!s.thumbnailUrl) { // no frame from the upstream yet
      img.removeAttribute("src");
      img.classList.add("missing");
      return;
    }
    const src = s.thumbnailUrl + "?t=" + thumbStamp;
    if (img.getAttribute("src") !== src) img.src = src;
  }

  function sortValue(s, key) {
    const v = s[key];
    return typeof v === "string" ? v.toLowerCase() : v;
  }

  function renderSessions(state) {
    const thumbStamp = Date.parse(state.generatedAt) || Date.now();
    const seen = new Set();
    for (const s of state.sessions) {
      seen.add(s.id);
      let row = sessionRows.get(s.id);
      if (!row) {
        row = createSessionRow(s);
        sessionRows.set(s.id, row);
      }
      updateSessionRow(row, s, state, thumbStamp);
    }
    for (const id of [...sessionRows.keys()]) if (!seen.has(id)) removeSession(id);

    const needle = filterText.trim().toLowerCase();
    const shown = state.sessions
      .filter((s) => !needle || s.userId.toLowerCase().includes(needle) || s.robotName.toLowerCase().includes(needle))
      .sort((a, b) => {
        const x = sortValue(a, sort.key), y = sortValue(b, sort.key);
        return (x < y ? -1 : x > y ? 1 : a.id < b.id ? -1 : 1) * sort.dir;
      });
    const shownIds = new Set(shown.map((s) => s.id));
    for (const [id, row] of sessionRows) row.hidden = !shownIds.has(id);
    // appendChild moves rows that are already in place: order follows the sort, nothing reloads.
    for (const s of shown) sessionsBody.append(sessionRows.get(s.id));
    $("no-sessions").hidden = state.sessions.length > 0;
    $("no-match").hidden = !(state.sessions.length && !shown.length);
    $("sessions-shown").textContent = needle ? `(${shown.length} of ${state.sessions.length})` : "";
  }

  // -- upstreams ----------------------------------------------------------------------------

  function renderUpstreams(state) {
    const seen = new Set();
    for (const u of state.upstreams) {
      seen.add(u.name);
      let row = upstreamRows.get(u.name);
      if (!row) {
        row = el("tr", { className: "upstream" });
        row.dataset.upstream = u.name;
        row.parts = {
          name: cell("name", "Upstream"), kind: cell("kind", "Kind"), state: cell("state", "State"),
          error: cell("last-error error-text", "Last error"), connects: cell("connects num", "Connects"),
          failures: cell("failures num", "Failures"), fpsIn: cell("fps-in num", "fps in"),
          bitrate: cell("bitrate num", "Bitrate in"), sessions: cell("sessions num", "Sessions"),
          viewers: cell("viewers", "Viewers"), spark: cell("spark-cell", "fps in, last minute"),
          cluster: cell("cluster cluster-col", "Cluster"),
        };
        row.parts.state.append(el("span", { className: "badge" }));
        row.parts.spark.append(sparkline());
        row.append(...Object.values(row.parts));
        upstreamRows.set(u.name, row);
        upstreamsBody.append(row);
      }
      const c = row.parts;
      row.dataset.state = u.state;
      row.classList.toggle("down", Boolean(u.down));
      c.name.textContent = u.name;
      // A JPEG upstream's shared H.264 encoder runs while it has H.264 viewers.
      // An RTSP upstream's H.264 is passed through, unless it has B-frames: then it is re-encoded.
      c.kind.textContent = u.kind + (u.encoder ? " · H.264 encoder" + (u.bFrames ? " (B-frames)" : "") : "");
      stateBadge(c.state.firstChild, u.state);
      c.error.textContent = u.lastError || "–";
      c.error.classList.toggle("none", !u.lastError);
      c.connects.textContent = String(u.connects);
      c.failures.textContent = String(u.failures);
      c.fpsIn.textContent = fps(u.fpsIn);
      c.bitrate.textContent = bitrate(u.bytesPerSecondIn);
      c.sessions.textContent = String(u.sessions);
      transports(c.viewers, u.viewers);
      drawSpark(c.spark.firstChild, { in: u.fpsHistory });
      c.cluster.textContent = u.cluster ? clusterRole(u.cluster) : "";
    }
    for (const [name, row] of upstreamRows) {
      if (!seen.has(name)) {
        row.remove();
        upstreamRows.delete(name);
      }
    }
  }

  // Which node holds an upstream (its origin) and which relay it from there (its edges), as seen
  // from this node.
  function clusterRole(c) {
    const edges = c.edges.length ? " · edges " + c.edges.join(", ") : "";
    if (c.role === "origin") return "origin: this node" + edges;
    if (c.role === "edge") return "edge of " + (c.origin || "?");
    return c.origin ? "origin: " + c.origin + " (not relayed here)" : "not running";
  }

  function renderCluster(cluster) {
    $("cluster-total").hidden = !cluster;
    document.getElementById("upstreams").classList.toggle("no-cluster", !cluster);
    if (!cluster) return;
    $("cluster-node").textContent = cluster.node;
    $("cluster-nodes").textContent = `of ${cluster.nodes.length}: ${cluster.nodes.join(" · ")}`;
    const redis = $("cluster-redis");
    redis.className = "badge " + (cluster.redis === "connected" ? "connected" : "retrying");
    redis.textContent = "Redis " + cluster.redis;
    redis.title = cluster.problem || "";
  }

  // -- header totals ------------------------------------------------------------------------

  function renderTotals(t) {
    $("total-sessions").textContent = t.sessions;
    $("total-max-sessions").textContent = "/ " + t.maxSessions;
    $("total-viewers").textContent = t.viewers;
    $("total-viewers-by-transport").textContent = Object.entries(t.viewersByTransport)
      .filter(([, n]) => n).map(([k, n]) => `${TRANSPORT_NAMES[k] || k} ${n}`).join(" · ");
    $("total-upstreams-up").textContent = t.upstreamsUp;
    $("total-upstreams-down").textContent = t.upstreamsDown;
    $("total-upstreams-down").classList.toggle("bad", t.upstreamsDown > 0);
    $("total-fps-in").textContent = fps(t.fpsIn);
    $("total-bitrate-in").textContent = bitrate(t.bytesPerSecondIn);
    $("total-fps-out").textContent = fps(t.fpsOut);
    $("total-bitrate-out").textContent = bitrate(t.bytesPerSecondOut);
    $("total-uptime").textContent = duration(t.uptimeSeconds);
    $("total-version").textContent = t.version;
  }

  function render(state) {
    lastState = state;
    TRANSPORT_NAMES = state.transportLabels || TRANSPORT_NAMES;
    renderTotals(state.totals);
    renderCluster(state.cluster);
    renderSessions(state);
    renderUpstreams(state);
  }

  // -- sorting and filtering ----------------------------------------------------------------

  function showSort() {
    for (const th of document.querySelectorAll("#sessions th[data-sort]")) {
      if (th.dataset.sort === sort.key) th.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
  }
  for (const th of document.querySelectorAll("#sessions th[data-sort]")) {
    th.tabIndex = 0;
    const choose = () => {
      const key = th.dataset.sort;
      sort = { key, dir: sort.key === key ? -sort.dir : 1 };
      showSort();
      if (lastState) renderSessions(lastState);
    };
    th.addEventListener("click", choose);
    th.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && (e.preventDefault(), choose()));
  }
  showSort();
  $("filter").addEventListener("input", (e) => {
    filterText = e.target.value;
    if (lastState) renderSessions(lastState);
  });

  // -- the live connection ------------------------------------------------------------------

  function setLive(text, cls) {
    const live = $("live");
    live.textContent = text;
    live.className = "live " + cls;
  }
  function connect() {
    const source = new EventSource(EVENTS_URL);
    source.onmessage = (event) => {
      lastEventAt = Date.now();
      document.body.classList.remove("stale");
      setLive("live", "on");
      render(JSON.parse(event.data));
    };
    source.onerror = () => {
      setLive("reconnecting…", "off");
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, REOPEN_AFTER_MS);
    };
  }
  setInterval(() => {
    if (lastEventAt && Date.now() - lastEventAt > STALE_AFTER_MS) document.body.classList.add("stale");
  }, 1000);
  connect();
})();
