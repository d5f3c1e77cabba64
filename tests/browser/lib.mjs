// Shared helpers of the browser tests: launching Debian's Chromium through playwright-core,
// one browser context per "device", signing in through the real login form, and RFC 6238 TOTP.
//
// The scripts are started by `tests/it/browser.rs`, which starts the gateway and an upstream and
// passes them in the environment:
//   PORTCULLIS_URL       the gateway, e.g. http://127.0.0.1:41234
//   PORTCULLIS_USER      a user name
//   PORTCULLIS_PASSWORD  that user's password
//   PORTCULLIS_OUTPUT    where screenshots go (tests/output)
//   CHROMIUM             the browser binary (default /usr/bin/chromium)
// Every check is a node:assert assertion; any failure exits non-zero with a screenshot of each
// open page under PORTCULLIS_OUTPUT. Waiting is playwright's own (auto-waiting locators,
// waitForURL, waitForResponse): there are no fixed delays.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

export { assert };

export const PREFIX = '/_portcullis';

/** User agents of the simulated devices, so that each row of the device list is recognisable. */
export const UA = {
  // Chromium's own (headless) user agent: "Chrome on Linux".
  chrome: undefined,
  firefox: 'Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0',
  iphone:
    'Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 ' +
    '(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1',
};

export function env(name) {
  const v = process.env[name];
  assert.ok(v, `environment variable ${name} is not set (run through cargo test --test it browser)`);
  return v;
}

export const base = () => env('PORTCULLIS_URL').replace(/\/$/, '');
export const url = (p) => base() + p;
export const outputDir = () => {
  const dir = process.env.PORTCULLIS_OUTPUT || path.resolve('tests/output');
  mkdirSync(dir, { recursive: true });
  return dir;
};

/** Escapes a string for use inside a RegExp. */
const reEscape = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** A RegExp matching a gateway URL whose path (before any query) is exactly `p`. */
export const at = (p) => new RegExp('^' + reEscape(base() + p) + '(\\?.*)?$');

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-dev-shm-usage',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
  });
}

const openPages = new Set();

/**
 * A fresh browser context (its own cookies): one "device"; `options` go to `newContext` (such as
 * `ignoreHTTPSErrors` for a gateway with a test CA's certificate).
 */
export async function device(browser, name, userAgent = undefined, options = {}) {
  const context = await browser.newContext({
    userAgent,
    viewport: { width: 1100, height: 800 },
    ...options,
  });
  context.setDefaultTimeout(15_000);
  context.setDefaultNavigationTimeout(15_000);
  const page = await context.newPage();
  page.deviceName = name;
  openPages.add(page);
  return { name, context, page };
}

/** Clicks a submit button and waits for the browser to land on a URL matching `landing`. */
export async function submit(page, button, landing) {
  await Promise.all([page.waitForURL(landing, { waitUntil: 'load' }), button.click()]);
}

/**
 * Clicks a submit button and returns the response to the form's POST (its status is the one
 * before any redirect is followed).
 */
export async function submitPost(page, button) {
  const [resp] = await Promise.all([
    page.waitForResponse((r) => r.request().method() === 'POST' && r.request().isNavigationRequest()),
    button.click(),
  ]);
  await page.waitForLoadState('load');
  return resp;
}

/** Fills the login form and submits it; returns once the browser has left the form's POST. */
export async function fillLogin(page, user, password, rd = `${PREFIX}/account`) {
  await page.goto(url(`${PREFIX}/login?rd=${encodeURIComponent(rd)}`));
  await page.locator('#username').fill(user);
  await page.locator('#password').fill(password);
  return submitPost(page, page.getByRole('button', { name: 'Sign in', exact: true }));
}

/** Signs in with a password (no second factor) and lands on the account page. */
export async function signIn(page, user, password) {
  const resp = await fillLogin(page, user, password);
  assert.equal(
    resp.status(),
    303,
    `${page.deviceName}: the login form's POST was answered ${resp.status()}: ` +
      (await page.locator('body').innerText()).slice(0, 300),
  );
  await page.waitForURL(at(`${PREFIX}/account`));
  await expectAccountPage(page, user);
}

/** Asserts that the page is the account page of `user`. */
export async function expectAccountPage(page, user) {
  assert.equal(
    (await page.locator('h1').textContent()).trim(),
    `Your account: ${user}`,
    `${page.deviceName}: expected the account page at ${page.url()}`,
  );
}

/** Navigates to `path` and asserts the browser ends up on the login page. */
export async function expectSentToLogin(page, path) {
  const resp = await page.goto(url(path));
  assert.match(page.url(), at(`${PREFIX}/login`), `${page.deviceName}: ${path} did not lead to the login page`);
  assert.equal(resp.status(), 200);
  assert.equal((await page.locator('h1').textContent()).trim(), 'Sign in');
}

/** Navigates to `/` and asserts the upstream answered (the session is live). */
export async function expectUpstream(page) {
  const resp = await page.goto(url('/'));
  assert.equal(page.url(), url('/'), `${page.deviceName}: / was not served (sent to ${page.url()})`);
  assert.equal(resp.status(), 200);
  assert.equal((await page.locator('body').textContent()).trim(), 'upstream ok: GET /');
}

/**
 * The rows of the device list on the account page, as plain objects: `device` is the summary
 * ("Firefox on Windows"), `tag` the "This device" label (or null), `ua` the full user agent (the cell's title).
 */
export async function deviceRows(page) {
  const out = [];
  for (const row of await page.locator('#devices tbody tr').all()) {
    const cells = row.locator('td');
    const first = cells.first();
    const texts = (await cells.allTextContents()).map((t) => t.trim());
    const tag = first.locator('.tag');
    out.push({
      current: (await row.getAttribute('data-current')) !== null,
      device: await first.evaluate((td) => td.firstChild.textContent.trim()),
      tag: (await tag.count()) > 0 ? (await tag.textContent()).trim() : null,
      ua: ((await first.getAttribute('title')) ?? '').trim(),
      kind: texts[1],
      ip: texts[2],
      created: texts[3],
      lastSeen: texts[4],
    });
  }
  return out;
}

// --- RFC 6238 TOTP (RFC 4226 HOTP over 30 s steps, HMAC-SHA1, 6 digits) ---

/** Decodes RFC 4648 base32 (padding and spaces optional). */
export function base32Decode(text) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  const clean = text.replace(/[\s=]/g, '').toUpperCase();
  let bits = 0;
  let value = 0;
  const out = [];
  for (const ch of clean) {
    const idx = alphabet.indexOf(ch);
    assert.ok(idx >= 0, `not base32: ${JSON.stringify(ch)} in ${JSON.stringify(text)}`);
    value = (value << 5) | idx;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

export const STEP_SECS = 30;
export const stepNow = () => Math.floor(Date.now() / 1000 / STEP_SECS);

/** The 6-digit code of `seed` (bytes) at time step `step`. */
export function totpAt(seed, step) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(step));
  const mac = createHmac('sha1', seed).update(counter).digest();
  const offset = mac[mac.length - 1] & 0x0f;
  const binary = mac.readUInt32BE(offset) & 0x7fffffff;
  return String(binary % 1_000_000).padStart(6, '0');
}

// RFC 6238 appendix B test vector (SHA-1, 8 digits there; the last 6 digits are the 6-digit
// code): seed "12345678901234567890", T = 59 s -> 94287082.
assert.equal(totpAt(Buffer.from('12345678901234567890'), 1), '287082');
assert.equal(base32Decode('GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ').toString(), '12345678901234567890');

/**
 * Runs a test body with a fresh browser; on failure prints the error and the state of every open
 * page (URL and visible text), saves screenshots, and exits non-zero.
 */
export async function run(name, body) {
  const started = Date.now();
  const browser = await launch();
  let failed = null;
  try {
    await body(browser);
  } catch (e) {
    failed = e;
  }
  if (failed) {
    console.error(`FAIL ${name}: ${failed.stack || failed}`);
    for (const page of openPages) {
      if (page.isClosed()) continue;
      try {
        const text = (await page.locator('body').innerText({ timeout: 2_000 })).slice(0, 2_000);
        console.error(`--- ${page.deviceName} at ${page.url()} ---\n${text}`);
        const file = path.join(outputDir(), `${name}-failure-${page.deviceName}.png`);
        await page.screenshot({ path: file, fullPage: true, timeout: 5_000 });
        console.error(`(screenshot: ${file})`);
      } catch (e) {
        console.error(`--- ${page.deviceName}: could not capture: ${e.message}`);
      }
    }
  }
  await browser.close();
  if (failed) {
    process.exit(1);
  }
  console.log(`ok ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
}

export function step(text) {
  console.log(`- ${text}`);
}
