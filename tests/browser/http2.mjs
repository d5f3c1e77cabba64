// A Jellyfin-style page load over HTTP/2 through the gateway's TLS listener, then the lever:
//
// Chromium opens the Jellyfin web client (the stand-in's /web/) at https://localhost: the page
// and everything it loads arrive over h2 (nextHopProtocol), several requests at once on one
// connection: public server info, branding, the app's login (the gateway binds the token to
// the user), the user, a Range request into a video stream. The app's WebSocket opens on
// HTTP/1.1 (no RFC 8441) and gets the server's first message. Then the same user signs in to the
// gateway's own pages, over h2 too, and presses "Sign out of all devices": the WebSocket is
// closed and the app's token is refused.

import { assert, device, env, run, signIn, step, submitPost, url } from './lib.mjs';

const user = env('PORTCULLIS_USER');
const password = env('PORTCULLIS_PASSWORD');
const AUTH = 'MediaBrowser Client="Jellyfin Web", Device="Chromium", DeviceId="h2-browser", Version="10.10.3"';

await run('http2', async (browser) => {
  const app = await device(browser, 'app', undefined, { ignoreHTTPSErrors: true });
  step('the Jellyfin web client loads over h2');
  const resp = await app.page.goto(url('/web/'));
  assert.equal(resp.status(), 200);
  assert.match(await app.page.locator('#reactRoot').textContent(), /Jellyfin stand-in web client/);
  const nav = await app.page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
  assert.equal(nav, 'h2', 'the page did not come over HTTP/2');

  step('the app signs in and loads in parallel: info, branding, user, a Range of a video');
  const result = await app.page.evaluate(async ({ AUTH, user, password }) => {
    const [info, branding] = await Promise.all([
      fetch('/System/Info/Public').then((r) => r.json()),
      // Each body read to its end: a resource's timing entry is written once its body is.
      fetch('/Branding/Configuration').then(async (r) => { await r.text(); return r.status; }),
    ]);
    const login = await fetch('/Users/AuthenticateByName', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-Emby-Authorization': AUTH },
      body: JSON.stringify({ Username: user, Pw: password }),
    });
    const body = await login.json();
    const token = body.AccessToken;
    const withToken = { 'X-Emby-Authorization': `${AUTH}, Token="${token}"` };
    const [me, video] = await Promise.all([
      fetch('/Users/Me', { headers: withToken }).then(async (r) => ({ status: r.status, body: await r.json() })),
      fetch(`/Videos/h2movie/stream?static=true&api_key=${token}`, { headers: { Range: 'bytes=1000-1999' } })
        .then(async (r) => ({ status: r.status, length: (await r.arrayBuffer()).byteLength, range: r.headers.get('content-range') })),
    ]);
    const protocols = performance.getEntriesByType('resource').map((e) => `${e.name} ${e.nextHopProtocol}`);
    return { info, branding, loginStatus: login.status, token, me, video, protocols };
  }, { AUTH, user, password });
  assert.ok(result.info.Id, JSON.stringify(result.info));
  assert.equal(result.branding, 200);
  assert.equal(result.loginStatus, 200);
  assert.ok(result.token, 'no AccessToken');
  assert.equal(result.me.status, 200);
  assert.equal(result.me.body.Name, user);
  assert.equal(result.video.status, 206);
  assert.equal(result.video.length, 1000);
  assert.match(result.video.range, /^bytes 1000-1999\//);
  // The five calls above (and the favicon, when the browser has asked for it by then).
  for (const p of ['/System/Info/Public', '/Branding/Configuration', '/Users/AuthenticateByName', '/Users/Me', '/Videos/h2movie/stream']) {
    assert.ok(result.protocols.some((e) => e.includes(p)), `${p} not among ${result.protocols.join('\n')}`);
  }
  for (const p of result.protocols) {
    assert.ok(p.endsWith(' h2'), `not over HTTP/2: ${p}`);
  }

  step('the app WebSocket opens (HTTP/1.1) and gets the server\'s first message');
  await app.page.evaluate((token) => new Promise((resolve, reject) => {
    const ws = new WebSocket(`wss://${location.host}/socket?api_key=${token}&deviceId=h2-browser`);
    window.appSocket = { closed: false, messages: [] };
    ws.onmessage = (e) => {
      window.appSocket.messages.push(String(e.data));
      resolve();
    };
    ws.onclose = () => {
      window.appSocket.closed = true;
      reject(new Error('closed before its first message'));
    };
    setTimeout(() => reject(new Error('no message within 10 s')), 10_000);
  }), result.token);
  const first = await app.page.evaluate(() => window.appSocket.messages[0]);
  assert.match(first, /ForceKeepAlive/);

  step('the user signs in to the gateway (over h2) and signs out of all devices');
  const me = await device(browser, 'account', undefined, { ignoreHTTPSErrors: true });
  await signIn(me.page, user, password);
  const accountProto = await me.page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
  assert.equal(accountProto, 'h2');
  const out = await submitPost(me.page, me.page.getByRole('button', { name: 'Sign out of all devices' }));
  assert.equal(out.status(), 303);

  step('the app\'s WebSocket is closed and its token refused');
  await app.page.waitForFunction(() => window.appSocket.closed, null, { timeout: 5_000 });
  const after = await app.page.evaluate(async (token) => (await fetch(`/Users/Me?api_key=${token}`)).status, result.token);
  assert.equal(after, 401);
});
