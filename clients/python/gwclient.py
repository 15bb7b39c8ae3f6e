#!/usr/bin/env python3
"""A minimal device client written from docs/PROTOCOL.md alone: TCP framing, the signed
X25519 handshake, HKDF-SHA256 keys, AES-256-GCM sealed frames with counter IVs.

Needs only the standard library, `cryptography` and `msgpack` (Debian: python3-cryptography,
python3-msgpack).

    python3 gwclient.py HOST PORT [--pin FINGERPRINT]     talk to a gateway
    python3 gwclient.py --vectors docs/test-vectors.json  check the crypto against the vectors

Prints one JSON line per step; exits 0 when every step succeeded.
"""
import argparse
import hashlib
import json
import os
import socket
import struct
import sys
import time

import msgpack
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def step(name, **fields):
    print(json.dumps({"step": name, **fields}, default=str), flush=True)


def raw_public(private_key):
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def transcript(cpub, cnonce, spub, snonce):
    return b"gw1" + cpub + cnonce + spub + snonce


def derive_keys(shared, cnonce, snonce, t):
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=cnonce + snonce,
        info=b"gw1 keys" + hashlib.sha256(t).digest(),
    ).derive(shared)
    return okm[:32], okm[32:]


def iv_for(counter):
    return b"\x00\x00\x00\x00" + struct.pack(">Q", counter)


class Channel:
    """PROTOCOL.md section 3: one key per direction, counters from 0, strict next counter."""

    def __init__(self, send_key, recv_key):
        self.send, self.recv = AESGCM(send_key), AESGCM(recv_key)
        self.send_counter = self.recv_counter = 0

    def seal(self, message):
        iv = iv_for(self.send_counter)
        self.send_counter += 1
        return iv + self.send.encrypt(iv, msgpack.packb(message, use_bin_type=True), None)

    def open(self, body):
        if body[:12] != iv_for(self.recv_counter):
            raise ValueError("decrypt_failed: unexpected counter")
        plain = self.recv.decrypt(body[:12], body[12:], None)
        self.recv_counter += 1
        return msgpack.unpackb(plain, raw=False)


class Wire:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""

    def send(self, body):
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def recv(self):
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    return body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buf += chunk


def talk(host, port, pin):
    wire = Wire(host, port)
    eph = X25519PrivateKey.generate()
    cpub, cnonce = raw_public(eph), os.urandom(16)
    wire.send(msgpack.packb({"type": "hello", "v": 1, "pub": cpub, "nonce": cnonce, "client": "gwclient.py/1"}, use_bin_type=True))
    welcome = msgpack.unpackb(wire.recv(), raw=False)
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {welcome}")
    t = transcript(cpub, cnonce, welcome["pub"], welcome["nonce"])
    Ed25519PublicKey.from_public_bytes(welcome["key"]).verify(welcome["sig"], t)  # raises if forged
    fingerprint = hashlib.sha256(welcome["key"]).hexdigest()
    if pin and fingerprint != pin.lower():
        raise RuntimeError("server identity does not match the pinned fingerprint")
    shared = eph.exchange(X25519PublicKey.from_public_bytes(welcome["pub"]))
    if shared == bytes(32):
        raise RuntimeError("all-zero shared secret")
    k_c2s, k_s2c = derive_keys(shared, cnonce, welcome["nonce"], t)
    ch = Channel(k_c2s, k_s2c)
    step("handshake", node=welcome["node"], hb=welcome["hb"], max=welcome["max"], fingerprint=fingerprint, pinned=bool(pin))

    def request(message):
        wire.send(ch.seal(message))
        while True:
            m = ch.open(wire.recv())
            if m["type"] == "ping":  # the server's heartbeat: answer it
                wire.send(ch.seal({"type": "pong", "ts": m["ts"]}))
                step("answered server ping", ts=m["ts"])
                continue
            return m

    ts = int(time.time() * 1000)
    pong = request({"type": "ping", "ts": ts})
    if pong != {"type": "pong", "ts": ts}:
        raise RuntimeError(f"bad pong {pong}")
    step("ping", pong_ts=pong["ts"])
    reply = request({"type": "rooms", "id": 1})
    step("rooms before login", reply=reply)
    if reply.get("type") != "error" or reply.get("code") != "unauthenticated" or reply.get("id") != 1:
        raise RuntimeError("expected unauthenticated")
    bye = request({"type": "bye", "id": 2})
    if bye != {"type": "ok", "id": 2, "data": {}}:
        raise RuntimeError(f"bad bye answer {bye}")
    step("bye", reply=bye)


def check_vectors(path):
    v = json.load(open(path))
    h = v["handshake"]
    x = bytes.fromhex
    eph = X25519PrivateKey.from_private_bytes(x(h["client_x25519_private"]))
    assert raw_public(eph).hex() == h["client_pub"]
    t = transcript(x(h["client_pub"]), x(h["client_nonce"]), x(h["server_pub"]), x(h["server_nonce"]))
    assert t.hex() == h["transcript"]
    Ed25519PublicKey.from_public_bytes(x(h["identity_key"])).verify(x(h["sig"]), t)
    assert hashlib.sha256(x(h["identity_key"])).hexdigest() == h["fingerprint"]
    shared = eph.exchange(X25519PublicKey.from_public_bytes(x(h["server_pub"])))
    assert shared.hex() == h["shared_secret"]
    k_c2s, k_s2c = derive_keys(shared, x(h["client_nonce"]), x(h["server_nonce"]), t)
    assert (k_c2s.hex(), k_s2c.hex()) == (h["k_c2s"], h["k_s2c"])
    step("vectors handshake", ok=True)
    client, server = Channel(k_c2s, k_s2c), Channel(k_s2c, k_c2s)
    for f in v["frames"]:
        sender, receiver = (client, server) if f["direction"] == "c2s" else (server, client)
        iv = iv_for(sender.send_counter)
        body = iv + sender.send.encrypt(iv, x(f["plaintext"]), None)
        sender.send_counter += 1
        assert body.hex() == f["body"], f
        assert receiver.open(body) == f["message"]
    step("vectors frames", ok=True, frames=len(v["frames"]))
    for f in v["must_fail"]:
        receiver = Channel(k_s2c, k_c2s)
        receiver.recv_counter = f["counter"]
        try:
            receiver.open(x(f["body"]))
        except Exception:
            continue
        raise AssertionError(f"accepted a frame that must fail: {f['why']}")
    step("vectors must_fail", ok=True, frames=len(v["must_fail"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("host", nargs="?")
    p.add_argument("port", nargs="?", type=int)
    p.add_argument("--pin")
    p.add_argument("--vectors")
    a = p.parse_args()
    try:
        if a.vectors:
            check_vectors(a.vectors)
        elif a.host and a.port:
            talk(a.host, a.port, a.pin)
        else:
            p.error("give HOST PORT or --vectors FILE")
    except Exception as e:  # one line, non-zero exit
        step("failed", error=f"{type(e).__name__}: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
