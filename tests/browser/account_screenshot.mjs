// A screenshot of the account page with several devices signed in: three browsers (as Chrome on
// Linux, Firefox on Windows and Safari on an iPhone) and an app signed in through the JSON API.
// Saved as PORTCULLIS_OUTPUT/account.png, and copied to PORTCULLIS_DOCS_SCREENSHOT when that is
// set (the README's picture, docs/account-page.png).

import { copyFileSync, mkdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { request } from 'playwright-core';
import {
  PREFIX, UA, assert, device, deviceRows, env, expectAccountPage, outputDir, run, signIn, step,
  url,
} from './lib.mjs';

const user = env('PORTCULLIS_USER');
const password = env('PORTCULLIS_PASSWORD');

await run('account_screenshot', async (browser) => {
  step('three browsers and an app sign in');
  const b = await device(browser, 'B', UA.firefox);
  await signIn(b.page, user, password);
  const c = await device(browser, 'C', UA.iphone);
  await signIn(c.page, user, password);
  const app = await request.newContext({ userAgent: 'Jellyfin Media Player/1.11.1 (Linux)' });
  const login = await app.post(url(`${PREFIX}/api/login`), { data: { username: user, password } });
  assert.equal(login.status(), 200, await login.text());
  await app.dispose();
  const a = await device(browser, 'A', UA.chrome);
  await signIn(a.page, user, password);

  step('the account page lists all four, this device first');
  await a.page.goto(url(`${PREFIX}/account`));
  await expectAccountPage(a.page, user);
  const rows = await deviceRows(a.page);
  assert.deepEqual(
    rows.map((r) => [r.device, r.kind, r.current, r.tag]),
    [
      ['Chrome on Linux', 'web', true, 'This device'],
      ['Jellyfin app on Linux', 'api', false, null],
      ['Safari on iPhone', 'web', false, null],
      ['Firefox on Windows', 'web', false, null],
    ],
  );
  for (const name of ['Sign out of all other devices', 'Sign out of all devices', 'Change password']) {
    assert.ok(await a.page.getByRole('button', { name, exact: true }).isVisible(), `${name} button`);
  }
  assert.ok(await a.page.getByLabel('Sign out connected devices').isChecked());

  step('screenshot');
  const file = path.join(outputDir(), 'account.png');
  await a.page.screenshot({ path: file, fullPage: true });
  assert.ok(statSync(file).size > 10_000, 'a real picture');
  console.log(`screenshot: ${file}`);
  const docs = process.env.PORTCULLIS_DOCS_SCREENSHOT;
  if (docs) {
    mkdirSync(path.dirname(docs), { recursive: true });
    copyFileSync(file, docs);
    console.log(`copied to ${docs}`);
  }
});
