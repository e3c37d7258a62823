'use strict';
// One WorkerService.Connect stream of a worker: the call, the messages written on it, heartbeats
// at the interval the server's Welcome gives, and the server's messages handed on.
//
// The Python worker keeps the same part in sdk/python/conveyor/worker_stream.py.

const { metadataFor, grpc } = require('./proto');
const { durationSeconds } = require('./values');

// Until the Welcome says otherwise; no heartbeat goes out before it.
const DEFAULT_HEARTBEAT_SECONDS = 5;
// A shorter interval from the server is raised to this.
const MIN_HEARTBEAT_SECONDS = 0.05;

class WorkerStream {
  /** `stub` is a WorkerService client; `log` has {warn, error}. */
  constructor(stub, token, log) {
    this._stub = stub;
    this._token = token;
    this.log = log;
    this._call = null; // while the stream is open
    this._heartbeatTimer = null;
  }

  get open() {
    return this._call !== null;
  }

  /**
   * Write `opening` (Hello first), then whatever send() is given, and hand each message from the
   * server to `onMessage`. Resolves (true when welcomed) when the server ends the stream; rejects
   * when it breaks, with `err.welcomed` set.
   */
  run(opening, onMessage) {
    return new Promise((resolve, reject) => {
      let welcomed = false;
      const call = this._stub.Connect(metadataFor(this._token));
      const finish = (err) => {
        if (this._call !== call) return;
        this._call = null;
        this._stopHeartbeats();
        if (err) {
          err.welcomed = welcomed;
          reject(err);
        } else {
          resolve(welcomed);
        }
      };
      call.on('data', (message) => {
        if (message.message === 'welcome') {
          welcomed = true;
          this._startHeartbeats(durationSeconds(message.welcome.heartbeat_interval) || DEFAULT_HEARTBEAT_SECONDS);
        }
        try {
          onMessage(message);
        } catch (err) {
          this.log.error(`handling a ${message.message} message failed: ${err.stack || err}`);
        }
      });
      call.on('error', (err) => finish(err));
      call.on('end', () => finish(null));
      call.on('status', (status) => { if (status.code === grpc.status.OK) finish(null); });
      this._call = call;
      for (const message of opening) this.send(message);
    });
  }

  /** Write a message; dropped once the stream has ended. */
  send(message) {
    if (!this._call) return;
    try {
      this._call.write(message);
    } catch (err) {
      this.log.warn(`could not write ${Object.keys(message)[0]}: ${err.message}`);
    }
  }

  /** End our side; the server then ends its side. */
  end() {
    if (this._call) this._call.end();
  }

  _startHeartbeats(seconds) {
    this._stopHeartbeats();
    const interval = Math.max(seconds, MIN_HEARTBEAT_SECONDS) * 1000;
    this._heartbeatTimer = setInterval(() => this.send({ heartbeat: {} }), interval);
  }

  _stopHeartbeats() {
    if (this._heartbeatTimer) clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }
}

module.exports = { WorkerStream };
