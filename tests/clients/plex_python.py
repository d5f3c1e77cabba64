#!/usr/bin/env python3
"""Drives the real `plexapi` (python-plexapi) against a Plex Media Server, or against plex.tv.

Usage:
  plex_python.py BASE TOKEN [PART_KEY]
  plex_python.py --plextv PLEXTV_BASE TOKEN [DELETE_CLIENT_ID]
  plex_python.py --verify-jwt PLEXTV_BASE JWT CLIENT_ID

Every request goes out with X-Plex-Client-Identifier "portcullis-plexapi-1" (plexapi's other
X-Plex-* headers unchanged). Only the JSON lines go to stdout.

PMS mode, two phases. Phase 1: `PlexServer(BASE, TOKEN)` (GET /), `server.library.sections()`
(plexapi asks /library and, when refused with a status other than 401/404, falls back to
/library/sections/ by itself), `section.all()`, the first movie's metadata with
`server.fetchItem(ratingKey)`, the first 100 bytes of PART_KEY (default: that movie's first
part) through plexapi's own session with the token in the query as plexapi's `url(...,
includeToken=True)` puts it and a Range header, an HLS transcode started with
`movie.getStreamURL(protocol='hls')` whose variant playlist and first segment are then fetched
WITHOUT a token (as players do), a transient token from `server.createToken()`, and the
notification listener `server.startAlertListener(callback)` (waits up to 10 s for a message).
It prints
  {"phase": 1, "machine_id", "friendly_name", "sections", "movies", "metadata_title",
   "part_key", "range_status", "range_len", "range_ok", "transcode_session", "segment_url",
   "segment_status", "segment_ok", "transient_token", "transient_status", "alert_connected",
   "alert_type"}
then waits for one line on stdin (the caller revokes things in between) and runs phase 2:
GET / again through plexapi (200, or the status of plexapi's Unauthorized/NotFound/BadRequest),
the token-less segment URL again, and waits up to 3 s for the listener's socket to close:
  {"phase": 2, "root_status", "segment_status", "socket_closed"}
Anything unexpected in phase 1 (or an exception anywhere) ends the script with a message on
stderr and exit status 1. Phase 2 only reports: the caller judges it.

--plextv mode: `MyPlexAccount(token=TOKEN)` with plexapi's hard-coded https://plex.tv and
https://clients.plex.tv URLs sent to PLEXTV_BASE instead (a requests session that rewrites them),
lists `account.devices()`, and with DELETE_CLIENT_ID removes that device with
`MyPlexDevice.delete()` and lists again. One line:
  {"id", "uuid", "username", "email", "title", "auth_token", "devices": [{"id", "name",
   "clientIdentifier", "product", "token"}], "deleted": id or null, "devices_after": [...]}
Unauthorized at sign-in prints {"error": "Unauthorized", "message"} and exits 0.

--verify-jwt mode: `MyPlexJWTLogin(jwtToken=JWT, headers={X-Plex-Client-Identifier: CLIENT_ID})
.decodePlexJWT()` — plexapi fetches the keys from PLEXTV_BASE/api/v2/auth/keys and checks the
signature, `aud`, `iss` and the required claims. One line: {"claims": {...}} or
{"error": "<PyJWT exception name>"}.
"""

import json
import sys
import threading
import time
from urllib.parse import urljoin

import plexapi
import requests
from plexapi.exceptions import BadRequest, NotFound, Unauthorized

CLIENT_ID = "portcullis-plexapi-1"
plexapi.BASE_HEADERS["X-Plex-Client-Identifier"] = CLIENT_ID

from plexapi.myplex import MyPlexAccount, MyPlexJWTLogin  # noqa: E402
from plexapi.server import PlexServer  # noqa: E402

# Only the JSON lines go to stdout: anything the library prints goes to stderr.
RESULTS = sys.stdout
sys.stdout = sys.stderr


def fail(message):
    print(f"plex_python: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def pattern_byte(i):
    # Same as tests/it/upstream.rs pattern_byte.
    return ((i % 251) * 31 + 7) % 251


def emit(obj):
    print(json.dumps(obj), file=RESULTS, flush=True)


def status_of(call):
    """Runs a plexapi call; returns 200 or the HTTP status of the exception it raised."""
    try:
        call()
        return 200
    except Unauthorized:
        return 401
    except NotFound:
        return 404
    except BadRequest as error:
        text = str(error)
        if text.startswith("(") and ")" in text:
            try:
                return int(text[1:text.index(")")])
            except ValueError:
                pass
        return 400


def media_playlist_entries(body):
    return [line.strip() for line in body.splitlines() if line.strip() and not line.startswith("#")]


def pms(base, token, part_key):
    server = PlexServer(base, token, timeout=30)
    session = server._session

    sections = server.library.sections()
    if not sections:
        fail("no library sections")
    movies = sections[0].all()
    if not movies:
        fail(f"section {sections[0].title} has no items")
    movie = server.fetchItem(movies[0].ratingKey)
    parts = [p for m in movie.media for p in m.parts]
    if not parts:
        fail(f"movie {movie.title} has no parts")
    part_key = part_key or parts[0].key

    # A direct-play range request: token in the query, as plexapi's URLs carry it.
    r = session.get(server.url(part_key, includeToken=True), headers={"Range": "bytes=0-99"}, timeout=30)
    body = r.content
    range_ok = r.status_code == 206 and list(body) == [pattern_byte(i) for i in range(100)]
    if not range_ok:
        fail(f"range request to {part_key} gave {r.status_code} with {len(body)} bytes")

    # An HLS transcode: the start URL carries the token, the playlists and segments do not.
    start_url = movie.getStreamURL(protocol="hls")
    r = requests.get(start_url, timeout=30)
    if r.status_code != 200:
        fail(f"transcode start answered {r.status_code}")
    variants = media_playlist_entries(r.text)
    if not variants:
        fail(f"no variant in the master playlist: {r.text!r}")
    variant_url = urljoin(start_url, variants[0])
    if "X-Plex-Token" in variant_url:
        fail(f"the variant URL carries a token: {variant_url}")
    session_id = variant_url.split("/session/", 1)[1].split("/", 1)[0]
    r = requests.get(variant_url, timeout=30)
    if r.status_code != 200:
        fail(f"variant playlist {variant_url} answered {r.status_code}")
    segments = media_playlist_entries(r.text)
    if not segments:
        fail(f"no segment in {variant_url}: {r.text!r}")
    segment_url = urljoin(variant_url, segments[0])
    r = requests.get(segment_url, headers={"Range": "bytes=0-99"}, timeout=30)
    segment_ok = r.status_code == 206 and list(r.content) == [pattern_byte(i) for i in range(100)]

    # A transient token: a PMS mints one for anyone; a gateway lets only the server's owner.
    minted = {}
    transient_status = status_of(lambda: minted.setdefault("token", server.createToken()))
    transient = minted.get("token")

    got_message = threading.Event()
    alert = {}

    def on_alert(data):
        if not got_message.is_set():
            alert["type"] = data.get("type")
            got_message.set()

    listener = server.startAlertListener(callback=on_alert)
    alert_connected = got_message.wait(10)

    emit({
        "phase": 1,
        "machine_id": server.machineIdentifier,
        "friendly_name": server.friendlyName,
        "sections": [s.title for s in sections],
        "movies": [m.title for m in movies],
        "metadata_title": movie.title,
        "part_key": part_key,
        "range_status": 206,
        "range_len": len(body),
        "range_ok": range_ok,
        "transcode_session": session_id,
        "segment_url": segment_url,
        "segment_status": r.status_code,
        "segment_ok": segment_ok,
        "transient_token": transient,
        "transient_status": transient_status,
        "alert_connected": alert_connected,
        "alert_type": alert.get("type"),
    })

    sys.stdin.readline()

    root_status = status_of(lambda: server.query("/"))
    segment_status = requests.get(segment_url, headers={"Range": "bytes=0-99"}, timeout=30).status_code
    listener.join(3)
    socket_closed = not listener.is_alive()
    if not socket_closed:
        try:
            listener.stop()
        except Exception:  # noqa: BLE001 - stopping a half-dead listener may fail in many ways
            pass
    emit({"phase": 2, "root_status": root_status, "segment_status": segment_status, "socket_closed": socket_closed})


class RewritingSession(requests.Session):
    """Sends plexapi's hard-coded plex.tv URLs to the stand-in."""

    def __init__(self, base):
        super().__init__()
        self._base = base.rstrip("/")

    def request(self, method, url, *args, **kwargs):
        for prefix in ("https://plex.tv", "https://clients.plex.tv"):
            if url.startswith(prefix):
                url = self._base + url[len(prefix):]
                break
        return super().request(method, url, *args, **kwargs)


def device_list(account):
    return [
        {"id": d.id, "name": d.name, "clientIdentifier": d.clientIdentifier, "product": d.product, "token": d.token}
        for d in account.devices()
    ]


def plextv(base, token, delete_client_id):
    session = RewritingSession(base)
    try:
        account = MyPlexAccount(token=token, session=session, timeout=30)
    except Unauthorized as error:
        emit({"error": "Unauthorized", "message": str(error)})
        return
    devices = device_list(account)
    deleted = None
    devices_after = devices
    if delete_client_id:
        device = account.device(clientId=delete_client_id)
        device.delete()
        deleted = device.id
        devices_after = device_list(account)
    emit({
        "id": account.id,
        "uuid": account.uuid,
        "username": account.username,
        "email": account.email,
        "title": account.title,
        "auth_token": account.authToken,
        "devices": devices,
        "deleted": deleted,
        "devices_after": devices_after,
    })


def verify_jwt(base, token, client_id):
    login = MyPlexJWTLogin(
        session=RewritingSession(base),
        jwtToken=token,
        headers={"X-Plex-Client-Identifier": client_id},
    )
    import jwt  # PyJWT, which plexapi uses for this

    try:
        claims = login.decodePlexJWT()
    except jwt.InvalidTokenError as error:
        emit({"error": type(error).__name__})
        return
    emit({"claims": claims})


def main():
    args = sys.argv[1:]
    if args[:1] == ["--plextv"]:
        if len(args) < 3:
            fail("usage: plex_python.py --plextv PLEXTV_BASE TOKEN [DELETE_CLIENT_ID]")
        plextv(args[1], args[2], args[3] if len(args) > 3 else None)
    elif args[:1] == ["--verify-jwt"]:
        if len(args) != 4:
            fail("usage: plex_python.py --verify-jwt PLEXTV_BASE JWT CLIENT_ID")
        verify_jwt(args[1], args[2], args[3])
    else:
        if len(args) < 2:
            fail("usage: plex_python.py BASE TOKEN [PART_KEY]")
        pms(args[0], args[1], args[2] if len(args) > 2 else None)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - report anything, then fail
        import traceback

        traceback.print_exc()
        fail(f"{type(error).__name__}: {error}")
