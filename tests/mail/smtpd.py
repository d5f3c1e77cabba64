#!/usr/bin/env python3
"""A real SMTP server for the mail tests: PyPI aiosmtpd (installed by tests/mail/install.sh),
started by tests/it/smtpd.rs on a loopback port.

Every message accepted is written to --dir as one JSON file, NNNNNNNN.json in arrival order
(written under a temporary name, then renamed: a reader never sees half a file), holding the
envelope (`mail_from`, `rcpt_tos`), the raw message (`data`, UTF-8 with replacement), whether
the connection was encrypted (`tls`) and who authenticated (`auth`, or null).

Options:
  --port N --dir PATH        where to listen (127.0.0.1) and where to write messages
  --starttls CERT KEY        offer STARTTLS with this certificate and key (PEM)
  --require-starttls         refuse everything but EHLO/HELO/NOOP/RSET/QUIT before STARTTLS
  --tls CERT KEY             implicit TLS (SMTPS) from the first byte instead
  --auth USER PASSWORD       require AUTH (PLAIN or LOGIN) with these credentials
  --reject-from ADDRESS      answer 550 to MAIL FROM:<ADDRESS> (case-insensitive)
  --tempfail N               answer 451 to the first N DATA commands; the count is kept in
                             --dir, so a restarted server does not fail them again

Prints READY on stdout once it listens; exits with status 0 on SIGTERM or SIGINT.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

TEMPFAIL_STATE = ".tempfails"


class Handler:
    def __init__(self, directory, reject_from, tempfail):
        self.directory = directory
        self.reject_from = reject_from.lower() if reject_from else None
        self.tempfail = tempfail
        names = [n for n in os.listdir(directory) if n.endswith(".json") and not n.startswith(".")]
        self.next = max((int(n[:-5]) for n in names if n[:-5].isdigit()), default=0) + 1

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.reject_from is not None and address.lower() == self.reject_from:
            return "550 5.7.1 Sender refused by the test server"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.tempfail > 0:
            state = os.path.join(self.directory, TEMPFAIL_STATE)
            try:
                with open(state, encoding="ascii") as f:
                    given = int(f.read().strip() or "0")
            except FileNotFoundError:
                given = 0
            if given < self.tempfail:
                write_atomically(state, str(given + 1))
                return "451 4.3.0 Temporary failure, try again later"
        data = envelope.original_content or b""
        login = getattr(session.auth_data, "login", None)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "data": data.decode("utf-8", errors="replace"),
            "tls": server.transport is not None
            and server.transport.get_extra_info("ssl_object") is not None,
            "auth": login.decode("utf-8", errors="replace") if login is not None else None,
        }
        name = f"{self.next:08d}.json"
        self.next += 1
        write_atomically(os.path.join(self.directory, name), json.dumps(record))
        return "250 2.0.0 Message accepted for delivery"


def write_atomically(path, text):
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def tls_context(cert, key):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def authenticator(user, password):
    def check(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    return check


async def serve(args):
    os.makedirs(args.dir, exist_ok=True)
    handler = Handler(args.dir, args.reject_from, args.tempfail)
    smtp_kwargs = {
        # A fixed name: the default, socket.getfqdn(), may wait on DNS.
        "hostname": "localhost",
        "ident": "Portcullis test SMTP (aiosmtpd)",
    }
    if args.starttls:
        smtp_kwargs["tls_context"] = tls_context(*args.starttls)
        smtp_kwargs["require_starttls"] = args.require_starttls
    if args.auth:
        smtp_kwargs["authenticator"] = authenticator(*args.auth)
        smtp_kwargs["auth_required"] = True
        # aiosmtpd counts only STARTTLS as encryption (behind --tls it would answer AUTH with
        # 538 and not even offer it): AUTH must follow STARTTLS where STARTTLS is offered, and
        # is allowed as it is otherwise (implicit TLS, or plain on loopback).
        smtp_kwargs["auth_require_tls"] = bool(args.starttls)
    implicit = tls_context(*args.tls) if args.tls else None

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: SMTP(handler, **smtp_kwargs),
        host="127.0.0.1",
        port=args.port,
        ssl=implicit,
    )
    print("READY", flush=True)
    await stop.wait()
    server.close()
    # Open sessions are not waited for: wait_closed() would (Python 3.12 and later).


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--starttls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--require-starttls", action="store_true")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--auth", nargs=2, metavar=("USER", "PASSWORD"))
    parser.add_argument("--reject-from", metavar="ADDRESS")
    parser.add_argument("--tempfail", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.starttls and args.tls:
        parser.error("--starttls and --tls exclude each other")
    if args.require_starttls and not args.starttls:
        parser.error("--require-starttls needs --starttls")
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        asyncio.run(serve(args))
    except OSError as e:
        # e.g. the port was taken between the harness picking it and this server binding it.
        print(f"smtpd: cannot listen on 127.0.0.1:{args.port}: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
