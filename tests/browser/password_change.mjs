// Password change from the account page, with and without "Sign out connected devices".
//
// With the box ticked (the default) device B is signed out and device A stays signed in on a
// fresh session; the old password no longer works. With the box unticked, B (signed in again)
// stays in.

import {
  PREFIX, UA, assert, at, device, deviceRows, env, expectAccountPage, expectSentToLogin,
  expectUpstream, fillLogin, run, signIn, step, submit, url,
} from './lib.mjs';

const user = env('PORTCULLIS_USER');
const first = env('PORTCULLIS_PASSWORD');
const second = 'second browser passphrase 7731';
const third = 'third browser passphrase 4410';

async function changePassword(page, current, next, signOutOthers) {
  await page.goto(url(`${PREFIX}/account`));
  await expectAccountPage(page, user);
  const box = page.locator('#signout');
  assert.equal(await box.isChecked(), true, '"Sign out connected devices" is ticked by default');
  await page.locator('#current').fill(current);
  await page.locator('#new_password').fill(next);
  await page.locator('#confirm').fill(next);
  if (!signOutOthers) {
    await box.uncheck();
  }
  await submit(page, page.getByRole('button', { name: 'Change password' }), at(`${PREFIX}/account`));
  await expectAccountPage(page, user);
}

await run('password_change', async (browser) => {
  const a = await device(browser, 'A', UA.chrome);
  const b = await device(browser, 'B', UA.firefox);
  step('A and B sign in');
  await signIn(a.page, user, first);
  await signIn(b.page, user, first);
  assert.equal((await deviceRows(a.page)).length, 1, 'A loaded its page before B signed in');

  step('A changes the password with "Sign out connected devices" ticked');
  await changePassword(a.page, first, second, true);
  assert.match(a.page.url(), /done=password-signout/);
  assert.match(
    await a.page.getByRole('status').textContent(),
    /password has been changed and every other device has been signed out/,
  );
  const rows = await deviceRows(a.page);
  assert.equal(rows.length, 1, `only A's fresh session is left: ${JSON.stringify(rows)}`);
  assert.ok(rows[0].current);

  step('B is signed out; A stays in');
  await expectSentToLogin(b.page, '/');
  await expectSentToLogin(b.page, `${PREFIX}/account`);
  await expectUpstream(a.page);

  step('the old password no longer works');
  const old = await fillLogin(b.page, user, first);
  assert.equal(old.status(), 401);
  assert.match(b.page.url(), at(`${PREFIX}/login`));
  assert.ok(await b.page.getByRole('alert').isVisible(), 'the login form shows an error');

  step('B signs in with the new password');
  await signIn(b.page, user, second);
  await expectUpstream(b.page);

  step('A changes the password with the box unticked');
  await changePassword(a.page, second, third, false);
  assert.match(a.page.url(), /done=password(&|$)/);
  assert.match(await a.page.getByRole('status').textContent(), /^Your password has been changed\.$/);
  assert.equal((await deviceRows(a.page)).length, 2, 'both sessions are left');

  step('B stays signed in; so does A');
  await expectUpstream(b.page);
  await b.page.goto(url(`${PREFIX}/account`));
  await expectAccountPage(b.page, user);
  await expectUpstream(a.page);

  step('a wrong current password changes nothing');
  await a.page.goto(url(`${PREFIX}/account`));
  await a.page.locator('#current').fill('not the current password');
  await a.page.locator('#new_password').fill('fourth browser passphrase 1234');
  await a.page.locator('#confirm').fill('fourth browser passphrase 1234');
  await submit(a.page, a.page.getByRole('button', { name: 'Change password' }), at(`${PREFIX}/account`));
  assert.match(a.page.url(), /error=password/);
  assert.match(await a.page.getByRole('alert').textContent(), /password was not changed/);
  await expectUpstream(b.page);

  step('the third password signs in');
  const c = await device(browser, 'C', UA.iphone);
  await signIn(c.page, user, third);
});
