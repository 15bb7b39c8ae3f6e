/**
 * Access tokens: short-lived JWTs signed EdDSA (Ed25519) with jose, claims `sub` (user id),
 * `sid` (session id), `iss`, `aud`, `iat`, `exp`, header `kid`. The signing key is a PKCS#8
 * PEM file created with mode 0600 when absent; other services verify offline with the JWKS.
 * Refresh tokens: 32 random bytes (base64url), stored only as their SHA-256.
 * `sealWithToken`/`openWithToken` keep a value in Redis that only the holder of a refresh token
 * can read (the successor pair of the refresh grace period): AES-256-GCM under a key derived
 * with HKDF-SHA256 from the token, which Redis never sees.
 */
import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  hkdfSync,
  type KeyObject,
  randomBytes,
} from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { errors, exportJWK, type JWK, jwtVerify, SignJWT } from 'jose';
import { ProtocolError } from '../../protocol/index.ts';

export interface TokenOptions {
  keyFile: string;
  issuer: string;
  audience: string;
  accessTtlSeconds: number;
}

export interface AccessClaims {
  userId: string;
  sessionId: string;
  expiresAt: number;
}

function loadOrCreateKey(path: string): KeyObject {
  try {
    return createPrivateKey(readFileSync(path, 'utf8'));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  const { privateKey } = generateKeyPairSync('ed25519');
  const pem = privateKey.export({ format: 'pem', type: 'pkcs8' }) as string;
  try {
    writeFileSync(path, pem, { mode: 0o600, flag: 'wx' });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    return createPrivateKey(readFileSync(path, 'utf8'));
  }
  return privateKey;
}

export class Tokens {
  private readonly privateKey: KeyObject;
  private readonly publicKey: KeyObject;
  readonly kid: string;
  private jwk: JWK | undefined;

  constructor(private readonly o: TokenOptions) {
    this.privateKey = loadOrCreateKey(o.keyFile);
    if (this.privateKey.asymmetricKeyType !== 'ed25519')
      throw new Error(`${o.keyFile} is not an Ed25519 key`);
    this.publicKey = createPublicKey(this.privateKey);
    const spki = this.publicKey.export({ format: 'der', type: 'spki' });
    this.kid = createHash('sha256').update(spki).digest('base64url').slice(0, 16);
  }

  async init(): Promise<void> {
    this.jwk = { ...(await exportJWK(this.publicKey)), kid: this.kid, alg: 'EdDSA', use: 'sig' };
  }

  jwks(): { keys: JWK[] } {
    return { keys: this.jwk ? [this.jwk] : [] };
  }

  async issue(userId: string, sessionId: string): Promise<{ token: string; expiresAt: number }> {
    const now = Math.floor(Date.now() / 1000);
    const exp = now + this.o.accessTtlSeconds;
    const token = await new SignJWT({ sid: sessionId })
      .setProtectedHeader({ alg: 'EdDSA', kid: this.kid, typ: 'JWT' })
      .setSubject(userId)
      .setIssuer(this.o.issuer)
      .setAudience(this.o.audience)
      .setIssuedAt(now)
      .setExpirationTime(exp)
      .sign(this.privateKey);
    return { token, expiresAt: exp * 1000 };
  }

  /**
   * Checks signature, issuer, audience and expiry. `token_expired` or `token_invalid`.
   * With `ignoreExpiry` (logout of an expired token) only the expiry is not enforced.
   */
  async verify(token: string, ignoreExpiry = false): Promise<AccessClaims> {
    try {
      const { payload } = await jwtVerify(token, this.publicKey, {
        issuer: this.o.issuer,
        audience: this.o.audience,
        algorithms: ['EdDSA'],
        ...(ignoreExpiry ? { clockTolerance: 10 * 365 * 86400 } : {}),
      });
      if (
        typeof payload.sub !== 'string' ||
        typeof payload.sid !== 'string' ||
        typeof payload.exp !== 'number'
      ) {
        throw new ProtocolError('token_invalid');
      }
      return { userId: payload.sub, sessionId: payload.sid, expiresAt: payload.exp * 1000 };
    } catch (e) {
      if (e instanceof ProtocolError) throw e;
      if (e instanceof errors.JWTExpired) throw new ProtocolError('token_expired');
      throw new ProtocolError('token_invalid');
    }
  }
}

export function newRefreshToken(): string {
  return randomBytes(32).toString('base64url');
}

export function hashToken(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}

const SEAL_INFO = Buffer.from('gw refresh grace v1');

function sealKey(token: string): Buffer {
  return Buffer.from(hkdfSync('sha256', Buffer.from(token, 'utf8'), Buffer.alloc(0), SEAL_INFO, 32));
}

/** Encrypts a JSON value under a key derived from `token`: base64url of iv(12) ‖ ciphertext ‖ tag(16). */
export function sealWithToken(token: string, value: unknown): string {
  const iv = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', sealKey(token), iv);
  const body = Buffer.concat([c.update(JSON.stringify(value), 'utf8'), c.final()]);
  return Buffer.concat([iv, body, c.getAuthTag()]).toString('base64url');
}

/** The value sealed by `sealWithToken` with the same token, or null if it does not open. */
export function openWithToken<T>(token: string, sealed: string): T | null {
  try {
    const raw = Buffer.from(sealed, 'base64url');
    if (raw.length < 28) return null;
    const d = createDecipheriv('aes-256-gcm', sealKey(token), raw.subarray(0, 12));
    d.setAuthTag(raw.subarray(raw.length - 16));
    const text = Buffer.concat([d.update(raw.subarray(12, raw.length - 16)), d.final()]).toString('utf8');
    return JSON.parse(text) as T;
  } catch {
    return null;
  }
}
