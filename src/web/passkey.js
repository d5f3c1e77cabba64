// Portcullis passkeys: the browser side of the WebAuthn ceremonies. The gateway starts each
// ceremony (its options as JSON, its state kept server-side), the browser's authenticator
// answers, and the answer goes back as the credential's JSON (PublicKeyCredential.toJSON()).
// Served from /_portcullis/passkey.js (the pages' policy allows scripts from the gateway only).
'use strict';

(() => {
  const supported = typeof window.PublicKeyCredential === 'function'
    && typeof PublicKeyCredential.parseCreationOptionsFromJSON === 'function';

  // webauthn-rs writes absent options as null; the browser's JSON parsers want them absent.
  const withoutNulls = (v) => {
    if (Array.isArray(v)) return v.map(withoutNulls);
    if (v && typeof v === 'object') {
      return Object.fromEntries(Object.entries(v)
        .filter(([, x]) => x !== null)
        .map(([k, x]) => [k, withoutNulls(x)]));
    }
    return v;
  };

  const post = async (path, body) => {
    const resp = await fetch(path, {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify(body),
    });
    let data = {};
    try { data = await resp.json(); } catch (_) { /* an empty or non-JSON answer */ }
    if (!resp.ok) {
      const e = new Error(data.message || `The gateway answered ${resp.status}.`);
      e.reason = data.error || String(resp.status);
      throw e;
    }
    return data;
  };

  const show = (message) => {
    const box = document.getElementById('passkey-error');
    if (box) {
      box.textContent = message;
      box.hidden = false;
    }
  };

  // What the browser's own refusals mean to a user.
  const explain = (e) => {
    if (e && e.name === 'NotAllowedError') {
      return 'The passkey prompt was closed, timed out, or no passkey for this site was found.';
    }
    if (e && e.name === 'InvalidStateError') return 'This passkey is already registered.';
    if (e && e.name === 'AbortError') return '';
    return (e && e.message) || 'The passkey could not be used.';
  };

  const get = async (started, mediation, signal) => {
    const publicKey = PublicKeyCredential.parseRequestOptionsFromJSON(
      withoutNulls(started.publicKey),
    );
    const options = { publicKey };
    if (mediation) options.mediation = mediation;
    if (signal) options.signal = signal;
    return navigator.credentials.get(options);
  };

  const rdOf = (form) => {
    const rd = form && form.querySelector('input[name="rd"]');
    return rd ? rd.value : '/';
  };

  // The login page: "Sign in with a passkey" (usernameless, or for the name typed in), and
  // passkey autofill on the user-name field where the browser offers it.
  const signin = document.getElementById('passkey-signin');
  if (signin) {
    const form = document.getElementById('login-form');
    const username = document.getElementById('username');
    let autofill = null;
    // Set once the button is used: an autofill request not yet made is then not made at all
    // (the browser allows one request at a time).
    let manual = false;
    const finish = async (started, credential) => {
      const done = await post('/_portcullis/passkey/login/finish', {
        ceremony: started.ceremony,
        credential: credential.toJSON(),
        rd: rdOf(form),
      });
      window.location.assign(done.redirect);
    };
    const startAutofill = async () => {
      if (!supported || typeof PublicKeyCredential.isConditionalMediationAvailable !== 'function') return;
      if (!(await PublicKeyCredential.isConditionalMediationAvailable()) || manual) return;
      autofill = new AbortController();
      try {
        const started = await post('/_portcullis/passkey/login/start', {});
        if (manual) return;
        const credential = await get(started, 'conditional', autofill.signal);
        if (credential) await finish(started, credential);
      } catch (e) {
        // Only the gateway's refusal of a passkey the user picked is worth saying; the browser's
        // own refusals (no passkey, an origin it will not use, the prompt cancelled) stay silent
        // here, as the page still offers the password and the button.
        if (e && e.reason && !(autofill && autofill.signal.aborted)) show(explain(e));
      }
    };
    signin.addEventListener('click', async (event) => {
      event.preventDefault();
      if (!supported) {
        show('This browser cannot use passkeys.');
        return;
      }
      manual = true;
      if (autofill) autofill.abort();
      // The browser takes one request at a time: let the autofill request end first.
      await autofillRun;
      try {
        const name = username && username.value.trim();
        const started = await post('/_portcullis/passkey/login/start', name ? { username: name } : {});
        const credential = await get(started);
        await finish(started, credential);
      } catch (e) {
        show(explain(e));
      }
    });
    const autofillRun = startAutofill();
  }

  // The second step of a password login: a passkey instead of the code.
  const second = document.getElementById('passkey-second-factor');
  if (second) {
    second.addEventListener('click', async (event) => {
      event.preventDefault();
      const form = second.closest('form') || document.querySelector('form');
      const csrf = form.querySelector('input[name="csrf"]').value;
      try {
        const started = await post('/_portcullis/passkey/second-factor/start', { csrf });
        const credential = await get(started);
        const done = await post('/_portcullis/passkey/second-factor/finish', {
          ceremony: started.ceremony,
          credential: credential.toJSON(),
          csrf,
          rd: rdOf(form),
        });
        window.location.assign(done.redirect);
      } catch (e) {
        show(explain(e));
      }
    });
  }

  // Confirming a sensitive change with a passkey instead of the password (and code): the
  // passkey's answer buys a single-use grant for this session; the form then carries it in
  // `passkey_grant` and is sent as it stands (its password and code fields are left empty).
  for (const button of document.querySelectorAll('button[data-passkey-grant]')) {
    button.addEventListener('click', async (event) => {
      event.preventDefault();
      if (!supported) {
        show('This browser cannot use passkeys.');
        return;
      }
      const form = button.closest('form');
      const csrf = form.querySelector('input[name="csrf"]').value;
      try {
        const started = await post('/_portcullis/account/passkeys/confirm/start', { csrf });
        const credential = await get(started);
        const { grant } = await post('/_portcullis/account/passkeys/confirm/finish', {
          ceremony: started.ceremony,
          credential: credential.toJSON(),
          csrf,
        });
        form.querySelector('input[name="passkey_grant"]').value = grant;
        for (const input of form.querySelectorAll('input[name="password"], input[name="current"], input[name="code"]')) {
          input.required = false;
        }
        form.requestSubmit();
      } catch (e) {
        show(explain(e));
      }
    });
  }

  // The account page (after the password and code, or another passkey) or an administrator's
  // one-time link: add a passkey.
  const add = document.getElementById('passkey-add');
  if (add) {
    add.addEventListener('submit', async (event) => {
      event.preventDefault();
      if (!supported) {
        show('This browser cannot create passkeys.');
        return;
      }
      const field = (name) => {
        const input = add.querySelector(`[name="${name}"]`);
        return input ? input.value : '';
      };
      try {
        const started = await post(add.dataset.start, {
          password: field('password'),
          code: field('code'),
          passkey_grant: field('passkey_grant'),
          csrf: field('csrf'),
        });
        const publicKey = PublicKeyCredential.parseCreationOptionsFromJSON(
          withoutNulls(started.publicKey),
        );
        const credential = await navigator.credentials.create({ publicKey });
        const done = await post(add.dataset.finish, {
          ceremony: started.ceremony,
          credential: credential.toJSON(),
          label: field('label'),
          csrf: field('csrf'),
          rd: field('rd'),
        });
        window.location.assign(done.redirect);
      } catch (e) {
        show(explain(e));
      }
    });
  }
})();
