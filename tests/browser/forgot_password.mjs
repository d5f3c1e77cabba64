// "Forgot your password?" in a real browser, in two phases around the mail the test harness
// receives (a real SMTP server): PHASE=request follows the login page's link and asks for a
// reset by user name; PHASE=reset opens the link taken from the received mail (RESET_LINK),
// finds "Sign out connected devices" ticked, sets a new password, and signs in with it.

import path from 'node:path';
import {
  PREFIX, assert, at, device, env, expectAccountPage, outputDir, run, signIn, step, submit, url,
} from './lib.mjs';

const user = env('PORTCULLIS_USER');
const phase = env('PHASE');

await run(`forgot_password_${phase}`, async (browser) => {
  const a = await device(browser, 'A');
  if (phase === 'request') {
    step('The login page offers "Forgot your password?"; the form asks for a name or address');
    await a.page.goto(url(`${PREFIX}/login`));
    await submit(a.page, a.page.getByRole('link', { name: 'Forgot your password?' }), at(`${PREFIX}/forgot`));
    await a.page.locator('#identifier').fill(user);
    await a.page.getByRole('button', { name: 'Mail me a reset link' }).click();
    await a.page.getByRole('heading', { name: 'Check your mail' }).waitFor();
    assert.match(await a.page.textContent('body'), /If an account with a confirmed address matches/);
    await a.page.screenshot({ path: path.join(outputDir(), 'forgot-requested.png'), fullPage: true });
    return;
  }
  step('The mailed link opens the reset page with "Sign out connected devices" ticked');
  const link = env('RESET_LINK');
  const next = env('NEW_PASSWORD');
  await a.page.goto(link);
  assert.equal(await a.page.locator('#signout').isChecked(), true);
  await a.page.locator('#new_password').fill(next);
  await a.page.locator('#confirm').fill(next);
  await a.page.getByRole('button', { name: 'Set new password' }).click();
  await a.page.getByRole('heading', { name: 'Password changed' }).waitFor();
  assert.match(await a.page.textContent('body'), /every device has been signed out/);
  step('The new password signs in');
  await signIn(a.page, user, next);
  await expectAccountPage(a.page, user);
  step('The link works once');
  const again = await a.page.goto(link);
  assert.equal(again.status(), 410);
});
