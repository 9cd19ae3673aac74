// ctscreen service page: upload by drag-and-drop or file picker, and a jobs table (and,
// with the DICOM node, its outbox) that the server renders and this script refreshes
// every two seconds (no framework).
"use strict";
(function () {
  const lang = document.body.dataset.lang || "en";
  const form = document.getElementById("upload");
  const picker = document.getElementById("files");
  const status = document.getElementById("upload-status");
  const jobs = document.getElementById("jobs");
  const dicom = document.getElementById("dicom"); // only when the DICOM node is on
  let chosen = [];

  function show(text) {
    status.textContent = text;
  }

  function choose(files) {
    chosen = Array.from(files);
    show(chosen.map((f) => f.name).join(", "));
  }

  // Put the server-rendered fragment at `path` into `element` (none: nothing to do).
  async function reload(path, element) {
    if (!element) {
      return;
    }
    try {
      const answer = await fetch(path + "?lang=" + encodeURIComponent(lang), {
        credentials: "same-origin",
      });
      if (answer.ok) {
        element.innerHTML = await answer.text();
      }
    } catch (err) {
      // the server is restarting: try again on the next tick
    }
  }

  function refresh() {
    return reload("/ui/jobs", jobs);
  }

  function refreshDicom() {
    return reload("/ui/dicom", dicom);
  }

  async function sendNow(event) {
    if (!event.target.closest("button.retry")) {
      return;
    }
    await fetch("/api/v1/dicom/outbox/retry", { method: "POST", credentials: "same-origin" });
    refreshDicom();
  }

  async function upload(event) {
    event.preventDefault();
    if (!chosen.length) {
      picker.click();
      return;
    }
    const body = new FormData();
    for (const file of chosen) {
      body.append("files", file, file.name);
    }
    const perSlice = form.querySelector("input[name=mode]");
    body.append("mode", perSlice && perSlice.checked ? "slice" : "study");
    show(status.dataset.uploading);
    const answer = await fetch("/api/v1/jobs", {
      method: "POST",
      body: body,
      credentials: "same-origin",
    });
    const reply = await answer.json().catch(() => ({}));
    if (answer.ok) {
      show(reply.id ? reply.id + ": " + reply.status : "");
      chosen = [];
      picker.value = "";
    } else {
      show(answer.status + ": " + (reply.detail || answer.statusText));
    }
    refresh();
  }

  async function remove(event) {
    const button = event.target.closest("button.delete");
    if (!button) {
      return;
    }
    await fetch("/api/v1/jobs/" + encodeURIComponent(button.dataset.job), {
      method: "DELETE",
      credentials: "same-origin",
    });
    refresh();
  }

  if (form) {
    // no upload form for a viewer
    picker.addEventListener("change", () => choose(picker.files));
    form.addEventListener("submit", upload);
    ["dragenter", "dragover"].forEach((name) =>
      form.addEventListener(name, (event) => {
        event.preventDefault();
        form.classList.add("over");
      })
    );
    ["dragleave", "drop"].forEach((name) =>
      form.addEventListener(name, (event) => {
        event.preventDefault();
        form.classList.remove("over");
      })
    );
    form.addEventListener("drop", (event) => choose(event.dataTransfer.files));
  }
  jobs.addEventListener("click", remove);
  if (dicom) {
    dicom.addEventListener("click", sendNow);
  }
  setInterval(() => {
    refresh();
    refreshDicom();
  }, 2000);
})();
