// One task's form and output: submit, follow the job (events + status for position and ETA), show
// previews, progress, errors next to the field they are about, and the result.

import { ApiError, api, describeError, getJson, jobEvents } from "./api.js";

const POLL_MS = 1000;

function fmtSeconds(s) {
  if (s < 1) return "under a second";
  if (s < 90) return `${Math.round(s)} s`;
  return `${Math.round(s / 60)} min`;
}

function fmtScore(x) {
  return Number(x).toFixed(3);
}

function fieldErrorEl(control) {
  return control.form.ownerDocument.getElementById(control.id + "-error");
}

export function clearErrors(form) {
  for (const control of form.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
  for (const el of form.querySelectorAll(".field-error, .form-error")) {
    el.textContent = "";
    el.hidden = true;
  }
}

export function showFieldError(control, text) {
  const el = fieldErrorEl(control);
  control.setAttribute("aria-invalid", "true");
  if (el) {
    el.textContent = text;
    el.hidden = false;
  }
  const details = control.closest("details");
  if (details) details.open = true;
}

export class JobPanel {
  // kind: "refine" | "generate"; onAuthError(err): show the API key field.
  constructor(form, output, { kind, onAuthError }) {
    this.form = form;
    this.output = output;
    this.kind = kind;
    this.onAuthError = onAuthError;
    const q = (sel) => output.querySelector(sel);
    this.status = q(".status");
    this.detail = q(".detail");
    this.progress = q(".progress");
    this.bar = q(".progress .bar");
    this.live = q(".live");
    this.liveImg = q(".live-img");
    this.liveCaption = q(".live-caption");
    this.result = q(".result");
    this.resultImg = q(".result-img");
    this.facts = q(".facts");
    this.download = q(".download");
    this.submitBtn = form.querySelector("button[type=submit]");
    this.cancelBtn = form.querySelector(".cancel");
    this.formError = form.querySelector(".form-error");
    this.jobId = null;
    this.resultUrl = null;
    this.resultBlob = null;
    this.abort = null;
    this.retryTimer = null;
    this.previewsLoaded = 0;
    this.cancelBtn.addEventListener("click", () => this.cancel());
    this.liveImg.addEventListener("load", () => {
      this.previewsLoaded += 1;
      this.live.dataset.loaded = String(this.previewsLoaded);
    });
  }

  get busy() {
    return this.abort !== null;
  }

  setStatus(text) {
    this.status.textContent = text;
  }

  setDetail(progressText, etaText) {
    if (progressText !== undefined) this.progressText = progressText;
    if (etaText !== undefined) this.etaText = etaText;
    this.detail.textContent = [this.progressText, this.etaText].filter(Boolean).join(" · ");
  }

  setProgress(fraction, text) {
    const pct = Math.max(0, Math.min(100, Math.round(fraction * 100)));
    this.progress.setAttribute("aria-valuenow", String(pct));
    this.progress.setAttribute("aria-valuetext", text ? `${pct}%, ${text}` : `${pct}%`);
    this.bar.style.width = pct + "%";
  }

  reset() {
    clearErrors(this.form);
    clearInterval(this.retryTimer);
    this.jobId = null;
    this.previewsLoaded = 0;
    this.progressText = "";
    this.etaText = "";
    this.output.hidden = true;
    this.live.hidden = true;
    delete this.live.dataset.loaded;
    this.liveImg.removeAttribute("src");
    this.liveCaption.textContent = "";
    this.result.hidden = true;
    this.resultImg.removeAttribute("src");
    this.facts.replaceChildren();
    if (this.resultUrl) URL.revokeObjectURL(this.resultUrl);
    this.resultUrl = null;
    this.resultBlob = null;
    this.setProgress(0);
    this.output.dataset.state = "idle";
  }

  // Shows `err` where it belongs: the field it names, the API key, or next to the button.
  showError(err) {
    const controls = this.form.elements;
    let unplaced = true;
    if (err instanceof ApiError && err.status === 401) {
      this.onAuthError(err);
    } else if (
      err instanceof ApiError &&
      controls.image &&
      (err.status === 413 || err.status === 415 || err.code === "image_too_large" || /^image:/.test(err.message))
    ) {
      showFieldError(controls.image, describeError(err));
      unplaced = false;
    } else if (err instanceof ApiError && err.status === 422) {
      // "steps: at most 200; seed: Input should be ..." -> each part next to its field.
      const rest = [];
      for (const part of err.message.split("; ")) {
        const m = /^([a-z_]+)(?:\.\d+)?: (.*)$/s.exec(part);
        const control = m && controls[m[1]];
        if (control && control.type !== "hidden" && !control.closest("[hidden]")) {
          showFieldError(control, m[2]);
        } else {
          rest.push(part);
        }
      }
      unplaced = rest.length > 0;
      if (!unplaced) this.showFormError("Please correct the highlighted field.");
      else err = new ApiError(err.status, err.code, rest.join("; "));
    }
    if (unplaced) this.showFormError(describeError(err));
    if (err instanceof ApiError && err.retryAfterS !== null && (err.status === 503 || err.status === 504)) {
      this.countDown(describeError(err), err.retryAfterS);
    }
  }

  showFormError(text) {
    this.formError.textContent = text;
    this.formError.hidden = false;
  }

  countDown(prefix, seconds) {
    clearInterval(this.retryTimer);
    const until = Date.now() + seconds * 1000;
    const tick = () => {
      const left = Math.ceil((until - Date.now()) / 1000);
      if (left > 0) {
        this.showFormError(`${prefix} Try again in ${left} s.`);
      } else {
        this.showFormError(`${prefix} You can try again now.`);
        clearInterval(this.retryTimer);
      }
    };
    tick();
    this.retryTimer = setInterval(tick, 1000);
  }

  setBusy(busy) {
    this.submitBtn.disabled = busy;
    this.cancelBtn.hidden = !busy;
    this.cancelBtn.disabled = false;
  }

  // Submits `body` (FormData) and follows the job to its end. `sent`: the fields as sent, for the
  // summary. Resolves to {id, blob, url, data} when the job succeeded, else null.
  async run(body, sent) {
    this.abort?.abort();
    this.reset();
    const abort = new AbortController();
    this.abort = abort;
    this.setBusy(true);
    try {
      return await this.follow(body, sent, abort.signal);
    } catch (err) {
      if (!abort.signal.aborted) this.showError(err);
      if (this.jobId) this.output.dataset.state = "error";
      return null;
    } finally {
      clearInterval(this.pollTimer);
      if (this.abort === abort) {
        this.abort = null;
        this.setBusy(false);
      }
    }
  }

  async follow(body, sent, signal) {
    const view = await getJson(`/v1/${this.kind}`, { method: "POST", body, signal });
    this.jobId = view.id;
    this.output.hidden = false;
    this.output.dataset.job = view.id;
    this.output.dataset.state = view.status;
    this.setStatus(view.status === "running" ? "Running" : "Queued");
    this.showView(view);
    this.pollTimer = setInterval(() => this.poll(view.id, signal), POLL_MS);
    let completed = null;
    for await (const ev of jobEvents(view.id, signal)) {
      completed = this.onEvent(ev) || completed;
    }
    clearInterval(this.pollTimer);
    if (!completed) return null;
    const resp = await api(`/v1/jobs/${view.id}/result`, { signal });
    const blob = await resp.blob();
    const final = await getJson(`/v1/jobs/${view.id}`, { signal }).catch(() => ({}));
    this.showResult(blob, { ...final, ...completed }, sent);
    return { id: view.id, blob, url: this.resultUrl, data: completed };
  }

  async poll(jobId, signal) {
    try {
      const view = await getJson(`/v1/jobs/${jobId}`, { signal });
      if (this.jobId === jobId) this.showView(view);
    } catch {
      // Best effort: the event stream carries the state; this only refreshes position and ETA.
    }
  }

  showView(view) {
    if (view.status === "queued") {
      const ahead = view.position;
      const where =
        ahead === undefined || ahead === null ? "" : ahead === 0 ? "next in line" : `${ahead} ahead in the queue`;
      this.setDetail(where, view.eta_s ? `about ${fmtSeconds(view.eta_s)} to go` : "");
    } else if (view.status === "running") {
      this.setDetail(undefined, view.eta_s ? `about ${fmtSeconds(view.eta_s)} left` : "");
    }
  }

  // Returns the completed event's data on `completed`.
  onEvent({ type, data }) {
    switch (type) {
      case "queued":
        this.setStatus("Queued");
        if (typeof data.position === "number") this.showView({ status: "queued", position: data.position });
        break;
      case "started":
        this.setStatus("Running");
        this.output.dataset.state = "running";
        this.setDetail("starting", "");
        break;
      case "progress": {
        const rounds = data.rounds || 1;
        const round = data.round || 1;
        const total = data.total || 1;
        const text =
          (rounds > 1 ? `round ${round} of ${rounds}, ` : "") + `step ${data.step} of ${total}`;
        this.setProgress((round - 1 + data.step / total) / rounds, text);
        this.setDetail(text.charAt(0).toUpperCase() + text.slice(1));
        break;
      }
      case "preview":
        this.live.hidden = false;
        this.liveImg.src = `data:image/${data.format};base64,${data.image}`;
        this.liveCaption.textContent = `Preview: round ${data.round}, step ${data.step}`;
        break;
      case "completed":
        this.setProgress(1, "done");
        this.setStatus("Done");
        this.setDetail("", "");
        return data;
      case "failed":
        this.setStatus("Failed");
        this.output.dataset.state = "failed";
        this.showFormError(`The job failed: ${data.message || data.code} (${data.code}).`);
        break;
      case "cancelled":
        this.setStatus("Cancelled");
        this.output.dataset.state = "cancelled";
        this.setDetail("", "");
        break;
    }
    return null;
  }

  async cancel() {
    if (!this.jobId) {
      this.abort?.abort(); // not submitted yet: just stop waiting
      return;
    }
    this.cancelBtn.disabled = true;
    this.setStatus("Cancelling");
    try {
      await api(`/v1/jobs/${this.jobId}`, { method: "DELETE" });
    } catch (err) {
      this.cancelBtn.disabled = false;
      this.showError(err);
    }
    // The event stream ends with `cancelled` (or `completed`, if the job won the race).
  }

  showResult(blob, data, sent) {
    this.resultBlob = blob;
    this.resultUrl = URL.createObjectURL(blob);
    this.resultImg.src = this.resultUrl;
    const ext = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" }[blob.type] || "png";
    this.download.href = this.resultUrl;
    this.download.download = `${this.kind}-${this.jobId}.${ext}`;
    this.fillFacts(data, sent);
    this.live.hidden = true;
    this.result.hidden = false;
    this.output.dataset.state = "succeeded";
  }

  fillFacts(data, sent) {
    const rows = [];
    if (Array.isArray(data.scores) && data.scores.length) {
      const parts = data.scores.map((s, i) => `round ${i + 1}: ${fmtScore(s)}`);
      rows.push(["Judge score per round", parts.join(" · ")]);
    } else if (typeof data.score === "number") {
      rows.push(["Judge score", fmtScore(data.score)]);
    }
    if (data.seed !== undefined) rows.push(["Seed", String(data.seed)]);
    if (this.kind === "refine" && data.rounds_run !== undefined) {
      rows.push(["Rounds run", `${data.rounds_run} of ${sent.rounds || 1}`]);
    }
    const settings = Object.entries(sent)
      .filter(([k]) => !["prompt", "seed", "preview_every"].includes(k))
      .map(([k, v]) => `${k} ${v}`);
    rows.push(["Settings", settings.length ? settings.join(" · ") : "server defaults"]);
    if (data.timings && typeof data.timings.total_s === "number") {
      const t = data.timings;
      rows.push(["Time", `${t.total_s.toFixed(1)} s (queued ${t.queue_s.toFixed(1)} s)`]);
    }
    rows.push(["Job", this.jobId]);
    const nodes = [];
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      nodes.push(dt, dd);
    }
    this.facts.replaceChildren(...nodes);
  }
}
