/** A peer's address as the gateway writes it in logs, limits and the sessions list. */
import { isIP } from 'node:net';

/**
 * The peer's address from uWS's binary form (4 or 16 bytes), written as the TCP transport
 * writes it: dotted for IPv4 and for an IPv4 client of a dual-stack (`::`) listener, the
 * canonical compressed form for IPv6 (`::1`). One client is then one address for
 * `GW_MAX_CONN_PER_IP`, the logs and the sessions list, whichever transport it uses.
 */
export function remoteIp(buf: ArrayBuffer): string {
  const b = new Uint8Array(buf);
  if (b.length === 4) return b.join('.');
  if (b.length !== 16) return '';
  if (b.subarray(0, 10).every((x) => x === 0) && b[10] === 0xff && b[11] === 0xff)
    return b.subarray(12).join('.');
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((b[i] << 8) | b[i + 1]).toString(16));
  // WHATWG URL serialises an IPv6 host in its canonical compressed form (RFC 5952).
  return new URL(`http://[${groups.join(':')}]/`).hostname.slice(1, -1);
}

/** An address as written in `X-Forwarded-For`, in the form `remoteIp` gives; null if it is none. */
function plainAddress(raw: string): string | null {
  const v = raw.trim();
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(v);
  if (mapped) return mapped[1];
  if (isIP(v) === 4) return v;
  if (isIP(v) === 6) return new URL(`http://[${v}]/`).hostname.slice(1, -1);
  return null;
}

/**
 * The client's address behind trusted proxies: for a peer that is one of `trusted`, the
 * nearest address of `X-Forwarded-For` (read from the right) that is not itself trusted; the
 * peer itself when it is not trusted, when the header is absent, or when an entry is not an
 * address (a forged or broken header is not believed past that point).
 */
export function clientIp(
  peer: string,
  forwardedFor: string | undefined,
  trusted: ReadonlySet<string>,
): string {
  if (!forwardedFor || !trusted.has(peer)) return peer;
  const hops = forwardedFor.split(',');
  let ip = peer;
  for (let i = hops.length - 1; i >= 0; i--) {
    const hop = plainAddress(hops[i]);
    if (hop === null) return ip;
    ip = hop;
    if (!trusted.has(hop)) return hop;
  }
  return ip;
}
