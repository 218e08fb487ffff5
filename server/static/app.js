// The page: tabs, the API key, capabilities from /v1/info, the refine and generate forms.

import { ApiError, apiKey, getJson, setApiKey } from "./api.js";
import { JobPanel, clearErrors, showFieldError } from "./job.js";

const $ = (id) => document.getElementById(id);
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];

// ---- tabs (WAI-ARIA tabs pattern: arrows, Home, End move between tabs) ----
const tabs = [...document.querySelectorAll("[role=tab]")];

function selectTab(tab, focus = true) {
  for (const t of tabs) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
}

for (const tab of tabs) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (e) => {
    const i = tabs.indexOf(tab);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (next === undefined) return;
    e.preventDefault();
    selectTab(tabs[(next + tabs.length) % tabs.length]);
  });
}

// ---- API key ----
const authForm = $("auth");
const keyInput = $("api-key");

function showAuth(err) {
  authForm.hidden = false;
  const el = $("api-key-error");
  if (err) {
    el.textContent = apiKey()
      ? "This key was refused. Check it and press Use key."
      : "This server needs an API key. Enter it and press Use key.";
    el.hidden = false;
    keyInput.setAttribute("aria-invalid", "true");
    keyInput.focus();
  }
}

authForm.addEventListener("submit", (e) => {
  e.preventDefault();
  setApiKey(keyInput.value.trim());
  $("api-key-error").hidden = true;
  keyInput.removeAttribute("aria-invalid");
  loadInfo();
});

// ---- capabilities: GET /v1/info where the server has it (404 otherwise: everything still works) ----
function showSpeedModes(modes) {
  for (const select of document.querySelectorAll("select[name=speed]")) {
    const wrap = select.closest(".speed");
    const offer = Array.isArray(modes) && modes.length > 1;
    wrap.hidden = !offer;
    select.disabled = !offer; // disabled controls are not sent
    if (!offer) continue;
    const current = select.value;
    select.replaceChildren(
      ...modes.map((m) => {
        const opt = document.createElement("option");
        opt.value = m;
        opt.textContent = m;
        return opt;
      }),
    );
    if (modes.includes(current)) select.value = current;
  }
}

async function loadInfo() {
  try {
    const info = await getJson("/v1/info");
    showSpeedModes(info.speed_modes);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) showAuth(err);
    // 404: a server without /v1/info; anything else: the submit will say what is wrong.
  }
}

// ---- form fields -> the API's multipart body ----
function collect(form) {
  const sent = {};
  for (const control of form.elements) {
    if (!control.name || control.disabled || control.type === "file" || control.type === "radio") continue;
    const value = control.value.trim();
    if (value !== "" || control.name === "prompt") sent[control.name] = control.name === "prompt" ? control.value : value;
  }
  return sent;
}

function toFormData(sent, image) {
  const body = new FormData();
  if (image) body.append("image", image, image.name || "image.png");
  for (const [k, v] of Object.entries(sent)) body.append(k, v);
  return body;
}

// ---- refine ----
const refineForm = $("refine-form");
const refineOutput = $("refine-output");
const imageInput = $("refine-image");
const thumb = $("refine-input-preview");
const refinePanel = new JobPanel(refineForm, refineOutput, { kind: "refine", onAuthError: showAuth });
const beforeImg = refineOutput.querySelector(".before-img");
let inputImage = null;
let inputUrl = null;

function setImage(file, fromInput = false) {
  clearErrors(refineForm);
  if (!file) return;
  if (!IMAGE_TYPES.includes(file.type)) {
    showFieldError(imageInput, `This is a ${file.type || "file of unknown type"}; use a PNG, JPEG or WebP image.`);
    return;
  }
  inputImage = file;
  if (!fromInput) {
    // Reflect a dropped, pasted or generated image in the file input, as if it had been chosen.
    const dt = new DataTransfer();
    dt.items.add(file);
    imageInput.files = dt.files;
  }
  // The URL stays alive while the last result's "before" image shows it.
  if (inputUrl && inputUrl !== beforeImg.getAttribute("src")) URL.revokeObjectURL(inputUrl);
  inputUrl = URL.createObjectURL(file);
  thumb.src = inputUrl;
  thumb.hidden = false;
}

imageInput.addEventListener("change", () => setImage(imageInput.files[0], true));

const drop = $("refine-drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const file = e.dataTransfer.files[0];
  if (file) setImage(file);
});
// A file dropped beside the zone would make the browser navigate away from the page.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (!file) return; // text pastes go where they were going
  e.preventDefault();
  selectTab($("tab-refine"), false);
  setImage(new File([file], file.name || "pasted.png", { type: file.type }));
});

async function submitRefine() {
  if (!inputImage) {
    clearErrors(refineForm);
    showFieldError(imageInput, "Choose, drop or paste an image first.");
    imageInput.focus();
    return null;
  }
  const sent = collect(refineForm);
  const before = inputUrl;
  const out = await refinePanel.run(toFormData(sent, inputImage), sent);
  if (out) beforeImg.src = before;
  return out;
}

refineForm.addEventListener("submit", (e) => {
  e.preventDefault();
  submitRefine();
});

// Compare: side by side, or stacked with the original revealed up to the slider.
const compare = refineOutput.querySelector(".compare");
const slider = refineOutput.querySelector(".slider");
const sliderLabel = refineOutput.querySelector(".slider-label");
for (const radio of refineOutput.querySelectorAll("input[name=refine-compare]")) {
  radio.addEventListener("change", () => {
    const stacked = radio.value === "slider" && radio.checked;
    compare.classList.toggle("side", !stacked);
    compare.classList.toggle("stacked", stacked);
    sliderLabel.hidden = !stacked;
  });
}
slider.addEventListener("input", () => compare.style.setProperty("--reveal", slider.value + "%"));
compare.style.setProperty("--reveal", slider.value + "%");
refineOutput.querySelector(".result-img").addEventListener("load", (e) => {
  const img = e.target;
  if (img.naturalHeight) compare.style.setProperty("--ratio", String(img.naturalWidth / img.naturalHeight));
});

refineOutput.querySelector(".again").addEventListener("click", () => {
  const blob = refinePanel.resultBlob;
  if (!blob) return;
  setImage(new File([blob], "refined." + blob.type.split("/")[1], { type: blob.type }));
  $("refine-submit").focus();
});

// ---- generate, and "send to refine" (what a text-to-image app does with RvR) ----
const generateForm = $("generate-form");
const generateOutput = $("generate-output");
const generatePanel = new JobPanel(generateForm, generateOutput, { kind: "generate", onAuthError: showAuth });

function sendToRefine() {
  const blob = generatePanel.resultBlob;
  if (!blob) return false;
  setImage(new File([blob], "generated." + blob.type.split("/")[1], { type: blob.type }));
  $("refine-prompt").value = $("generate-prompt").value;
  selectTab($("tab-refine"), false);
  $("refine-submit").focus();
  return true;
}

generateForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  const sent = collect(generateForm);
  const out = await generatePanel.run(toFormData(sent, null), sent);
  if (out && $("generate-auto-refine").checked && sendToRefine()) submitRefine();
});
generateOutput.querySelector(".send").addEventListener("click", sendToRefine);

// ---- start ----
if (apiKey()) {
  keyInput.value = apiKey();
  authForm.hidden = false;
}
await loadInfo();
document.body.dataset.ready = "true";
