// The sign-out buttons of the account page, seen from the other devices.
//
// Devices A, B and C are signed in as the same user. A signs C out with C's own "Sign out"
// button; A presses "Sign out of all other devices" (B is out, A stays in); B signs in again and
// A presses "Sign out of all devices": A lands on the login page and B's next request, to the
// proxied site or to the account page, is sent to the login page.

import {
  PREFIX, UA, assert, at, device, deviceRows, env, expectAccountPage, expectSentToLogin,
  expectUpstream, run, signIn, step, submit, submitPost, url,
} from './lib.mjs';

const user = env('PORTCULLIS_USER');
const password = env('PORTCULLIS_PASSWORD');

await run('signout', async (browser) => {
  const a = await device(browser, 'A', UA.chrome);
  const b = await device(browser, 'B', UA.firefox);
  const c = await device(browser, 'C', UA.iphone);
  step('A, B and C sign in; each reaches the proxied site');
  for (const d of [a, b, c]) {
    await signIn(d.page, user, password);
    await expectUpstream(d.page);
  }

  step("A signs C out with the Sign out button on C's row");
  await a.page.goto(url(`${PREFIX}/account`));
  await expectAccountPage(a.page, user);
  assert.equal((await deviceRows(a.page)).length, 3);
  const cRow = a.page.locator('#devices tbody tr', { hasText: 'Safari on iPhone' });
  await submit(a.page, cRow.getByRole('button', { name: 'Sign out' }), at(`${PREFIX}/account`));
  assert.match(a.page.url(), /done=device/);
  assert.match(await a.page.getByRole('status').textContent(), /That device has been signed out/);
  const afterOne = await deviceRows(a.page);
  assert.deepEqual(afterOne.map((r) => r.device).sort(), ['Chrome on Linux', 'Firefox on Windows']);
  await expectSentToLogin(c.page, '/');
  await expectUpstream(b.page);

  step('A presses "Sign out of all other devices": B is out, A stays in');
  await submit(a.page, a.page.getByRole('button', { name: 'Sign out of all other devices' }), at(`${PREFIX}/account`));
  assert.match(await a.page.getByRole('status').textContent(), /Every other device has been signed out/);
  const onlyA = await deviceRows(a.page);
  assert.equal(onlyA.length, 1, JSON.stringify(onlyA));
  assert.ok(onlyA[0].current);
  await expectSentToLogin(b.page, `${PREFIX}/account`);
  await expectUpstream(a.page);

  step('B signs in again');
  await signIn(b.page, user, password);
  await expectUpstream(b.page);

  step('A presses "Sign out of all devices": A is sent to the login page');
  await a.page.goto(url(`${PREFIX}/account`));
  await expectAccountPage(a.page, user);
  assert.equal((await deviceRows(a.page)).length, 2);
  const resp = await submitPost(a.page, a.page.getByRole('button', { name: 'Sign out of all devices' }));
  assert.equal(resp.status(), 303);
  assert.match(a.page.url(), at(`${PREFIX}/login`));
  assert.equal((await a.page.locator('h1').textContent()).trim(), 'Sign in');

  step("B's next request is sent to the login page");
  await expectSentToLogin(b.page, '/');
  await expectSentToLogin(b.page, `${PREFIX}/account`);
  step("and A's too");
  await expectSentToLogin(a.page, '/');
});
