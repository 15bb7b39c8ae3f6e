/**
 * The server's long-term Ed25519 identity: a PKCS#8 PEM file, created with mode 0600 on first
 * start when absent. Only the 32-byte seed leaves this module, to the crypto backend; the
 * fingerprint (hex SHA-256 of the public key) is what clients pin.
 */
import { createPrivateKey, randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { type CryptoBackend, type Ed25519Identity, fingerprint } from '../protocol/index.ts';

const ED25519_PKCS8 = Buffer.from('302e020100300506032b657004220420', 'hex');

export interface ServerIdentity {
  identity: Ed25519Identity;
  fingerprint: string;
  created: boolean;
  /** Set when the file is readable by group or others. */
  modeWarning?: string;
}

function seedToPem(seed: Buffer): string {
  const der = Buffer.concat([ED25519_PKCS8, seed]);
  return `-----BEGIN PRIVATE KEY-----\n${der.toString('base64')}\n-----END PRIVATE KEY-----\n`;
}

function pemToSeed(pem: string, path: string): Buffer {
  let der: Buffer;
  try {
    der = createPrivateKey({ key: pem, format: 'pem' }).export({ format: 'der', type: 'pkcs8' }) as Buffer;
  } catch (e) {
    throw new Error(`identity file ${path} is not a PKCS#8 PEM private key: ${(e as Error).message}`);
  }
  if (der.length !== 48 || !der.subarray(0, 16).equals(ED25519_PKCS8)) {
    throw new Error(`identity file ${path} does not hold an Ed25519 key`);
  }
  return der.subarray(16);
}

export function loadServerIdentity(backend: CryptoBackend, path: string): ServerIdentity {
  let pem: string;
  let created = false;
  try {
    pem = readFileSync(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
    pem = seedToPem(randomBytes(32));
    try {
      writeFileSync(path, pem, { mode: 0o600, flag: 'wx' });
      created = true;
    } catch (we) {
      // Another process created it first: use theirs.
      if ((we as NodeJS.ErrnoException).code !== 'EEXIST') throw we;
      pem = readFileSync(path, 'utf8');
    }
  }
  const identity = backend.ed25519Identity(pemToSeed(pem, path));
  const mode = statSync(path).mode & 0o777;
  return {
    identity,
    fingerprint: fingerprint(backend, identity.publicKey),
    created,
    ...(mode & 0o077 ? { modeWarning: `identity file ${path} has mode ${mode.toString(8)}; use 600` } : {}),
  };
}
