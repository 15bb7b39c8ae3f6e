/**
 * What a simulated device (bench/sim/device.ts) reads of its run, for a test that runs devices
 * itself: a ledger and metrics of its own, no room, every ack sent, and the run's clock;
 * `stop()` ends the run (no reconnect, no new work).
 */
import type { DeviceContext } from '../../bench/sim/device.ts';
import { Ledger } from '../../bench/sim/ledger.ts';
import { RunMetrics } from '../../bench/sim/metrics.ts';

export function deviceContext(given: Partial<DeviceContext> = {}): { ctx: DeviceContext; stop: () => void } {
  let running = true;
  const t0 = performance.now();
  return {
    ctx: {
      ledger: new Ledger(),
      metrics: new RunMetrics(),
      helloChunks: 1,
      noAckProb: 0,
      room: () => undefined,
      now: () => performance.now() - t0,
      running: () => running,
      mayWithholdAcks: () => false,
      ...given,
    },
    stop: () => {
      running = false;
    },
  };
}
