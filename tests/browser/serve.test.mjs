// Browser test of the `vdit serve` web page: Debian's chromium, driven by playwright-core,
// submits a prompt, watches the progress bar (fed by SSE) reach 100%, and sees the video element
// load the result and the gallery show it; a bad field shows the server's message naming it.
// A screenshot is saved (VDIT_ARTIFACTS, default target/artifacts/browser/serve.png).
//
// The server is the `vdit` binary (VDIT_BIN, default target/debug/vdit) with VDIT_MODEL, else
// the shipped models/vdit-shapes, else a tiny model assembled from the repository's fixtures.
// Without playwright-core (npm ci) or /usr/bin/chromium the test is skipped with a message.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../..");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";

function tinyModel(dir) {
  const src = path.join(repo, "tests/fixtures/parity/pipeline_2b_like/pipeline");
  const out = path.join(dir, "tiny-model");
  for (const c of ["transformer", "vae", "scheduler", "text_encoder"]) {
    fs.cpSync(path.join(src, c), path.join(out, c), { recursive: true });
  }
  fs.mkdirSync(path.join(out, "tokenizer"), { recursive: true });
  fs.copyFileSync(
    path.join(repo, "tests/fixtures/tokenizer/wordlevel/tokenizer.json"),
    path.join(out, "tokenizer/tokenizer.json"),
  );
  fs.writeFileSync(path.join(out, "model_index.json"), JSON.stringify({
    _class_name: "CogVideoXPipeline",
    scheduler: ["diffusers", "CogVideoXDDIMScheduler"],
    text_encoder: ["transformers", "T5EncoderModel"],
    tokenizer: ["transformers", "PreTrainedTokenizerFast"],
    transformer: ["diffusers", "CogVideoXTransformer3DModel"],
    vae: ["diffusers", "AutoencoderKLCogVideoX"],
  }));
  fs.writeFileSync(path.join(out, "generation_config.json"),
    JSON.stringify({ num_inference_steps: 2, guidance_scale: 6.0, fps: 8.0 }));
  return out;
}

function pickModel(dir) {
  if (process.env.VDIT_MODEL) return { model: process.env.VDIT_MODEL, tiny: false };
  const shipped = path.join(repo, "models/vdit-shapes");
  if (fs.existsSync(path.join(shipped, "model_index.json"))) return { model: shipped, tiny: false };
  return { model: tinyModel(dir), tiny: true };
}

function startServer(bin, model, data) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ["serve", "--model", model, "--addr", "127.0.0.1:0", "--data", data],
      { stdio: ["ignore", "pipe", "inherit"] });
    const timer = setTimeout(() => reject(new Error("vdit serve did not start in 60 s")), 60000);
    child.on("error", reject);
    child.on("exit", (code) => reject(new Error(`vdit serve exited with ${code}`)));
    readline.createInterface({ input: child.stdout }).on("line", (line) => {
      const m = line.match(/^listening on (http:\/\/\S+)/);
      if (m) {
        clearTimeout(timer);
        resolve({ child, url: m[1] });
      }
    });
  });
}

test("web page: prompt, progress to 100%, video loads, gallery, field errors", async (t) => {
  let chromium;
  try {
    ({ chromium } = await import("playwright-core"));
  } catch {
    const msg = "SKIPPED browser test: playwright-core is not installed (run npm ci in tests/browser)";
    console.log(msg);
    t.skip(msg);
    return;
  }
  if (!fs.existsSync(chromiumPath)) {
    const msg = `SKIPPED browser test: no chromium at ${chromiumPath} (apt-get install chromium)`;
    console.log(msg);
    t.skip(msg);
    return;
  }
  const target = process.env.CARGO_TARGET_DIR || path.join(repo, "target");
  const bin = process.env.VDIT_BIN || path.join(target, "debug/vdit");
  assert.ok(fs.existsSync(bin), `no vdit binary at ${bin}: build it with cargo build -p vdit-cli`);
  const shot = process.env.VDIT_ARTIFACTS
    ? path.join(process.env.VDIT_ARTIFACTS, "serve.png")
    : path.join(target, "artifacts/browser/serve.png");

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "vdit-browser-"));
  const { model, tiny } = pickModel(dir);
  const { child, url } = await startServer(bin, model, path.join(dir, "data"));
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 820 } });
    const pageErrors = [];
    page.on("pageerror", (e) => pageErrors.push(String(e)));
    await page.goto(url);
    await page.waitForFunction(() => document.getElementById("model").textContent.startsWith("model:"));

    // A bad field: the server's 400 message, naming it, is shown and nothing starts.
    await page.fill("#prompt", "a red ball");
    await page.fill("#num_frames", "10");
    await page.click("#submit");
    await page.waitForFunction(() => document.getElementById("error").textContent.length > 0);
    const err = await page.textContent("#error");
    assert.match(err, /num_frames must be 4k\+1/);
    await page.fill("#num_frames", "");

    // Record every value the bar takes.
    await page.evaluate(() => {
      window.__pcts = [];
      const bar = document.getElementById("bar");
      new MutationObserver(() => window.__pcts.push(Number(bar.dataset.pct)))
        .observe(bar, { attributes: true, attributeFilter: ["data-pct"] });
    });
    await page.fill("#prompt", "a red circle moves right on a blue background");
    // Enough steps on the tiny model to see the bar move; few on a real one to keep CI short.
    await page.fill("#num_inference_steps", tiny ? "40" : "4");
    await page.fill("#seed", "7");
    await page.click("#submit");
    await page.waitForFunction(() => document.getElementById("bar").value === 100, null, { timeout: 120000 });
    const pcts = await page.evaluate(() => window.__pcts);
    assert.equal(pcts.at(-1), 100, `bar values ${pcts}`);
    assert.ok(pcts.some((p) => p > 0 && p < 100), `the bar moved through intermediate values: ${pcts}`);
    for (let i = 1; i < pcts.length; i++) {
      assert.ok(pcts[i] >= pcts[i - 1] || pcts[i] === 0, `bar went back: ${pcts}`);
    }

    // The video element loads the result.
    await page.waitForFunction(() => {
      const v = document.getElementById("player");
      return v.dataset.job && v.readyState >= 2 && v.videoWidth > 0;
    }, null, { timeout: 30000 });
    const video = await page.evaluate(() => {
      const v = document.getElementById("player");
      return { w: v.videoWidth, h: v.videoHeight, d: v.duration, src: v.currentSrc, err: v.error && v.error.code };
    });
    assert.equal(video.err, null);
    assert.match(video.src, /\/v1\/videos\/video_[0-9a-f]{32}\/content\?format=mp4$/);
    const health = await (await fetch(`${url}/healthz`)).json();
    assert.equal(video.w, health.defaults.width);
    assert.equal(video.h, health.defaults.height);
    assert.ok(video.d > 0, `duration ${video.d}`);
    assert.equal(await page.textContent("#status"), "completed");

    // The gallery shows the finished job with its GIF loaded.
    await page.waitForFunction(() => {
      const img = document.querySelector('#gallery .card[data-status="completed"] img');
      return img && img.complete && img.naturalWidth > 0;
    }, null, { timeout: 30000 });
    await page.evaluate(() => document.getElementById("player").pause());
    fs.mkdirSync(path.dirname(shot), { recursive: true });
    await page.screenshot({ path: shot, fullPage: true });
    console.log(`browser test: screenshot saved to ${shot} (model ${health.model}, bar values ${pcts.join(",")})`);
    assert.deepEqual(pageErrors, []);
  } finally {
    await browser.close();
    child.kill("SIGTERM");
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
