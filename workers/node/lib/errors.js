'use strict';
// The details a refused call carries (docs/errors.md): its `grpc-status-details-bin` trailer is a
// google.rpc.Status whose details hold an ErrorInfo, a BadRequest (INVALID_ARGUMENT) and a
// RetryInfo (with a retry hint). These few messages are read with a small protobuf wire reader,
// so no google.rpc schema is needed.

const DETAILS_KEY = 'grpc-status-details-bin';
const TYPE_PREFIX = 'type.googleapis.com/';

/** The fields of a message as [number, value] pairs: varints as Number, length-delimited as Buffer. */
function* fields(buffer) {
  let pos = 0;
  while (pos < buffer.length) {
    const [key, afterKey] = varint(buffer, pos);
    const number = Math.floor(key / 8);
    switch (key % 8) {
      case 0: { // varint
        const [value, next] = varint(buffer, afterKey);
        pos = next;
        yield [number, value];
        break;
      }
      case 1: pos = afterKey + 8; break; // fixed64: unused here
      case 2: { // length-delimited
        const [length, start] = varint(buffer, afterKey);
        pos = start + length;
        if (pos > buffer.length) throw new RangeError('truncated message');
        yield [number, buffer.subarray(start, pos)];
        break;
      }
      case 5: pos = afterKey + 4; break; // fixed32: unused here
      default: throw new RangeError(`unsupported wire type ${key % 8}`);
    }
  }
}

function varint(buffer, pos) {
  let value = 0;
  for (let scale = 1; pos < buffer.length; scale *= 128) {
    const byte = buffer[pos++];
    value += (byte & 0x7f) * scale;
    if (byte < 0x80) return [value, pos];
  }
  throw new RangeError('truncated varint');
}

function strings(buffer, names) {
  const out = {};
  for (const [number, value] of fields(buffer)) {
    if (names[number] && Buffer.isBuffer(value)) out[names[number]] = value.toString('utf8');
  }
  return out;
}

function readErrorInfo(buffer, details) {
  for (const [number, value] of fields(buffer)) {
    if (number === 1) details.reason = value.toString('utf8');
    else if (number === 2) details.domain = value.toString('utf8');
    else if (number === 3) { // map<string, string> entry
      const entry = strings(value, { 1: 'key', 2: 'value' });
      details.metadata[entry.key || ''] = entry.value || '';
    }
  }
}

function readBadRequest(buffer, details) {
  for (const [number, value] of fields(buffer)) {
    if (number !== 1) continue;
    const violation = strings(value, { 1: 'field', 2: 'description' });
    details.fieldViolations.push({ field: violation.field || '', description: violation.description || '' });
  }
}

function readRetryInfo(buffer, details) {
  let seconds = 0;
  for (const [number, value] of fields(buffer)) {
    if (number !== 1) continue; // retry_delay, a google.protobuf.Duration
    for (const [part, amount] of fields(value)) {
      if (part === 1) seconds += amount;
      else if (part === 2) seconds += amount / 1e9;
    }
  }
  details.retryAfter = seconds;
}

const READERS = {
  'google.rpc.ErrorInfo': readErrorInfo,
  'google.rpc.BadRequest': readBadRequest,
  'google.rpc.RetryInfo': readRetryInfo,
};

/**
 * Decodes a serialized google.rpc.Status's details: {reason, domain, metadata, fieldViolations,
 * retryAfter (seconds, or null without a hint)}.
 */
function decodeStatusDetails(buffer) {
  const details = { reason: '', domain: '', metadata: {}, fieldViolations: [], retryAfter: null };
  for (const [number, value] of fields(buffer)) {
    if (number !== 3 || !Buffer.isBuffer(value)) continue; // Status.details: repeated Any
    const any = { typeUrl: '', value: Buffer.alloc(0) };
    for (const [part, content] of fields(value)) {
      if (part === 1) any.typeUrl = content.toString('utf8');
      else if (part === 2) any.value = content;
    }
    const reader = READERS[any.typeUrl.startsWith(TYPE_PREFIX) ? any.typeUrl.slice(TYPE_PREFIX.length) : ''];
    if (reader) reader(any.value, details);
  }
  return details;
}

/**
 * Adds the server's error details to a grpc-js error, in place: `reason` (ErrorInfo's stable code,
 * '' without one), `errorMetadata` (ErrorInfo's metadata), `fieldViolations` ([{field,
 * description}]) and `retryAfter` (seconds, or null). Returns the error.
 */
function withErrorDetails(error) {
  const raw = error && error.metadata && typeof error.metadata.get === 'function' ? error.metadata.get(DETAILS_KEY) : [];
  let details = { reason: '', domain: '', metadata: {}, fieldViolations: [], retryAfter: null };
  if (raw.length && Buffer.isBuffer(raw[0])) {
    try {
      details = decodeStatusDetails(raw[0]);
    } catch {
      // Unreadable details leave the error as gRPC reported it.
    }
  }
  return Object.assign(error, {
    reason: details.reason,
    errorMetadata: details.metadata,
    fieldViolations: details.fieldViolations,
    retryAfter: details.retryAfter,
  });
}

module.exports = { decodeStatusDetails, withErrorDetails, DETAILS_KEY };
