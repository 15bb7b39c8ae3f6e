/**
 * What a session shows about where it comes from, worked out once when it starts: device info
 * from the User-Agent when the client named no device (ua-parser-js), and a location that is
 * never looked up over the network: `Local` for loopback and private addresses, else from a
 * MaxMind-format database on disk (GW_GEOIP_DB, e.g. GeoLite2-City.mmdb), else none.
 */
import { BlockList, isIPv4, isIPv6 } from 'node:net';
import maxmind, { type CityResponse, type Reader } from 'maxmind';
import { UAParser } from 'ua-parser-js';

/** What the session list shows of a client that named no device. */
export interface DeviceInfo {
  /** A short label, e.g. `Firefox 121 on Ubuntu`, `Mobile Safari 17 on iOS 17.2 (iPhone)`. */
  name: string;
  browser: string | null;
  os: string | null;
  /** ua-parser-js's device type (`mobile`, `tablet`, ...), `desktop` (a browser without one), or `unknown`. */
  type: string;
  vendor: string | null;
  model: string | null;
}

/** Device info from a User-Agent header; null for none or an empty one. */
export function deviceInfoFromUserAgent(ua: string | undefined): DeviceInfo | null {
  if (!ua?.trim()) return null;
  const r = new UAParser(ua.slice(0, 512)).getResult();
  const major = (v?: string) => v?.split('.')[0];
  const browser = r.browser.name
    ? [r.browser.name, major(r.browser.version)].filter(Boolean).join(' ')
    : null;
  const os = r.os.name ? [r.os.name, r.os.version].filter(Boolean).join(' ') : null;
  const model = r.device.model ?? null;
  const name =
    [browser, os && `on ${os}`, model && `(${model})`].filter(Boolean).join(' ') || ua.slice(0, 64).trim();
  return {
    name,
    browser,
    os,
    // ua-parser-js names a type for mobiles, tablets, TVs...; a known browser without one is
    // a desktop; anything else (a device's own client, a tool) is unknown.
    type: r.device.type ?? (r.browser.name ? 'desktop' : 'unknown'),
    vendor: r.device.vendor ?? null,
    model,
  };
}

/** Loopback, private, link-local and shared (CGNAT) ranges: shown as `Local`. */
const LOCAL = new BlockList();
for (const [net, len] of [
  ['127.0.0.0', 8],
  ['10.0.0.0', 8],
  ['172.16.0.0', 12],
  ['192.168.0.0', 16],
  ['169.254.0.0', 16],
  ['100.64.0.0', 10],
  ['0.0.0.0', 8],
] as const)
  LOCAL.addSubnet(net, len, 'ipv4');
for (const [net, len] of [
  ['::1', 128],
  ['::', 128],
  ['fc00::', 7],
  ['fe80::', 10],
] as const)
  LOCAL.addSubnet(net, len, 'ipv6');

export function isLocalAddress(ip: string): boolean {
  if (isIPv4(ip)) return LOCAL.check(ip, 'ipv4');
  if (isIPv6(ip)) {
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
    return mapped ? LOCAL.check(mapped[1], 'ipv4') : LOCAL.check(ip, 'ipv6');
  }
  return false;
}

/** Where an address is, from the database on disk; no network lookup ever. */
export class Locator {
  private constructor(private readonly reader: Reader<CityResponse> | null) {}

  /** A locator over the MaxMind-format database at `path`, or one that knows only `Local`. */
  static async open(path: string | undefined): Promise<Locator> {
    return new Locator(path ? await maxmind.open<CityResponse>(path) : null);
  }

  /** `Local`, `City, Country`, `Country`, or null when unknown. */
  locate(ip: string): string | null {
    if (isLocalAddress(ip)) return 'Local';
    if (!this.reader || !maxmind.validate(ip)) return null;
    let r: CityResponse | null;
    try {
      r = this.reader.get(ip);
    } catch {
      return null; // e.g. an IPv6 address against an IPv4-only database
    }
    const city = r?.city?.names?.en;
    const country = r?.country?.names?.en ?? r?.registered_country?.names?.en;
    return [city, country].filter(Boolean).join(', ') || null;
  }
}
