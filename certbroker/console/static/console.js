// The console's only script (the Content-Security-Policy allows no inline script): draws the
// overview's charts from the JSON in #overview-data's data-chart attribute, and wires the
// print button. Tests read the charts back with echarts.getInstanceByDom(...).getOption().
"use strict";

(function () {
  var COLORS = { allowed: "#2f6fb3", denied: "#d48806", failed: "#cf1322" };
  var NAMES = { allowed: "查询成功", denied: "拒绝", failed: "失败" };

  function bars(el, data, stacked, horizontal) {
    var chart = window.echarts.init(el, null, { renderer: "canvas" });
    var category = { type: "category", data: data.labels, axisLabel: { hideOverlap: true } };
    var value = { type: "value", minInterval: 1 };
    chart.setOption({
      animation: false,
      textStyle: { fontFamily: "Noto Sans CJK SC, sans-serif" },
      tooltip: { trigger: "axis" },
      legend: { top: 0 },
      grid: { left: horizontal ? 140 : 50, right: 20, top: 36, bottom: 40 },
      xAxis: horizontal ? value : category,
      yAxis: horizontal ? category : value,
      series: ["allowed", "denied", "failed"].map(function (key) {
        return {
          id: key,
          name: NAMES[key],
          type: "bar",
          stack: stacked ? "all" : undefined,
          itemStyle: { color: COLORS[key] },
          data: data[key],
        };
      }),
    });
    window.addEventListener("resize", function () { chart.resize(); });
    return chart;
  }

  function overview() {
    var holder = document.getElementById("overview-data");
    if (!holder || !window.echarts) return;
    var data = JSON.parse(holder.getAttribute("data-chart"));
    bars(document.getElementById("chart-hours"), data.hours, true, false);
    bars(document.getElementById("chart-offices"), data.offices, true, true);
    bars(document.getElementById("chart-departments"), data.departments, true, true);
    document.body.setAttribute("data-charts-ready", "true");
  }

  function printButton() {
    var button = document.getElementById("print");
    if (button) button.addEventListener("click", function () { window.print(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    overview();
    printButton();
  });
})();
