/** A gateway's `/metrics`, read as text and as values by series (`name{labels}`). */
import { fetchWithin, until } from './deadline.ts';

export interface Scrape {
  text: string;
  /** The series' value, 0 when the series is absent. */
  value: (series: string) => number;
}

export async function scrapeMetrics(port: number): Promise<Scrape> {
  const text = await (await fetchWithin(`http://127.0.0.1:${port}/metrics`)).text();
  const values = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    values.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return { text, value: (series) => values.get(series) ?? 0 };
}

/**
 * Waits until the gateway's hash pool holds at least `n` jobs (a login or register being
 * verified): a test's cue that a request is in its hash.
 */
export async function untilHashJobs(port: number, n: number, what: string, ms?: number): Promise<void> {
  await until(what, async () => (await scrapeMetrics(port)).value('gateway_hash_jobs') >= n, ms, 10);
}
