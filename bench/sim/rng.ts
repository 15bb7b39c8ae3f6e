/**
 * Seeded PRNG (mulberry32): every random choice of a simulation comes from one of these, so a
 * run with the same `--seed` makes the same choices. Each device has its own stream, derived
 * from the seed and its index, so its choices do not depend on how the devices interleave.
 */
export type Rng = () => number;

export function mulberry32(seed: number): Rng {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The stream of one actor (`stream` 0 = the producer, i + 1 = device i) of a run's seed. */
export function rngFor(seed: number, stream: number): Rng {
  // Mix the two numbers so that neighbouring streams do not start correlated.
  let h = Math.imul((seed >>> 0) ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(stream + 1, 0xc2b2ae35);
  h = Math.imul(h ^ (h >>> 16), 0x45d9f3b);
  return mulberry32(h ^ (h >>> 13));
}

/** An integer in [0, n). */
export const pick = (rng: Rng, n: number): number => Math.floor(rng() * n);
