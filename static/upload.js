/* CovidScan upload form: while the image is analysed, the button is disabled and a progress indicator shows.
 *
 * Without JavaScript the form posts as usual; this only adds feedback and stops a second submission.
 */
(function () {
  "use strict";

  document.querySelectorAll("form.upload-form").forEach(function (form) {
    var button = form.querySelector("[type=submit]");
    var progress = form.querySelector("[data-role=progress]");
    var progressText = form.querySelector("[data-role=progress-text]");
    var idleLabel = button ? button.value : "";
    var submitting = false;

    form.addEventListener("submit", function (event) {
      if (submitting) {
        event.preventDefault(); // a second click while the first upload is analysed
        return;
      }
      submitting = true;
      form.setAttribute("aria-busy", "true");
      if (progress) {
        progress.hidden = false;
      }
      if (progressText) {
        progressText.textContent = "Analysing the image… this usually takes a few seconds.";
      }
      // Disabled on the next turn: a button disabled during the submit event would be left out of the form data.
      window.setTimeout(function () {
        if (button) {
          button.disabled = true;
          button.value = "Analysing…";
        }
      }, 0);
    });

    // Back from the result page (back/forward cache): the form is ready again.
    window.addEventListener("pageshow", function () {
      submitting = false;
      form.removeAttribute("aria-busy");
      if (button) {
        button.disabled = false;
        button.value = idleLabel;
      }
      if (progress) {
        progress.hidden = true;
      }
      if (progressText) {
        progressText.textContent = "";
      }
    });
  });
})();
