// rlfuse annotate: show one item, send the annotator's answer, move on. The server's JSON API is
// described in rlfuse/annotate/server.py; a label counts once the server answers 200/201.
"use strict";

const NAME_KEY = "rlfuse-annotator";
const state = { config: null, annotator: null, item: null, busy: false, marks: [], cursor: 0 };
const $ = (id) => document.getElementById(id);

const INSTRUCTIONS = {
  best: "Pick the best image: click it or press its number (1-9).",
  pair: "Which is better? Click it, or press \u2190 / a for the left, \u2192 / d for the right.",
  goodbad: "Mark each image good or bad: g / b mark the outlined image and move on (\u2190 \u2192 move), " +
           "Enter submits once all are marked.",
};

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data;
  try {
    data = await response.json();
  } catch (error) {
    data = { error: `HTTP ${response.status}` };
  }
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function say(message, ok = false) {
  $("status").textContent = message;
  $("status").className = ok ? "ok" : "";
}

function showProgress(progress) {
  const others = Object.entries(progress.annotators)
    .filter(([name]) => name !== state.annotator)
    .map(([name, count]) => `${name} ${count}`);
  const mine = progress.annotators[state.annotator] || 0;
  $("progress").textContent = `you: ${mine} / ${progress.total}` + (others.length ? ` \u00b7 ${others.join(" \u00b7 ")}` : "");
}

function setBusy(busy) {
  state.busy = busy;
  $("item").dataset.busy = busy ? "true" : "false";
}

function card(image, caption) {
  const figure = document.createElement("div");
  figure.className = "card";
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = `image ${image.id}`;
  figure.append(img, caption);
  return figure;
}

function choiceButton(image, keyText, onPick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "choice";
  button.dataset.id = image.id;
  const key = document.createElement("span");
  key.className = "key";
  key.textContent = keyText;
  const figure = card(image, key);
  button.append(figure);
  button.addEventListener("click", onPick);
  return button;
}

function showItem(item) {
  state.item = item;
  state.marks = item.images.map(() => null);
  state.cursor = 0;
  const task = state.config.task;
  $("done").hidden = true;
  $("item").hidden = false;
  $("item").dataset.group = String(item.group);
  $("item").dataset.images = item.images.map((image) => image.id).join(",");
  $("prompt").textContent = item.prompt;
  $("instructions").textContent = INSTRUCTIONS[task];
  $("submit").hidden = task !== "goodbad";
  const images = $("images");
  images.replaceChildren();
  if (task === "best") {
    item.images.forEach((image, k) => {
      images.append(choiceButton(image, String(k + 1), () => pickBest(k)));
    });
  } else if (task === "pair") {
    images.append(choiceButton(item.images[0], "\u2190 a", () => pickPair(0)));
    images.append(choiceButton(item.images[1], "d \u2192", () => pickPair(1)));
  } else {
    item.images.forEach((image, k) => {
      const marks = document.createElement("div");
      marks.className = "marks";
      for (const mark of ["good", "bad"]) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = `mark-${mark}`;
        button.textContent = mark === "good" ? "Good (g)" : "Bad (b)";
        button.addEventListener("click", () => { state.cursor = k; markImage(mark, false); });
        marks.append(button);
      }
      const figure = card(image, marks);
      figure.dataset.id = image.id;
      images.append(figure);
    });
    drawMarks();
  }
}

function drawMarks() {
  const cards = $("images").children;
  state.marks.forEach((mark, k) => {
    cards[k].classList.toggle("good", mark === "good");
    cards[k].classList.toggle("bad", mark === "bad");
    cards[k].classList.toggle("cursor", k === state.cursor);
    cards[k].querySelector(".mark-good").classList.toggle("on", mark === "good");
    cards[k].querySelector(".mark-bad").classList.toggle("on", mark === "bad");
  });
  $("submit").disabled = state.marks.includes(null);
}

function markImage(mark, advance) {
  state.marks[state.cursor] = mark;
  if (advance && state.cursor < state.marks.length - 1) state.cursor += 1;
  drawMarks();
}

function showDone(progress) {
  state.item = null;
  $("item").hidden = true;
  $("done").hidden = false;
  showProgress(progress);
}

async function loadNext() {
  const data = await api("GET", `/api/next?annotator=${encodeURIComponent(state.annotator)}`);
  showProgress(data.progress);
  if (data.done) showDone(data.progress);
  else showItem(data.item);
}

async function send(answer) {
  if (state.busy || !state.item) return;
  setBusy(true);
  try {
    const body = { annotator: state.annotator, task: state.config.task, group: state.item.group, ...answer };
    await api("POST", "/api/labels", body);
    say(answer.skip ? `skipped prompt ${state.item.group}` : `saved prompt ${state.item.group}`, true);
    await loadNext();
  } catch (error) {
    say(error.message);
  } finally {
    setBusy(false);
  }
}

function pickBest(k) {
  send({ best: state.item.images[k].id });
}

function pickPair(side) {
  const images = state.item.images;
  send({ winner: images[side].id, loser: images[1 - side].id });
}

function submitMarks() {
  if (state.marks.includes(null)) {
    say("mark every image good or bad first");
    return;
  }
  const ids = (mark) => state.item.images.filter((_, k) => state.marks[k] === mark).map((image) => image.id);
  send({ good: ids("good"), bad: ids("bad") });
}

function skip() {
  const answer = { skip: true };
  if (state.config.task === "pair") answer.pair = state.item.images.map((image) => image.id);
  send(answer);
}

async function undo() {
  if (state.busy) return;
  setBusy(true);
  try {
    const data = await api("POST", "/api/undo", { annotator: state.annotator });
    showItem(data.item);
    showProgress(data.progress);
    say(`undid your label on prompt ${data.undone.group}`, true);
  } catch (error) {
    say(error.message);
  } finally {
    setBusy(false);
  }
}

function onKey(event) {
  if (event.target instanceof HTMLInputElement || !state.annotator || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (key === "u") return undo();
  if (!state.item) return;
  const task = state.config.task;
  if (key === "s") skip();
  else if (task === "best" && /^[1-9]$/.test(key) && Number(key) <= state.item.images.length) pickBest(Number(key) - 1);
  else if (task === "pair" && (key === "ArrowLeft" || key === "a")) pickPair(0);
  else if (task === "pair" && (key === "ArrowRight" || key === "d")) pickPair(1);
  else if (task === "goodbad" && (key === "g" || key === "b")) markImage(key === "g" ? "good" : "bad", true);
  else if (task === "goodbad" && key === "ArrowLeft") { state.cursor = Math.max(0, state.cursor - 1); drawMarks(); }
  else if (task === "goodbad" && key === "ArrowRight") { state.cursor = Math.min(state.marks.length - 1, state.cursor + 1); drawMarks(); }
  else if (task === "goodbad" && key === "Enter") submitMarks();
  else return;
  event.preventDefault();
}

async function begin(name) {
  state.annotator = name;
  localStorage.setItem(NAME_KEY, name);
  $("name-form").hidden = true;
  $("who").hidden = false;
  $("who-name").textContent = name;
  try {
    await loadNext();
  } catch (error) {
    say(error.message);
  }
}

function askName() {
  state.annotator = null;
  state.item = null;
  $("item").hidden = true;
  $("done").hidden = true;
  $("who").hidden = true;
  $("name-form").hidden = false;
  $("name").value = localStorage.getItem(NAME_KEY) || "";
  $("name").focus();
}

async function start() {
  state.config = await api("GET", "/api/config");
  $("task-name").textContent = `${state.config.dataset} \u00b7 task: ${state.config.task}`;
  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name").value.trim();
    if (name) begin(name);
  });
  $("change-name").addEventListener("click", askName);
  $("submit").addEventListener("click", submitMarks);
  $("skip").addEventListener("click", skip);
  $("undo").addEventListener("click", undo);
  $("undo-done").addEventListener("click", undo);
  document.addEventListener("keydown", onKey);
  const saved = localStorage.getItem(NAME_KEY);
  if (saved) begin(saved);
  else askName();
}

start().catch((error) => say(`cannot reach the server: ${error.message}`));
