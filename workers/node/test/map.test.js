'use strict';
// map, starmap and chunks: the workflow the client sends, and how the worker runs a chunk task.
const test = require('node:test');
const assert = require('node:assert/strict');
const { sig, map, starmap, chunks, link, toWorkflow, callTask } = require('../lib');
const { toValue, fromValue } = require('../lib/values');

test('map, starmap and chunks send the items once, with their chunk size', () => {
  const mapped = toWorkflow(map(sig('double'), [1, 2, 3], { chunkSize: 2 })).map;
  assert.deepEqual(mapped.items.map(fromValue), [1, 2, 3]);
  assert.equal(mapped.chunk_size, 2);
  assert.equal(mapped.star, false);
  assert.equal(mapped.task.immutable, true);
  const chunked = toWorkflow(chunks(sig('add'), [[1, 2], [3, 4]], 1)).map;
  assert.deepEqual(chunked.items.map(fromValue), [[1, 2], [3, 4]]);
  assert.equal(chunked.star, true);
  assert.equal(chunked.nested, true);
  assert.equal(toWorkflow(starmap(sig('add'), [[1, 2]])).map.chunk_size, 100);
  const linked = toWorkflow(link(map(sig('double'), [1]), sig('done')));
  assert.equal(linked.chain.on_success[0].name, 'done');
  assert.throws(() => map(sig('add', [1]), [1]), /takes no args of its own/);
  assert.throws(() => chunks(sig('add'), [[1]], 0), /chunkSize must be an integer of at least 1/);
});

test('a chunk task calls the task once per item and returns the list', async () => {
  const add = async ([x, y]) => x + y;
  const starred = { args: [toValue([1, 2]), toValue([3, 4])], kwargs: {}, headers: { 'conveyor-map': 'starmap' } };
  assert.deepEqual(await callTask(add, starred, {}), [3, 7]);
  const mapped = { args: [toValue(5), toValue(6)], kwargs: {}, headers: { 'conveyor-map': 'map' } };
  assert.deepEqual(await callTask(async ([x]) => x * 2, mapped, {}), [10, 12]);
  const plain = { args: [toValue(1), toValue(2)], kwargs: {}, headers: {} };
  assert.equal(await callTask(add, plain, {}), 3);
  const bad = { args: [toValue(1)], kwargs: {}, headers: { 'conveyor-map': 'starmap' } };
  await assert.rejects(callTask(add, bad, {}), /starmap item 0 is number, not a list of args/);
});
