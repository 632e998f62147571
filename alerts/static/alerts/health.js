// The model health page's charts (vendored ECharts), from the JSON that json_script wrote.
(function () {
  "use strict";
  var source = document.getElementById("health-charts");
  if (!source || !window.echarts) return;
  var data = JSON.parse(source.textContent);
  var charts = [];
  var base = {textStyle: {fontFamily: "system-ui, sans-serif"}, grid: {containLabel: true, left: 8, right: 16, top: 56, bottom: 24},
              tooltip: {trigger: "axis"}};

  function draw(id, option) {
    var element = document.getElementById(id);
    if (!element) return;
    var chart = window.echarts.init(element, null, {renderer: "svg"});
    chart.setOption(Object.assign({}, base, option));
    charts.push(chart);
  }

  var s = data.scores;
  if (s.edges.length) {
    var centers = s.edges.slice(0, -1).map(function (e, i) { return ((e + s.edges[i + 1]) / 2).toFixed(3); });
    draw("score-drift", {
      legend: {data: ["Training run", "Latest run"], top: 0, left: 0},
      xAxis: {type: "category", data: centers},
      yAxis: {type: "value", axisLabel: {formatter: function (v) { return (v * 100).toFixed(0) + "%"; }}},
      series: [
        {name: "Training run", type: "bar", data: s.training, barGap: "-100%", itemStyle: {color: "#9aa5b4"}},
        {name: "Latest run", type: "bar", data: s.current, itemStyle: {color: "rgba(30,95,168,.65)"}}
      ]
    });
  }

  var r = data.rate;
  if (r.runs.length) {
    draw("rate-trend", {
      legend: {data: ["Anomaly rate"], top: 0, left: 0},
      xAxis: {type: "category", data: r.at},
      yAxis: {type: "value", axisLabel: {formatter: function (v) { return (v * 100).toFixed(1) + "%"; }}},
      series: [{name: "Anomaly rate", type: "line", data: r.rate, symbolSize: 7, itemStyle: {color: "#b42318"},
                markLine: r.contamination === null ? undefined : {symbol: "none", lineStyle: {color: "#1c2430", type: "dashed"},
                  label: {formatter: "contamination", position: "insideEndTop"}, data: [{yAxis: r.contamination}]}}]
    });
  }

  if (window.ResizeObserver) {
    var observer = new ResizeObserver(function () { charts.forEach(function (c) { c.resize(); }); });
    charts.forEach(function (c) { observer.observe(c.getDom()); });
  }
})();
