// Cross-site request forgery: a page on another origin auto-submits the account page's forms
// at the gateway in a browser that is signed in. Every such post is answered 403 and changes
// nothing; the session still works afterwards.
//
// The attacker's server runs here on another loopback port, reached two ways:
//  - http://127.0.0.1:PORT: another origin but the same site (ports do not make sites), so the
//    browser still sends the SameSite=Lax session cookie: only the gateway's own Origin /
//    Sec-Fetch-Site / CSRF-token checks can refuse it;
//  - http://localhost:PORT: another site, where the cookie is withheld as well.

import http from 'node:http';
import {
  PREFIX, UA, assert, base, device, deviceRows, env, expectAccountPage, expectUpstream, run,
  signIn, step, url,
} from './lib.mjs';

const user = env('PORTCULLIS_USER');
const password = env('PORTCULLIS_PASSWORD');

/** The attack page: a form that posts `fields` to the gateway's `path` as soon as it loads. */
function attackPage(path, fields) {
  const inputs = Object.entries(fields)
    .map(([k, v]) => `<input type="hidden" name="${k}" value="${v}">`)
    .join('');
  return `<!doctype html><html><head><title>You won a prize</title></head><body>
<form id="f" method="post" action="${base()}${path}">${inputs}</form>
<script>document.getElementById('f').submit();</script></body></html>`;
}

const attacks = {
  '/signout-all': [`${PREFIX}/account/signout-all`, { csrf: 'guessed' }],
  '/signout-all-no-token': [`${PREFIX}/account/signout-all`, {}],
  '/password': [
    `${PREFIX}/account/password`,
    { current: password, new_password: 'attacker chose this 9931', confirm: 'attacker chose this 9931', signout: '1', csrf: 'guessed' },
  ],
  '/logout': [`${PREFIX}/logout`, {}],
};

async function startAttacker() {
  const server = http.createServer((req, res) => {
    const attack = attacks[req.url];
    if (!attack) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(attackPage(...attack));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return server;
}

await run('csrf', async (browser) => {
  const attacker = await startAttacker();
  const port = attacker.address().port;
  try {
    const a = await device(browser, 'A', UA.chrome);
    const other = await device(browser, 'B', UA.firefox);
    step('A and B sign in');
    await signIn(a.page, user, password);
    await signIn(other.page, user, password);

    for (const origin of [`http://127.0.0.1:${port}`, `http://localhost:${port}`]) {
      for (const [name, [target]] of Object.entries(attacks)) {
        step(`${origin}${name} posts to ${target}`);
        const page = await a.context.newPage();
        page.deviceName = `A-attacked-${name.slice(1)}`;
        const [resp] = await Promise.all([
          page.waitForResponse((r) => r.url() === url(target) && r.request().method() === 'POST'),
          // The form replaces the attack page before it finishes loading: wait for commit only.
          page.goto(`${origin}${name}`, { waitUntil: 'commit' }),
        ]);
        const headers = await resp.request().allHeaders();
        assert.equal(resp.status(), 403, `${origin}${name}: the gateway answered ${resp.status()}`);
        await page.waitForURL(url(target));
        assert.equal((await page.locator('h1').textContent()).trim(), 'Refused');
        if (origin.includes('127.0.0.1')) {
          // Same site: the browser sent the session cookie, so only the gateway's checks refused.
          assert.match(headers.cookie || '', /(^|; )portcullis=/, `cookie sent: ${JSON.stringify(headers)}`);
        }
        await page.close();

        step('the session still works and nothing changed');
        await a.page.goto(url(`${PREFIX}/account`));
        await expectAccountPage(a.page, user);
        assert.equal((await deviceRows(a.page)).length, 2, 'no device was signed out');
        await expectUpstream(a.page);
        await expectUpstream(other.page);
      }
    }

    step('the password is still the original one');
    const c = await device(browser, 'C', UA.iphone);
    await signIn(c.page, user, password);
  } finally {
    attacker.close();
  }
});
