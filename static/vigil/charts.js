// The fleet overview's charts, drawn with the vendored ECharts from the JSON that json_script wrote.
(function () {
  "use strict";
  if (!window.echarts) return;
  var charts = [];
  var severityColors = {critical: "#b42318", high: "#e8706a", medium: "#d89a2b", low: "#6b9bd1"};
  var base = {textStyle: {fontFamily: "system-ui, sans-serif"}, grid: {containLabel: true, left: 8, right: 16, top: 56, bottom: 24},
              tooltip: {trigger: "axis"}};

  function draw(id, option) {
    var element = document.getElementById(id);
    if (!element) return;
    var chart = window.echarts.init(element, null, {renderer: "svg"});
    chart.setOption(Object.assign({}, base, option));
    charts.push(chart);
  }

  function read(id) {
    var source = document.getElementById(id);
    return source ? JSON.parse(source.textContent) : null;
  }

  var data = read("overview-charts");
  var h = data && data.histogram;
  if (h && h.edges.length) {
    var centers = h.edges.slice(0, -1).map(function (edge, i) { return (edge + h.edges[i + 1]) / 2; });
    var pairs = function (counts) {
      return counts.map(function (n, i) { return [centers[i], n || null]; });  // null: no bar on a log axis
    };
    draw("score-histogram", {
      legend: {data: ["Normal", "Anomaly"], top: 0, left: 0},
      xAxis: {type: "value", scale: true},
      yAxis: {type: "log"},
      series: [
        {name: "Normal", type: "bar", data: pairs(h.normal), barWidth: "90%", barGap: "-100%", itemStyle: {color: "#9aa5b4"}},
        {name: "Anomaly", type: "bar", data: pairs(h.anomaly), barWidth: "90%", itemStyle: {color: "#b42318"},
         markLine: h.threshold === null ? undefined : {symbol: "none", lineStyle: {color: "#1c2430", type: "dashed"},
           label: {formatter: "threshold " + h.threshold.toFixed(3)}, data: [{xAxis: h.threshold}]}}
      ]
    });
  }

  var t = data && data.trend;
  if (t && t.days.length) {
    draw("anomaly-trend", {
      legend: {top: 0, left: 0},
      xAxis: {type: "category", data: t.days},
      yAxis: {type: "value", minInterval: 1},
      series: Object.keys(t.series).map(function (severity) {
        return {name: severity, type: "bar", stack: "day", barMaxWidth: 48, data: t.series[severity],
                itemStyle: {color: severityColors[severity]}};
      })
    });
  }

  // One small time-series chart per metric (anomaly detail, device page).
  function drawInto(element, option) {
    var chart = window.echarts.init(element, null, {renderer: "svg"});
    chart.setOption(Object.assign({}, base, {grid: {containLabel: true, left: 8, right: 16, top: 16, bottom: 24}}, option));
    charts.push(chart);
  }
  var timeAxis = {type: "time", axisLabel: {hideOverlap: true}};

  var around = read("anomaly-charts");
  if (around) {
    var event = {symbol: "none", lineStyle: {color: "#b42318", width: 2}, label: {formatter: "anomaly", position: "insideEndTop"},
                 data: [{xAxis: around.event}]};
    // Every chart of the page spans the same window: the telemetry's first to last sample.
    var span = around.metrics.reduce(function (acc, m) {
      if (m.points.length) { acc.push(m.points[0][0], m.points[m.points.length - 1][0]); }
      return acc;
    }, []).sort();
    var windowAxis = Object.assign({}, timeAxis, span.length ? {min: span[0], max: span[span.length - 1]} : {});
    var scores = document.getElementById("score-timeline");
    if (scores) {
      drawInto(scores, {
        xAxis: windowAxis, yAxis: {type: "value", scale: true},
        series: [{name: "score", type: "line", showSymbol: false, data: around.scores.points, lineStyle: {color: "#3451b2"},
                  markLine: {symbol: "none", silent: true, data: [
                    {yAxis: around.scores.threshold, lineStyle: {color: "#1c2430", type: "dashed"},
                     label: {formatter: "threshold", position: "insideStartTop"}},
                    {xAxis: around.event, lineStyle: {color: "#b42318", width: 2}, label: {formatter: "anomaly", position: "insideEndTop"}}]}}]
      });
    }
    around.metrics.forEach(function (m) {
      var element = document.querySelector('[data-metric="' + m.name + '"]');
      if (!element) return;
      var series = [];
      if (m.band) {
        // The band as a stacked area: an invisible lower edge, then the band's width on top of it.
        // stackStrategy "all": ECharts' default ("samesign") stacks a positive width on 0, not on a
        // negative lower edge, which drew the band of a metric below zero (wifi dBm) in the wrong place.
        var low = m.points.map(function (p) { return [p[0], m.band.low]; });
        var width = m.points.map(function (p) { return [p[0], m.band.high - m.band.low]; });
        series.push({name: "band low", type: "line", data: low, stack: "band", stackStrategy: "all", symbol: "none", lineStyle: {opacity: 0}, tooltip: {show: false}});
        series.push({name: "baseline ±" + around.band_z + "σ (robust)", type: "line", data: width, stack: "band", stackStrategy: "all", symbol: "none",
                     lineStyle: {opacity: 0}, areaStyle: {color: "rgba(29, 122, 70, .15)"}, tooltip: {show: false}});
        series.push({name: "median", type: "line", symbol: "none", data: m.points.map(function (p) { return [p[0], m.band.median]; }),
                     lineStyle: {color: "#1d7a46", type: "dotted"}, tooltip: {show: false}});
      }
      series.push({name: m.label, type: "line", showSymbol: false, data: m.points, lineStyle: {color: "#3451b2"}, markLine: event});
      // The stacked band series take part in the y range, so the band is never cut off.
      drawInto(element, {xAxis: windowAxis, yAxis: {type: "value", scale: true}, series: series});
    });
  }

  var device = read("device-charts");
  if (device) {
    var colors = {critical: "#b42318", high: "#e8706a", medium: "#d89a2b", low: "#6b9bd1"};
    device.metrics.forEach(function (m) {
      var element = document.querySelector('[data-metric="' + m.name + '"]');
      if (!element) return;
      drawInto(element, {
        xAxis: timeAxis, yAxis: {type: "value", scale: true},
        series: [{name: m.label, type: "line", showSymbol: false, sampling: "lttb", data: m.points, lineStyle: {color: "#3451b2", width: 1},
                  markLine: device.anomalies.length ? {symbol: "none", silent: true, label: {show: false},
                    data: device.anomalies.map(function (a) { return {xAxis: a[0], lineStyle: {color: colors[a[1]] || "#b42318", width: 1}}; })} : undefined}]
      });
    });
  }

  // Redraw when a chart's box changes (window resize, rotation, the grid collapsing to one column).
  if (window.ResizeObserver) {
    var observer = new ResizeObserver(function () { charts.forEach(function (c) { c.resize(); }); });
    charts.forEach(function (c) { observer.observe(c.getDom()); });
  } else {
    window.addEventListener("resize", function () { charts.forEach(function (c) { c.resize(); }); });
  }
})();
