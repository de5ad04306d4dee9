// followSessions() and useSessions() against the real herald: the list, live changes,
// a server-side drop healed by the fresh list, and a refusal with auth on.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import React from 'react';
import TestRenderer from 'react-test-renderer';
import { HeraldClient } from '../dist/index.js';
import { useSessions } from '../dist/react.js';
import { spawnHerald, waitUntil, postEvents, uniqueId } from './helpers.mjs';

globalThis.IS_REACT_ACT_ENVIRONMENT = false;

let server;
before(async () => { server = await spawnHerald(); });
after(async () => {
  const { code } = await server.stop();
  assert.equal(code, 0);
});

const progress = (n, extra = {}) => ({ event: 'progress', data: { status: 'PROCESSING', progress: n, ...extra } });

test('followSessions: the list, then each change; a drop heals with a fresh list, nothing lost', async () => {
  const early = uniqueId('feed-early');
  await postEvents(server.url, early, [progress(5)]);
  const client = new HeraldClient(server.url, { transports: ['websocket'], reconnectionDelay: 50, reconnectionDelayMax: 100 });
  const lists = [];
  const changes = [];
  const feed = client.followSessions({
    onSessions: (sessions, info) => lists.push({ sessions, ...info }),
    onSession: (s) => changes.push(s),
  });
  try {
    await waitUntil(() => feed.synced, 10000, 'the first list');
    assert.ok(feed.sessions.some((s) => s.sessionId === early && s.progress === 5), 'the list holds the session');

    const created = await client.createSession({ prompts: ['What is a monad?'], models: ['sim-fast'] });
    await waitUntil(
      () => feed.sessions.find((s) => s.sessionId === created.sessionId)?.status === 'COMPLETED',
      20000,
      'the created run COMPLETED in the feed',
    );
    assert.equal(feed.sessions[0].sessionId, created.sessionId, 'newest first');
    assert.ok(changes.some((s) => s.sessionId === created.sessionId), 'changes came as `session` messages');

    // The feed socket also follows `early`, so the dev drop cuts it off.
    const sub = client.subscribe(early, {});
    await waitUntil(() => sub.lastSeq === 1, 10000, 'subscribed to early');
    const listsBefore = lists.length;
    const res = await fetch(`${server.url}/api/dev/session/${encodeURIComponent(early)}/drop-sockets`, { method: 'POST' });
    assert.equal(res.status, 200);
    await waitUntil(() => !feed.synced, 10000, 'the drop noticed');
    // A change while the client is away must still show once it is back.
    await postEvents(server.url, early, [progress(60)]);
    await waitUntil(
      () => feed.synced && feed.sessions.find((s) => s.sessionId === early)?.progress === 60,
      10000,
      'the change made while away, after the reconnect',
    );
    assert.ok(lists.slice(listsBefore).some((l) => l.synced), 'a fresh list after the reconnect');
    sub.unsubscribe();
  } finally {
    feed.stop();
    client.close();
  }
});

test('useSessions renders the live list and stops on unmount', async () => {
  const client = new HeraldClient(server.url, { transports: ['websocket'] });
  const renders = [];
  function Jobs() {
    const { sessions, synced } = useSessions(client);
    renders.push({ sessions, synced });
    return React.createElement('ul', null, sessions.map((s) => React.createElement('li', { key: s.sessionId }, `${s.sessionId} ${s.progress}`)));
  }
  const id = uniqueId('feed-hook');
  let root;
  try {
    globalThis.IS_REACT_ACT_ENVIRONMENT = true;
    TestRenderer.act(() => { root = TestRenderer.create(React.createElement(Jobs)); });
    globalThis.IS_REACT_ACT_ENVIRONMENT = false;
    await waitUntil(() => renders.at(-1).synced, 10000, 'synced in the hook');
    await postEvents(server.url, id, [progress(42)]);
    await waitUntil(() => renders.at(-1).sessions.some((s) => s.sessionId === id && s.progress === 42), 10000, 'the new session in the hook');
    assert.ok(JSON.stringify(root.toJSON()).includes(`${id} 42`));
    globalThis.IS_REACT_ACT_ENVIRONMENT = true;
    TestRenderer.act(() => root.unmount());
    globalThis.IS_REACT_ACT_ENVIRONMENT = false;
    // After unmount a change reaches another feed on the same client, not the hook.
    const rendered = renders.length;
    const other = client.followSessions();
    await waitUntil(() => other.synced, 10000, 'the other feed');
    await postEvents(server.url, id, [progress(43)]);
    await waitUntil(() => other.sessions.some((s) => s.sessionId === id && s.progress === 43), 10000, 'the change');
    assert.equal(renders.length, rendered, 'an unmounted hook renders no more');
    other.stop();
  } finally {
    client.close();
  }
});

test('followSessions with auth on: each token sees only the sessions it may read', async () => {
  const secret = 'feed-test-secret-0123456789abcdef';
  const authed = await spawnHerald(['--jwt-secret', secret]);
  const { createHmac } = await import('node:crypto');
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const sign = (claims) => {
    const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
    return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
  };
  const exp = Math.floor(Date.now() / 1000) + 600;
  const ops = sign({ sub: 'ops', exp, scope: 'read publish', sessions: ['*'] });
  const carol = new HeraldClient(authed.url, {
    transports: ['websocket'],
    token: () => sign({ sub: 'carol', exp, scope: 'read create', sessions: [] }),
  });
  const watcher = new HeraldClient(authed.url, { transports: ['websocket'], token: ops });
  try {
    const mine = carol.followSessions();
    const all = watcher.followSessions();
    await waitUntil(() => mine.synced && all.synced, 10000, 'both lists');
    const theirs = uniqueId('not-carols');
    const res = await fetch(`${authed.url}/api/sessions/${theirs}/events`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${ops}` },
      body: JSON.stringify([progress(9)]),
    });
    assert.equal(res.status, 202);
    await waitUntil(() => all.sessions.some((s) => s.sessionId === theirs), 10000, 'the ops feed sees it');
    const created = await carol.createSession({ prompts: ['Explain closures'], models: ['sim-fast'] });
    await waitUntil(
      () => mine.sessions.find((s) => s.sessionId === created.sessionId)?.status === 'COMPLETED',
      20000,
      "carol's own run COMPLETED in her feed",
    );
    assert.deepEqual(mine.sessions.map((s) => s.sessionId), [created.sessionId], 'carol sees only her own session');
    await waitUntil(() => all.sessions.some((s) => s.sessionId === created.sessionId), 10000, 'ops sees every session');
  } finally {
    carol.close();
    watcher.close();
    await authed.stop();
  }
});
