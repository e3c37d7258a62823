'use strict';
// The wire `Value` <-> JavaScript values; interoperates with sdk/python/conveyor/values.py.
//
//   JavaScript                         Value kind       Python
//   null / undefined                   (empty)          None
//   boolean                            bool_value       bool
//   integer Number in int64, BigInt    int_value        int
//   other Number (2.5, NaN, -0)        double_value     float
//   string                             string_value     str
//   Buffer / Uint8Array                bytes_value      bytes
//   array, plain object                json_value       list, dict
//
// Decoding: int_value becomes a Number when it is a safe integer, else a BigInt (lossless).
// A JavaScript Number cannot tell 2.0 from 2, so a Python float 2.0 comes back from Node as int 2.
// Inside JSON structures, Buffers become {"$bytes": base64} (as the server does for chord results),
// BigInts must be safe integers (or the runtime must have JSON.rawJSON), NaN/Infinity are refused.

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;

class UnencodableValue extends TypeError {
  constructor(message) {
    super(message);
    this.name = 'UnencodableValue';
  }
}

function isBytes(obj) {
  return obj instanceof Uint8Array; // Buffer is a Uint8Array
}

function asBuffer(obj) {
  return Buffer.isBuffer(obj) ? obj : Buffer.from(obj.buffer, obj.byteOffset, obj.byteLength);
}

function jsonReplacer(key, value) {
  const raw = this[key]; // before toJSON (Buffer.toJSON would give {type, data})
  if (isBytes(raw)) return { $bytes: asBuffer(raw).toString('base64') };
  if (typeof value === 'bigint') {
    if (value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(value);
    if (typeof JSON.rawJSON === 'function') return JSON.rawJSON(value.toString());
    throw new UnencodableValue(`BigInt ${value} inside a structure does not fit in a safe integer`);
  }
  if (typeof value === 'number' && !Number.isFinite(value)) {
    throw new UnencodableValue(`${value} inside a structure has no JSON form`);
  }
  return value;
}

/** Encode one JavaScript value as a Value message (plain object for @grpc/proto-loader). */
function toValue(obj) {
  if (obj === null || obj === undefined) return {};
  switch (typeof obj) {
    case 'boolean':
      return { bool_value: obj };
    case 'string':
      return { string_value: obj };
    case 'bigint':
      if (obj < INT64_MIN || obj > INT64_MAX) throw new UnencodableValue(`integer ${obj} does not fit in int64`);
      return { int_value: obj.toString() };
    case 'number':
      if (Number.isInteger(obj) && !Object.is(obj, -0)) {
        const big = BigInt(obj);
        if (big >= INT64_MIN && big <= INT64_MAX) return { int_value: big.toString() };
      }
      return { double_value: obj };
    case 'function':
    case 'symbol':
      throw new UnencodableValue(`cannot encode a ${typeof obj} as a task value`);
    default:
      break;
  }
  if (isBytes(obj)) return { bytes_value: asBuffer(obj) };
  if (obj instanceof ArrayBuffer) return { bytes_value: Buffer.from(obj) };
  let text;
  try {
    text = JSON.stringify(obj, jsonReplacer);
  } catch (err) {
    if (err instanceof UnencodableValue) throw err;
    throw new UnencodableValue(`cannot encode ${obj.constructor?.name || typeof obj} as a task value: ${err.message}`);
  }
  if (text === undefined) throw new UnencodableValue(`cannot encode ${String(obj)} as a task value`);
  return { json_value: text };
}

function decodeInt(raw) {
  if (typeof raw === 'number') return raw;
  if (typeof raw === 'bigint') return Number.isSafeInteger(Number(raw)) ? Number(raw) : raw;
  const text = String(raw); // proto-loader gives a decimal string (longs: String) or a Long
  const n = Number(text);
  return Number.isSafeInteger(n) ? n : BigInt(text);
}

/** Decode one Value message; an empty Value (or none) is null. */
function fromValue(value) {
  if (!value) return null;
  const kind = value.kind || Object.keys(value).find((k) => k.endsWith('_value') && value[k] !== undefined);
  switch (kind) {
    case 'int_value':
      return decodeInt(value.int_value);
    case 'double_value':
      return Number(value.double_value);
    case 'string_value':
      return value.string_value;
    case 'bool_value':
      return Boolean(value.bool_value);
    case 'bytes_value':
      return Buffer.from(value.bytes_value);
    case 'json_value':
      return JSON.parse(value.json_value);
    default:
      return null;
  }
}

const toValues = (objs) => Array.from(objs || [], toValue);
const fromValues = (values) => Array.from(values || [], fromValue);

function toValueMap(objs) {
  const out = {};
  for (const [key, obj] of Object.entries(objs || {})) out[key] = toValue(obj);
  return out;
}

function fromValueMap(values) {
  const out = {};
  for (const [key, value] of Object.entries(values || {})) out[key] = fromValue(value);
  return out;
}

/** JSON text for display: BigInt as digits, Buffers as {"$bytes": base64}. */
function show(obj) {
  if (typeof obj === 'bigint') return obj.toString();
  if (isBytes(obj)) return JSON.stringify({ $bytes: asBuffer(obj).toString('base64') });
  try {
    return JSON.stringify(obj, jsonReplacer) ?? String(obj);
  } catch {
    return String(obj);
  }
}

// -- well-known types -------------------------------------------------------------------------

/** Timestamp for now (microsecond precision), or for a Date / epoch milliseconds. */
function timestamp(at) {
  const ms = at === undefined ? performance.timeOrigin + performance.now() : Number(at instanceof Date ? at.getTime() : at);
  const seconds = Math.floor(ms / 1000);
  const micros = Math.min(Math.round((ms - seconds * 1000) * 1e3), 999999);
  return { seconds: String(seconds), nanos: micros * 1e3 };
}

function toDate(ts) {
  if (!ts) return null;
  return new Date(Number(ts.seconds) * 1000 + Math.floor((ts.nanos || 0) / 1e6));
}

function duration(seconds) {
  const value = Math.max(Number(seconds) || 0, 0);
  const whole = Math.floor(value);
  return { seconds: String(whole), nanos: Math.round((value - whole) * 1e9) };
}

function durationSeconds(d) {
  if (!d) return 0;
  return Number(d.seconds || 0) + (d.nanos || 0) / 1e9;
}

module.exports = {
  toValue, fromValue, toValues, fromValues, toValueMap, fromValueMap, show,
  timestamp, toDate, duration, durationSeconds, UnencodableValue, INT64_MIN, INT64_MAX,
};
