// The fleet overview's charts, drawn with the vendored ECharts from the JSON that json_script wrote.
(function () {
  "use strict";
  var source = document.getElementById("overview-charts");
  if (!source || !window.echarts) return;
  var data = JSON.parse(source.textContent);
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

  var h = data.histogram;
  if (h.edges.length) {
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

  var t = data.trend;
  if (t.days.length) {
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

  // Redraw when a chart's box changes (window resize, rotation, the grid collapsing to one column).
  if (window.ResizeObserver) {
    var observer = new ResizeObserver(function () { charts.forEach(function (c) { c.resize(); }); });
    charts.forEach(function (c) { observer.observe(c.getDom()); });
  } else {
    window.addEventListener("resize", function () { charts.forEach(function (c) { c.resize(); }); });
  }
})();
