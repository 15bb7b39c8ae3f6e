/**
 * Waits for `p` to settle, at most `ms` (none: at once); true if it settled in time. Never
 * rejects: what `p` failed with is its owner's to handle. The timer goes with the wait.
 */
export async function settledWithin(p: Promise<unknown> | undefined, ms: number): Promise<boolean> {
  if (!p) return true;
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), Math.max(0, ms));
  });
  try {
    return await Promise.race([p.then(ok, ok), late]);
  } finally {
    clearTimeout(timer);
  }
}

const ok = () => true as const;
