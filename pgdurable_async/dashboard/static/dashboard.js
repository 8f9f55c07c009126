// The instance page's action buttons (loaded only with --allow-actions).  The token is
// sent as "Authorization: Bearer ..." and kept for this tab only (sessionStorage).
"use strict";
(function () {
  const section = document.getElementById("actions");
  if (!section) return;
  const base = document.body.dataset.base || "";
  const id = section.dataset.instanceId;
  const tokenInput = document.getElementById("token");
  const out = document.getElementById("action-result");
  tokenInput.value = sessionStorage.getItem("pgdurable-dashboard-token") || "";
  for (const form of section.querySelectorAll("form.action")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const action = form.dataset.action;
      if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
      let body;
      if (action === "raise-event") {
        let data = null;
        const text = form.elements.data.value.trim();
        try { data = text ? JSON.parse(text) : null; } catch (e) { show("data is not valid JSON", true); return; }
        body = { name: form.elements.name.value, data: data };
      } else {
        body = { reason: form.elements.reason.value || null };
      }
      sessionStorage.setItem("pgdurable-dashboard-token", tokenInput.value);
      const response = await fetch(base + "/api/instances/" + encodeURIComponent(id) + "/" + action, {
        method: "POST",
        headers: { "Authorization": "Bearer " + tokenInput.value, "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      const reply = await response.json().catch(() => ({}));
      if (!response.ok) { show(response.status + ": " + (reply.error || response.statusText), true); return; }
      show(action + ": " + reply.note + " (status " + reply.status + ")", false);
      window.setTimeout(() => window.location.reload(), 1200);
    });
  }
  function show(text, failed) {
    out.textContent = text;
    out.className = failed ? "failed" : "";
  }
})();
