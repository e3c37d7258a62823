'use strict';
// Unit tests of the value codec: `npm test` (node --test).
const test = require('node:test');
const assert = require('node:assert/strict');
const { toValue, fromValue, UnencodableValue, timestamp, duration, durationSeconds } = require('../lib/values');
const { load } = require('../lib/proto');
const { parseTraceparent } = require('../lib/tracing');

// Through the real protobuf serializer, as on the wire.
function wire(obj) {
  const { Connect } = load().WorkerService.service;
  const message = { progress: { items: [{ task_id: 't', progress: toValue(obj) }] } };
  return Connect.requestDeserialize(Connect.requestSerialize(message)).progress.items[0].progress;
}

test('scalars keep their kind', () => {
  assert.deepEqual(toValue(5), { int_value: '5' });
  assert.deepEqual(toValue(-7), { int_value: '-7' });
  assert.deepEqual(toValue(2.5), { double_value: 2.5 });
  assert.deepEqual(toValue(-0), { double_value: -0 });
  assert.deepEqual(toValue(1e300), { double_value: 1e300 });
  assert.deepEqual(toValue('s'), { string_value: 's' });
  assert.deepEqual(toValue(true), { bool_value: true });
  assert.deepEqual(toValue(null), {});
  assert.deepEqual(toValue(undefined), {});
});

test('round trip through protobuf', () => {
  for (const v of [0, 1, -1, 2.5, 'héllo', '', true, false, null, [1, 'a', null], { a: { b: [1, 2] } }, []]) {
    assert.deepEqual(fromValue(wire(v)), v);
  }
  assert.ok(Number.isNaN(fromValue(wire(NaN))));
  assert.deepEqual(fromValue(wire(Buffer.from([0, 1, 255]))), Buffer.from([0, 1, 255]));
  assert.deepEqual(fromValue(wire(new Uint8Array([7]))), Buffer.from([7]));
});

test('int64 is lossless: Number when safe, BigInt otherwise', () => {
  assert.equal(fromValue(wire(2 ** 53 - 1)), 2 ** 53 - 1);
  assert.equal(fromValue(wire(2n ** 62n)), 2n ** 62n);
  assert.equal(fromValue(wire(-(2n ** 63n))), -(2n ** 63n));
  assert.equal(fromValue(wire(2n ** 63n - 1n)), 2n ** 63n - 1n);
  assert.equal(fromValue(wire(12n)), 12);
  assert.throws(() => toValue(2n ** 63n), UnencodableValue);
  assert.deepEqual(toValue(2 ** 60), { int_value: (2n ** 60n).toString() });
  assert.deepEqual(toValue(2 ** 64), { double_value: 2 ** 64 });
});

test('structures travel as JSON', () => {
  assert.deepEqual(toValue([1, { a: null }]), { json_value: '[1,{"a":null}]' });
  assert.deepEqual(toValue({ b: Buffer.from('hi') }), { json_value: '{"b":{"$bytes":"aGk="}}' });
  assert.deepEqual(toValue([5n]), { json_value: '[5]' });
  assert.throws(() => toValue([NaN]), UnencodableValue);
  assert.throws(() => toValue(() => 1), UnencodableValue);
  assert.deepEqual(fromValue({ json_value: 'null' }), null);
});

test('timestamps and durations', () => {
  assert.deepEqual(timestamp(1500), { seconds: '1', nanos: 500000000 });
  assert.deepEqual(duration(1.25), { seconds: '1', nanos: 250000000 });
  assert.equal(durationSeconds({ seconds: '2', nanos: 500000000 }), 2.5);
  const now = timestamp();
  assert.ok(now.nanos >= 0 && now.nanos < 1e9);
});

test('traceparent parsing', () => {
  const sc = parseTraceparent({ traceparent: '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01' });
  assert.equal(sc.traceId, '0af7651916cd43dd8448eb211c80319c');
  assert.equal(sc.spanId, 'b7ad6b7169203331');
  assert.equal(sc.traceFlags, 1);
  assert.equal(parseTraceparent({ traceparent: 'garbage' }), null);
  assert.equal(parseTraceparent({}), null);
});
