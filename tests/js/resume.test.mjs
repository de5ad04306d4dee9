// Runs survive their node (SPEC §7), seen by the real socket.io-client: herald runs with
// `--data-dir`, is killed with SIGKILL in the middle of a run and started again on the same
// port and data dir. The client, created with `reconnection: true` and never touched by the
// test after the kill, reconnects by itself, resubscribes with the last `seq` it saw, and
// receives the rest of the run: one contiguous `seq` from 1, one terminal `model_result`
// per unit, one `completed`. The fake providers count their requests: the finished units
// were not asked again, the interrupted ones once more (`attempt: 2`).

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { io } from 'socket.io-client';
import { spawnHerald, stopAndAssertClean, waitConnected } from './helpers.mjs';
import { startFakeLlm } from './fake-llm.mjs';

const fakes = [];
const servers = [];
let tmpDir;
after(async () => {
  for (const server of servers) await server.stop({ signal: 'SIGKILL' }).catch(() => {});
  for (const fake of fakes) await fake.close();
  if (tmpDir) await fs.rm(tmpDir, { recursive: true, force: true });
});

function configToml(quickUrl, steadyUrl) {
  const model = (name, url) => `[[models]]
name = "${name}"
provider = "openai"
base_url = "${url}/v1"
timeout_secs = 60
retries = 0
max_concurrency = 8
`;
  return `[orchestrator]\nupdate_interval_ms = 100\n\n${model('quick', quickUrl)}\n${model('steady', steadyUrl)}`;
}

/** Resolves when `check()` holds, re-checked on every session event; rejects after `ms`. */
function until(events, check, ms, what) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    const poll = () => {
      if (check()) {
        clearTimeout(timer);
        clearInterval(interval);
        resolve();
      }
    };
    const interval = setInterval(poll, 20);
    poll();
  });
}

test('a run killed mid-way finishes after a restart, and a reconnecting client sees it whole', async () => {
  const quick = await startFakeLlm({ tokens: 5, delayMs: 0 });
  const steady = await startFakeLlm({ tokens: 40, delayMs: 100 });
  fakes.push(quick, steady);
  tmpDir = await fs.mkdtemp(path.join(os.tmpdir(), 'herald-resume-'));
  const configPath = path.join(tmpDir, 'herald.toml');
  await fs.writeFile(configPath, configToml(quick.url, steady.url));
  const args = ['--config', configPath, '--data-dir', path.join(tmpDir, 'data')];
  const first = await spawnHerald(args);
  servers.push(first);

  const created = await fetch(`${first.url}/api/wizard/sessions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      prompts: [{ id: 'alpha', text: 'alpha' }, { id: 'beta', text: 'beta' }],
      models: ['quick', 'steady'],
    }),
  });
  assert.equal(created.status, 201);
  const { sessionId } = await created.json();

  // The client any front end has: reconnects by itself, resubscribes from its last seq.
  const events = [];
  const disconnects = [];
  const socket = io(first.url, {
    transports: ['websocket'],
    reconnection: true,
    reconnectionDelay: 100,
    reconnectionDelayMax: 500,
  });
  const lastSeq = () => (events.length ? events[events.length - 1].data.seq : 0);
  socket.on('connect', () => socket.emit('subscribe', { sessionId, lastSeq: lastSeq() }));
  socket.on('disconnect', (reason) => disconnects.push(reason));
  for (const name of ['progress', 'model_result', 'clarification', 'completed', 'error']) {
    socket.on(name, (data) => events.push({ name, data }));
  }
  await waitConnected(socket);

  const quickDone = () => events.filter((e) => e.name === 'model_result'
    && e.data.modelName === 'quick' && e.data.status === 'completed').length;
  const steadyStreams = () => events.some((e) => e.name === 'model_result'
    && e.data.modelName === 'steady' && e.data.result !== '');
  await until(events, () => quickDone() === 2 && steadyStreams(), 10000, 'the quick units to end and the steady ones to stream');
  first.proc.kill('SIGKILL');
  await first.exited;
  const seenBefore = events.length;

  const second = await spawnHerald(args, { port: first.port });
  servers.push(second);
  await until(events, () => events.some((e) => e.name === 'completed' || e.name === 'error'), 20000, 'the end of the run');
  assert.ok(events.length > seenBefore, 'events arrived after the restart');
  assert.deepEqual(disconnects, ['transport close'], 'one drop, which the client recovered from by itself');

  const seqs = events.map((e) => e.data.seq);
  assert.deepEqual(seqs, seqs.map((_, i) => i + 1), 'one contiguous seq from 1, no duplicate');
  const terminal = events.filter((e) => e.name === 'model_result' && e.data.status !== 'processing');
  const units = terminal.map((e) => `${e.data.promptId}/${e.data.modelName}`).sort();
  assert.deepEqual(units, ['alpha/quick', 'alpha/steady', 'beta/quick', 'beta/steady'], 'one terminal result per unit');
  assert.ok(terminal.every((e) => e.data.status === 'completed'));
  assert.equal(events.filter((e) => e.name === 'completed').length, 1);
  assert.equal(events.at(-1).name, 'completed');
  for (const prompt of ['alpha', 'beta']) {
    const again = events.find((e) => e.name === 'model_result' && e.data.promptId === prompt
      && e.data.modelName === 'steady' && e.data.attempt === 2);
    assert.ok(again, `steady on ${prompt} says attempt 2`);
    assert.equal(again.data.status, 'processing');
  }
  assert.equal(quick.requests.length, 2, 'each finished unit was asked once');
  assert.equal(steady.requests.length, 4, 'each interrupted unit was asked once more');

  socket.close();
  await stopAndAssertClean(second);
});
