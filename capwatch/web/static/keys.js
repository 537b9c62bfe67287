// capwatch serve: keyboard only. "/" focuses the search box; arrow keys move through the results grid.
// Everything works without this file (plain links and forms).
(function () {
  "use strict";
  function tiles() { return Array.prototype.slice.call(document.querySelectorAll("#results .hit")); }
  function columns(list) {
    if (list.length < 2) { return 1; }
    var top = list[0].getBoundingClientRect().top, n = 0;
    for (var i = 0; i < list.length && list[i].getBoundingClientRect().top === top; i++) { n++; }
    return Math.max(1, n);
  }
  document.addEventListener("keydown", function (event) {
    var target = event.target, typing = target && /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName);
    if (event.key === "/" && !typing) {
      var box = document.getElementById("q");
      if (box) { event.preventDefault(); box.focus(); box.select(); }
      return;
    }
    if (typing || event.altKey || event.ctrlKey || event.metaKey) { return; }
    var steps = { ArrowLeft: -1, ArrowRight: 1 }, list = tiles();
    if (!list.length) { return; }
    var cols = columns(list);
    steps.ArrowUp = -cols; steps.ArrowDown = cols;
    if (!(event.key in steps)) { return; }
    var at = list.indexOf(document.activeElement);
    var next = at < 0 ? 0 : Math.min(list.length - 1, Math.max(0, at + steps[event.key]));
    event.preventDefault();
    list[next].focus();
    list[next].scrollIntoView({ block: "nearest" });
  });
}());
