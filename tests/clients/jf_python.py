#!/usr/bin/env python3
"""Drives the real `jellyfin-apiclient-python` against a Jellyfin-compatible server.

Usage: jf_python.py BASE USER PASSWORD [ITEM_ID]

Phase 1 connects, logs in, calls Users/Me, opens a WebSocket at BASE/socket with the client's
own `Authorization: MediaBrowser ... Token=` header, and fetches the first 100 bytes of
`Videos/ITEM_ID/stream` through the client's own stream-URL helper (which adds `ApiKey`). It
prints one JSON line:
  {"phase": 1, "token", "user_id", "server_id", "me", "socket_open", "socket_echo",
   "range_status", "range_len", "range_ok"}
Then it waits for one line on stdin (the caller revokes things in between) and runs phase 2:
Users/Me again, and waits up to 3 s for the WebSocket to close. It prints
  {"phase": 2, "me_status", "socket_closed"}
Anything unexpected in phase 1 (or an exception anywhere) ends the script with a message on
stderr and exit status 1. Phase 2 only reports: the caller judges it.
"""

import json
import sys
import time

import requests
import websocket
from jellyfin_apiclient_python import JellyfinClient
from jellyfin_apiclient_python.connection_manager import CONNECTION_STATE
from jellyfin_apiclient_python.exceptions import HTTPException

DEFAULT_ITEM = "5f1b2c3d4e5f60718293a4b5c6d7e8f9"

# Only the two JSON lines go to stdout: anything the library prints goes to stderr.
RESULTS = sys.stdout
sys.stdout = sys.stderr


def fail(message):
    print(f"jf_python: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def pattern_byte(i):
    # Same as tests/it/upstream.rs pattern_byte.
    return ((i % 251) * 31 + 7) % 251


def emit(obj):
    print(json.dumps(obj), file=RESULTS, flush=True)


def http_status(call):
    """Runs an API call of the client; returns (status, result)."""
    try:
        return 200, call()
    except HTTPException as error:
        response = getattr(error.message, "response", None)
        if response is not None:
            return response.status_code, None
        fail(f"request failed without an HTTP status: {error.status} {error.message}")


def main():
    if len(sys.argv) < 4:
        fail("usage: jf_python.py BASE USER PASSWORD [ITEM_ID]")
    base, user, password = sys.argv[1:4]
    item = sys.argv[4] if len(sys.argv) > 4 else DEFAULT_ITEM

    client = JellyfinClient()
    client.config.app("portcullis-test", "0.1.0", "ci-box", "dev-py-1")
    client.config.data["auth.ssl"] = False

    state = client.auth.connect_to_address(base)
    if state.get("State") != CONNECTION_STATE["ServerSignIn"]:
        fail(f"connect_to_address({base}) gave {state}")
    result = client.auth.login(base, user, password)
    if not result:
        fail(f"login as {user} failed")
    token = result["AccessToken"]
    user_id = result["User"]["Id"]

    status, me = http_status(lambda: client.jellyfin._get("Users/Me"))
    if status != 200 or not me:
        fail(f"Users/Me answered {status}")

    # The WebSocket, authenticated exactly as the client's own ws_client does it.
    ws_url = base.replace("https", "wss", 1) if base.startswith("https") else base.replace("http", "ws", 1)
    auth_header = client.http._get_authenication_header()
    if f'Token="{token}"' not in auth_header:
        fail(f"the client's Authorization header has no token: {auth_header}")
    ws = websocket.create_connection(f"{ws_url}/socket", header={"Authorization": auth_header}, timeout=10)
    first = json.loads(ws.recv())
    if first.get("MessageType") != "ForceKeepAlive":
        fail(f"first WebSocket message is not ForceKeepAlive: {first}")
    ws.send(json.dumps({"MessageType": "KeepAlive"}))
    answer = json.loads(ws.recv())
    socket_echo = answer.get("MessageType") == "KeepAlive"

    # A direct-play stream URL from the client's own helper, fetched with a Range.
    stream_url = client.jellyfin.video_url(item)
    r = requests.get(stream_url, headers={"Range": "bytes=0-99"}, timeout=30)
    body = r.content
    range_ok = r.status_code == 206 and list(body) == [pattern_byte(i) for i in range(100)]
    if not range_ok:
        fail(f"range request to {stream_url} gave {r.status_code} with {len(body)} bytes")

    emit({
        "phase": 1,
        "token": token,
        "user_id": user_id,
        "server_id": result.get("ServerId"),
        "me": me,
        "socket_open": True,
        "socket_echo": socket_echo,
        "range_status": r.status_code,
        "range_len": len(body),
        "range_ok": range_ok,
        "stream_url": stream_url,
    })

    sys.stdin.readline()

    me_status, _ = http_status(lambda: client.jellyfin._get("Users/Me"))

    socket_closed = False
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        ws.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            opcode, _frame = ws.recv_data_frame(True)
        except websocket.WebSocketTimeoutException:
            break
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            socket_closed = True
            break
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            socket_closed = True
            break
    try:
        ws.close(timeout=1)
    except Exception:  # noqa: BLE001 - closing a dead socket may fail in many ways
        pass

    emit({"phase": 2, "me_status": me_status, "socket_closed": socket_closed})


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - report anything, then fail
        import traceback

        traceback.print_exc()
        fail(f"{type(error).__name__}: {error}")
