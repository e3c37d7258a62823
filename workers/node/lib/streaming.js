'use strict';
// Streamed submits (TaskService.SubmitStream): a group, or a chord's header, whose members come
// from an iterable that is not an array (a generator, an async generator) is read at submit and
// sent in pieces of PIECE_MEMBERS: open, members..., commit. The server submits the group only at
// the commit, so a stream that fails or is abandoned midway submits nothing (docs/canvas.md).

const { withErrorDetails } = require('./errors');

// Members per piece: the server's limit (core/streamed.py MAX_PIECE_MEMBERS).
const PIECE_MEMBERS = 1000;

/** True for members to stream: an iterable or async iterable that is not an array. */
function isLazy(members) {
  if (members === null || typeof members !== 'object' || Array.isArray(members)) return false;
  return typeof members[Symbol.asyncIterator] === 'function' || typeof members[Symbol.iterator] === 'function';
}

/** The lazy group a submit of `node` streams (a root group, a root chord's header), or null. */
function streamedGroup(node) {
  if (node.kind === 'group' && node.lazy) return node;
  if (node.kind === 'chord' && node.header && node.header.lazy) return node.header;
  return null;
}

/** `node` without its lazy members: what the stream's open message carries. */
function opening(node) {
  if (node.kind === 'chord') {
    const header = { ...node.header, lazy: undefined };
    return { ...node, header, members: header.members };
  }
  return { ...node, lazy: undefined };
}

/** Writes `message` on a client stream, waiting for the stream to drain when its buffer is full. */
function writer(call) {
  return (message) => new Promise((resolve) => {
    if (call.write(message)) resolve();
    else call.once('drain', resolve);
  });
}

/**
 * Submit `node` (see streamedGroup) over SubmitStream: `request` is the open message's submission
 * (the canvas without the lazy members, with any options); `toWorkflow` converts each member.
 * Resolves to {taskId, workflowId, taskIds: [], resultId}; the members are read one piece at a time.
 */
function submitStream(stub, metadata, node, request, toWorkflow) {
  const lazy = streamedGroup(node).lazy;
  return new Promise((resolve, reject) => {
    const call = stub.SubmitStream(metadata, (error, response) => {
      if (error) reject(withErrorDetails(error));
      else resolve({ taskId: response.task_id, workflowId: response.workflow_id, taskIds: [], resultId: response.workflow_id });
    });
    const write = writer(call);
    (async () => {
      await write({ open: request });
      let piece = [];
      let sent = 0;
      for await (const member of lazy) {
        piece.push(toWorkflow(member));
        if (piece.length >= PIECE_MEMBERS) {
          await write({ members: { members: piece } });
          sent += piece.length;
          piece = [];
        }
      }
      if (piece.length) await write({ members: { members: piece } });
      await write({ commit: { member_count: sent + piece.length } });
      call.end();
    })().catch((error) => {
      call.cancel(); // the server drops what it received: nothing is submitted
      reject(error);
    });
  });
}

module.exports = { PIECE_MEMBERS, isLazy, streamedGroup, opening, submitStream };
