// A real OpenID provider for the integration tests: panva's certified `oidc-provider` on an
// ephemeral loopback port. It prints {"issuer": "http://127.0.0.1:PORT"} once it listens, then
// reads its configuration as one JSON line on stdin (the gateway's port is known only then):
//   { "client_id", "client_secret", "redirect_uri", "post_logout_redirect_uri",
//     "backchannel_logout_uri", "accounts": { "<login = sub>": { "email", ... } } }
// and prints {"ready": true}. Until then every request gets 503 (a provider that is down).
// Sign-in uses the provider's own development interaction (a login form that takes any
// password for a listed login); consent is granted for the test client, as for a first-party
// client. Back-channel logout is enabled; the client requires `sid`. Exits when stdin closes.
import http from 'node:http';
import readline from 'node:readline';
import Provider from 'oidc-provider';

let handler = (req, res) => {
  res.writeHead(503, { 'content-type': 'text/plain' });
  res.end('not configured yet\n');
};
const server = http.createServer((req, res) => handler(req, res));
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;
process.stdout.write(`${JSON.stringify({ issuer })}\n`);

const lines = readline.createInterface({ input: process.stdin });
lines.on('close', () => process.exit(0));
const cfg = JSON.parse(await new Promise((resolve) => lines.once('line', resolve)));
const accounts = cfg.accounts ?? {};

const provider = new Provider(issuer, {
  clients: [{
    client_id: cfg.client_id,
    client_secret: cfg.client_secret,
    redirect_uris: [cfg.redirect_uri],
    post_logout_redirect_uris: [cfg.post_logout_redirect_uri],
    backchannel_logout_uri: cfg.backchannel_logout_uri,
    backchannel_logout_session_required: true,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username', 'name'],
    groups: ['groups'],
  },
  scopes: ['openid', 'email', 'profile', 'groups'],
  features: {
    devInteractions: { enabled: true },
    backchannelLogout: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  pkce: { required: () => true },
  // The provider refuses to call special-use addresses (SSRF protection); the relying party
  // under test lives on loopback, so its back-channel logout calls must be let through.
  fetch: (url, options) => {
    const { dispatcher, ...rest } = options;
    return globalThis.fetch(url, rest);
  },
  async findAccount(ctx, id) {
    const account = accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        return { ...account, sub: id };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid email profile groups');
    await grant.save();
    return grant;
  },
});
provider.on('backchannel.error', (ctx, err) => {
  process.stderr.write(`backchannel.error: ${err.message}\n`);
});
provider.on('backchannel.success', (ctx, client, accountId, sid) => {
  process.stderr.write(`backchannel.success: ${accountId} ${sid}\n`);
});
handler = provider.callback();
process.stdout.write(`${JSON.stringify({ ready: true })}\n`);
