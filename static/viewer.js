/* CovidScan result viewer: heatmap opacity, zoom and pan, window/level of the film.
 *
 * Hand-written (no library): the page needs a few dozen lines of transforms and one SVG filter, and a
 * self-hosted script keeps the strict CSP (script-src 'self', no inline code, no style attributes in the markup;
 * styles are set through the CSSOM, which the CSP allows). Without JavaScript the film, the heatmap and its
 * show/hide checkbox still work (plain HTML and CSS); these controls then stay hidden.
 */
(function () {
  "use strict";

  var ZOOM_STEP = 1.5;
  var ZOOM_MIN = 1;
  var ZOOM_MAX = 8;
  var PAN_STEP = 40; // pixels per arrow key press

  function clamp(value, low, high) {
    return Math.min(high, Math.max(low, value));
  }

  function setUpViewer(viewer) {
    var stage = viewer.querySelector("[data-role=stage]");
    var layers = viewer.querySelector("[data-role=layers]");
    var film = viewer.querySelector("[data-role=film]");
    var heatmap = viewer.querySelector("[data-role=heatmap]");
    var controls = viewer.querySelector("[data-role=controls]");
    var opacity = viewer.querySelector("[data-role=opacity]");
    var opacityValue = viewer.querySelector("[data-role=opacity-value]");
    var level = viewer.querySelector("[data-role=level]");
    var levelValue = viewer.querySelector("[data-role=level-value]");
    var windowWidth = viewer.querySelector("[data-role=window]");
    var windowValue = viewer.querySelector("[data-role=window-value]");
    var zoomValue = viewer.querySelector("[data-role=zoom-value]");
    var transfer = viewer.querySelector("[data-role=window-level]");
    var toggle = viewer.querySelector("#show-heatmap");
    if (!stage || !layers || !film || !controls) {
      return;
    }
    var view = { scale: 1, x: 0, y: 0 };

    function keepInside() {
      // The zoomed film always covers the stage: no panning it out of sight.
      var width = stage.clientWidth;
      var height = stage.clientHeight;
      view.x = clamp(view.x, width - width * view.scale, 0);
      view.y = clamp(view.y, height - height * view.scale, 0);
    }

    function render() {
      keepInside();
      layers.style.transform = "translate(" + view.x + "px, " + view.y + "px) scale(" + view.scale + ")";
      stage.classList.toggle("is-zoomed", view.scale > 1);
      zoomValue.textContent = "Zoom " + Math.round(view.scale * 100) + " %";
    }

    function zoomAt(factor, originX, originY) {
      var scale = clamp(view.scale * factor, ZOOM_MIN, ZOOM_MAX);
      var applied = scale / view.scale;
      view.x = originX - (originX - view.x) * applied;
      view.y = originY - (originY - view.y) * applied;
      view.scale = scale;
      render();
    }

    function zoomCentre(factor) {
      zoomAt(factor, stage.clientWidth / 2, stage.clientHeight / 2);
    }

    function resetView() {
      view = { scale: 1, x: 0, y: 0 };
      render();
    }

    function applyOpacity() {
      if (!heatmap || !opacity) {
        return;
      }
      heatmap.style.opacity = String(Number(opacity.value) / 100);
      opacityValue.textContent = opacity.value + " %";
    }

    function applyWindowLevel() {
      // Grey values g in 0..1 map to (g - centre) * contrast + 0.5, clipped: a window of width 1/contrast
      // around the centre (the level) fills the whole grey range. Brightness moves the centre.
      var contrast = Number(windowWidth.value) / 100;
      var centre = 0.5 - Number(level.value) / 100;
      var intercept = 0.5 - centre * contrast;
      transfer.querySelectorAll("feFuncR, feFuncG, feFuncB").forEach(function (channel) {
        channel.setAttribute("slope", String(contrast));
        channel.setAttribute("intercept", String(intercept));
      });
      film.classList.toggle("is-windowed", contrast !== 1 || centre !== 0.5);
      levelValue.textContent = (Number(level.value) > 0 ? "+" : "") + level.value;
      windowValue.textContent = windowWidth.value + " %";
    }

    function resetAll() {
      level.value = level.defaultValue;
      windowWidth.value = windowWidth.defaultValue;
      applyWindowLevel();
      resetView();
    }

    controls.hidden = false;
    stage.classList.add("is-interactive");

    if (opacity) {
      opacity.addEventListener("input", applyOpacity);
      applyOpacity();
    }
    level.addEventListener("input", applyWindowLevel);
    windowWidth.addEventListener("input", applyWindowLevel);
    applyWindowLevel();

    controls.addEventListener("click", function (event) {
      var button = event.target.closest("[data-action]");
      if (!button) {
        return;
      }
      var action = button.getAttribute("data-action");
      if (action === "zoom-in") {
        zoomCentre(ZOOM_STEP);
      } else if (action === "zoom-out") {
        zoomCentre(1 / ZOOM_STEP);
      } else if (action === "reset") {
        resetAll();
      }
    });

    stage.addEventListener("wheel", function (event) {
      if (!event.ctrlKey && view.scale === 1) {
        return; // an unzoomed film lets the page scroll; Ctrl + wheel (or a pinch) zooms it
      }
      event.preventDefault();
      var bounds = stage.getBoundingClientRect();
      zoomAt(event.deltaY < 0 ? ZOOM_STEP : 1 / ZOOM_STEP, event.clientX - bounds.left, event.clientY - bounds.top);
    }, { passive: false });

    var drag = null;
    stage.addEventListener("pointerdown", function (event) {
      if (view.scale === 1 || event.button !== 0) {
        return;
      }
      drag = { id: event.pointerId, x: event.clientX - view.x, y: event.clientY - view.y };
      stage.setPointerCapture(event.pointerId);
      stage.classList.add("is-dragging");
    });
    stage.addEventListener("pointermove", function (event) {
      if (!drag || event.pointerId !== drag.id) {
        return;
      }
      view.x = event.clientX - drag.x;
      view.y = event.clientY - drag.y;
      render();
    });
    function endDrag(event) {
      if (drag && event.pointerId === drag.id) {
        drag = null;
        stage.classList.remove("is-dragging");
      }
    }
    stage.addEventListener("pointerup", endDrag);
    stage.addEventListener("pointercancel", endDrag);
    stage.addEventListener("dblclick", function (event) {
      var bounds = stage.getBoundingClientRect();
      if (view.scale > 1) {
        resetView();
      } else {
        zoomAt(2, event.clientX - bounds.left, event.clientY - bounds.top);
      }
    });

    stage.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey) {
        return;
      }
      var handled = true;
      switch (event.key) {
        case "+":
        case "=":
          zoomCentre(ZOOM_STEP);
          break;
        case "-":
        case "_":
          zoomCentre(1 / ZOOM_STEP);
          break;
        case "0":
          resetView();
          break;
        case "ArrowLeft":
          view.x += PAN_STEP;
          render();
          break;
        case "ArrowRight":
          view.x -= PAN_STEP;
          render();
          break;
        case "ArrowUp":
          view.y += PAN_STEP;
          render();
          break;
        case "ArrowDown":
          view.y -= PAN_STEP;
          render();
          break;
        case "h":
        case "H":
          if (toggle) {
            toggle.checked = !toggle.checked;
          } else {
            handled = false;
          }
          break;
        default:
          handled = false;
      }
      if (handled) {
        event.preventDefault();
      }
    });

    window.addEventListener("resize", render);
    render();
  }

  document.querySelectorAll("[data-viewer]").forEach(setUpViewer);
})();
