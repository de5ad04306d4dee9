// examples/seed-client.ts: plain socket.io-client code, unchanged, against herald.
// Node >= 22.6 runs the .ts directly (--experimental-strip-types); Node 20 runs the
// tsc output that `npm run build` writes to dist/examples/seed-client.js.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { spawnHerald, waitUntil, postEvents, uniqueId, PKG } from './helpers.mjs';

let server;
before(async () => { server = await spawnHerald(); });
after(async () => { await server.stop(); });

function seedCommand() {
  const [major, minor] = process.versions.node.split('.').map(Number);
  if (major > 22 || (major === 22 && minor >= 6)) {
    return ['--experimental-strip-types', '--no-warnings', path.join(PKG, 'examples/seed-client.ts')];
  }
  return [path.join(PKG, 'dist/examples/seed-client.js')];
}

test('seed client prints every event of the session and exits after completed', async () => {
  const sid = uniqueId('seed');
  const child = spawn(process.execPath, [...seedCommand(), server.url, sid], { cwd: PKG, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (c) => { out += c; });
  child.stderr.setEncoding('utf8').on('data', (c) => { err += c; });
  const exited = new Promise((resolve) => child.once('exit', (code) => resolve(code)));
  try {
    await waitUntil(() => out.includes('subscribed '), 10000, `"subscribed" from the seed client (stderr: ${err})`);
    await postEvents(server.url, sid, [
      { event: 'progress', data: { status: 'PROCESSING', progress: 30, prompts: { total: 1, completed: 0, processing: 1, pending: 0, failed: 0 }, hasClarifications: false, clarificationCount: 0 } },
      { event: 'model_result', data: { promptId: 'p1', modelName: 'm', provider: 'simulated', duration: 1, result: 'ok', status: 'completed' } },
      { event: 'clarification', data: { clarificationId: 'c1', question: 'Which?', status: 'pending' } },
      { event: 'completed', data: { result: { ok: true } } },
    ]);
    const code = await Promise.race([exited, new Promise((r) => setTimeout(() => r('timeout'), 10000))]);
    assert.equal(code, 0, `seed client exit code (stdout: ${out}, stderr: ${err})`);
    const lines = out.trim().split('\n');
    assert.deepEqual(lines.map((l) => l.split(' ')[0]), ['subscribed', 'progress', 'model_result', 'clarification', 'completed']);
    const events = lines.slice(1).map((l) => JSON.parse(l.slice(l.indexOf(' ') + 1)));
    assert.deepEqual(events.map((e) => e.seq), [1, 2, 3, 4]);
    assert.ok(events.every((e) => e.sessionId === sid));
  } finally {
    child.kill();
  }
});

test('examples/quickstart.ts (compiled) runs an orchestrated session to completion', async () => {
  const child = spawn(process.execPath, [path.join(PKG, 'dist/examples/quickstart.js'), server.url], { cwd: PKG, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (c) => { out += c; });
  child.stderr.setEncoding('utf8').on('data', (c) => { err += c; });
  const code = await Promise.race([
    new Promise((resolve) => child.once('exit', resolve)),
    new Promise((r) => setTimeout(() => r('timeout'), 30000)),
  ]);
  child.kill();
  assert.equal(code, 0, `quickstart exit (stdout: ${out}, stderr: ${err})`);
  assert.match(out, /expected: 404 SESSION_NOT_FOUND/);
  assert.match(out, /question: .*\(pending\)/);
  assert.match(out, /#\d+ completed/);
});
