/* scistream web view: live updates of the session table and of one session's chart.
   Served by s2cs (src/scistream/control/web.py); no external resources, no inline script. */
(function () {
  "use strict";
  var COLUMNS = ["uid", "owner", "role", "state", "age", "lease_left", "conns", "rate_in_h",
                 "rate_out_h", "wan_security", "server_type", "node"];
  var KEEP = 300;
  var body = document.body;
  var live = document.getElementById("live");

  function esc(v) {
    return String(v).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}[c];
    });
  }

  function rate(bps) {
    var units = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"];
    for (var i = 0; i < units.length; i++) {
      if (bps < 1000 || i === units.length - 1) {
        return (i === 0 ? bps.toFixed(0) : bps.toFixed(1)) + " " + units[i];
      }
      bps /= 1000;
    }
    return "";
  }

  /* times read as the timeline's: UTC, 24-hour */
  function utc(t) { return new Date(t * 1000).toISOString().substr(11, 8); }

  function setText(id, text) {
    var el = document.getElementById(id);
    if (el && el.textContent !== String(text)) { el.textContent = text; }
    return el;
  }

  function connect(url, onData) {
    var es = new EventSource(url);
    es.onopen = function () { if (live) { live.classList.add("on"); } };
    es.onerror = function () { if (live) { live.classList.remove("on"); } };
    es.onmessage = function (ev) { onData(JSON.parse(ev.data)); };
    es.addEventListener("signed-out", function () { es.close(); window.location.href = "/login"; });
    return es;
  }

  function rowHtml(r) {
    var cells = COLUMNS.map(function (k) {
      var v = r[k];
      if (k === "uid") { v = '<a href="' + esc(r.url) + '">' + esc(v) + "</a>"; }
      else if (k === "state") { v = '<span class="state s-' + esc(v) + '">' + esc(v) + "</span>"; }
      else { v = esc(v); }
      return '<td class="c-' + k + '">' + v + "</td>";
    });
    var title = r.last_error ? ' title="' + esc(r.last_error) + '"' : "";
    return '<tr data-key="' + esc(r.uid) + "/" + esc(r.role) + '"' + title + ">" + cells.join("") + "</tr>";
  }

  function summary(sm) {
    setText("ports", sm.ports_used + " / " + sm.ports_total);
    setText("bandwidth", sm.bandwidth_max_kbps ? sm.bandwidth_used_kbps + " / " + sm.bandwidth_max_kbps + " kbit/s"
                                               : sm.bandwidth_used_kbps + " kbit/s (no cap)");
    Object.keys(sm.states).forEach(function (k) { setText("n-" + k, sm.states[k]); });
    var nodes = document.getElementById("nodes");
    if (nodes && sm.nodes) {   /* a facility (s2cs --facility): its nodes, live */
      var html = '<span class="label">nodes</span> ' + (sm.nodes.map(function (n) {
        return '<span class="node n-' + esc(n.state) + '" data-node="' + esc(n.name) + '">' + esc(n.name) +
               " " + esc(n.state) + " <b>" + esc(n.sessions) + "</b></span>";
      }).join(" ") || "none registered");
      if (nodes.innerHTML !== html) { nodes.innerHTML = html; }
    }
  }

  function index() {
    var tbody = document.querySelector("#sessions tbody");
    var empty = document.getElementById("empty");
    connect("/events", function (d) {
      summary(d.summary);
      tbody.innerHTML = d.sessions.map(rowHtml).join("");
      if (empty) { empty.hidden = d.sessions.length > 0; }
    });
  }

  var HOPS = ["producer", "a_lan", "wan", "b_lan", "consumer"];
  function drawChain(c) {
    var ol = document.getElementById("chain");
    if (!ol) { return; }
    var items = c.hops.map(function (h, i) {
      return '<li class="hop' + (HOPS[i] === c.hop ? " bottleneck" : "") + '" data-hop="' + HOPS[i] + '">' +
             '<span class="name">' + esc(h.hop) + '</span> <span class="rate">' + esc(h.rate_h) + "</span> " +
             '<span class="rtt">' + esc(h.rtt_h) + "</span></li>";
    }).join("");
    if (ol.innerHTML !== items) { ol.innerHTML = items; }
    setText("bottleneck", c.bottleneck);
  }

  function session() {
    var uid = body.dataset.uid, role = body.dataset.role;
    var holder = document.getElementById("chart");
    var data = [[], [], []];
    var plot = null;
    function makePlot() {
      if (typeof uPlot === "undefined") { return null; }
      return new uPlot({
        width: Math.max(320, (holder.clientWidth || 640) - 24), height: 260,
        scales: {x: {time: true}, y: {range: function (u, lo, hi) { return [0, Math.max(hi, 1000)]; }}},
        series: [{label: "UTC", value: function (u, v) { return v == null ? "-" : utc(v); }},
                 {label: "to producer", stroke: "#1f77b4", width: 2, dash: [8, 4], value: function (u, v) { return v == null ? "-" : rate(v); }},
                     {label: "to consumer", stroke: "#d62728", width: 2, value: function (u, v) { return v == null ? "-" : rate(v); }}],
        axes: [{label: "UTC", values: function (u, vals) { return vals.map(utc); }},
               {size: 96, values: function (u, vals) { return vals.map(rate); }}]
      }, data, holder);
    }
    function push(p) {
      var n = data[0].length;
      if (n && p[0] <= data[0][n - 1]) { return; }
      data[0].push(p[0]); data[1].push(p[1]); data[2].push(p[2]);
      if (data[0].length > KEEP) { data.forEach(function (a) { a.splice(0, a.length - KEEP); }); }
    }
    var url = "/events?uid=" + encodeURIComponent(uid) + "&role=" + encodeURIComponent(role);
    connect(url, function (d) {
      var r = d.session;
      if (d.history) { data = [[], [], []]; d.history.forEach(push); }
      if (d.sample) { push(d.sample); }
      var st = setText("state", r.state);
      if (st) { st.className = "state s-" + r.state; }
      setText("age", r.age);
      setText("lease", r.lease_left);
      setText("conns", r.conns);
      var ri = setText("rate-in", r.rate_in_h), ro = setText("rate-out", r.rate_out_h);
      if (ri) { ri.dataset.bps = r.rate_in; }
      if (ro) { ro.dataset.bps = r.rate_out; }
      var by = setText("bytes", r.bytes_in_h + " / " + r.bytes_out_h);
      if (by) { by.title = r.bytes_in + " / " + r.bytes_out + " bytes"; }
      setText("last-error", r.last_error || "none");
      if (d.chain) { drawChain(d.chain); }
      var tl = document.getElementById("timeline");
      var items = d.timeline.map(function (t) {
        return '<li><span class="state s-' + esc(t.state) + '">' + esc(t.state) + "</span> <time>" + esc(t.when) + "</time></li>";
      }).join("");
      if (tl.innerHTML !== items) { tl.innerHTML = items; }
      if (!plot) { plot = makePlot(); }
      if (plot) { plot.setData(data); }
      holder.dataset.points = data[0].length;
    });
  }

  if (body.dataset.view === "index") { index(); }
  else if (body.dataset.view === "session") { session(); }
})();
