// Password + TOTP login in a real browser, and the device list.
//
// Device A signs in with the password, turns on two-factor authentication at
// /_portcullis/account/2fa by reading the manual key and computing the code (RFC 6238), and is
// shown 10 recovery codes. Device B then signs in: after the password the gateway asks for the
// code; the code that confirmed enrolment is refused (spent), the next step's code signs in.
// Both devices appear on the account page, each marking itself as "This device". Device C signs
// in with a recovery code, which then no longer works on device D.

import path from 'node:path';
import {
  PREFIX, UA, assert, at, device, deviceRows, env, expectAccountPage, fillLogin, outputDir, run,
  signIn, step, stepNow, submit, submitPost, totpAt, base32Decode, url,
} from './lib.mjs';

const user = env('PORTCULLIS_USER');
const password = env('PORTCULLIS_PASSWORD');

await run('totp_login', async (browser) => {
  const a = await device(browser, 'A', UA.chrome);
  step('A signs in with the password alone (2FA is off)');
  await signIn(a.page, user, password);
  assert.match(await a.page.locator('section', { hasText: 'Two-factor authentication' }).last().textContent(), /Off\./);

  step('A opens the 2FA page and reads the manual key');
  await a.page.getByRole('link', { name: 'Turn it on' }).click();
  await a.page.waitForURL(at(`${PREFIX}/account/2fa`));
  assert.equal(await a.page.locator('.qr svg').count(), 1, 'a locally rendered SVG QR code');
  const secretText = (await a.page.locator('#totp-secret').textContent()).trim();
  assert.match(secretText, /^[A-Z2-7]{32}$/, `manual key ${secretText}`);
  const seed = base32Decode(secretText);
  assert.equal(seed.length, 20);
  await a.page.screenshot({ path: path.join(outputDir(), 'enroll-2fa.png'), fullPage: true });

  step('A confirms enrolment with the current code');
  const enrollStep = stepNow();
  await a.page.locator('#code').fill(totpAt(seed, enrollStep));
  const enrolled = await submitPost(a.page, a.page.getByRole('button', { name: 'Turn on two-factor authentication' }));
  assert.equal(enrolled.status(), 200);
  assert.equal((await a.page.locator('h1').textContent()).trim(), 'Two-factor authentication is on');
  const codes = (await a.page.locator('#recovery-codes li').allTextContents()).map((c) => c.trim());
  assert.equal(codes.length, 10, `10 recovery codes: ${codes}`);
  assert.equal(new Set(codes).size, 10, 'recovery codes are distinct');
  for (const c of codes) assert.match(c, /^[A-Za-z0-9-]{8,}$/, `recovery code ${c}`);
  await a.page.screenshot({ path: path.join(outputDir(), 'recovery-codes.png'), fullPage: true });

  await submit(a.page, a.page.getByRole('link', { name: 'Continue' }), at(`${PREFIX}/account`));
  await expectAccountPage(a.page, user);
  assert.match(await a.page.locator('section', { hasText: 'Two-factor authentication' }).last().textContent(), /On\./);

  step('B: the password alone leads to the code page');
  const b = await device(browser, 'B', UA.firefox);
  const pw = await fillLogin(b.page, user, password);
  assert.equal(pw.status(), 303);
  await b.page.waitForURL(at(`${PREFIX}/login/2fa`));
  assert.equal((await b.page.locator('h1').textContent()).trim(), 'Two-factor authentication');
  await b.page.screenshot({ path: path.join(outputDir(), 'login-2fa.png'), fullPage: true });

  step('B: the code that confirmed enrolment is spent and refused');
  await b.page.locator('#code').fill(totpAt(seed, enrollStep));
  const replay = await submitPost(b.page, b.page.getByRole('button', { name: 'Verify' }));
  assert.equal(replay.status(), 401, 'a spent code is refused');
  assert.match(b.page.url(), at(`${PREFIX}/login/2fa`));
  assert.match(await b.page.getByRole('alert').textContent(), /code is not valid/);

  step("B: the next step's code signs in");
  // The server accepts one step either way; the confirming step is spent, so use the next one
  // (or the current one if the clock has already moved past it).
  await b.page.locator('#code').fill(totpAt(seed, Math.max(enrollStep + 1, stepNow())));
  const ok = await submitPost(b.page, b.page.getByRole('button', { name: 'Verify' }));
  assert.equal(ok.status(), 303);
  await b.page.waitForURL(at(`${PREFIX}/account`));
  await expectAccountPage(b.page, user);

  step('device list: both sessions, each device marking itself');
  const fromB = await deviceRows(b.page);
  assert.equal(fromB.length, 2, JSON.stringify(fromB));
  const currentB = fromB.filter((r) => r.current);
  assert.equal(currentB.length, 1, 'exactly one current row');
  assert.equal(currentB[0].device, 'Firefox on Windows');
  assert.equal(currentB[0].tag, 'This device');
  assert.match(currentB[0].ua, /Firefox\/128\.0/);
  const otherB = fromB.find((r) => !r.current);
  assert.equal(otherB.device, 'Chrome on Linux');
  assert.equal(otherB.tag, null);
  assert.match(otherB.ua, /X11; Linux x86_64/);
  for (const r of fromB) {
    assert.equal(r.kind, 'web');
    assert.equal(r.ip, '127.0.0.1');
    assert.match(r.created, /^\d{4}-\d\d-\d\d \d\d:\d\d UTC$/);
    assert.match(r.lastSeen, /^\d{4}-\d\d-\d\d \d\d:\d\d UTC$/);
  }
  assert.equal(await b.page.locator('tr[data-current]').getByText('This device').count(), 1);

  await a.page.reload();
  const fromA = await deviceRows(a.page);
  assert.equal(fromA.length, 2, JSON.stringify(fromA));
  assert.deepEqual(fromA.filter((r) => r.current).map((r) => [r.device, r.tag]), [['Chrome on Linux', 'This device']]);

  step('C signs in with a recovery code instead of the app code');
  const c = await device(browser, 'C', UA.iphone);
  await fillLogin(c.page, user, password);
  await c.page.waitForURL(at(`${PREFIX}/login/2fa`));
  await c.page.locator('#code').fill(codes[0]);
  await submit(c.page, c.page.getByRole('button', { name: 'Verify' }), at(`${PREFIX}/account`));
  await expectAccountPage(c.page, user);
  assert.equal((await deviceRows(c.page)).length, 3);

  step('D: the same recovery code does not work twice');
  const d = await device(browser, 'D', UA.iphone);
  await fillLogin(d.page, user, password);
  await d.page.waitForURL(at(`${PREFIX}/login/2fa`));
  await d.page.locator('#code').fill(codes[0]);
  const reused = await submitPost(d.page, d.page.getByRole('button', { name: 'Verify' }));
  assert.equal(reused.status(), 401, 'a used recovery code is refused');
  assert.match(d.page.url(), at(`${PREFIX}/login/2fa`));
  const home = await d.page.goto(url('/'));
  assert.match(d.page.url(), at(`${PREFIX}/login`), 'D is not signed in');
  assert.equal(home.status(), 200);
});
