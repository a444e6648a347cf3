// The worklist page: fills the table from /worklist/data, refreshes it every few seconds without reloading,
// shows a heatmap on demand and marks an image reviewed (CSRF token from the page's meta tag).
(function () {
  "use strict";
  var REFRESH_MS = 10000;
  var table = document.querySelector("[data-role=worklist]");
  if (!table) { return; }
  var rows = table.querySelector("[data-role=rows]");
  var summary = document.querySelector("[data-role=summary]");
  var filters = document.querySelector("[data-role=filters]");
  var previous = document.querySelector("[data-role=previous]");
  var next = document.querySelector("[data-role=next]");
  var pageLabel = document.querySelector("[data-role=page]");
  var panel = document.querySelector("[data-role=heatmap-panel]");
  var heatmap = document.querySelector("[data-role=heatmap]");
  var caption = document.querySelector("[data-role=heatmap-caption]");
  var csrf = document.querySelector("meta[name=csrf-token]").getAttribute("content");
  var state = { page: 1, pages: 1 };

  function query() {
    var params = new URLSearchParams(new FormData(filters));
    Array.from(params.keys()).forEach(function (key) { if (!params.get(key)) { params.delete(key); } });
    params.set("page", String(state.page));
    params.set("per_page", table.dataset.pageSize);
    return params.toString();
  }

  function cell(text) {
    var td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "—" : String(text);
    return td;
  }

  function button(text, onClick) {
    var element = document.createElement("button");
    element.type = "button";
    element.className = "button";
    element.textContent = text;
    element.addEventListener("click", onClick);
    return element;
  }

  function render(data) {
    rows.textContent = "";
    data.items.forEach(function (item, index) {
      var tr = document.createElement("tr");
      tr.className = "status-" + item.status;
      tr.dataset.sop = item.sop_instance_uid;
      tr.appendChild(cell((data.page - 1) * data.per_page + index + 1));
      tr.appendChild(cell(item.accession_number));
      tr.appendChild(cell(item.study_date));
      tr.appendChild(cell(item.status + (item.reviewed_by ? " by " + item.reviewed_by : "")));
      tr.appendChild(cell(item.label));
      var urgency = cell(item.urgency === null ? null : (item.urgency * 100).toFixed(0) + " %");
      urgency.className = "urgency";
      tr.appendChild(urgency);
      tr.appendChild(cell(item.received_at ? new Date(item.received_at).toLocaleString() : null));
      var actions = document.createElement("td");
      actions.className = "actions";
      if (item.viewer_url) {
        var link = document.createElement("a");
        link.href = item.viewer_url;
        link.textContent = "Open study";
        link.rel = "noopener";
        link.target = "_blank";
        actions.appendChild(link);
      }
      if (item.heatmap_url) {
        actions.appendChild(button("Heatmap", function () { showHeatmap(item); }));
      }
      if (item.status === "done" || item.status === "flagged") {
        actions.appendChild(button("Mark reviewed", function () { markReviewed(item); }));
      }
      tr.appendChild(actions);
      rows.appendChild(tr);
    });
    state.pages = data.pages;
    summary.textContent = data.total + " image(s); " + Object.keys(data.counts).map(function (key) {
      return data.counts[key] + " " + key;
    }).join(", ") + ". Updated " + new Date().toLocaleTimeString() + ".";
    pageLabel.textContent = "Page " + data.page + " of " + data.pages;
    previous.disabled = data.page <= 1;
    next.disabled = data.page >= data.pages;
  }

  function refresh() {
    return fetch(table.dataset.source + "?" + query(), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(render)
      .catch(function (error) { summary.textContent = "The worklist could not be loaded (" + error.message + ")."; });
  }

  function showHeatmap(item) {
    panel.hidden = false;
    heatmap.src = item.heatmap_url;
    caption.textContent = "Accession " + (item.accession_number || "—") + ": " + (item.label || "flagged") +
      ". Research use only.";
  }

  function markReviewed(item) {
    fetch(item.review_url, {
      method: "POST", credentials: "same-origin", headers: { "X-CSRFToken": csrf, Accept: "application/json" }
    }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return refresh();
    }).catch(function (error) { summary.textContent = "Could not mark it reviewed (" + error.message + ")."; });
  }

  filters.addEventListener("submit", function (event) { event.preventDefault(); state.page = 1; refresh(); });
  previous.addEventListener("click", function () { state.page = Math.max(1, state.page - 1); refresh(); });
  next.addEventListener("click", function () { state.page = Math.min(state.pages, state.page + 1); refresh(); });
  refresh();
  window.setInterval(refresh, REFRESH_MS);
}());
