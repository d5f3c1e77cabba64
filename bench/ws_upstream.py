#!/usr/bin/env python3
"""A WebSocket upstream for bench/idle.sh: answers every upgrade with 101 and holds the
connection open (no frames), until the peer closes it. Plain GETs get a 1 KiB body.

    python3 bench/ws_upstream.py PORT
"""
import asyncio
import base64
import hashlib
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            key = None
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"sec-websocket-key:"):
                    key = line.split(b":", 1)[1].strip()
            if key is None:
                body = b"x" * 1024
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + body)
                await writer.drain()
                continue
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            await writer.drain()
            while await reader.read(65536):
                pass
            break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with server:
        await server.serve_forever()


asyncio.run(main())
