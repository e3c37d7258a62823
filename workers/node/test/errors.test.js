'use strict';
// Unit tests of the error-details reader: `npm test` (node --test). The end-to-end check against
// a real server is tests/e2e/test_rich_errors.py.
const test = require('node:test');
const assert = require('node:assert/strict');
const { grpc } = require('../lib/proto');
const { decodeStatusDetails, withErrorDetails, DETAILS_KEY } = require('../lib/errors');

// google.rpc.Status messages as the server serializes them (conveyor_server/api/status.py):
// INVALID_ARGUMENT for field task.name, and RESOURCE_EXHAUSTED QUEUE_FULL with a 1.5 s RetryInfo.
const BAD_REQUEST = Buffer.from(
  '080312137461736b3a206e616d6520697320656d7074791a4c0a28747970652e676f6f676c65617069732e636f6d2f676f6f676c652e7270632e4572726f72496e666f12200a10494e56414c49445f415247554d454e54120c636f6e7665796f722e6465761a4f0a29747970652e676f6f676c65617069732e636f6d2f676f6f676c652e7270632e4261645265717565737412220a200a097461736b2e6e616d6512137461736b3a206e616d6520697320656d707479',
  'hex',
);
const QUEUE_FULL = Buffer.from(
  '0808121571756575652027736d616c6c272069732066756c6c1a660a28747970652e676f6f676c65617069732e636f6d2f676f6f676c652e7270632e4572726f72496e666f123a0a0a51554555455f46554c4c120c636f6e7665796f722e6465761a0e0a096d61785f64657074681201351a0e0a0571756575651205736d616c6c1a360a28747970652e676f6f676c65617069732e636f6d2f676f6f676c652e7270632e5265747279496e666f120a0a0808011080cab5ee01',
  'hex',
);

test('a bad request names its field', () => {
  assert.deepEqual(decodeStatusDetails(BAD_REQUEST), {
    reason: 'INVALID_ARGUMENT',
    domain: 'conveyor.dev',
    metadata: {},
    fieldViolations: [{ field: 'task.name', description: 'task: name is empty' }],
    retryAfter: null,
  });
});

test('a full queue carries its metadata and retry delay', () => {
  const details = decodeStatusDetails(QUEUE_FULL);
  assert.equal(details.reason, 'QUEUE_FULL');
  assert.deepEqual(details.metadata, { queue: 'small', max_depth: '5' });
  assert.equal(details.retryAfter, 1.5);
  assert.deepEqual(details.fieldViolations, []);
});

test('withErrorDetails reads the trailer of a grpc-js error, and tolerates none or garbage', () => {
  const trailers = new grpc.Metadata();
  trailers.set(DETAILS_KEY, QUEUE_FULL);
  const error = withErrorDetails(Object.assign(new Error('full'), { code: 8, metadata: trailers }));
  assert.equal(error.reason, 'QUEUE_FULL');
  assert.deepEqual(error.errorMetadata, { queue: 'small', max_depth: '5' });
  assert.equal(error.retryAfter, 1.5);

  const bare = withErrorDetails(Object.assign(new Error('gone'), { code: 5, metadata: new grpc.Metadata() }));
  assert.deepEqual([bare.reason, bare.errorMetadata, bare.fieldViolations, bare.retryAfter], ['', {}, [], null]);

  const garbled = new grpc.Metadata();
  garbled.set(DETAILS_KEY, Buffer.from([0x1a, 0x7f, 0x00]));
  assert.equal(withErrorDetails(Object.assign(new Error('x'), { metadata: garbled })).reason, '');
});
