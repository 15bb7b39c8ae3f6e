/**
 * A JSON `POST` for the load benches' back ends: node:http on a keep-alive agent, not `fetch`.
 * In bench:delivery, `fetch` (undici) kept ~1.2 MB of the bench process's young objects alive
 * across each of its young-generation collections during the gateway's fixed-rate row, which
 * made them 3-11 ms long against 1-2 ms in Mosquitto's row (`--trace-gc-nvp`); with node:http,
 * 1-3 ms. Those pauses stop the devices the bench runs too, so they were charged to the
 * gateway's latency (bench/RESULTS.md).
 */
import http from 'node:http';

const agent = new http.Agent({ keepAlive: true });

/** Posts `body` (JSON text) with a bearer token; resolves with the status and the parsed answer. */
export function postJson(
  url: string,
  body: string,
  bearer: string,
): Promise<{ status: number; body: unknown }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      url,
      {
        method: 'POST',
        agent,
        headers: {
          authorization: `Bearer ${bearer}`,
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(body),
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          try {
            resolve({
              status: res.statusCode ?? 0,
              body: JSON.parse(Buffer.concat(chunks).toString('utf8')),
            });
          } catch (e) {
            reject(e);
          }
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}
