// 3. Bad input on the socket: an `error` event (and a failing ack), never a disconnect.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  spawnHerald, stopAndAssertClean, connect, waitFor, expectNoEvent, postOk, emitAck,
  uniqueId, assertIsoMs, assertSessionEvent, sampleData, closeAll, safeJson,
} from './helpers.mjs';

let server;
before(async () => { server = await spawnHerald(); });
after(async () => { await stopAndAssertClean(server); });

const ID = ['INVALID_SESSION_ID'];
const ANY = ['INVALID_SESSION_ID', 'INVALID_PAYLOAD'];

// [label, args passed to emit after the event name, acceptable codes]
const BAD = [
  ['empty string', [''], ID],
  ['129 characters', ['a'.repeat(129)], ID],
  ['space and !', ['bad id!'], ID],
  ['leading dash', ['-abc'], ID],
  ['slash', ['a/b'], ID],
  ['number 42', [42], ANY],
  ['empty object', [{}], ANY],
  ['{sessionId: 5}', [{ sessionId: 5 }], ANY],
  ['{sessionId: "bad id!"}', [{ sessionId: 'bad id!' }], ID],
  ['{sessionId: "ok", lastSeq: "x"}', [{ sessionId: 'ok-id', lastSeq: 'x' }], ['INVALID_PAYLOAD']],
  ['null', [null], ANY],
  ['true', [true], ANY],
  ['array', [['sess-1']], ANY],
  ['no payload at all', [], ANY],
];

function assertProtocolError(err, codes, label) {
  assert.ok(err && typeof err === 'object', `${label}: error payload must be an object: ${safeJson(err)}`);
  assert.ok(codes.includes(err.code), `${label}: error.code ${safeJson(err.code)} not in ${codes.join('|')} (payload ${safeJson(err)})`);
  assert.equal(typeof err.error, 'string', `${label}: error.error must be the message string: ${safeJson(err)}`);
  assert.ok(err.error.length > 0, `${label}: error message must not be empty`);
  assertIsoMs(err.timestamp, `${label}: error.timestamp`);
  assert.ok(!('seq' in err), `${label}: a protocol error has no seq: ${safeJson(err)}`);
}

function assertAckError(ack, codes, label) {
  assert.ok(ack && typeof ack === 'object', `${label}: ack must be an object: ${safeJson(ack)}`);
  assert.equal(ack.ok, false, `${label}: ack.ok: ${safeJson(ack)}`);
  assert.ok(ack.error && typeof ack.error === 'object', `${label}: ack.error must be { code, message }: ${safeJson(ack)}`);
  assert.ok(codes.includes(ack.error.code), `${label}: ack.error.code ${safeJson(ack.error.code)} not in ${codes.join('|')}`);
  assert.equal(typeof ack.error.message, 'string', `${label}: ack.error.message: ${safeJson(ack)}`);
  assert.ok(ack.error.message.length > 0);
}

/** After the bad inputs the socket is still usable: subscribe + a live event. */
async function assertStillWorks(socket, transportName) {
  assert.equal(socket.connected, true, 'socket must stay connected after bad input');
  assert.deepStrictEqual(socket.__rec.disconnects, [], 'no disconnect after bad input');
  const sessionId = uniqueId(`after-bad-${transportName}`);
  socket.emit('subscribe', sessionId);
  const sub = await waitFor(socket, 'subscribed', 5000, (p) => p.sessionId === sessionId);
  assert.equal(sub.lastSeq, 0);
  const data = sampleData('clarification');
  await postOk(server.url, sessionId, { event: 'clarification', data });
  const ev = await waitFor(socket, 'clarification');
  assertSessionEvent(ev, { sessionId, seq: 1, data });
  await expectNoEvent(socket, 'error', 100, () => true, 'no stray error after a valid subscribe');
}

describe('bad subscribe input', () => {
  for (const transports of [['websocket'], ['polling']]) {
    test(`error events without ack (${transports[0]})`, async () => {
      const socket = connect(server.url, { transports });
      try {
        await waitFor(socket, 'connected');
        for (const [label, args, codes] of BAD) {
          socket.emit('subscribe', ...args);
          const err = await waitFor(socket, 'error', 5000).catch((e) => {
            throw new Error(`subscribe ${label} (${safeJson(args)}): ${e.message}`);
          });
          assertProtocolError(err, codes, `subscribe ${label}`);
          assert.equal(socket.connected, true, `still connected after subscribe ${label}`);
        }
        await expectNoEvent(socket, 'subscribed', 100, () => true, 'bad input must not subscribe');
        await assertStillWorks(socket, transports[0]);
      } finally {
        closeAll(socket);
      }
    });
  }

  test('failing ack {ok:false, error:{code,message}} plus the error event', async () => {
    const socket = connect(server.url, { transports: ['websocket'] });
    try {
      await waitFor(socket, 'connected');
      for (const [label, args, codes] of BAD) {
        if (args.length === 0) continue; // emitWithAck needs the ack as last argument; covered above
        const ack = await emitAck(socket, 'subscribe', ...args);
        assertAckError(ack, codes, `ack subscribe ${label}`);
        const err = await waitFor(socket, 'error', 5000).catch((e) => {
          throw new Error(`subscribe ${label} with ack: the client must also get an error event: ${e.message}`);
        });
        assertProtocolError(err, codes, `subscribe ${label} (with ack)`);
        assert.equal(err.code, ack.error.code, `${label}: error event and ack carry the same code`);
      }
      await assertStillWorks(socket, 'ack');
    } finally {
      closeAll(socket);
    }
  });

  test('boundary: 128 characters and every allowed punctuation are valid ids', async () => {
    const socket = connect(server.url, { transports: ['websocket'] });
    try {
      await waitFor(socket, 'connected');
      for (const sessionId of ['a'.repeat(128), 'A9_.:-z', '0']) {
        const ack = await emitAck(socket, 'subscribe', sessionId);
        assert.deepStrictEqual({ ok: ack.ok, sessionId: ack.sessionId }, { ok: true, sessionId }, safeJson(ack));
        const sub = await waitFor(socket, 'subscribed', 5000, (p) => p.sessionId === sessionId);
        assert.equal(sub.lastSeq, 0);
      }
      await expectNoEvent(socket, 'error', 100);
    } finally {
      closeAll(socket);
    }
  });

  test('bad unsubscribe input gives an error, not a disconnect', async () => {
    const socket = connect(server.url, { transports: ['websocket'] });
    try {
      await waitFor(socket, 'connected');
      socket.emit('unsubscribe', 'bad id!');
      assertProtocolError(await waitFor(socket, 'error'), ID, 'unsubscribe "bad id!"');
      socket.emit('unsubscribe', 42);
      assertProtocolError(await waitFor(socket, 'error'), ANY, 'unsubscribe 42');
      const ack = await emitAck(socket, 'unsubscribe', '');
      assertAckError(ack, ID, 'ack unsubscribe ""');
      await waitFor(socket, 'error');
      await expectNoEvent(socket, 'unsubscribed', 100, () => true, 'bad unsubscribe must not reply unsubscribed');
      await assertStillWorks(socket, 'unsub');
    } finally {
      closeAll(socket);
    }
  });
});
