// Shared by the player pages (tests/players.py serves them): query parameters, a log of media
// events, and the report POSTed back to /report/<token>. Every page ends with exactly one final
// report (done: true): success, a media/player error, a script error, or its own deadline.
"use strict";

const params = new URLSearchParams(location.search);
const started = performance.now();
const report = { page: location.pathname, userAgent: navigator.userAgent, events: [], done: false };

function now() {
  return Math.round(performance.now() - started);
}

function numberParam(name, fallback) {
  const value = params.get(name);
  return value === null ? fallback : Number(value);
}

function round(seconds) {
  return Math.round(seconds * 1000) / 1000;
}

function ranges(timeRanges) {
  const out = [];
  for (let i = 0; i < timeRanges.length; i++) {
    out.push([round(timeRanges.start(i)), round(timeRanges.end(i))]);
  }
  return out;
}

function within(seconds, timeRanges) {
  for (let i = 0; i < timeRanges.length; i++) {
    if (timeRanges.start(i) <= seconds && seconds <= timeRanges.end(i)) return true;
  }
  return false;
}

function post(body) {
  return fetch("/report/" + params.get("token"), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

function finish(extra) {
  if (report.done) return;
  Object.assign(report, extra, { done: true, elapsedMs: now() });
  post(report);
}

function fail(message) {
  finish({ ok: false, failure: String(message) });
}

window.addEventListener("error", (event) => fail("script error: " + event.message));
window.addEventListener("unhandledrejection", (event) => fail("unhandled: " + event.reason));
setTimeout(() => fail("page deadline"), numberParam("timeout", 20) * 1000);
// Progress, for the test's message should the browser never send the final report.
setInterval(() => report.done || post(report), 1000);

const MEDIA_EVENTS = [
  "loadstart", "durationchange", "loadedmetadata", "loadeddata", "canplay", "canplaythrough",
  "play", "playing", "waiting", "stalled", "suspend", "seeking", "seeked", "pause", "ended",
  "emptied", "abort", "error",
];

function watch(video) {
  for (const type of MEDIA_EVENTS) {
    video.addEventListener(type, () => {
      report.events.push({
        t: now(),
        type,
        currentTime: round(video.currentTime),
        readyState: video.readyState,
        networkState: video.networkState,
        buffered: ranges(video.buffered),
      });
    });
  }
  video.addEventListener("playing", () => {
    if (report.timeToPlayingMs === undefined) report.timeToPlayingMs = now();
  });
  video.addEventListener("error", () => {
    const error = video.error;
    finish({ ok: false, error: { code: error && error.code, message: error && error.message } });
  });
}

// Resolves once predicate() holds, checked whenever the playback position or state changes;
// rejects if playback ends first (`what` says what was awaited).
function until(video, predicate, what) {
  const events = ["timeupdate", "playing", "seeked", "ended"];
  return new Promise((resolve, reject) => {
    const check = () => {
      const met = predicate();
      if (!met && !video.ended) return;
      for (const type of events) video.removeEventListener(type, check);
      if (met) resolve();
      else reject(new Error(`ended at ${round(video.currentTime)} s before ${what}`));
    };
    for (const type of events) video.addEventListener(type, check);
    check();
  });
}

// Seek to target, then wait until playback has advanced `after` seconds past it.
async function seekAndResume(video, target, after) {
  const seek = {
    target: round(target),
    from: round(video.currentTime),
    targetBuffered: within(target, video.buffered),
    buffered: ranges(video.buffered),
    seekable: ranges(video.seekable),
    duration: round(video.duration),
  };
  report.seek = seek;
  const begun = now();
  const seeked = new Promise((resolve) => video.addEventListener("seeked", resolve, { once: true }));
  video.currentTime = target;
  await seeked;
  seek.seekedMs = now() - begun;
  seek.landedAt = round(video.currentTime);
  await until(
    video,
    () => !video.paused && video.currentTime >= target + after,
    `playing ${after} s past the seek`,
  );
  seek.resumedMs = now() - begun;
  seek.currentTime = round(video.currentTime);
}

function newVideo() {
  const video = document.createElement("video");
  video.muted = true;
  video.autoplay = true;
  video.playsInline = true;
  document.body.appendChild(video);
  watch(video);
  return video;
}
