// Drives the real `@jellyfin/sdk` (with axios, and `ws` for the WebSocket on Node 20) against a
// Jellyfin-compatible server.
//
// Usage: node jf_sdk.mjs BASE USER PASSWORD [ITEM_ID]
//
// Phase 1: public system info, login, current user, a WebSocket at
// api.getUri('/socket', {ApiKey}) turned into ws://, and the first 100 bytes of the item's
// direct stream through axios with `ApiKey`. Prints one JSON line
//   {"phase":1,"token","user_id","server_id","me","socket_open","socket_echo","range_status",
//    "range_len","range_ok"}
// then waits for one line on stdin (the caller revokes things in between) and runs phase 2:
// the current user again, and up to 3 s for the WebSocket to close. Prints
//   {"phase":2,"me_status","socket_closed"}
// Anything unexpected in phase 1 (or any exception) ends the script with a message on stderr and
// exit status 1. Phase 2 only reports: the caller judges it.

import readline from 'node:readline';

import axios from 'axios';
import WebSocket from 'ws';
import { Jellyfin } from '@jellyfin/sdk';
import { getAuthenticationApi } from '@jellyfin/sdk/lib/utils/api/authentication-api.js';
import { getSystemApi } from '@jellyfin/sdk/lib/utils/api/system-api.js';
import { getUserApi } from '@jellyfin/sdk/lib/utils/api/user-api.js';

const DEFAULT_ITEM = '5f1b2c3d4e5f60718293a4b5c6d7e8f9';

function fail(message) {
    process.stderr.write(`jf_sdk: ${message}\n`);
    process.exit(1);
}

function emit(obj) {
    process.stdout.write(`${JSON.stringify(obj)}\n`);
}

// Same as tests/it/upstream.rs pattern_byte.
const patternByte = (i) => (((i % 251) * 31) + 7) % 251;

/** Resolves with the HTTP status of an SDK call (200 with data on success). */
async function status(call) {
    try {
        const res = await call();
        return { status: res.status, data: res.data };
    } catch (err) {
        if (err.response) return { status: err.response.status, data: undefined };
        throw err;
    }
}

/** Resolves with the next message of a socket, or rejects after `ms`. */
function nextMessage(ws, ms) {
    return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no WebSocket message in time')), ms);
        ws.once('message', (data) => {
            clearTimeout(timer);
            resolve(JSON.parse(data.toString()));
        });
    });
}

async function main() {
    const [base, user, password, itemArg] = process.argv.slice(2);
    if (!password) fail('usage: node jf_sdk.mjs BASE USER PASSWORD [ITEM_ID]');
    const item = itemArg || DEFAULT_ITEM;

    const jellyfin = new Jellyfin({
        clientInfo: { name: 'portcullis-test', version: '0.1.0' },
        deviceInfo: { name: 'ci box', id: 'dev-sdk-1' }
    });
    const api = jellyfin.createApi(base);

    const info = await getSystemApi(api).getPublicSystemInfo();
    if (info.status !== 200 || !info.data.Id) fail(`public system info: ${info.status}`);

    const auth = await getAuthenticationApi(api).authenticateUserByName({
        authenticateUserByName: { Username: user, Pw: password }
    });
    const token = api.accessToken;
    if (!token || token !== auth.data.AccessToken) fail('the SDK did not keep the access token');
    const userId = auth.data.User.Id;

    const me = await status(() => getUserApi(api).getCurrentUser());
    if (me.status !== 200) fail(`current user: ${me.status}`);

    // The WebSocket URL the SDK itself would use, with the ws scheme.
    const wsUrl = api.getUri('/socket', { ApiKey: api.accessToken }).replace(/^http/, 'ws');
    const ws = new WebSocket(wsUrl);
    let closed = false;
    const closedPromise = new Promise((resolve) => ws.once('close', () => { closed = true; resolve(); }));
    ws.on('error', () => {});
    const first = await new Promise((resolve, reject) => {
        ws.once('unexpected-response', (_req, res) => reject(new Error(`WebSocket refused: ${res.statusCode}`)));
        ws.once('open', () => resolve(nextMessage(ws, 10000)));
    });
    if (first.MessageType !== 'ForceKeepAlive') fail(`first WebSocket message: ${JSON.stringify(first)}`);
    const echoWait = nextMessage(ws, 10000);
    ws.send(JSON.stringify({ MessageType: 'KeepAlive' }));
    const echo = await echoWait;

    // A direct stream with the token in the query, as jellyfin-web builds it.
    const streamUrl = api.getUri(`/Videos/${item}/stream`, { Static: true, ApiKey: api.accessToken });
    const range = await axios.get(streamUrl, {
        headers: { Range: 'bytes=0-99' },
        responseType: 'arraybuffer',
        validateStatus: () => true
    });
    const bytes = Buffer.from(range.data);
    const rangeOk = range.status === 206 && bytes.length === 100
        && bytes.every((b, i) => b === patternByte(i));
    if (!rangeOk) fail(`range request to ${streamUrl} gave ${range.status} with ${bytes.length} bytes`);

    emit({
        phase: 1,
        token,
        user_id: userId,
        server_id: auth.data.ServerId,
        me: me.data,
        socket_open: true,
        socket_echo: echo.MessageType === 'KeepAlive',
        range_status: range.status,
        range_len: bytes.length,
        range_ok: rangeOk,
        ws_url: wsUrl
    });

    const rl = readline.createInterface({ input: process.stdin });
    await new Promise((resolve) => { rl.once('line', resolve); rl.once('close', resolve); });
    rl.close();

    const me2 = await status(() => getUserApi(api).getCurrentUser());
    await Promise.race([closedPromise, new Promise((resolve) => setTimeout(resolve, 3000))]);

    emit({ phase: 2, me_status: me2.status, socket_closed: closed });
    ws.terminate();
    process.exit(0);
}

main().catch((err) => fail(err && err.stack ? err.stack : String(err)));
