/**
 * The same fleet against an MQTT broker (the peers bench): each device is an `mqtt` client with
 * a persistent session (`clean: false`) subscribed at QoS 1 to its own topic; the producer is
 * one client publishing at QoS 1, an event accepted when the broker's PUBACK comes. A receipt
 * with the DUP flag counts as a redelivery. mqtt.js acks (PUBACK) every message itself, so
 * `--no-ack-prob` does not apply here; a churn drop ends the socket and reconnects with the same
 * client id, which resumes the session.
 */
import mqtt from 'mqtt';
import type { DeviceContext } from './device.ts';
import type { Fleet, FleetDevice, Simulation } from './engine.ts';
import { errorCode } from './metrics.ts';
import type { EventSink, OutgoingEvent } from './producer.ts';
import type { Rng } from './rng.ts';

class MqttDevice implements FleetDevice {
  online = false;
  ready = false;
  target: string | undefined;
  private client: mqtt.MqttClient | undefined;
  private stopped = false;
  private dropping = false;
  private everIn = false;
  private reconnectTimer: NodeJS.Timeout | undefined;
  /** The current connection attempt (settles when connected, refused or ended by `stop`). */
  private attempt: Promise<void> | undefined;

  constructor(
    readonly index: number,
    readonly rng: Rng,
    private readonly url: string,
    private readonly clientId: string,
    private readonly topic: string,
    private readonly ctx: DeviceContext,
  ) {}

  start(): Promise<void> {
    // Stopped: a reconnect must not open a connection that nothing would end (the process
    // would never exit).
    if (this.stopped) return Promise.resolve();
    this.attempt = this.connectOnce();
    return this.attempt;
  }

  /** Connects again after `ms`, unless the device is stopped or the run is over by then. */
  private reconnectIn(ms: number): void {
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      if (!this.stopped && this.ctx.running()) void this.start();
    }, ms);
  }

  private async connectOnce(): Promise<void> {
    const { ctx } = this;
    const t0 = ctx.now();
    try {
      const c = mqtt.connect(this.url, {
        clientId: this.clientId,
        clean: false,
        reconnectPeriod: 0,
        connectTimeout: 15000,
        keepalive: 30,
      });
      this.client = c;
      // Handlers first: a resumed session's queued messages may come right behind the CONNACK.
      c.on('message', (_topic, payload, packet) => {
        const eid = payload.subarray(0, payload.indexOf(0x20)).toString();
        const t = ctx.now();
        ctx.ledger.received(eid, packet.dup ? 2 : 1, this.index, t);
        ctx.ledger.acked(eid, t);
      });
      c.on('error', (e) => ctx.metrics.error(errorCode(e), 'connection'));
      await new Promise<void>((resolve, reject) => {
        c.once('connect', () => resolve());
        c.once('error', reject);
        c.once('close', () => reject(new Error('connection closed')));
      });
      c.on('close', () => this.onClose());
      ctx.metrics.connect.record(ctx.now() - t0);
      this.online = true;
      ctx.metrics.connected++;
      if (!this.everIn) await c.subscribeAsync(this.topic, { qos: 1 });
      else ctx.metrics.reconnects++;
      this.everIn = true;
      this.target = this.topic;
      this.ready = true;
      ctx.metrics.authenticated++;
    } catch (e) {
      ctx.metrics.error(errorCode(e), 'connect');
      this.client?.end(true);
      if (!this.stopped && ctx.running()) this.reconnectIn(500 + this.rng() * 500);
    }
  }

  private onClose(): void {
    const m = this.ctx.metrics;
    if (this.online) {
      this.online = false;
      m.connected--;
    }
    if (this.ready) {
      this.ready = false;
      m.authenticated--;
    }
    const dropped = this.dropping;
    this.dropping = false;
    if (this.stopped) return;
    if (!dropped) m.error('closed_by_server', 'connection');
    this.client = undefined;
    if (this.ctx.running()) this.reconnectIn(100 + this.rng() * 400);
  }

  drop(): void {
    if (!this.client || !this.online) return;
    this.ctx.metrics.churns++;
    this.dropping = true;
    // Without DISCONNECT, as a device losing its link.
    this.client.stream.destroy();
  }

  /** Ends the device: no reconnect follows, and a connection being made is ended too. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    // The current attempt's client (set before its first await): ending it fails the attempt
    // if it is still out, which then settles.
    await this.client?.endAsync().catch(() => undefined);
    await this.attempt?.catch(() => undefined);
  }

  async publish(): Promise<void> {}

  async say(): Promise<void> {}
}

class MqttSink implements EventSink {
  private client: mqtt.MqttClient | undefined;
  private connecting: Promise<mqtt.MqttClient> | undefined;

  constructor(
    private readonly url: string,
    private readonly clientId: string,
    private readonly sim: Simulation,
  ) {}

  /**
   * The one producer connection. Memoised as a promise: batches in flight at once must share
   * it, since a second connection with the same client id makes the broker close the first.
   */
  private connected(): Promise<mqtt.MqttClient> {
    this.connecting ??= mqtt.connectAsync(this.url, { clientId: this.clientId, clean: true }).then((c) => {
      // A producer connection lost and re-made resends its unacked publishes (DUP): count it.
      c.on('reconnect', () => this.sim.metrics.error('producer_reconnect', 'producer'));
      c.on('error', (e) => this.sim.metrics.error(`producer_${errorCode(e)}`, 'producer'));
      this.client = c;
      return c;
    });
    return this.connecting;
  }

  async send(events: OutgoingEvent[]): Promise<void> {
    const { ledger, metrics } = this.sim;
    let c: mqtt.MqttClient;
    try {
      c = await this.connected();
    } catch (e) {
      metrics.error(`publish_${errorCode(e)}`, 'producer');
      this.connecting = undefined;
      return;
    }
    const t = this.sim.now();
    await Promise.all(
      events.map(async (e) => {
        // The eid first, then a space, then the payload: the device reads the eid back.
        const body = `${e.eid} ${JSON.stringify(e.data)}`;
        try {
          await c.publishAsync(e.target, body, { qos: 1 });
          ledger.accepted(e.eid);
        } catch (err) {
          metrics.error(`publish_${errorCode(err)}`, 'producer');
        }
      }),
    );
    metrics.httpPublish.record(this.sim.now() - t);
  }

  async close(): Promise<void> {
    // A connection still being made is waited for, then ended with the rest.
    await this.connecting?.catch(() => undefined);
    await this.client?.endAsync().catch(() => undefined);
  }
}

/** A fleet of MQTT devices on `url` (e.g. `mqtt://127.0.0.1:1883`). */
export function mqttFleet(url: string, runId: string): Fleet {
  return {
    name: 'mqtt',
    device: (i, rng: Rng, ctx) => new MqttDevice(i, rng, url, `sim-${runId}-${i}`, `sim/${runId}/${i}`, ctx),
    sink: (sim) => new MqttSink(url, `sim-${runId}-producer`, sim),
  };
}
