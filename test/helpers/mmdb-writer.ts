/**
 * A minimal writer of MaxMind DB files (format 2.0, IPv4 tree, 24-bit records), enough to make
 * a GeoIP test database: no network lookup, no downloaded database. The file it writes is read
 * by the real `maxmind` reader the gateway uses, which is what the tests check.
 * Spec: https://maxmind.github.io/MaxMind-DB/
 */

type Value = string | number | bigint | boolean | Value[] | { [k: string]: Value };

function control(type: number, size: number): Buffer {
  const head: number[] = [];
  let sizeBits: number;
  const ext: number[] = [];
  if (size < 29) sizeBits = size;
  else if (size < 285) {
    sizeBits = 29;
    ext.push(size - 29);
  } else {
    sizeBits = 30;
    const s = size - 285;
    ext.push(s >> 8, s & 0xff);
  }
  if (type <= 7) head.push((type << 5) | sizeBits);
  else head.push(sizeBits, type - 7);
  return Buffer.from([...head, ...ext]);
}

function uint(type: number, v: bigint): Buffer {
  const bytes: number[] = [];
  while (v > 0n) {
    bytes.unshift(Number(v & 0xffn));
    v >>= 8n;
  }
  return Buffer.concat([control(type, bytes.length), Buffer.from(bytes)]);
}

/** Encodes a value of the data section; numbers are uint32 (uint16 and uint64 by wrapper). */
export function encode(v: Value): Buffer {
  if (typeof v === 'string') {
    const b = Buffer.from(v, 'utf8');
    return Buffer.concat([control(2, b.length), b]);
  }
  if (typeof v === 'number') return uint(6, BigInt(v));
  if (typeof v === 'bigint') return uint(9, v);
  if (typeof v === 'boolean') return control(14, v ? 1 : 0);
  if (Array.isArray(v)) return Buffer.concat([control(11, v.length), ...v.map(encode)]);
  const entries = Object.entries(v);
  return Buffer.concat([control(7, entries.length), ...entries.flatMap(([k, x]) => [encode(k), encode(x)])]);
}

interface TrieNode {
  child: [TrieNode | number | null, TrieNode | number | null];
}

/** Writes a database mapping IPv4 networks (`a.b.c.d/len`) to records. */
export function writeMmdb(
  networks: { cidr: string; record: { [k: string]: Value } }[],
  meta: { databaseType: string; description: string },
): Buffer {
  // Data section: each record once; a tree leaf holds its offset.
  const data: Buffer[] = [];
  const offsets: number[] = [];
  let at = 0;
  for (const n of networks) {
    const b = encode(n.record);
    offsets.push(at);
    data.push(b);
    at += b.length;
  }
  const root: TrieNode = { child: [null, null] };
  networks.forEach((n, i) => {
    const [addr, lenText] = n.cidr.split('/');
    const len = Number(lenText);
    const ip = addr.split('.').reduce((acc, o) => (acc << 8) | Number(o), 0) >>> 0;
    let node = root;
    for (let bit = 0; bit < len; bit++) {
      const side = (ip >>> (31 - bit)) & 1;
      if (bit === len - 1) {
        node.child[side] = -(offsets[i] + 1); // a leaf: data offset, negative to tell it apart
      } else {
        let next = node.child[side];
        if (next === null || typeof next === 'number') next = node.child[side] = { child: [null, null] };
        node = next;
      }
    }
  });
  // Number the nodes breadth first (the root is 0).
  const order: TrieNode[] = [root];
  for (let i = 0; i < order.length; i++) {
    for (const c of order[i].child) if (c !== null && typeof c !== 'number') order.push(c);
  }
  const index = new Map(order.map((n, i) => [n, i]));
  const nodeCount = order.length;
  const tree = Buffer.alloc(nodeCount * 6);
  order.forEach((n, i) => {
    n.child.forEach((c, side) => {
      let value: number;
      if (c === null)
        value = nodeCount; // no data
      else if (typeof c === 'number') value = nodeCount + 16 + (-c - 1);
      else value = index.get(c)!;
      tree.writeUIntBE(value, i * 6 + side * 3, 3);
    });
  });
  const metadata = encode({
    binary_format_major_version: 2,
    binary_format_minor_version: 0,
    build_epoch: BigInt(1764547200),
    database_type: meta.databaseType,
    description: { en: meta.description },
    ip_version: 4,
    languages: ['en'],
    node_count: nodeCount,
    record_size: 24,
  });
  return Buffer.concat([
    tree,
    Buffer.alloc(16),
    ...data,
    Buffer.from([0xab, 0xcd, 0xef]),
    Buffer.from('MaxMind.com'),
    metadata,
  ]);
}
