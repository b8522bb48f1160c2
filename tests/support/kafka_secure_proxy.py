"""A secured Kafka listener in front of a plaintext broker (librdkafka's mock cluster).

The mock cluster speaks neither TLS nor SASL. This proxy adds both, as a managed Kafka's
listener does: it terminates TLS (Python's ssl module, a certificate from the test's CA)
and authenticates each connection with SASL before anything else reaches the broker:

- the client's ApiVersions request goes to the broker, and the answer gets SaslHandshake
  (key 17, v0-1) and SaslAuthenticate (key 36, v0-1) added, which the mock lacks;
- SaslHandshake and SaslAuthenticate are answered here: PLAIN, SCRAM-SHA-256 and
  SCRAM-SHA-512 (server side by `scramp`, PyPI's RFC 5802/7677 implementation, so the
  client is checked against an implementation that is not ours), OAUTHBEARER (RFC 7628
  client response; the token's shape is checked, not its signature);
- any other request before authentication closes the connection, as a broker does;
- once authenticated, bytes are copied both ways untouched.

Usage: kafka_secure_proxy.py --upstream HOST:PORT [--tls-cert F --tls-key F]
       [--mechanism M --username U --password P]
Prints "LISTENING <port>" when ready, then one line per connection outcome
("AUTH OK <mechanism> <user>", "AUTH FAILED <mechanism> <why>", "AUTH ABANDONED
<mechanism> <why>" when the client hung up mid-exchange, "TLS FAILED <why>").
"""

import argparse
import asyncio
import ssl
import struct
import sys

import scramp

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 33, 34, 58


def say(line):
    print(line, flush=True)


async def read_frame(reader):
    size = struct.unpack(">i", await reader.readexactly(4))[0]
    return await reader.readexactly(size)


def frame(body):
    return struct.pack(">i", len(body)) + body


def uvarint(data, at):
    value, shift = 0, 0
    while True:
        b = data[at]
        at += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, at
        shift += 7


def put_uvarint(value):
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def request_header(data):
    """api key, version, correlation id, and where the body starts (header v1 or v2)."""
    key, version, correlation = struct.unpack(">hhi", data[:8])
    client_id_len = struct.unpack(">h", data[8:10])[0]
    at = 10 + max(client_id_len, 0)
    flexible = (key == API_VERSIONS and version >= 3) or (key == SASL_AUTHENTICATE and version >= 2)
    if flexible:
        tags, at = uvarint(data, at)
        assert tags == 0, "tagged fields in the request header"
    return key, version, correlation, at


def add_sasl_apis(version, body):
    """The broker's ApiVersions answer (after the correlation id), with the SASL APIs."""
    extra = [(SASL_HANDSHAKE, 0, 1), (SASL_AUTHENTICATE, 0, 1)]
    error = body[:2]
    if version >= 3:
        count, at = uvarint(body, 2)
        entries = []
        for _ in range(count - 1):
            key, lo, hi = struct.unpack(">hhh", body[at : at + 6])
            tags, at2 = uvarint(body, at + 6)
            assert tags == 0
            entries.append((key, lo, hi))
            at = at2
        rest = body[at:]
        entries = [e for e in entries if e[0] not in (SASL_HANDSHAKE, SASL_AUTHENTICATE)] + extra
        out = error + put_uvarint(len(entries) + 1)
        for key, lo, hi in entries:
            out += struct.pack(">hhh", key, lo, hi) + b"\x00"
        return out + rest
    count = struct.unpack(">i", body[2:6])[0]
    at = 6
    entries = []
    for _ in range(count):
        entries.append(struct.unpack(">hhh", body[at : at + 6]))
        at += 6
    entries = [e for e in entries if e[0] not in (SASL_HANDSHAKE, SASL_AUTHENTICATE)] + extra
    out = error + struct.pack(">i", len(entries))
    for key, lo, hi in entries:
        out += struct.pack(">hhh", key, lo, hi)
    return out + body[at:]


class Authenticator:
    def __init__(self, mechanism, username, password):
        self.mechanism = mechanism
        self.username = username
        self.password = password
        self.scram = None
        if mechanism.startswith("SCRAM-"):
            m = scramp.ScramMechanism(mechanism)
            info = m.make_auth_info(password, iteration_count=4096)

            def lookup(user):
                if user != username:
                    raise scramp.ScramException(f"unknown user {user!r}")
                return info

            self.scram = m.make_server(lookup)
        self.step = 0

    def respond(self, token):
        """(done, answer bytes); raises ValueError when authentication fails."""
        if self.mechanism == "PLAIN":
            parts = token.split(b"\x00")
            if len(parts) != 3 or parts[1].decode() != self.username or parts[2].decode() != self.password:
                raise ValueError("wrong PLAIN credentials")
            return True, b""
        if self.mechanism == "OAUTHBEARER":
            text = token.decode("utf-8", "replace")
            if not text.startswith("n,") or "\x01auth=Bearer " not in text:
                raise ValueError("not an RFC 7628 client response")
            jwt = text.split("\x01auth=Bearer ", 1)[1].split("\x01", 1)[0]
            if jwt.count(".") != 2:
                raise ValueError("the bearer token is not a JWT")
            return True, b""
        try:
            if self.step == 0:
                self.step = 1
                self.scram.set_client_first(token.decode())
                return False, self.scram.get_server_first().encode()
            self.scram.set_client_final(token.decode())
            return True, self.scram.get_server_final().encode()
        except scramp.ScramException as e:
            raise ValueError(str(e)) from e


async def authenticate(reader, writer, upstream_reader, upstream_writer, args):
    """Runs the SASL exchange; True once authenticated."""
    auth = None
    while True:
        data = await read_frame(reader)
        key, version, correlation, at = request_header(data)
        head = struct.pack(">i", correlation)
        if key == API_VERSIONS:
            upstream_writer.write(frame(data))
            await upstream_writer.drain()
            answer = await read_frame(upstream_reader)
            writer.write(frame(answer[:4] + add_sasl_apis(version, answer[4:])))
        elif key == SASL_HANDSHAKE:
            length = struct.unpack(">h", data[at : at + 2])[0]
            mechanism = data[at + 2 : at + 2 + length].decode()
            error = 0 if mechanism == args.mechanism else UNSUPPORTED_SASL_MECHANISM
            body = struct.pack(">hi", error, 1) + struct.pack(">h", len(args.mechanism)) + args.mechanism.encode()
            writer.write(frame(head + body))
            if error:
                say(f"AUTH FAILED {mechanism} mechanism not enabled")
                await writer.drain()
                return False
            auth = Authenticator(args.mechanism, args.username, args.password)
        elif key == SASL_AUTHENTICATE and auth is not None and version <= 1:
            length = struct.unpack(">i", data[at : at + 4])[0]
            token = data[at + 4 : at + 4 + length]
            session = struct.pack(">q", 0) if version >= 1 else b""
            try:
                done, answer = auth.respond(token)
            except ValueError as e:
                message = f"Authentication failed: {e}".encode()
                body = struct.pack(">h", SASL_AUTHENTICATION_FAILED) + struct.pack(">h", len(message)) + message
                writer.write(frame(head + body + struct.pack(">i", 0) + session))
                await writer.drain()
                say(f"AUTH FAILED {args.mechanism} {e}")
                return False
            body = struct.pack(">h", 0) + struct.pack(">h", -1) + struct.pack(">i", len(answer)) + answer + session
            writer.write(frame(head + body))
            if done:
                await writer.drain()
                say(f"AUTH OK {args.mechanism} {args.username}")
                return True
        else:
            say(f"AUTH FAILED {args.mechanism} request {key} v{version} before authentication")
            return False
        await writer.drain()


async def pipe(reader, writer):
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve_connection(reader, writer, args):
    host, port = args.upstream.rsplit(":", 1)
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
    except OSError:
        writer.close()
        return
    try:
        if args.mechanism and not await authenticate(reader, writer, upstream_reader, upstream_writer, args):
            writer.close()
            upstream_writer.close()
            return
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        # The client hung up before the exchange ended (a producer dropped while one of
        # its connections was still authenticating): nothing was refused.
        say(f"AUTH ABANDONED {args.mechanism} {type(e).__name__}")
        writer.close()
        upstream_writer.close()
        return
    except (struct.error, UnicodeDecodeError, AssertionError) as e:
        say(f"AUTH FAILED {args.mechanism} {type(e).__name__}")
        writer.close()
        upstream_writer.close()
        return
    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--mechanism")
    parser.add_argument("--username", default="")
    parser.add_argument("--password", default="")
    args = parser.parse_args()
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(args.tls_cert, args.tls_key)
    server = await asyncio.start_server(
        lambda r, w: serve_connection(r, w, args), "127.0.0.1", 0, ssl=context, ssl_handshake_timeout=10
    )
    say(f"LISTENING {server.sockets[0].getsockname()[1]}")
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: say(f"TLS FAILED {ctx.get('message')}: {ctx.get('exception')!r}"))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
