// Shared test helpers: the real herald binary on a free loopback port.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const PKG = path.resolve(HERE, '..');

/** $HERALD_BIN (relative to cwd) or ../../target/debug/herald (relative to clients/js). */
export function heraldBin() {
  const fromEnv = process.env.HERALD_BIN;
  if (fromEnv) return path.resolve(process.cwd(), fromEnv);
  return path.resolve(PKG, '../../target/debug/herald');
}

const live = new Set();
process.on('exit', () => {
  for (const child of live) {
    try { child.kill('SIGKILL'); } catch { /* gone */ }
  }
});

/** Start `herald serve --host 127.0.0.1 --port 0 --dev ...extra`; resolves { url, stop() }. */
export function spawnHerald(extra = []) {
  const bin = heraldBin();
  const args = ['serve', '--host', '127.0.0.1', '--port', '0', '--dev', ...extra];
  const proc = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(proc);
  let stdout = '';
  let stderr = '';
  const exited = new Promise((resolve) => proc.once('exit', (code, signal) => {
    live.delete(proc);
    resolve({ code, signal });
  }));
  proc.stderr.setEncoding('utf8');
  proc.stderr.on('data', (c) => { stderr = (stderr + c).slice(-20000); });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`herald did not start within 30 s\nstderr: ${stderr}`));
    }, 30000);
    proc.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot start herald (${bin}): ${err.message}; build it or set HERALD_BIN`));
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`herald exited early (code ${code}, signal ${signal})\nstderr: ${stderr}`));
    });
    proc.stdout.setEncoding('utf8');
    proc.stdout.on('data', (c) => {
      stdout += c;
      const m = /listening on http:\/\/([^:\s]+):(\d+)/.exec(stdout);
      if (m) {
        clearTimeout(timer);
        resolve({
          url: `http://${m[1]}:${m[2]}`,
          stderr: () => stderr,
          async stop() {
            if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
            const t = setTimeout(() => proc.kill('SIGKILL'), 10000);
            const r = await exited;
            clearTimeout(t);
            return r;
          },
        });
      }
    });
  });
}

/** Poll `fn` until it returns truthy; rejects after timeoutMs with `what`. */
export async function waitUntil(fn, timeoutMs = 10000, what = 'condition') {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Producer ingest; returns the JSON body (asserting 202). */
/** `query` (e.g. `'?reopen=true'`): a session that has ended takes producer events only with reopen. */
export async function postEvents(url, sessionId, body, query = '') {
  const res = await fetch(`${url}/api/sessions/${encodeURIComponent(sessionId)}/events${query}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const json = await res.json();
  if (res.status !== 202) throw new Error(`ingest ${sessionId}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

export async function getJson(url, p) {
  const res = await fetch(url + p);
  return { status: res.status, body: await res.json() };
}

let n = 0;
export function uniqueId(prefix = 'hc') {
  n += 1;
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${n}`;
}

/** A recorder of everything a subscription delivers, in order. */
export function recorder() {
  const rec = { events: [], resyncs: [], errors: [], subscribed: [] };
  rec.handlers = {
    progress: (e) => rec.events.push({ kind: 'progress', e }),
    modelResult: (e) => rec.events.push({ kind: 'modelResult', e }),
    clarification: (e) => rec.events.push({ kind: 'clarification', e }),
    completed: (e) => rec.events.push({ kind: 'completed', e }),
    error: (e) => rec.events.push({ kind: 'error', e }),
    onResync: (s) => rec.resyncs.push(s),
    onSubscribed: (a) => rec.subscribed.push(a),
    onSubscribeError: (err) => rec.errors.push(err),
  };
  rec.seqs = () => rec.events.map((x) => x.e.seq);
  rec.last = () => rec.events[rec.events.length - 1];
  return rec;
}
