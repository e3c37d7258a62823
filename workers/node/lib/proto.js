'use strict';
// Loads the Conveyor schema at run time (no generated code): from the package's own proto/ when installed,
// else from proto/ at the repository root (CONVEYOR_PROTO_DIR overrides both).
//
// Options, used the same way everywhere in this package:
//   keepCase: true  -> fields keep their proto names (task_id, lease_token), like the Python SDK;
//   longs: String   -> int64 fields arrive as decimal strings, so nothing is lost above 2^53
//                      (values.js turns them into Number when safe, else BigInt);
//   enums: String   -> enum values are their names ("TASK_STATE_SUCCESS");
//   defaults: true  -> unset scalars read as their zero value, unset messages as null;
//   oneofs: true    -> each oneof also names its set member (ConnectResponse.message, Value.kind).

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const fs = require('node:fs');
const protoLoader = require('@grpc/proto-loader');

// An installed package carries its own copy (proto/, put there by `npm pack`'s prepack step); a
// checkout of the repository reads the repository's.
const PACKED_PROTO = path.resolve(__dirname, '..', 'proto');
const PROTO_ROOT = process.env.CONVEYOR_PROTO_DIR
  || (fs.existsSync(path.join(PACKED_PROTO, 'conveyor')) ? PACKED_PROTO : path.resolve(__dirname, '..', '..', '..', 'proto'));
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

let cached = null;

function load() {
  if (cached === null) {
    const definition = protoLoader.loadSync(
      ['conveyor/v1/worker_service.proto', 'conveyor/v1/task_service.proto'],
      { ...LOADER_OPTIONS, includeDirs: [PROTO_ROOT] },
    );
    cached = grpc.loadPackageDefinition(definition).conveyor.v1;
  }
  return cached;
}

/** Metadata with `authorization: Bearer <token>` when a token is given (or CONVEYOR_TOKEN is set). */
function metadataFor(token) {
  const metadata = new grpc.Metadata();
  const bearer = token || process.env.CONVEYOR_TOKEN;
  if (bearer) metadata.set('authorization', `Bearer ${bearer}`);
  return metadata;
}

function defaultAddress() {
  return process.env.CONVEYOR_ADDRESS || '127.0.0.1:50051';
}

module.exports = { load, metadataFor, defaultAddress, grpc, PROTO_ROOT, LOADER_OPTIONS };
