// Passkeys in a real browser: Chromium's DevTools virtual authenticator (a CTAP2 platform
// authenticator with resident keys and user verification) stands in for a phone or laptop.
//
// The user signs in with the password, adds a passkey from the account page (after the
// password), signs out, and is signed in again by the passkey alone (no user name: the login
// page's autofill request); the account page shows the passkey as used, and the passkey stands
// in for the current password when the password is changed. The password is then
// followed by "Use a passkey" as the second step. With user verification switched off the browser
// refuses and the page says so; once the passkey is removed on the account page (the
// authenticator still holding it), the gateway refuses it and the page explains. Last, a second
// virtual authenticator without user verification (no PIN, no biometric) is registered, and its
// sign-in (user name first, no password) is refused by the gateway (`user_not_verified`). Runs at
// http://localhost:PORT: browsers allow WebAuthn on localhost without TLS, not on 127.0.0.1.

import path from 'node:path';
import {
  PREFIX, assert, at, device, env, expectAccountPage, fillLogin, outputDir, run, signIn, step, submit,
  submitPost, url,
} from './lib.mjs';

const user = env('PORTCULLIS_USER');
const password = env('PORTCULLIS_PASSWORD');

/** The text the passkey script showed, once it shows one. */
async function passkeyError(page) {
  const box = page.locator('#passkey-error');
  await box.waitFor({ state: 'visible' });
  return (await box.textContent()).trim();
}

await run('passkey_login', async (browser) => {
  const a = await device(browser, 'A');
  // Counts the page's WebAuthn requests by mediation, so a step can wait until the login page's
  // autofill request is pending before it lets the authenticator answer (the authenticator
  // answers a request only as it is made, so the order decides which request it answers).
  await a.context.addInitScript(() => {
    window.__passkeyRequests = { conditional: 0, modal: 0 };
    const original = navigator.credentials.get.bind(navigator.credentials);
    navigator.credentials.get = (options) => {
      window.__passkeyRequests[options && options.mediation === 'conditional' ? 'conditional' : 'modal'] += 1;
      return original(options);
    };
  });
  const autofillPending = () => a.page.waitForFunction(() => window.__passkeyRequests.conditional > 0);
  const cdp = await a.context.newCDPSession(a.page);
  await cdp.send('WebAuthn.enable', { enableUI: false });
  const { authenticatorId } = await cdp.send('WebAuthn.addVirtualAuthenticator', {
    options: {
      protocol: 'ctap2',
      ctap2Version: 'ctap2_1',
      transport: 'internal',
      hasResidentKey: true,
      hasUserVerification: true,
      isUserVerified: true,
      automaticPresenceSimulation: true,
    },
  });

  // Signs A out with nobody at the authenticator: the login page the sign-out lands on asks for
  // a passkey as it loads (autofill), and must not sign in (to "/") while the test goes on to
  // the page it means. A step that wants the authenticator to answer switches it back on.
  // That page is left for a blank one before anything else happens: its script may still be
  // on its way to the request (the start of the ceremony is a fetch) when the next step switches
  // the authenticator on, and two answered requests race to the gateway, where the one with the
  // older signature counter is refused as a possible clone (seen once in CI).
  const signOut = async () => {
    await cdp.send('WebAuthn.setAutomaticPresenceSimulation', { authenticatorId, enabled: false });
    await submitPost(a.page, a.page.getByRole('button', { name: 'Sign out of this device' }));
    await a.page.goto('about:blank');
  };

  step('A signs in with the password and adds a passkey from the account page');
  await signIn(a.page, user, password);
  const section = a.page.locator('#passkeys');
  assert.equal(await section.locator('tr[data-passkey]').count(), 0);
  await a.page.locator('#passkey-label').fill('Laptop');
  await a.page.locator('#passkey-password').fill(password);
  await submit(a.page, a.page.getByRole('button', { name: 'Add a passkey' }), /done=passkey-added/);
  const row = section.locator('tr[data-passkey]');
  assert.equal(await row.count(), 1, 'one passkey listed');
  assert.match(await row.textContent(), /Laptop/);
  assert.match(await row.textContent(), /never/, 'not used yet');
  const { credentials } = await cdp.send('WebAuthn.getCredentials', { authenticatorId });
  assert.equal(credentials.length, 1, 'the authenticator holds one credential');
  assert.equal(credentials[0].isResidentCredential, true, 'a discoverable credential');
  assert.equal(credentials[0].rpId, new URL(url('/')).hostname);
  await a.page.screenshot({ path: path.join(outputDir(), 'passkey-added.png'), fullPage: true });

  step('A signs out; the login page signs in with the passkey alone (autofill, no user name)');
  await signOut();
  // The page asks for a passkey with conditional mediation as it loads; the virtual
  // authenticator answers at once, as a user picking it from the autofill list would. (The
  // request of the page the sign-out landed on waits on: the authenticator answers a request
  // only as it is made.)
  await cdp.send('WebAuthn.setAutomaticPresenceSimulation', { authenticatorId, enabled: true });
  await a.page.goto(url(`${PREFIX}/login?rd=${encodeURIComponent(`${PREFIX}/account`)}`));
  await a.page.waitForURL(at(`${PREFIX}/account`));
  await expectAccountPage(a.page, user);

  step('A signs out and signs in with the "Sign in with a passkey" button');
  await signOut();
  await a.page.goto(url(`${PREFIX}/login?rd=${encodeURIComponent(`${PREFIX}/account`)}`));
  // The autofill request is made with nobody at the authenticator, and waits; the click cancels
  // it and asks again, and the authenticator, now answering, answers the button's request.
  await autofillPending();
  await cdp.send('WebAuthn.setAutomaticPresenceSimulation', { authenticatorId, enabled: true });
  await a.page.getByRole('button', { name: 'Sign in with a passkey' }).click();
  await a.page.waitForURL(at(`${PREFIX}/account`));
  await expectAccountPage(a.page, user);
  assert.doesNotMatch(await a.page.locator('#passkeys tr[data-passkey]').textContent(), /never/, 'last used is set');
  const after = await cdp.send('WebAuthn.getCredentials', { authenticatorId });
  assert.ok(after.credentials[0].signCount >= 1, 'the authenticator signed');

  step('A changes the password, confirming with the passkey instead of the current password');
  const renewed = `${password} renewed`;
  await a.page.locator('#new_password').fill(renewed);
  await a.page.locator('#confirm').fill(renewed);
  await a.page.locator('#signout').uncheck();
  await submit(
    a.page,
    a.page.getByRole('button', { name: 'Change with a passkey instead' }),
    /done=password$/,
  );
  await expectAccountPage(a.page, user);

  step('Without user verification the browser refuses, and the page says so');
  await signOut();
  await cdp.send('WebAuthn.setUserVerified', { authenticatorId, isUserVerified: false });
  await cdp.send('WebAuthn.setAutomaticPresenceSimulation', { authenticatorId, enabled: true });
  await a.page.goto(url(`${PREFIX}/login`));
  await a.page.getByRole('button', { name: 'Sign in with a passkey' }).click();
  assert.match(await passkeyError(a.page), /closed, timed out, or no passkey/);
  assert.match(a.page.url(), /\/_portcullis\/login/);
  await cdp.send('WebAuthn.setUserVerified', { authenticatorId, isUserVerified: true });

  step('With a passkey registered, the password is followed by "Use a passkey"');
  // Nobody at the authenticator: the login page's autofill request waits, and the password
  // form is used instead.
  await cdp.send('WebAuthn.setAutomaticPresenceSimulation', { authenticatorId, enabled: false });
  const pw = await fillLogin(a.page, user, renewed);
  assert.equal(pw.status(), 303);
  await a.page.waitForURL(at(`${PREFIX}/login/2fa`));
  assert.equal(await a.page.locator('#code').count(), 0, 'no code field without TOTP');
  await cdp.send('WebAuthn.setAutomaticPresenceSimulation', { authenticatorId, enabled: true });
  await submit(a.page, a.page.getByRole('button', { name: 'Use a passkey' }), at(`${PREFIX}/account`));
  await expectAccountPage(a.page, user);

  step('A removes the passkey on the account page; the authenticator still offers it and is refused');
  await submit(a.page, a.page.locator('#passkeys').getByRole('button', { name: 'Remove' }), /done=passkey-removed/);
  assert.equal(await a.page.locator('#passkeys tr[data-passkey]').count(), 0);
  await submitPost(a.page, a.page.getByRole('button', { name: 'Sign out of this device' }));
  await a.page.goto(url(`${PREFIX}/login`));
  assert.match(await passkeyError(a.page), /not registered here/);
  assert.match(a.page.url(), /\/_portcullis\/login/);
  await a.page.screenshot({ path: path.join(outputDir(), 'passkey-refused.png'), fullPage: true });

  step('An authenticator that cannot verify its user: the gateway refuses it for passwordless sign-in');
  // Chromium itself refuses the answer of an authenticator told its verification failed (the
  // step above), so the gateway never sees it. One without user verification at all (no PIN,
  // no biometric) answers with the UV flag clear; A has no TOTP, so the refusal is the
  // gateway's own, `user_not_verified`.
  await cdp.send('WebAuthn.removeVirtualAuthenticator', { authenticatorId });
  const { authenticatorId: keyId } = await cdp.send('WebAuthn.addVirtualAuthenticator', {
    options: {
      protocol: 'ctap2',
      ctap2Version: 'ctap2_1',
      transport: 'internal',
      hasResidentKey: true,
      hasUserVerification: false,
      automaticPresenceSimulation: false,
    },
  });
  await signIn(a.page, user, renewed);
  await cdp.send('WebAuthn.setAutomaticPresenceSimulation', { authenticatorId: keyId, enabled: true });
  await a.page.locator('#passkey-label').fill('Security key');
  await a.page.locator('#passkey-password').fill(renewed);
  await submit(a.page, a.page.getByRole('button', { name: 'Add a passkey' }), /done=passkey-added/);
  assert.match(await a.page.locator('#passkeys tr[data-passkey]').textContent(), /Security key/);
  const held = await cdp.send('WebAuthn.getCredentials', { authenticatorId: keyId });
  assert.equal(held.credentials.length, 1, 'the key holds its credential');
  await cdp.send('WebAuthn.setAutomaticPresenceSimulation', { authenticatorId: keyId, enabled: false });
  await submitPost(a.page, a.page.getByRole('button', { name: 'Sign out of this device' }));
  // User name first: Chromium does not let an authenticator that cannot verify its user answer
  // a request without a name (NotAllowedError), so the gateway names A's passkey
  // (allowCredentials). Whichever request Chromium answers (the button's, or an autofill
  // request if it makes one), the gateway's refusal is what the page shows.
  await a.page.goto(url(`${PREFIX}/login?rd=${encodeURIComponent(`${PREFIX}/account`)}`));
  await a.page.locator('#username').fill(user);
  await cdp.send('WebAuthn.setAutomaticPresenceSimulation', { authenticatorId: keyId, enabled: true });
  await a.page.getByRole('button', { name: 'Sign in with a passkey' }).click();
  assert.match(await passkeyError(a.page), /did not verify you \(no PIN or biometric\)/);
  assert.match(a.page.url(), /\/_portcullis\/login/);
  const signed = await cdp.send('WebAuthn.getCredentials', { authenticatorId: keyId });
  assert.ok(
    signed.credentials[0].signCount > held.credentials[0].signCount,
    `the key signed (counter ${held.credentials[0].signCount} -> ${signed.credentials[0].signCount}): the refusal is the gateway's`,
  );
  await a.page.screenshot({ path: path.join(outputDir(), 'passkey-not-verified.png'), fullPage: true });
});
