/** Reading a gateway's Prometheus text (`/metrics` on its metrics port) in the load benches. */

/** The gateway's metrics now, as Prometheus text. */
export async function metricsOf(metricsPort: number): Promise<string> {
  return (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
}

/** A counter's value summed over its series with `labels`, in a /metrics text. */
export function counterSum(text: string, metric: string, labels: string): number {
  let n = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${metric}{`) && line.includes(labels))
      n += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return n;
}

/**
 * Redis calls a gateway made so far: the count of its Redis round-trip histogram (a script
 * call is one; pipelined commands count one each), every connection but BullMQ's blocking
 * workers.
 */
export function redisCallsIn(text: string): number {
  return counterSum(text, 'gateway_redis_command_duration_seconds_count', '');
}
