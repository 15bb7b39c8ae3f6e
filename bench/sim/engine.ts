/**
 * The simulation engine: starts the fleet at a rate, runs the producer, device publishes,
 * rooms and churn for the duration, drains, reads the gateway's reports, and returns the
 * report. Bounded in devices, events and time; stops early (with a partial report) when
 * `abort()` is called.
 */
import { randomBytes } from 'node:crypto';
import { processCpuMicros, processRssKib } from '../lib/proc.ts';
import { BackendWatch, type ReportScan, readBackendReports } from './backend-reports.ts';
import { type DeviceContext, VirtualDevice } from './device.ts';
import type { LatencyHistogram, Percentiles } from './histogram.ts';
import { Ledger, type Settlement, type Totals } from './ledger.ts';
import { RunMetrics } from './metrics.ts';
import { type EventSink, HttpEventSink, Producer } from './producer.ts';
import { pick, type Rng, rngFor } from './rng.ts';

export const Transport = { tcp: 'tcp', ws: 'ws', mix: 'mix' } as const;
export type Transport = (typeof Transport)[keyof typeof Transport];

export interface SimOptions {
  tcpUrl: string;
  wsUrl: string;
  httpUrl: string;
  transport: Transport;
  devices: number;
  /** Devices started per second. */
  rate: number;
  /** Seconds of the run from the first device start (the drain comes after). */
  durationS: number;
  /** Longest wait after the run for outstanding events (s). */
  drainS: number;
  /** Producer events per second (0: as fast as acks allow, within `window`). */
  eventRate: number;
  window: number;
  payloadBytes: number;
  maxEvents: number;
  apiKey: string;
  /** Device → back end `publish` requests per second, over the fleet. */
  publishRate: number;
  rooms: number;
  /** `say` requests per second, over the fleet. */
  sayRate: number;
  noAckProb: number;
  /** The gateway's refresh grace period (`GW_REFRESH_GRACE_SECONDS`), ms; default 30 000. */
  refreshGraceMs?: number;
  /** Devices refresh while connected, keeping their sessions (the client's `keepSession`); default true. */
  keepSession?: boolean;
  /** Per device and second: probability of dropping the connection and resuming. */
  churnProb: number;
  helloChunks: number;
  seed: number;
  pinnedFingerprint?: string;
  /**
   * This process is worker `index` of `count` (`--workers`): its device i is the fleet's device
   * `i * count + index` (names, seeds), and its report carries its histograms for merging.
   */
  worker?: { index: number; count: number };
  /**
   * Start the clock of the run (and the producer) only once every device is in, so that the
   * figures are of the traffic alone (benches); otherwise the producer starts with the fleet.
   */
  waitForFleet?: boolean;
  /** Redis of the gateway, and its key prefix, to read the back-end queue; omit to skip. */
  redisUrl?: string;
  redisPrefix?: string;
  gatewayPid?: number;
}

/** What the engine needs of a device, whatever it speaks. */
export interface FleetDevice {
  readonly index: number;
  /** The device's own random stream. */
  readonly rng: Rng;
  readonly online: boolean;
  /** In (authenticated, subscribed): the producer may address it. */
  readonly ready: boolean;
  /** What the producer's sink addresses; undefined until the device is first in. */
  readonly target: string | undefined;
  start(): Promise<void>;
  /** Churn: drop the connection; the device comes back by itself. */
  drop(): void;
  stop(): Promise<void>;
  publish(name: string, data: unknown): Promise<void>;
  say(body: string): Promise<void>;
}

/** The system under load: its devices and where the producer's events go. */
export interface Fleet {
  readonly name: string;
  device(index: number, rng: Rng, ctx: DeviceContext): FleetDevice;
  sink(sim: Simulation): EventSink;
}

/** The gateway: reference-client devices, and `POST /v1/events` for the producer. */
export function gatewayFleet(o: SimOptions, runId: string): Fleet {
  const urlFor = (i: number) =>
    o.transport === 'ws' ? o.wsUrl : o.transport === 'mix' && i % 2 === 1 ? o.wsUrl : o.tcpUrl;
  return {
    name: 'gateway',
    device: (i, rng, ctx) => new VirtualDevice(i, `s${runId}${i}`, urlFor(i), rng, ctx),
    sink: (sim) => new HttpEventSink(o.httpUrl, o.apiKey, sim.ledger, sim.metrics, () => sim.now()),
  };
}

/** One point per second of the run. */
export interface SeriesPoint {
  /** Seconds since the start. */
  t: number;
  connected: number;
  authenticated: number;
  published: number;
  delivered: number;
  acked: number;
  deliveryP50: number;
  deliveryP90: number;
  deliveryP99: number;
  ackP99: number;
  errors: number;
  reconnects: number;
  gatewayCpu: number | null;
  gatewayRssMb: number | null;
}

export interface ProcessUsage {
  /** Average CPU over the run, % of one core. */
  cpuPercent: number | null;
  cpuSeconds: number | null;
  /** Peak resident set (MiB). */
  peakRssMb: number | null;
}

export interface SimReport {
  options: Omit<SimOptions, 'apiKey'>;
  runId: string;
  interrupted: boolean;
  startedAt: string;
  elapsedS: number;
  drainS: number;
  /** `settled`: no accepted event was left unacked and unreported; `deadline`: `--drain` ran out. */
  drainEndedBy: 'settled' | 'deadline';
  devices: {
    started: number;
    peakConnected: number;
    connectedAtEnd: number;
    /** Authenticated at the end of the drain, counted device by device. */
    authenticatedAtEnd: number;
    /** Devices that never logged in. */
    neverLoggedIn: number;
  };
  totals: Totals;
  delivered: number;
  lost: number;
  duplicates: number;
  redeliveries: number;
  reconnects: number;
  /** Refreshes answered with a new pair. */
  refreshes: number;
  /** Resumes that presented again first a refresh left in doubt by an earlier connection. */
  refreshesInDoubt: number;
  /** Registers retried that found the account made by an earlier attempt (not errors). */
  registersFoundMade: number;
  /** Sessions whose resume was refused for good (revoked, a refresh token reused): logged in again. */
  sessionsLost: number;
  churns: number;
  settlement: Settlement;
  rejectedBy: Record<string, number>;
  backendScan: ReportScan | null;
  errors: Record<string, number>;
  /** The errors by the step that met them (RunMetrics.errorsByStep). */
  errorsByStep: Record<string, Record<string, number>>;
  /** Events delivered per second over the event phase and drain; published per second over the event phase. */
  throughput: { deliveredPerS: number; publishedPerS: number };
  /** From the producer's start (0, or when every device was in with `waitForFleet`) to the end of the drain. */
  eventPhase: {
    startS: number;
    seconds: number;
    gatewayCpuSeconds: number | null;
    simulatorCpuSeconds: number;
  };
  latency: Record<string, Percentiles>;
  devicePublishes: number;
  says: number;
  roomMessages: number;
  gateway: ProcessUsage | null;
  simulator: ProcessUsage;
  series: SeriesPoint[];
  /** With `worker`: every latency histogram, encoded, for the parent to merge. */
  histograms?: Record<string, string>;
}

export interface RunHooks {
  /** Called once per second with the latest point. */
  onTick?: (p: SeriesPoint, phase: 'run' | 'drain') => void;
  /** Called when the producer starts, and when the drain ends (benches measure between). */
  onEventPhase?: (edge: 'start' | 'end') => void;
}

function rssMb(pid: number): number | null {
  const kib = processRssKib(pid);
  return kib === null ? null : kib / 1024;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class Simulation {
  readonly ledger = new Ledger();
  readonly metrics = new RunMetrics();
  readonly runId = randomBytes(4).toString('hex').slice(0, 6);
  private readonly devices: FleetDevice[] = [];
  readonly fleet: Fleet;
  private running = true;
  private draining = false;
  private aborted = false;
  private abortWake: (() => void) | undefined;
  private readonly t0 = performance.now();
  private readonly series: SeriesPoint[] = [];
  /** When every device was in (s), with `waitForFleet`. */
  private fleetReadyS = 0;

  constructor(
    readonly options: SimOptions,
    /** The system under load, given the run id (default: the gateway of `options`). */
    fleet?: (runId: string) => Fleet,
  ) {
    if (options.devices < 1 || options.devices > 15000) throw new Error('devices: 1-15000 per process');
    this.fleet = fleet ? fleet(this.runId) : gatewayFleet(options, this.runId);
  }

  now(): number {
    return performance.now() - this.t0;
  }

  /** Ends the run early: no more starts or events; a short drain, then the (partial) report. */
  abort(): void {
    this.aborted = true;
    this.abortWake?.();
  }

  private wait(ms: number): Promise<void> {
    if (this.aborted) return Promise.resolve();
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done() {
        clearTimeout(t);
        resolve();
      }
      this.abortWake = done;
    });
  }

  /** The latency histograms of the run by name (the keys of `SimReport.latency`). */
  histogramsByName(): Record<string, LatencyHistogram> {
    const m = this.metrics;
    return {
      connect: m.connect,
      handshake: m.handshake,
      register: m.register,
      login: m.login,
      resume: m.resume,
      delivery: this.ledger.delivery,
      ack: this.ledger.ack,
      httpPublish: m.httpPublish,
      devicePublish: m.devicePublish,
    };
  }

  private encodedHistograms(): Record<string, string> {
    return Object.fromEntries(Object.entries(this.histogramsByName()).map(([k, h]) => [k, h.encode()]));
  }

  async run(hooks: RunHooks = {}): Promise<SimReport> {
    const o = this.options;
    const startedAt = new Date().toISOString();
    const ctx: DeviceContext = {
      ledger: this.ledger,
      metrics: this.metrics,
      helloChunks: o.helloChunks,
      ...(o.pinnedFingerprint ? { pinnedFingerprint: o.pinnedFingerprint } : {}),
      noAckProb: o.noAckProb,
      ...(o.refreshGraceMs !== undefined ? { refreshGraceMs: o.refreshGraceMs } : {}),
      keepSession: o.keepSession !== false,
      room: (i) => (o.rooms > 0 ? `#sim-${this.runId}-${i % o.rooms}` : undefined),
      now: () => this.now(),
      running: () => this.running,
      mayWithholdAcks: () => !this.draining,
    };
    // The producer's stream: 0 alone, one per worker beyond the devices' streams otherwise.
    const rng = rngFor(o.seed, o.worker ? 0x40000000 + o.worker.index : 0);
    const globalIndex = (i: number) => (o.worker ? i * o.worker.count + o.worker.index : i);
    const sink = this.fleet.sink(this);
    const producer = new Producer(
      {
        rate: o.eventRate,
        window: o.window,
        payloadBytes: o.payloadBytes,
        maxEvents: o.maxEvents,
        concurrency: 4,
        batchMax: 500,
        eidPrefix: `sim-${this.runId}`,
      },
      sink,
      () => this.devices.map((d) => ({ index: d.index, target: d.target })),
      this.ledger,
      rng,
      () => this.now(),
    );

    // Per-second sampling: the series, churn, and the status hook.
    let last = { published: 0, delivered: 0, acked: 0, reconnects: 0 };
    let gwCpuLast = o.gatewayPid ? processCpuMicros(o.gatewayPid) : null;
    let gwPeakRss: number | null = null;
    let ownPeakRss = 0;
    const ownCpu0 = process.cpuUsage();
    const gwCpu0 = gwCpuLast;
    // CPU from the moment events flow (the producer's start), for the benches.
    let gwCpuEvents = gwCpu0;
    let ownCpuEvents = ownCpu0;
    let tLast = this.now();
    let peakConnected = 0;
    const sample = () => {
      const t = this.now();
      const dt = Math.max(1e-3, (t - tLast) / 1000);
      tLast = t;
      const tot = this.ledger.totals;
      let gatewayCpu: number | null = null;
      let gatewayRssMb: number | null = null;
      if (o.gatewayPid) {
        const cpu = processCpuMicros(o.gatewayPid);
        if (cpu !== null && gwCpuLast !== null) gatewayCpu = (cpu - gwCpuLast) / 1e4 / dt;
        gwCpuLast = cpu;
        gatewayRssMb = rssMb(o.gatewayPid);
        if (gatewayRssMb !== null) gwPeakRss = Math.max(gwPeakRss ?? 0, gatewayRssMb);
      }
      ownPeakRss = Math.max(ownPeakRss, process.memoryUsage.rss() / 1048576);
      peakConnected = Math.max(peakConnected, this.metrics.connected);
      const p: SeriesPoint = {
        t: Math.round(t / 100) / 10,
        connected: this.metrics.connected,
        authenticated: this.metrics.authenticated,
        published: (tot.published - last.published) / dt,
        delivered: (tot.delivered - last.delivered) / dt,
        acked: (tot.acked - last.acked) / dt,
        deliveryP50: this.ledger.deliveryInterval.at(50),
        deliveryP90: this.ledger.deliveryInterval.at(90),
        deliveryP99: this.ledger.deliveryInterval.at(99),
        ackP99: this.ledger.ackInterval.at(99),
        errors: this.metrics.intervalErrors / dt,
        reconnects: (this.metrics.reconnects - last.reconnects) / dt,
        gatewayCpu,
        gatewayRssMb,
      };
      last = {
        published: tot.published,
        delivered: tot.delivered,
        acked: tot.acked,
        reconnects: this.metrics.reconnects,
      };
      this.ledger.deliveryInterval.reset();
      this.ledger.ackInterval.reset();
      this.metrics.intervalErrors = 0;
      this.series.push(p);
      return p;
    };
    let phase: 'run' | 'drain' = 'run';
    const sampler = setInterval(() => {
      const p = sample();
      if (phase === 'run' && !this.aborted && o.churnProb > 0) {
        for (const d of this.devices) if (d.online && d.rng() < o.churnProb) d.drop();
      }
      hooks.onTick?.(p, phase);
    }, 1000);

    // Device publishes and says, every 100 ms from random ready devices.
    let pubDue = 0;
    let sayDue = 0;
    let pubSeq = 0;
    const pad = 'p'.repeat(o.payloadBytes);
    const chatter = setInterval(() => {
      const ready = this.devices.filter((d) => d.ready);
      if (ready.length === 0) return;
      pubDue += o.publishRate / 10;
      sayDue += o.sayRate / 10;
      for (; pubDue >= 1; pubDue--)
        void ready[pick(rng, ready.length)].publish('sim.telemetry', { seq: pubSeq++, pad });
      for (; sayDue >= 1; sayDue--) void ready[pick(rng, ready.length)].say('hello from the simulator');
    }, 100);

    let watch: BackendWatch | undefined;
    if (o.redisUrl && o.redisPrefix !== undefined) {
      watch = new BackendWatch(o.redisUrl, o.redisPrefix, `sim-${this.runId}-`, this.ledger, (e) =>
        this.metrics.error(`backend_watch_${(e as { code?: string }).code ?? e.name}`, 'backend'),
      );
      await Promise.race([watch.ready(), sleep(5000)]).catch(() => undefined);
    }
    let runEnd = o.durationS * 1000;
    const starts: Promise<void>[] = [];
    if (!o.waitForFleet) {
      hooks.onEventPhase?.('start');
      producer.start();
    }
    // Staggered starts: device i at i / rate seconds.
    for (let i = 0; i < o.devices && !this.aborted; i++) {
      const at = (i * 1000) / o.rate;
      if (at >= runEnd && !o.waitForFleet) break;
      const ahead = at - this.now();
      if (ahead > 0) await this.wait(ahead);
      if (this.aborted) break;
      const d = this.fleet.device(i, rngFor(o.seed, globalIndex(i) + 1), ctx);
      this.devices.push(d);
      starts.push(d.start());
    }
    if (o.waitForFleet) {
      // Bounded too: a fleet that does not get in within the time of the run plus a minute ends it.
      const deadline = this.now() + 60_000 + runEnd;
      while (!this.aborted && this.devices.some((d) => !d.ready) && this.now() < deadline) await sleep(50);
      if (this.devices.some((d) => !d.ready)) this.metrics.error('fleet_not_ready', 'fleet');
      this.fleetReadyS = this.now() / 1000;
      gwCpuEvents = o.gatewayPid ? processCpuMicros(o.gatewayPid) : null;
      ownCpuEvents = process.cpuUsage();
      runEnd = this.now() + o.durationS * 1000;
      hooks.onEventPhase?.('start');
      if (!this.aborted) producer.start();
    }
    const left = runEnd - this.now();
    if (left > 0) await this.wait(left);
    const eventStart = o.waitForFleet ? this.fleetReadyS * 1000 : 0;
    const runMs = this.now();
    clearInterval(chatter);
    await producer.stop();
    await sink.close();

    // Drain: every receipt is acked now; wait for the outstanding events (or the deadline).
    phase = 'drain';
    this.draining = true;
    const drainStart = this.now();
    const drainEnd = drainStart + (this.aborted ? Math.min(2000, o.drainS * 1000) : o.drainS * 1000);
    while (this.now() < drainEnd && this.ledger.outstanding > 0) await sleep(100);
    const drainMs = this.now() - drainStart;
    const drainEndedBy = this.ledger.outstanding > 0 ? 'deadline' : 'settled';
    hooks.onEventPhase?.('end');
    // CPU of the event phase: from the producer's start to the end of the drain.
    const eventCpu = {
      gatewaySeconds:
        o.gatewayPid && gwCpuEvents !== null
          ? ((processCpuMicros(o.gatewayPid) ?? Number.NaN) - gwCpuEvents) / 1e6
          : null,
      simulatorSeconds: (() => {
        const u = process.cpuUsage(ownCpuEvents);
        return (u.user + u.system) / 1e6;
      })(),
    };
    await watch?.close();
    let backendScan: ReportScan | null = null;
    if (o.redisUrl && o.redisPrefix !== undefined) {
      try {
        backendScan = await readBackendReports(o.redisUrl, o.redisPrefix, `sim-${this.runId}-`, this.ledger);
      } catch (e) {
        this.metrics.error(`backend_scan_${(e as Error).name}`, 'backend');
      }
    }
    clearInterval(sampler);
    sample();
    this.running = false;
    const connectedAtEnd = this.metrics.connected;
    const inAtEnd = new Set(this.devices.filter((d) => d.ready).map((d) => d.index));
    const authenticatedAtEnd = inAtEnd.size;
    const neverLoggedIn = this.devices.filter((d) => d.target === undefined).length;
    await Promise.allSettled(starts);
    await Promise.race([Promise.allSettled(this.devices.map((d) => d.stop())), sleep(10000)]);

    const settlement = this.ledger.settle((i) => inAtEnd.has(i));
    const elapsedS = this.now() / 1000;
    const ownCpu = process.cpuUsage(ownCpu0);
    const ownCpuS = (ownCpu.user + ownCpu.system) / 1e6;
    const gwCpuEnd = o.gatewayPid ? processCpuMicros(o.gatewayPid) : null;
    const gwCpuS = gwCpu0 !== null && gwCpuEnd !== null ? (gwCpuEnd - gwCpu0) / 1e6 : null;
    const tot = this.ledger.totals;
    const { apiKey: _secret, ...shown } = o;
    return {
      options: shown,
      runId: this.runId,
      interrupted: this.aborted,
      startedAt,
      elapsedS,
      drainS: drainMs / 1000,
      drainEndedBy,
      devices: {
        started: this.devices.length,
        peakConnected,
        connectedAtEnd,
        authenticatedAtEnd,
        neverLoggedIn,
      },
      totals: { ...tot },
      delivered: tot.delivered,
      lost: settlement.lost,
      duplicates: tot.duplicates,
      redeliveries: tot.redeliveries,
      reconnects: this.metrics.reconnects,
      refreshes: this.metrics.refreshes,
      refreshesInDoubt: this.metrics.refreshesInDoubt,
      registersFoundMade: this.metrics.registersFoundMade,
      sessionsLost: this.metrics.sessionsLost,
      churns: this.metrics.churns,
      settlement,
      rejectedBy: { ...this.ledger.rejectedBy },
      backendScan,
      errors: { ...this.metrics.errors },
      errorsByStep: Object.fromEntries(
        Object.entries(this.metrics.errorsByStep).map(([step, byCode]) => [step, { ...byCode }]),
      ),
      throughput: {
        deliveredPerS: tot.delivered / Math.max(0.001, (runMs - eventStart + drainMs) / 1000),
        publishedPerS: tot.published / Math.max(0.001, (runMs - eventStart) / 1000),
      },
      eventPhase: {
        startS: eventStart / 1000,
        seconds: (runMs - eventStart + drainMs) / 1000,
        gatewayCpuSeconds: eventCpu.gatewaySeconds,
        simulatorCpuSeconds: eventCpu.simulatorSeconds,
      },
      latency: Object.fromEntries(
        Object.entries(this.histogramsByName()).map(([k, h]) => [k, h.percentiles()]),
      ),
      devicePublishes: this.metrics.devicePublishes,
      says: this.metrics.says,
      roomMessages: this.metrics.roomMessages,
      gateway: o.gatewayPid
        ? {
            cpuSeconds: gwCpuS,
            cpuPercent: gwCpuS === null ? null : (gwCpuS / elapsedS) * 100,
            peakRssMb: gwPeakRss,
          }
        : null,
      simulator: { cpuSeconds: ownCpuS, cpuPercent: (ownCpuS / elapsedS) * 100, peakRssMb: ownPeakRss },
      series: this.series,
      ...(o.worker ? { histograms: this.encodedHistograms() } : {}),
    };
  }
}
