/**
 * Latency histograms (HDR, 3 significant digits): values recorded in microseconds, reported in
 * milliseconds.
 */
import hdr, { decodeFromCompressedBase64, encodeIntoCompressedBase64 } from 'hdr-histogram-js';

export interface Percentiles {
  count: number;
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
  mean: number;
}

export class LatencyHistogram {
  private readonly h = hdr.build({
    lowestDiscernibleValue: 1,
    // One hour in µs: anything slower is clamped to it.
    highestTrackableValue: 3_600_000_000,
    numberOfSignificantValueDigits: 3,
  });

  /** Records one latency in milliseconds (fractions kept to the microsecond). */
  record(ms: number): void {
    this.h.recordValue(Math.min(3_600_000_000, Math.max(1, Math.round(ms * 1000))));
  }

  get count(): number {
    return this.h.totalCount;
  }

  /** Percentile in ms (0 when empty). */
  at(percentile: number): number {
    return this.h.totalCount === 0 ? 0 : this.h.getValueAtPercentile(percentile) / 1000;
  }

  percentiles(): Percentiles {
    const empty = this.h.totalCount === 0;
    return {
      count: this.h.totalCount,
      p50: this.at(50),
      p90: this.at(90),
      p99: this.at(99),
      p999: this.at(99.9),
      max: empty ? 0 : this.h.maxValue / 1000,
      mean: empty ? 0 : this.h.mean / 1000,
    };
  }

  reset(): void {
    this.h.reset();
  }

  /** The recorded values, compressed (HdrHistogram's base64 form), to merge elsewhere. */
  encode(): string {
    return encodeIntoCompressedBase64(this.h);
  }

  /** Adds the values of an `encode()`d histogram (another process's). */
  addEncoded(encoded: string): void {
    this.h.add(decodeFromCompressedBase64(encoded));
  }
}
