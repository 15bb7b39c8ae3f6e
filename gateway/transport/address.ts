/** A peer's address as the gateway writes it in logs, limits and the sessions list. */

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
