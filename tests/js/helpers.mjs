// Shared helpers for the socket.io-client compatibility tests.
//
// - spawnHerald(args): start the real herald binary on a free loopback port.
// - connect(url, opts): a socket.io-client socket with an event recorder attached.
// - waitFor(socket, event, timeoutMs, predicate): await the next matching event.
// - expectNoEvent(socket, event, ms, predicate): bounded negative check.
// - post(baseUrl, sessionId, body): producer ingest over HTTP (global fetch).

import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';

const HERE = path.dirname(fileURLToPath(import.meta.url));

export const ISO_MS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;
export const DEFAULT_TIMEOUT = 5000;

/** Path of the herald binary: $HERALD_BIN (relative to cwd) or ../../target/debug/herald. */
export function heraldBin() {
  const fromEnv = process.env.HERALD_BIN;
  if (fromEnv) return path.resolve(process.cwd(), fromEnv);
  return path.resolve(HERE, '../../target/debug/herald');
}

const live = new Set();
process.on('exit', () => {
  for (const child of live) {
    try { child.kill('SIGKILL'); } catch { /* already gone */ }
  }
});

/**
 * Start `herald serve --host 127.0.0.1 --port 0 --dev ...extraArgs` (`dev: false` drops --dev;
 * `port` binds that port instead, to restart a server where its clients reconnect), wait for the
 * `herald listening on http://HOST:PORT` line on stdout.
 * Resolves to { url, host, port, proc, stderr(), stop() }; stop() sends SIGTERM and
 * resolves to { code, signal } (SIGKILL after stopTimeoutMs, then rejects).
 */
export function spawnHerald(extraArgs = [], { env = {}, readyTimeoutMs = 30000, dev = true, port = 0 } = {}) {
  const bin = heraldBin();
  const args = ['serve', '--host', '127.0.0.1', '--port', String(port), ...(dev ? ['--dev'] : []), ...extraArgs];
  const proc = spawn(bin, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    // A drain bounded well inside `stop()`'s wait, so a slow drain shows as herald's own
    // warning and a clean exit, and only a real hang as a failed stop.
    env: { HERALD_SHUTDOWN_TIMEOUT_SECS: '4', ...process.env, ...env },
  });
  live.add(proc);

  let stdout = '';
  let stderr = '';
  const exited = new Promise((resolve) => {
    proc.once('exit', (code, signal) => {
      live.delete(proc);
      resolve({ code, signal });
    });
  });
  proc.stderr.setEncoding('utf8');
  proc.stderr.on('data', (chunk) => {
    stderr += chunk;
    if (stderr.length > 200_000) stderr = stderr.slice(-100_000);
  });

  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`herald did not print its listening line within ${readyTimeoutMs} ms\n` +
        `cmd: ${bin} ${args.join(' ')}\nstdout: ${stdout}\nstderr: ${stderr.slice(-4000)}`));
    }, readyTimeoutMs);
    proc.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot start herald (${bin}): ${err.message}. Build it with \`cargo build\` or set HERALD_BIN.`));
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`herald exited before listening (code ${code}, signal ${signal})\n` +
        `cmd: ${bin} ${args.join(' ')}\nstdout: ${stdout}\nstderr: ${stderr.slice(-4000)}`));
    });
    proc.stdout.setEncoding('utf8');
    proc.stdout.on('data', (chunk) => {
      stdout += chunk;
      const m = /listening on http:\/\/([^:\s]+):(\d+)/.exec(stdout);
      if (m) {
        clearTimeout(timer);
        const host = m[1];
        const port = Number(m[2]);
        resolve({ host, port, url: `http://${host}:${port}` });
      }
    });
  });

  return ready.then(({ host, port, url }) => ({
    host,
    port,
    url,
    proc,
    args,
    stdout: () => stdout,
    stderr: () => stderr,
    exited,
    async stop({ signal = 'SIGTERM', stopTimeoutMs = 10000 } = {}) {
      if (proc.exitCode !== null || proc.signalCode !== null) return exited;
      proc.kill(signal);
      let timer;
      const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => {
          proc.kill('SIGKILL');
          // A panic's message comes before its backtrace, which may push it out of the tail.
          const panic = stderr.match(/panicked at [^\n]*\n[^\n]*/);
          reject(new Error(`herald did not exit within ${stopTimeoutMs} ms of ${signal}\n` +
            (panic ? `panic: ${panic[0]}\n` : '') +
            `stderr: ${stderr.slice(-4000)}`));
        }, stopTimeoutMs);
      });
      try {
        return await Promise.race([exited, timeout]);
      } finally {
        clearTimeout(timer);
      }
    },
  }));
}

/** Stop a server with SIGTERM and assert a graceful exit (code 0). */
export async function stopAndAssertClean(server) {
  if (!server) return;
  const { code, signal } = await server.stop();
  assert.equal(signal, null, `herald was killed by ${signal} instead of exiting\n${server.stderr().slice(-4000)}`);
  assert.equal(code, 0, `herald exit code after SIGTERM\n${server.stderr().slice(-4000)}`);
}

/**
 * Attach an ordered recorder to a socket (all server->client events via onAny, plus
 * connect/disconnect/connect_error). Must be called synchronously after io(), before
 * the event loop turns, so that nothing is missed. Idempotent.
 */
export function record(socket) {
  if (socket.__rec) return socket.__rec;
  const rec = { log: [], waiters: new Set(), disconnects: [], connectErrors: [] };
  socket.__rec = rec;
  const push = (event, args) => {
    const entry = { event, args, payload: args[0], at: Date.now(), consumed: false };
    rec.log.push(entry);
    for (const w of [...rec.waiters]) {
      if (!entry.consumed && w.match(entry)) {
        entry.consumed = true;
        w.resolve(entry);
      }
    }
  };
  socket.onAny((event, ...args) => push(event, args));
  socket.on('connect', () => push('connect', []));
  socket.on('disconnect', (reason, details) => {
    rec.disconnects.push(reason);
    push('disconnect', [reason, details]);
  });
  socket.on('connect_error', (err) => {
    rec.connectErrors.push(err);
    push('connect_error', [err]);
  });
  return rec;
}

/** io(url, opts) with forceNew, no reconnection (unless overridden) and a recorder. */
export function connect(url, opts = {}) {
  const socket = io(url, { forceNew: true, reconnection: false, timeout: 5000, ...opts });
  record(socket);
  return socket;
}

/**
 * Resolve with the payload (first argument) of the next not-yet-consumed `event` on
 * `socket` for which predicate(payload, args) is true. With a recorder attached
 * (connect()/record()), events that already arrived count. Rejects after timeoutMs.
 */
export function waitFor(socket, event, timeoutMs = DEFAULT_TIMEOUT, predicate = () => true) {
  return waitForEntry(socket, event, timeoutMs, predicate).then((e) => e.payload);
}

/** Like waitFor but resolves with the recorder entry { event, args, payload, at }. */
export function waitForEntry(socket, event, timeoutMs = DEFAULT_TIMEOUT, predicate = () => true) {
  const rec = socket.__rec;
  const match = (entry) => entry.event === event && predicate(entry.payload, entry.args);
  if (!rec) {
    return new Promise((resolve, reject) => {
      const handler = (...args) => {
        if (!predicate(args[0], args)) return;
        clearTimeout(timer);
        socket.off(event, handler);
        resolve({ event, args, payload: args[0], at: Date.now() });
      };
      const timer = setTimeout(() => {
        socket.off(event, handler);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for '${event}'`));
      }, timeoutMs);
      socket.on(event, handler);
    });
  }
  const already = rec.log.find((e) => !e.consumed && match(e));
  if (already) {
    already.consumed = true;
    return Promise.resolve(already);
  }
  return new Promise((resolve, reject) => {
    const waiter = {
      match,
      resolve: (entry) => {
        clearTimeout(timer);
        rec.waiters.delete(waiter);
        resolve(entry);
      },
    };
    const timer = setTimeout(() => {
      rec.waiters.delete(waiter);
      const seen = rec.log.map((e) => `${e.event}${e.consumed ? '(consumed)' : ''} ${safeJson(e.payload, 200)}`);
      reject(new Error(`timed out after ${timeoutMs} ms waiting for '${event}'. ` +
        `Events seen on this socket:\n  ${seen.join('\n  ') || '(none)'}`));
    }, timeoutMs);
    rec.waiters.add(waiter);
  });
}

/** Wait for `n` matching events, in arrival order. */
export async function waitForN(socket, event, n, timeoutMs = DEFAULT_TIMEOUT, predicate = () => true) {
  const deadline = Date.now() + timeoutMs;
  const out = [];
  for (let i = 0; i < n; i++) {
    const left = Math.max(1, deadline - Date.now());
    try {
      out.push(await waitFor(socket, event, left, predicate));
    } catch (err) {
      err.message = `got ${i}/${n} '${event}' events: ${safeJson(out, 2000)}\n${err.message}`;
      throw err;
    }
  }
  return out;
}

/**
 * Bounded negative check: assert that no (unconsumed) matching `event` arrives on the
 * socket within `ms` milliseconds. Requires a recorder.
 */
export async function expectNoEvent(socket, event, ms = 300, predicate = () => true, message = '') {
  const rec = socket.__rec;
  assert.ok(rec, 'expectNoEvent needs a recorder (use connect() or record())');
  const find = () => rec.log.find((e) => !e.consumed && e.event === event && predicate(e.payload, e.args));
  let hit = find();
  if (!hit) {
    await new Promise((r) => setTimeout(r, ms));
    hit = find();
  }
  assert.equal(hit, undefined,
    `${message ? message + ': ' : ''}unexpected '${event}' event: ${safeJson(hit && hit.payload, 1000)}`);
}

/** The recorded events (not connect/disconnect) in arrival order, optionally filtered. */
export function eventsOf(socket, filter = () => true) {
  const rec = socket.__rec;
  return rec.log.filter((e) => !['connect', 'disconnect', 'connect_error'].includes(e.event) && filter(e));
}

/** POST /api/sessions/{id}/events; resolves to { status, body, headers }. */
export async function post(baseUrl, sessionId, body, { headers = {}, query = '' } = {}) {
  const res = await fetch(`${baseUrl}/api/sessions/${encodeURIComponent(sessionId)}/events${query}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  let parsed;
  try { parsed = text.length ? JSON.parse(text) : undefined; } catch { parsed = text; }
  return { status: res.status, body: parsed, headers: res.headers };
}

/** POST and assert 202 with `{ accepted, lastSeq, ... }`; returns the body. */
export async function postOk(baseUrl, sessionId, body, options = {}) {
  const r = await post(baseUrl, sessionId, body, options);
  assert.equal(r.status, 202, `POST events for ${sessionId}: expected 202, got ${r.status} ${safeJson(r.body, 1000)}`);
  return r.body;
}

/** GET a JSON resource; resolves to { status, body }. */
export async function getJson(baseUrl, p) {
  const res = await fetch(`${baseUrl}${p}`);
  const text = await res.text();
  let parsed;
  try { parsed = text.length ? JSON.parse(text) : undefined; } catch { parsed = text; }
  return { status: res.status, body: parsed };
}

let counter = 0;
/** A session id unique to this process and test. */
export function uniqueId(prefix = 'js') {
  counter += 1;
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${counter}`;
}

/** Assert an ISO 8601 UTC timestamp with milliseconds, close to now. */
export function assertIsoMs(value, what = 'timestamp', { maxSkewMs = 120000 } = {}) {
  assert.equal(typeof value, 'string', `${what} must be a string, got ${safeJson(value)}`);
  assert.match(value, ISO_MS, `${what} must be ISO 8601 UTC with ms`);
  const t = Date.parse(value);
  assert.ok(Number.isFinite(t), `${what} must parse as a date: ${value}`);
  assert.ok(Math.abs(Date.now() - t) < maxSkewMs, `${what} ${value} is not close to now (${new Date().toISOString()})`);
}

/** Disconnect sockets, ignoring already-closed ones. */
export function closeAll(...sockets) {
  for (const s of sockets.flat()) {
    try { s && s.disconnect(); } catch { /* ignore */ }
  }
}

/** Await the socket's connect (immediately if already connected). */
export function waitConnected(socket, timeoutMs = DEFAULT_TIMEOUT) {
  if (socket.connected) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`socket did not connect within ${timeoutMs} ms`));
    }, timeoutMs);
    const onConnect = () => { cleanup(); resolve(); };
    const onError = (err) => { cleanup(); reject(new Error(`connect_error: ${err && err.message}`)); };
    const cleanup = () => {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.off('connect_error', onError);
    };
    socket.on('connect', onConnect);
    socket.on('connect_error', onError);
  });
}

/** emitWithAck with a timeout and a clear error message. */
export async function emitAck(socket, event, ...args) {
  try {
    return await socket.timeout(DEFAULT_TIMEOUT).emitWithAck(event, ...args);
  } catch (err) {
    throw new Error(`no ack for '${event}' ${safeJson(args, 300)} within ${DEFAULT_TIMEOUT} ms (${err.message})`);
  }
}

export function safeJson(v, max = 500) {
  let s;
  try { s = JSON.stringify(v); } catch { s = String(v); }
  if (s === undefined) s = String(v);
  return s.length > max ? s.slice(0, max) + `…(${s.length} chars)` : s;
}

// ---- sample event data (complete per SPEC §1, so the received payload can be compared exactly)

export function sampleData(kind, n = 1) {
  switch (kind) {
    case 'progress':
      return {
        status: 'PROCESSING',
        progress: Math.min(100, 10 * n),
        prompts: { total: 2, completed: 0, processing: 1, pending: 1, failed: 0 },
        hasClarifications: false,
        clarificationCount: 0,
        custom: { nested: [1, 2] },
      };
    case 'model_result':
      return {
        promptId: `prompt-${n}`,
        modelName: 'llama3.1:8b',
        provider: 'simulated',
        duration: 1234 + n,
        result: `partial output ${n}`,
        status: 'processing',
        custom: { nested: [1, 2] },
      };
    case 'clarification':
      return {
        clarificationId: '6f1c2a4e-8b1d-4c3e-9f2a-0123456789ab',
        question: 'Which region should the report cover?',
        status: 'pending',
        custom: { nested: [1, 2] },
      };
    case 'completed':
      return {
        result: { prompts: [{ promptId: 'prompt-1', outputs: { 'llama3.1:8b': 'done' } }], totalDuration: 4321 },
        custom: { nested: [1, 2] },
      };
    case 'error':
      return { error: 'model llama3.1:8b failed: connection refused', code: 'MODEL_FAILED', custom: { nested: [1, 2] } };
    default:
      throw new Error(`unknown kind ${kind}`);
  }
}

export const KINDS = ['progress', 'model_result', 'clarification', 'completed', 'error'];

/**
 * Assert a received session event equals data + { sessionId, seq, timestamp } exactly,
 * with a server-filled (or producer-given) ISO-ms timestamp.
 */
export function assertSessionEvent(got, { sessionId, seq, data, what = 'event' }) {
  assert.ok(got && typeof got === 'object', `${what}: payload must be an object, got ${safeJson(got)}`);
  if (typeof data.timestamp === 'string') {
    assert.equal(got.timestamp, data.timestamp, `${what}: producer timestamp must be kept verbatim`);
  } else {
    assertIsoMs(got.timestamp, `${what}.timestamp`);
  }
  assert.deepStrictEqual(got, { ...data, sessionId, seq, timestamp: got.timestamp },
    `${what}: payload must be the producer data plus sessionId, seq, timestamp (nothing dropped, renamed or added)`);
}
