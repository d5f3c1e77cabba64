// Single sign-on in the browser: the login page's provider button, the provider's own sign-in
// page (a real OpenID provider), back to the gateway signed in; then, when the test says so on
// stdin, the user signs out at the provider's own end-session page, and the provider's
// back-channel logout ends the gateway session.
//
// Environment: PORTCULLIS_URL, PORTCULLIS_USER (the gateway user expected),
// PORTCULLIS_OIDC_ISSUER, PORTCULLIS_OIDC_LOGIN (the login at the provider). Prints
// {"session": "<cookie value>"} once signed in and {"provider_logout": "done"} after the
// provider's logout.

import readline from 'node:readline';

import { PREFIX, assert, at, device, env, expectAccountPage, run, step, url } from './lib.mjs';

const user = env('PORTCULLIS_USER');
const issuer = env('PORTCULLIS_OIDC_ISSUER');
const login = env('PORTCULLIS_OIDC_LOGIN');
const lines = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once('line', resolve));

await run('sso_login', async (browser) => {
  const d = await device(browser, 'A');
  step('the login page offers the provider next to the password form');
  await d.page.goto(url(`${PREFIX}/login?rd=${encodeURIComponent(`${PREFIX}/account`)}`));
  assert.ok(await d.page.locator('#password').isVisible(), 'the password form is shown');
  const button = d.page.getByRole('link', { name: 'Sign in with Test IdP' });
  await Promise.all([
    d.page.waitForURL((u) => u.href.startsWith(issuer)),
    button.click(),
  ]);
  // (The provider is set to require PKCE, so getting through at all shows it was sent.)

  step("sign in on the provider's own page");
  await d.page.locator('input[name=login]').fill(login);
  await d.page.locator('input[name=password]').fill('any password will do here');
  await Promise.all([
    d.page.waitForURL(at(`${PREFIX}/account`)),
    d.page.locator('button[type=submit]').click(),
  ]);
  await expectAccountPage(d.page, user);
  assert.match(
    await d.page.locator('#sso tbody tr[data-provider="testidp"]').textContent(),
    /Linked/,
  );
  const session = (await d.context.cookies()).find((c) => c.name === 'portcullis');
  assert.ok(session, 'the gateway set its session cookie');
  assert.ok(
    !(await d.context.cookies()).some((c) => c.name === 'portcullis-oidc'),
    'the sign-in cookie is gone once used',
  );
  console.log(JSON.stringify({ session: session.value }));
  await nextLine();

  step("sign out on the provider's own end-session page");
  await d.page.goto(`${issuer}/session/end`);
  await Promise.all([
    d.page.waitForURL((u) => u.pathname.startsWith('/session/end/success')),
    d.page.getByRole('button', { name: 'Yes, sign me out' }).click(),
  ]);
  console.log(JSON.stringify({ provider_logout: 'done' }));

  step('the gateway session has ended: the account page sends the browser to sign in');
  await d.page.goto(url(`${PREFIX}/account`));
  assert.match(d.page.url(), at(`${PREFIX}/login`));
});
lines.close();
