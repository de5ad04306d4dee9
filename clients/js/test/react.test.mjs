// useSession rendered with react-test-renderer against the real herald.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import React from 'react';
import TestRenderer from 'react-test-renderer';
import { HeraldClient } from '../dist/index.js';
import { useSession } from '../dist/react.js';
import { spawnHerald, waitUntil } from './helpers.mjs';

// Socket events update state outside act(); the legacy root renders them synchronously.
// Mount/unmount go through act(), which flushes effects and their cleanups at once.
globalThis.IS_REACT_ACT_ENVIRONMENT = false;
function inAct(fn) {
  globalThis.IS_REACT_ACT_ENVIRONMENT = true;
  let out;
  try {
    TestRenderer.act(() => { out = fn(); });
  } finally {
    globalThis.IS_REACT_ACT_ENVIRONMENT = false;
  }
  return out;
}

let server;
before(async () => { server = await spawnHerald(); });
after(async () => {
  const { code } = await server.stop();
  assert.equal(code, 0);
});

function counts(socket) {
  return ['connect', 'disconnect', 'progress', 'model_result', 'clarification', 'completed', 'error']
    .map((e) => socket.listeners(e).length).join(',');
}

test('useSession: status/progress update to COMPLETED; no listeners left after unmount', async () => {
  const client = new HeraldClient(server.url, { transports: ['websocket'] });
  const renders = [];
  function View({ sessionId }) {
    const s = useSession(client, sessionId);
    renders.push(s);
    return React.createElement('span', null, `${s.status ?? 'none'} ${s.progress}%`);
  }
  try {
    await waitUntil(() => client.socket.connected, 5000, 'connect');
    const baseline = counts(client.socket);
    const snap = await client.createSession({ prompts: ['What is a monad?', 'Explain closures'], models: ['sim-fast', 'sim-balanced'] });

    const root = inAct(() => TestRenderer.create(React.createElement(View, { sessionId: snap.sessionId })));
    await waitUntil(() => renders.at(-1).status === 'COMPLETED' && renders.at(-1).result, 20000, 'COMPLETED in the hook');
    const last = renders.at(-1);
    assert.equal(last.progress, 100);
    assert.equal(last.connected, true);
    assert.equal(last.prompts.total, 2);
    assert.equal(last.prompts.completed, 2);
    assert.equal(last.modelResults.length, 4, 'latest result per prompt and model');
    assert.ok(last.modelResults.every((m) => m.status === 'completed'));
    assert.equal(last.error, null);
    assert.ok(last.result && Array.isArray(last.result.prompts));
    assert.equal(root.toJSON().children.join(''), 'COMPLETED 100%');
    // progress moved forward through PROCESSING, never backwards
    const seen = renders.map((r) => r.progress);
    assert.ok(renders.some((r) => r.status === 'PROCESSING'));
    for (let i = 1; i < seen.length; i++) assert.ok(seen[i] >= seen[i - 1] || renders[i].status === null, `progress went back: ${seen}`);
    assert.equal(client.subscriptionCount, 1);
    assert.notEqual(counts(client.socket), baseline);

    // switching sessionId: the old subscription goes, state resets, the new one is followed
    const other = await client.createSession({ prompts: ['Explain [clarify] things'], models: ['sim-fast'] });
    inAct(() => root.update(React.createElement(View, { sessionId: other.sessionId })));
    await waitUntil(() => renders.at(-1).clarifications.some((c) => c.status === 'pending'), 10000, 'pending clarification');
    assert.equal(client.subscriptionCount, 1);
    const pending = renders.at(-1).clarifications[0];
    await client.respond(other.sessionId, pending.clarificationId, 'basics');
    await waitUntil(() => renders.at(-1).status === 'COMPLETED' && renders.at(-1).result, 20000, 'second COMPLETED');
    assert.equal(renders.at(-1).clarifications[0].status, 'answered');

    inAct(() => root.unmount());
    assert.equal(client.subscriptionCount, 0, 'no subscription left');
    assert.equal(counts(client.socket), baseline, 'no socket listener left');
  } finally {
    client.close();
  }
});

test('useSession: connected follows the socket and the subscription survives a forced disconnect', async () => {
  const client = new HeraldClient(server.url, { transports: ['websocket'], reconnectionDelay: 200 });
  const renders = [];
  function View({ sessionId }) {
    const s = useSession(client, sessionId);
    renders.push(s);
    return null;
  }
  try {
    const snap = await client.createSession({ prompts: ['Explain [clarify] closures'], models: ['sim-slow'] });
    const root = inAct(() => TestRenderer.create(React.createElement(View, { sessionId: snap.sessionId })));
    await waitUntil(() => renders.at(-1).clarifications.some((c) => c.status === 'pending'), 15000, 'clarification');
    await fetch(`${server.url}/api/dev/session/${snap.sessionId}/drop-sockets`, { method: 'POST' });
    await waitUntil(() => renders.some((r) => r.connected === false), 5000, 'connected=false');
    await waitUntil(() => renders.at(-1).connected === true, 10000, 'connected=true again');
    await client.respond(snap.sessionId, renders.at(-1).clarifications[0].clarificationId, 'x');
    await waitUntil(() => renders.at(-1).status === 'COMPLETED' && renders.at(-1).result, 30000, 'COMPLETED');
    const final = await client.getSession(snap.sessionId);
    assert.equal(renders.at(-1).lastSeq, final.lastSeq);
    inAct(() => root.unmount());
    assert.equal(client.subscriptionCount, 0);
  } finally {
    client.close();
  }
});
