import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { encodeFrame, FrameDecoder, ProtocolError } from '../../protocol/index.ts';

const isCode = (code: string) => (e: unknown) => e instanceof ProtocolError && e.code === code;

/** Splits `bytes` at the given (sorted, deduplicated) cut points. */
function split(bytes: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const parts: Buffer[] = [];
  let prev = 0;
  for (const p of points) {
    parts.push(bytes.subarray(prev, p));
    prev = p;
  }
  parts.push(bytes.subarray(prev));
  return parts;
}

test('any split of a valid stream decodes to the same frames', () => {
  fc.assert(
    fc.property(
      fc.array(fc.uint8Array({ minLength: 1, maxLength: 300 }), { minLength: 1, maxLength: 20 }),
      fc.array(fc.nat(), { maxLength: 30 }),
      (bodies, cuts) => {
        const stream = Buffer.concat(bodies.map((b) => encodeFrame(b)));
        const d = new FrameDecoder(300);
        const got: Buffer[] = [];
        for (const part of split(stream, cuts)) d.push(part, (b) => got.push(Buffer.from(b)));
        assert.deepEqual(
          got.map((b) => b.toString('hex')),
          bodies.map((b) => Buffer.from(b).toString('hex')),
        );
        assert.equal(d.buffered, 0);
      },
    ),
    { numRuns: 500 },
  );
});

test('arbitrary bytes give frames within the bound or a coded protocol error, nothing else', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 2000 }), fc.array(fc.nat(), { maxLength: 10 }), (bytes, cuts) => {
      const d = new FrameDecoder(1000);
      try {
        for (const part of split(Buffer.from(bytes), cuts)) {
          d.push(part, (b) => {
            assert.ok(b.length >= 1 && b.length <= 1000, 'b.length >= 1 && b.length <= 1000');
          });
        }
      } catch (e) {
        assert.ok(e instanceof ProtocolError, `unexpected ${e}`);
        assert.ok(
          e.code === 'bad_frame' || e.code === 'frame_too_large',
          "e.code === 'bad_frame' || e.code === 'frame_too_large'",
        );
      }
    }),
    { numRuns: 1000 },
  );
});

test('byte-by-byte input yields the frame at its last byte', () => {
  const frame = encodeFrame(Buffer.from('hello world'));
  const d = new FrameDecoder();
  const got: string[] = [];
  for (let i = 0; i < frame.length; i++) {
    d.push(frame.subarray(i, i + 1), (b) => got.push(b.toString()));
    assert.equal(got.length, i === frame.length - 1 ? 1 : 0);
  }
  assert.deepEqual(got, ['hello world']);
});

test('a body within one chunk is a view, not a copy', () => {
  const chunk = encodeFrame(Buffer.from('abc'));
  let body: Buffer | undefined;
  new FrameDecoder().push(chunk, (b) => {
    body = b;
  });
  assert.equal(body!.buffer, chunk.buffer);
});

test('L = max is accepted, L = max + 1 fails before the body arrives', () => {
  const d = new FrameDecoder(10);
  let n = 0;
  d.push(encodeFrame(Buffer.alloc(10)), () => n++);
  assert.equal(n, 1);
  const header = Buffer.alloc(4);
  header.writeUInt32BE(11);
  assert.throws(() => d.push(header, () => {}), isCode('frame_too_large'));
  assert.equal(d.buffered, 0);
  // the decoder stays failed
  assert.throws(() => d.push(encodeFrame(Buffer.alloc(1)), () => {}), isCode('frame_too_large'));
});

test('L = 0 is bad_frame even after good frames in the same chunk', () => {
  const d = new FrameDecoder();
  const got: number[] = [];
  const chunk = Buffer.concat([encodeFrame(Buffer.from([1])), Buffer.alloc(4)]);
  assert.throws(() => d.push(chunk, (b) => got.push(b[0])), isCode('bad_frame'));
  assert.deepEqual(got, [1]);
});

test('a split length prefix is reassembled', () => {
  const frame = encodeFrame(Buffer.alloc(70000, 7));
  const d = new FrameDecoder(100000);
  const got: Buffer[] = [];
  d.push(frame.subarray(0, 2), (b) => got.push(b));
  d.push(frame.subarray(2, 3), (b) => got.push(b));
  d.push(frame.subarray(3, 50000), (b) => got.push(b));
  assert.equal(d.buffered, 49996);
  d.push(frame.subarray(50000), (b) => got.push(b));
  assert.equal(got.length, 1);
  assert.equal(got[0].length, 70000);
});

test('a handler that says stop holds the rest of the chunk, undecoded, until resume', () => {
  fc.assert(
    fc.property(
      fc.array(fc.uint8Array({ minLength: 1, maxLength: 50 }), { minLength: 1, maxLength: 20 }),
      fc.array(fc.nat(), { maxLength: 10 }),
      fc.array(fc.boolean(), { minLength: 1, maxLength: 20 }),
      (bodies, cuts, stops) => {
        const stream = Buffer.concat(bodies.map((b) => encodeFrame(b)));
        const d = new FrameDecoder(300);
        const got: string[] = [];
        let k = 0;
        // Stops after some bodies; while stopped, nothing more is handed out.
        const onFrame = (b: Buffer) => {
          got.push(b.toString('hex'));
          return stops[k++ % stops.length] ? false : undefined;
        };
        for (const part of split(stream, cuts)) {
          d.push(part, onFrame);
          // (A resume may hand out nothing: what was held can be part of a frame.)
          while (d.stopped) d.resume(onFrame);
        }
        assert.deepEqual(
          got,
          bodies.map((b) => Buffer.from(b).toString('hex')),
        );
        assert.equal(d.buffered, 0);
      },
    ),
    { numRuns: 300 },
  );
});

test('a chunk pushed while stopped is decoded after what the stop held', () => {
  const d = new FrameDecoder();
  const got: number[] = [];
  const chunk = Buffer.concat([1, 2, 3].map((n) => encodeFrame(Buffer.from([n]))));
  d.push(chunk, (b) => {
    got.push(b[0]);
    return false;
  });
  assert.deepEqual(got, [1]);
  assert.equal(d.stopped, true);
  assert.equal(d.buffered, 10);
  d.push(encodeFrame(Buffer.from([4])), (b) => got.push(b[0]));
  assert.deepEqual(got, [1, 2, 3, 4]);
  assert.equal(d.stopped, false);
});
