// The playground: a client of the job API's own routes, nothing more.
//
// 1. The form is built from GET /v1/request-schema (the POST /v1/jobs body's schema at the
//    served model's bounds), so a new field appears here without touching this file.
// 2. The API key is asked once and kept in sessionStorage (this tab, until it closes).
// 3. Progress comes from the job's SSE stream, read with fetch() because EventSource cannot
//    send an Authorization header, and a key in a query string would land in access logs.
// 4. Every value the API sends back is put on the page as text (textContent), never as HTML.

const KEY_STORAGE = "sdxl-playground-key";
// `python -m sdxl_jobs.keys create` makes keys of "sdxl_" and 43 characters (a browser test
// holds this to sdxl_jobs.keys.new_key).
const KEY_LENGTH = 48;
const FINAL = new Set(["succeeded", "failed", "canceled"]);
const RECENT_LIMIT = 12;
const MAX_RETRY_MS = 10000;
// A fetch waits as long as the connection stays open: an API whose process is stopped, or
// a proxy holding the request, kept Generate disabled with nothing said for minutes. The
// API answers within 5 s even when its Redis hangs; past this, the call has failed.
const ANSWER_MS = 20000;
// An event stream carries a keep-alive every 15 s (the API's KEEPALIVE_S) when nothing
// happens: a stream silent for longer has stopped, though its connection is still open.
const STREAM_QUIET_MS = 40000;
// The recent list's pictures are previews no wider or taller than this (the API's
// `max_side`): shown at 56 px, twice that for high-density screens. A few KiB each, where
// the image itself is 1 to 2 MB at SDXL's 1024 px.
const THUMBNAIL_SIDE = 128;
// The API refuses a preview past its queue (a burst from other tabs and clients) with a 503
// and Retry-After: the list asks again then, this many times in all, and meanwhile shows
// placeholders, as for a preview that cannot be had.
const THUMBNAIL_PASSES = 5;
// The job's image the API cannot give for now (a 503: its Redis restarting; or no answer)
// is still the job's: it is asked again when the API says, else after a short backoff,
// this many times in all.
const IMAGE_TRIES = 5;
const IMAGE_BACKOFF_MS = 2000;

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  schema: null,
  job: null,          // the job on show (the API's view)
  watch: null,        // AbortController of the current job's stream and polls
  thumbnails: new Map(),  // job id -> object URL of its first image's preview, while listed
  asked: 0,           // counts the requests to show a job: a reply to an older one is stale
  submitting: false,  // a submit is in flight: a double click makes one job, not two
  submitKey: null,    // {body, key}: the Idempotency-Key of a body not yet known submitted
  shown: [],          // object URLs of the images on show, revoked when they leave it
};

// --- JSON that keeps 64-bit seeds exact ----------------------------------------------
// Seeds go up to 2**64-1; a JS number is exact only to 2**53. Integers past that are read
// as BigInt from their source text and written back as bare digits.
function parseJson(text) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && context &&
        /^-?\d+$/.test(context.source)) {
      return BigInt(context.source);
    }
    return value;
  });
}

// What JSON itself reads as a number. Number() also takes "0x1A", "0b11", "0o7" and
// "Infinity"; those are sent as typed, so the API names the field instead of taking 26.
const JSON_NUMBER = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?$/;
const JSON_INTEGER = /^-?(0|[1-9]\d*)$/;

const BIG = "\u0000int:";
function toJson(body) {
  return JSON.stringify(body, (key, value) =>
    typeof value === "bigint" ? BIG + value.toString() : value
  ).replace(/"\\u0000int:(-?\d+)"/g, "$1");
}

// --- The API --------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, body, retryAfter = null) {
    super(body && body.message ? body.message : `the job API answered HTTP ${status}`);
    this.status = status;
    this.body = body || {};
    this.retryAfter = retryAfter;  // seconds, when the API said when to come back
  }
}

class Unreachable extends Error {}

// Aborted when any of `signals` is (AbortSignal.any is too new: Safari 17.4, Firefox 124).
function anyAborted(...signals) {
  const either = new AbortController();
  for (const signal of signals) {
    if (!signal) continue;
    if (signal.aborted) either.abort();
    else signal.addEventListener("abort", () => either.abort(), { once: true });
  }
  return either.signal;
}

// fetch() with `signal`, given up when no answer has come ANSWER_MS after the call.
async function answered(path, options, signal) {
  const late = new AbortController();
  const timer = setTimeout(() => late.abort(), ANSWER_MS);
  try {
    return await fetch(path, { ...options, cache: "no-store",
                               signal: anyAborted(signal, late.signal) });
  } catch (error) {
    if (signal && signal.aborted) throw error;
    throw new Unreachable(late.signal.aborted
      ? `the job API did not answer within ${ANSWER_MS / 1000} s`
      : "the job API does not answer: the connection was refused or dropped");
  } finally {
    clearTimeout(timer);
  }
}

async function api(method, path, { body, signal, raw, extra } = {}) {
  const headers = { Accept: "application/json", ...extra };
  const key = state.key;
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await answered(path, {
    method, headers, body: body === undefined ? undefined : toJson(body) }, signal);
  if (response.ok && raw) return response;
  const text = await response.text();
  let parsed = null;
  try { parsed = text ? parseJson(text) : null; } catch { parsed = null; }
  if (!response.ok) {
    const after = response.headers.get("Retry-After");
    const error = new ApiError(response.status, parsed,
                               /^\d+$/.test(after || "") ? Number(after) : null);
    // Once per key: the calls sent with it at the same time are refused too, and one
    // sent before another key was entered is not that key's refusal.
    if (response.status === 401 && key && key === state.key) keyRefused(error.message);
    throw error;
  }
  return parsed;
}

async function imageUrl(path, signal) {
  const response = await api("GET", path, { signal, raw: true });
  const blob = await response.blob();
  return { url: URL.createObjectURL(blob), seed: response.headers.get("X-Seed"),
           type: blob.type, size: blob.size };
}

// --- Small DOM helpers ----------------------------------------------------------------
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function say(id, text) { $(id).textContent = text || ""; }

function sentence(text) { return text.charAt(0).toUpperCase() + text.slice(1); }
function humanize(name) { return sentence(name.replace(/_/g, " ")); }

function seconds(value) {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(2)} s`;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); },
                                        { once: true });
  });
}

// --- The key --------------------------------------------------------------------------
function showKeyForm(message) {
  say("page-error", "");
  $("key-section").hidden = false;
  $("workspace").hidden = true;
  $("key-status").hidden = true;
  say("api-key-error", message);
  const input = $("api-key");
  input.setAttribute("aria-invalid", message ? "true" : "false");
  input.focus();
}

// A key refused after it worked (revoked, or its record gone) takes its work off the page,
// as Forget key does: whoever enters a key next, on a shared screen, saw the last prompt,
// job and image before.
function keyRefused(message) {
  const worked = !$("workspace").hidden;
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  if (worked) forgetWork();
  else stopWatching();  // a job in the address stays there for the next key
  showKeyForm(`The API refused the key: ${message}` +
              (worked ? ". Its prompt, job, images and recent list were cleared from the " +
                        "page." : ""));
}

// A key is printable ASCII. Anything else (a zero-width space or a non-breaking space
// pasted along with it) cannot go in an HTTP header: fetch() throws before sending, which
// would read as "the job API does not answer".
function keyFlaw(key) {
  const index = [...key].findIndex((character) => !/^[\x21-\x7e]$/.test(character));
  if (index < 0) return null;
  const code = key.codePointAt([...key].slice(0, index).join("").length);
  return `The key holds a character a key cannot have: U+${code.toString(16).toUpperCase()
    .padStart(4, "0")} at position ${index + 1}. Keys are printable ASCII; copy it again.`;
}

async function useKey(key) {
  state.key = key;
  try {
    const recent = await api("GET", `/v1/jobs?limit=${RECENT_LIMIT}`);
    // Another key was entered while this one was checked (the form stays up meanwhile):
    // this list is the first key's, and taken it showed its prompts under the other key
    // and kept the first key in the tab for the next reload.
    if (state.key !== key) return false;
    sessionStorage.setItem(KEY_STORAGE, key);
    say("page-error", "");
    $("key-section").hidden = true;
    $("workspace").hidden = false;
    $("key-status").hidden = false;
    renderRecent(recent.jobs);
    return true;
  } catch (error) {
    if (state.key !== key) return false;  // another key is being checked: it says its own
    if (error instanceof ApiError && error.status === 401) return false;  // form shown
    if (error instanceof ApiError && error.status === 431) {
      // The key alone made the request's headers too large: no key is that long (a
      // paste of something else), and trying it again cannot help.
      state.key = null;
      showKeyForm(`The key is ${key.length} characters long: too long to be an API key ` +
                  `(the API's keys are ${KEY_LENGTH}), so the API refused the request ` +
                  `(${error.message}). Copy the key again.`);
      return false;
    }
    // Not the key's fault (the API or its store is down, the network failed): the key
    // stays in the form (and in the tab's storage, if it was there) for a retry, and the
    // message goes to the page, not under the key as if the key were wrong.
    state.key = null;
    showKeyForm("");
    $("api-key").value = key;
    say("page-error", `The key could not be checked: ${error.message}. The key is kept: ` +
                      "press Use this key to try again.");
    return false;
  }
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) { showKeyForm("Enter the API key."); return; }
  const odd = keyFlaw(key);
  if (odd) { showKeyForm(odd); return; }
  if (await useKey(key)) {
    $("api-key").value = "";
    if (!restoreFromAddress()) $(firstFieldId()).focus();
  }
});

$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  forgetWork();
  showKeyForm("");
});

// Whoever enters a key next sees nothing of this key's: not its prompt in the form, its
// job, its images or its recent list (their object URLs are freed too).
function forgetWork() {
  state.asked += 1;  // a job still being opened is that key's: its reply is not shown
  clearJob();
  say("job-status", "No job yet: write a prompt and press Generate.");
  for (const url of state.thumbnails.values()) URL.revokeObjectURL(url);
  state.thumbnails.clear();
  $("recent-list").replaceChildren();
  if (state.schema) buildForm(state.schema);
}

// --- The form, from the published declaration ---------------------------------------
function fieldId(name) { return `field-${name}`; }
function firstFieldId() { return fieldId(formFields(state.schema)[0][0]); }

// The fields the form can fill in, as [name, rule]. The declaration gives an optional field
// as `anyOf: [its rule, null]` (null: not given, as the API reads it) with its words beside;
// the form reads the rule and the words as one. Left to curl: a field with one value only
// (`stream`: false, progress being on the events stream), a list, and a URL to call back
// (a webhook needs a receiver the operator allows).
function formFields(schema) {
  const shown = [];
  for (const [name, property] of Object.entries(schema.properties)) {
    const { anyOf, ...words } = property;
    const rule = { ...(anyOf ? anyOf.find((one) => one.type !== "null") : {}), ...words };
    if ("const" in rule || rule.type === "array" || rule.format === "uri") continue;
    shown.push([name, rule]);
  }
  return shown;
}

function buildForm(schema) {
  const container = $("fields");
  container.replaceChildren();
  const required = new Set(schema.required || []);
  for (const [name, property] of formFields(schema)) {
    const id = fieldId(name);
    const help = [property.description];
    if (property["x-rule"]) help.push(`${sentence(property["x-rule"])}.`);
    if (property.default === undefined && !required.has(name)) help.push("Empty: the server's choice.");
    const describedBy = `${id}-help ${id}-error`;
    let input;
    if (property.enum) {
      input = el("select", { id, name, "aria-describedby": describedBy });
      for (const choice of property.enum) {
        input.append(el("option", { value: choice, selected: choice === property.default }, choice));
      }
    } else if (property.type === "boolean") {
      input = el("input", { id, name, type: "checkbox", checked: property.default === true,
                            "aria-describedby": describedBy });
    } else if (property.type === "string") {
      input = el("textarea", { id, name, rows: name === "prompt" ? 3 : 2,
                               "aria-describedby": describedBy,
                               "aria-required": required.has(name) ? "true" : null });
    } else {
      // Text, not type=number: the browser would turn a typo into "" and hide it; the API
      // judges every value and says what is wrong with it.
      const integer = property.type === "integer";
      input = el("input", { id, name, type: "text", inputmode: integer ? "numeric" : "decimal",
                            autocomplete: "off", spellcheck: "false",
                            placeholder: property.default === undefined ? "random" : null,
                            "aria-describedby": describedBy });
      if (property.default !== undefined) input.value = String(property.default);
    }
    const label = el("label", { for: id }, humanize(name), required.has(name) ? " (required)" : null);
    container.append(el("div", { class: "field", "data-field": name },
                        label,
                        el("p", { id: `${id}-help`, class: "help" }, help.join(" ")),
                        input,
                        el("p", { id: `${id}-error`, class: "field-error" })));
  }
}

function formBody() {
  const body = {};
  const required = new Set(state.schema.required || []);
  for (const [name, property] of formFields(state.schema)) {
    const input = $(fieldId(name));
    if (property.type === "boolean" && !property.enum) { body[name] = input.checked; continue; }
    const text = input.value;
    if (text.trim() === "" && !required.has(name)) continue;  // the server's default
    const trimmed = text.trim();
    if (property.type === "integer" && JSON_INTEGER.test(trimmed)) {
      const value = BigInt(trimmed);
      body[name] = value >= BigInt(Number.MIN_SAFE_INTEGER) &&
                   value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
    } else if ((property.type === "number" || property.type === "integer") &&
               JSON_NUMBER.test(trimmed) && Number.isFinite(Number(trimmed))) {
      // An integer may be written 2.0 or 2e0, as the API takes it; 2.5 is its to refuse.
      body[name] = Number(trimmed);  // finite: "1e999" would be written as null
    } else {
      body[name] = text;  // as typed: the API's message names the field and the rule
    }
  }
  return body;
}

function fillForm(request, seed) {
  for (const [name, property] of formFields(state.schema)) {
    const input = $(fieldId(name));
    if (!(name in request)) continue;
    const value = name === "seed" ? seed : request[name];
    if (property.type === "boolean" && !property.enum) input.checked = Boolean(value);
    else input.value = value === null || value === undefined ? "" : String(value);
  }
}

function clearErrors() {
  for (const node of document.querySelectorAll("#fields .field-error")) node.textContent = "";
  for (const node of document.querySelectorAll("#fields [aria-invalid]")) {
    node.removeAttribute("aria-invalid");
  }
  say("form-error", "");
}

function showRefusal(error, body) {
  if (error.status === 413) {
    showFieldError(...tooLarge(error, body));
    return;
  }
  showFieldError(error.body.field, error.message);
}

function showFieldError(field, message) {
  const input = field ? document.getElementById(fieldId(field)) : null;
  if (input && input.closest("#fields")) {
    say(`${fieldId(field)}-error`, message);
    input.setAttribute("aria-invalid", "true");
    input.focus();
  } else {
    say("form-error", message);
  }
}

// A body over the API's size limit is refused whole, with no field named: the API does
// not read it. The page knows what it sent: the largest field (a paste of megabytes) is
// the one to fix, and the message goes under it rather than above Generate.
function tooLarge(error, body) {
  let field = null;
  let bytes = 0;
  for (const [name, value] of Object.entries(body)) {
    const size = new TextEncoder().encode(toJson(value)).length;
    if (size > bytes) [field, bytes] = [name, size];
  }
  const [, rule] = formFields(state.schema).find(([name]) => name === field);
  return [field, `The request is too large for the job API: ${error.message}. ` +
                 `${humanize(field)} makes ${bytes} bytes of it` +
                 (rule["x-rule"] ? `; its rule: ${rule["x-rule"]}.` : ".")];
}

const SUBMITTERS = ["submit", "same-seed", "new-seed"];

// The same key for the same body until it is known submitted: a submit whose answer was
// lost may have made the job, and sent again with its key it answers that job instead of
// making a second. (crypto.randomUUID exists only on https pages; this works on http.)
function idempotencyKey(body) {
  const text = toJson(body);
  if (!state.submitKey || state.submitKey.body !== text) {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    state.submitKey = { body: text,
                        key: Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("") };
  }
  return state.submitKey.key;
}

async function submit(body) {
  if (state.submitting) return;
  state.submitting = true;
  clearErrors();
  for (const id of SUBMITTERS) $(id).disabled = true;
  const key = state.key;
  try {
    const job = await api("POST", "/v1/jobs",
                          { body, extra: { "Idempotency-Key": idempotencyKey(body) } });
    state.submitKey = null;  // submitted: the same form again is a new job
    if (state.key !== key) return;  // the key was refused or forgotten meanwhile
    state.asked += 1;  // the new job wins over a job still being opened
    showJob(job);
    refreshRecent();
  } catch (error) {
    // The key forgotten (or another entered) meanwhile: the refusal quotes that key's
    // values, and shown under the fields it told the next person what the last one sent.
    if (state.key !== key) return;
    if (error instanceof ApiError && error.status !== 401) showRefusal(error, body);
    else if (!(error instanceof ApiError)) {
      say("form-error", `Not known whether it was submitted: ${error.message}. Submitting ` +
                        "the same request again is safe: it answers the job if it was " +
                        "made, and makes it if not.");
      refreshRecent();  // the job shows there if it was made
    }
  } finally {
    state.submitting = false;
    for (const id of SUBMITTERS) $(id).disabled = false;
  }
}

$("generate").addEventListener("submit", (event) => {
  event.preventDefault();
  submit(formBody());
});

// --- One job: status, progress, result ------------------------------------------------
function stopWatching() {
  if (state.watch) state.watch.abort();
  state.watch = null;
}

function setAddress(jobId) {
  history.replaceState(null, "", jobId ? `#job=${jobId}` : location.pathname);
}

function restoreFromAddress() {
  const match = /^#job=([0-9a-f]{32})$/.exec(location.hash);
  if (!match) return false;
  openJob(match[1]);
  return true;
}

// A job's address typed or pasted into this tab's address bar changes only the fragment:
// no reload, so the page showed the job it had while the address named another (and a
// reload then showed that other). The job it names is opened; any other fragment gives
// way to the job on show's, so that the address stays the page's.
window.addEventListener("hashchange", () => {
  if (!state.key || $("workspace").hidden) return;  // opened once the key is taken
  const asked = /^#job=([0-9a-f]{32})$/.exec(location.hash);
  if (asked && !(state.job && state.job.id === asked[1])) openJob(asked[1]);
  else if (!asked) setAddress(state.job ? state.job.id : null);
});

async function openJob(jobId) {
  // The last job asked for is the one shown, whichever reply comes last.
  const asked = ++state.asked;
  try {
    const job = await api("GET", `/v1/jobs/${jobId}`);
    if (asked === state.asked) showJob(job);
  } catch (error) {
    if (asked !== state.asked) return;
    if (error instanceof ApiError && error.status === 404) showGone(jobId, error.message);
    else if (!(error instanceof ApiError && error.status === 401)) {
      say("connection", `Could not load job ${jobId}: ${error.message}.`);
    }
  }
}

// The images on show leave it: their object URLs go with them (each holds its image in
// memory for as long as the tab lives). The recent list's thumbnails are previews of their
// own, never one of these.
function clearResults() {
  revoke(state.shown);
  state.shown = [];
  $("results").replaceChildren();
}

function revoke(urls) {
  for (const url of urls) URL.revokeObjectURL(url);
}

// No job on show: nothing watched, no progress, results or buttons, none in the address.
function clearJob() {
  stopWatching();
  state.job = null;
  $("progress-row").hidden = true;
  $("cancel").hidden = true;
  $("again").hidden = true;
  clearResults();
  say("connection", "");
  setAddress(null);
}

function showGone(jobId, message) {
  clearJob();
  say("job-status", `Job ${jobId} is gone: it expired or never existed for this key ` +
                    `(${message}).`);
  refreshRecent();  // it leaves the list too: clicked there again, it was gone again
}

function showJob(job) {
  stopWatching();
  state.job = job;
  state.watch = new AbortController();
  setAddress(job.id);
  say("connection", "");
  clearResults();
  $("again").hidden = true;
  drawProgress(job.progress.step, job.progress.total);  // not the previous job's
  renderStatus(job);
  if (FINAL.has(job.status)) {
    finish(job);
  } else {
    follow(job.id, state.watch.signal);
    if (job.status === "queued") pollQueue(job.id, state.watch.signal);
  }
}

function renderStatus(job, note = "") {
  const running = !FINAL.has(job.status);
  const cancel = $("cancel");
  // A keyboard user on Cancel as the job ends would be sent back to the page's start.
  const refocus = !running && !cancel.hidden && document.activeElement === cancel;
  cancel.hidden = !running;
  $("progress-row").hidden = job.status === "queued" && !job.progress.step;
  let text;
  if (job.status === "queued") {
    text = job.queue_position ? `Queued: position ${job.queue_position} in the queue` : "Queued";
    if (job.estimated_start_at) {
      text += `, expected to start about ${new Date(job.estimated_start_at).toLocaleTimeString()}`;
    }
    text += ".";
  } else if (job.status === "running") {
    text = job.attempts > 1 ? `Running (attempt ${job.attempts}).` : "Running.";
  } else if (job.status === "succeeded") {
    text = "Done.";
  } else if (job.status === "failed") {
    text = `Failed: ${job.error ? job.error.message : "no reason given"}`;
  } else if (job.status === "canceled") {
    text = "Canceled: nothing was kept.";
  } else {
    text = job.status;
  }
  say("job-status", `Job ${job.id}: ${text}${note ? ` ${note}` : ""}`);
  if (refocus) {
    $("again").hidden = false;
    $("same-seed").focus();
  }
}

function drawProgress(step, total) {
  const bar = $("progress");
  bar.max = Math.max(total, 1);
  bar.value = step;
  say("progress-text", `${step} of ${total}`);
}

function setProgress(step, total) {
  drawProgress(step, total);
  $("progress-row").hidden = false;
}

async function pollQueue(jobId, signal) {
  // The stream says when the job starts; its place in the queue is only in the job view.
  while (!signal.aborted) {
    await sleep(2000, signal);
    if (signal.aborted) return;
    try {
      const job = await api("GET", `/v1/jobs/${jobId}`, { signal });
      if (signal.aborted || job.status !== "queued") return;
      state.job = job;
      renderStatus(job);
    } catch {
      // The stream says what went wrong; the position is asked again at the next turn
      // (a gone job or a refused key ends the stream, which aborts this too).
    }
  }
}

async function* serverEvents(response, heard) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    heard();
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { id: null, type: "message", data: [] };
      for (const line of frame.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (name === "data") event.data.push(text);
        else if (name === "id") event.id = text;
        else if (name === "event") event.type = text;
        else if (name === "retry" && /^\d+$/.test(text)) event.retry = Number(text);
      }
      yield event;
    }
  }
}

async function follow(jobId, signal) {
  // 3. The stream, resumed after the last event seen whenever the connection drops.
  let lastId = null;
  let failures = 0;
  let retryMs = 2000;
  while (!signal.aborted) {
    let refusal = null;
    let endedWhole = false;
    // Ends this connection, not the job's following, when the stream falls silent.
    const quiet = new AbortController();
    let silence = null;
    const heard = () => {
      clearTimeout(silence);
      silence = setTimeout(() => quiet.abort(), STREAM_QUIET_MS);
    };
    try {
      const headers = { Authorization: `Bearer ${state.key}`, Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await answered(`/v1/jobs/${jobId}/events`, { headers },
                                      anyAborted(signal, quiet.signal));
      heard();
      if (response.status === 404) {
        const body = parseJson(await response.text());
        showGone(jobId, body.message);
        return;
      }
      if (response.status === 401) { keyRefused("the API key is not known"); return; }
      if (!response.ok) {
        // The API answered with its reason (this key holds too many streams, its store is
        // down): say that, not a dropped connection.
        let body = null;
        try { body = parseJson(await response.text()); } catch { body = null; }
        throw new ApiError(response.status, body);
      }
      if (failures) say("connection", "");
      failures = 0;
      for await (const event of serverEvents(response, heard)) {
        if (event.retry) retryMs = event.retry;
        if (event.id) lastId = event.id;
        if (event.type === "expired") { showGone(jobId, "its results expired"); return; }
        if (!event.data.length) continue;
        if (event.type === "unavailable") {
          // The API's store failed under the stream, in a 503's body: its reason, not a
          // dropped connection; the next try comes after its `retry:`.
          refusal = new ApiError(503, parseJson(event.data.join("\n"))).message;
          break;
        }
        const data = parseJson(event.data.join("\n"));
        if (event.type === "progress") {
          setProgress(data.step, data.total);
        } else if (event.type === "status") {
          if (data.job) {
            state.job = data.job;
            renderStatus(data.job);
            await finish(data.job);
            refreshRecent();
            return;
          }
          state.job = { ...state.job, status: data.status, attempts: data.attempt || state.job.attempts };
          if (data.status === "queued" && data.reason) {
            // Handed back unrun (its pod's circuit breaker refused it): its place in the
            // queue is only in the job view, as for a job that never started.
            renderStatus({ ...state.job, queue_position: null, estimated_start_at: null },
                         "It went back to the queue: the server that took it cannot generate now.");
            pollQueue(jobId, signal);
          } else {
            renderStatus(state.job);
          }
        }
      }
      // Ended whole before a final state, with no `unavailable` event: its API replica
      // stops (a rolling update) and closed it cleanly, so the next connection (after
      // `retry:`, as an EventSource does) resumes the job elsewhere; nothing dropped. A
      // connection cut in the middle throws instead (its chunked reply incomplete).
      endedWhole = refusal === null;
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError) refusal = error.message;
    } finally {
      clearTimeout(silence);
    }
    if (endedWhole) {
      await sleep(retryMs, signal);
      continue;
    }
    failures += 1;
    say("connection", (refusal ? `The job's progress cannot be followed now: ${refusal}; ` +
                                 `trying again on its own (attempt ${failures}).`
                               : `The connection to the job API dropped; reconnecting on ` +
                                 `its own (attempt ${failures}).`) +
                      " The job keeps running on the server.");
    await sleep(Math.min(retryMs * failures, MAX_RETRY_MS), signal);
  }
}

async function finish(job) {
  $("cancel").hidden = true;
  if (job.progress.total && job.status === "succeeded") setProgress(job.progress.total, job.progress.total);
  $("again").hidden = false;
  if (job.status !== "succeeded") return;
  const signal = state.watch ? state.watch.signal : undefined;
  const figures = [];
  const made = [];  // object URLs of these images
  for (const [index, path] of job.images.entries()) {
    let image;
    try {
      image = await jobImage(path, index, signal);
    } catch (error) {
      if (signal && signal.aborted) {  // another job came on show
        revoke(made);
        return;
      }
      say("connection", `Image ${index + 1} could not be loaded: ${error.message}.`);
      continue;
    }
    const seed = image.seed || String(job.seeds[index]);
    const result = job.result || {};
    const format = (result.format || job.request.output_format || "png").toLowerCase();
    const size = `${result.width || job.request.width}×${result.height || job.request.height}`;
    const stages = Object.entries(result.timings_s || {})
      .map(([stage, value]) => `${stage} ${seconds(value)}`).join(", ");
    const alt = `Generated image ${index + 1} of ${job.images.length}, seed ${seed}: ${job.request.prompt}`;
    figures.push(el("figure", { "data-seed": seed },
      el("img", { src: image.url, alt, width: result.width, height: result.height }),
      el("figcaption", {},
        el("p", {}, `Seed ${seed} · ${size} ${format.toUpperCase()} · ${Math.round(image.size / 1024 * 10) / 10} KiB`),
        el("p", { class: "muted" }, `Queued ${seconds(job.timings.queued_s)}, ran ${seconds(job.timings.run_s)}` +
                                    (stages ? ` (${stages})` : "")),
        el("p", {}, el("a", { href: image.url, download: `sdxl-${job.id.slice(0, 8)}-${seed}.${format === "jpeg" ? "jpg" : format}` },
                       `Download image ${index + 1}`)))));
    made.push(image.url);
  }
  if (state.job && state.job.id === job.id) {
    state.shown.push(...made);
    $("results").replaceChildren(...figures);
  } else {
    revoke(made);  // another job came on show while these loaded
  }
}

// One of the job's images; one the API cannot give for now (a 503, no answer) is asked
// again, saying so: it was lost to the page, though the job has it.
async function jobImage(path, index, signal) {
  for (let tries = 1; ; tries += 1) {
    try {
      const image = await imageUrl(path, signal);
      if (tries > 1) say("connection", "");
      return image;
    } catch (error) {
      const forNow = error instanceof Unreachable ||
                     (error instanceof ApiError && error.status === 503);
      if (!forNow || tries >= IMAGE_TRIES || (signal && signal.aborted)) throw error;
      const wait = Math.min(error.retryAfter ? error.retryAfter * 1000
                                             : IMAGE_BACKOFF_MS * tries, MAX_RETRY_MS);
      say("connection", `Image ${index + 1} could not be loaded yet: ${error.message}. ` +
                        `Trying again in ${wait / 1000} s (try ${tries + 1} of ${IMAGE_TRIES}).`);
      await sleep(wait, signal);
    }
  }
}

$("cancel").addEventListener("click", async () => {
  const job = state.job;
  if (!job) return;
  $("cancel").disabled = true;
  try {
    const canceled = await api("DELETE", `/v1/jobs/${job.id}`);
    // A slow answer may come after another job was submitted or opened: that one stays.
    if (state.job && state.job.id === job.id) {
      showJob(canceled);
      $("submit").focus();
    }
    refreshRecent();
  } catch (error) {
    if (error instanceof ApiError && error.status === 409) await endedFirst(job.id);
    else if (error instanceof ApiError && error.status === 404) goneFirst(job.id, error.message);
    else if (!(error instanceof ApiError && error.status === 401) &&
             state.job && state.job.id === job.id) {
      // Said as the cancel's failure, not as the progress stream's: the job goes on. Of a
      // job no longer on show (the key forgotten, another job opened) it is not said: the
      // next person read of a job they never saw.
      say("connection", `The cancel did not go through: ${error.message}. The job goes on; ` +
                        "Cancel job tries again.");
    }
  } finally {
    $("cancel").disabled = false;
  }
});

// The job ended (or was canceled elsewhere) before the cancel reached it: the API answers
// 409. Nothing failed: show how it ended, from the stream if it has told, else from the job.
async function endedFirst(jobId) {
  if (!state.job || state.job.id !== jobId) return;
  if (!FINAL.has(state.job.status)) {
    let ended;
    try {
      ended = await api("GET", `/v1/jobs/${jobId}`);
    } catch (error) {
      // Not said of a job no longer on show (the key forgotten, another job opened).
      if (!(error instanceof ApiError && error.status === 401) &&
          state.job && state.job.id === jobId) {
        say("connection", `The job ended before the cancel reached it; it could not be ` +
                          `loaded: ${error.message}.`);
      }
      return;
    }
    // Another job may have been opened meanwhile; the stream may have told meanwhile.
    if (!state.job || state.job.id !== jobId) return;
    if (!FINAL.has(state.job.status)) {
      showJob(ended);
      refreshRecent();  // as the stream does when it tells the end
    }
  }
  renderStatus(state.job, "It ended before the cancel reached it.");
  $("submit").focus();
}

// The job expired (canceled or ended elsewhere, then its results' TTL passed) or was
// removed before the cancel reached it: the API answers 404. No connection failed: say it
// is gone, as opening it would. An answer about a job no longer on show leaves that one.
function goneFirst(jobId, message) {
  if (state.job && state.job.id === jobId) {
    showGone(jobId, message);  // which takes it off the list too
    $("submit").focus();  // Cancel, which had the focus, is hidden
  } else {
    refreshRecent();  // it leaves the list too
  }
}

function again(sameSeed) {
  const job = state.job;
  if (!job) return;
  // The image's X-Seed header is exact in every browser; the view's number may not be.
  const shown = document.querySelector("#results figure");
  const seed = sameSeed ? (shown ? shown.dataset.seed : String(job.request.seed)) : "";
  fillForm(job.request, seed);
  submit(formBody());
}

$("same-seed").addEventListener("click", () => again(true));
$("new-seed").addEventListener("click", () => again(false));

// --- Recent jobs ----------------------------------------------------------------------
let recentBusy = null;

function refreshRecent() {
  if (!state.key) return;
  recentBusy = (recentBusy || Promise.resolve()).then(async () => {
    const key = state.key;
    if (!key) return;
    try {
      const recent = await api("GET", `/v1/jobs?limit=${RECENT_LIMIT}`);
      // The key forgotten (or another entered) while the list was asked for: that list is
      // the old key's, and rendered it put its prompts back on a page just cleared for the
      // next person.
      if (state.key !== key) return;
      await renderRecent(recent.jobs);
    } catch (error) {
      if (state.key !== key) return;
      if (!(error instanceof ApiError && error.status === 401)) {
        say("recent-empty", `The list could not be loaded: ${error.message}.`);
        $("recent-empty").hidden = false;
      }
    }
  });
  return recentBusy;
}

async function renderRecent(jobs) {
  const key = state.key;
  const list = $("recent-list");
  $("recent-empty").hidden = jobs.length > 0;
  say("recent-empty", "None yet.");
  const items = jobs.map((job) => {
    const thumbnail = state.thumbnails.get(job.id);
    const picture = thumbnail
      ? el("img", { src: thumbnail, alt: "" })
      : el("span", { class: "placeholder", "aria-hidden": "true" });
    const when = new Date(job.created_at).toLocaleTimeString();
    const button = el("button", { type: "button", class: "recent-item", "data-job": job.id },
      picture,
      el("span", { class: "text" },
        el("span", { class: "prompt" }, job.request.prompt),
        el("span", { class: "meta" }, `${job.status} · ${when} · seed ${job.request.seed}`)));
    button.addEventListener("click", () => { openJob(job.id); $("job-heading").scrollIntoView(); });
    return el("li", {}, button);
  });
  list.replaceChildren(...items);
  // A job that left the list takes its thumbnail's memory with it.
  const listed = new Set(jobs.map((job) => job.id));
  for (const [id, url] of state.thumbnails) {
    if (listed.has(id)) continue;
    state.thumbnails.delete(id);
    URL.revokeObjectURL(url);
  }
  await fillThumbnails(jobs, key, 1);
}

// Thumbnails: a preview of each finished job's first image, fetched with the key (an
// <img src> cannot send it), once while it is listed. Refused for now (a 503 with
// Retry-After), the rest are asked again when the API said, out of the list's way: a
// refresh is not held back by it.
async function fillThumbnails(jobs, key, pass) {
  const slot = (job) => $("recent-list").querySelector(`[data-job="${job.id}"] .placeholder`);
  for (const job of jobs) {
    if (state.key !== key) return;  // forgotten meanwhile: nothing more of its work is asked
    if (job.status !== "succeeded" || !job.images || state.thumbnails.has(job.id) ||
        !slot(job)) continue;  // no slot: it left the list before a later pass
    let image;
    try {
      image = await imageUrl(`${job.images[0]}?max_side=${THUMBNAIL_SIDE}`);
    } catch (error) {
      if (error instanceof ApiError && error.retryAfter !== null && pass < THUMBNAIL_PASSES) {
        setTimeout(() => fillThumbnails(jobs, key, pass + 1),
                   Math.min(error.retryAfter * 1000, MAX_RETRY_MS));
        return;
      }
      continue;  // expired between the list and the image: the item stays without a picture
    }
    // Nobody's copy when the key was forgotten meanwhile (its work must leave the page),
    // another rendering of the list (the key's first, a refresh) fetched this one too, or
    // the job left the list; kept, it would hold its bytes for the tab's life.
    if (state.key !== key || state.thumbnails.has(job.id) || !slot(job)) {
      URL.revokeObjectURL(image.url);
      continue;
    }
    state.thumbnails.set(job.id, image.url);
    slot(job).replaceWith(el("img", { src: image.url, alt: "" }));
  }
}

$("refresh-recent").addEventListener("click", () => refreshRecent());

// The skip link moves the focus itself: following "#fields" would put that in the address
// in place of the job on show (#job=…), which a reload would then lose; and a div is not
// focusable, so the focus would stay where it was.
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  if (!$("workspace").hidden) $(firstFieldId()).focus();
  else if (!$("key-section").hidden) $("api-key").focus();
});

// --- Start ----------------------------------------------------------------------------
async function start() {
  try {
    const declaration = await api("GET", "/v1/request-schema");
    state.schema = declaration.request_schema;
    const limits = declaration.limits;
    say("model", `Model ${declaration.model_version ? `version ${declaration.model_version}` : "(not started yet: SDXL's bounds)"}` +
                 ` · native size ${limits.default_size} px, ${limits.min_size}–${limits.max_size} px` +
                 ` · up to ${limits.max_num_images} images a request`);
    buildForm(state.schema);
  } catch (error) {
    say("model", "");
    say("page-error", `The job API did not give its request declaration: ${error.message}. ` +
                      "Reload the page when it runs.");
    return;
  }
  // useKey shows the form itself when the key cannot be used, with the reason.
  if (!state.key) showKeyForm("");
  else if (await useKey(state.key)) restoreFromAddress();
}

start();
