'use strict';
// Reference server for the herald benchmark: the same wire contract as herald
// (docs/protocol.md) for the parts the benchmark uses, on the official `socket.io`
// 4.x server. It is the baseline herald is compared against, so it is written the way
// a Node developer would write it, with the tuning the Socket.IO docs recommend
// ("Performance tuning": `bufferutil` installed, the handshake request discarded).
//
//   PORT=0 node bench/node-reference/server.js
//   -> prints `herald-node-reference listening on http://127.0.0.1:PORT` on stdout when ready.
//
// Env: PORT (default 3000, 0 = any free port), HOST (default 127.0.0.1),
//      RETAIN (events kept per session, default 1000),
//      NODE_REF_KEEP_REQUEST=1 keeps the handshake request on each socket (Socket.IO default),
//      REDIS_URL (e.g. redis://127.0.0.1:6379): run as one node of a cluster with the
//      official @socket.io/redis-adapter (`redis` client, one pub + one sub connection), so
//      `io.to(room).emit` reaches the room's sockets on every node; REDIS_PREFIX is the
//      adapter's channel prefix (default `socket.io`). Session state (seq, retained log)
//      stays per node, as in a bare adapter deployment: the benchmark posts all events of
//      a session to one node.

const http = require('node:http');
const crypto = require('node:crypto');
const { Server } = require('socket.io');

const REDIS_URL = process.env.REDIS_URL || '';
const REDIS_PREFIX = process.env.REDIS_PREFIX || 'socket.io';

const HOST = process.env.HOST || '127.0.0.1';
const PORT = process.env.PORT === undefined ? 3000 : Number(process.env.PORT);
const RETAIN = Number(process.env.RETAIN || 1000);
const MAX_BODY = 1024 * 1024;
const MAX_BATCH = 1000;

const SESSION_ID = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;
const EVENTS = new Set(['progress', 'model_result', 'clarification', 'completed', 'error']);

/** sessionId -> { lastSeq, epoch, log: [{ seq, event, data }] } (log holds the last RETAIN) */
const sessions = new Map();

function now() {
  return new Date().toISOString();
}

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
  });
  res.end(text);
}

function httpError(res, status, code, message) {
  sendJson(res, status, { error: { code, message } });
}

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (req.method === 'GET' && url.pathname === '/healthz') {
    return sendJson(res, 200, { status: 'ok' });
  }
  const m = /^\/api\/sessions\/([^/]+)\/events$/.exec(url.pathname);
  if (!m) return httpError(res, 404, 'NOT_FOUND', 'no such route');
  if (req.method !== 'POST') return httpError(res, 405, 'METHOD_NOT_ALLOWED', 'use POST');

  let id;
  try {
    id = decodeURIComponent(m[1]);
  } catch {
    id = '';
  }
  if (!SESSION_ID.test(id)) return httpError(res, 400, 'INVALID_SESSION_ID', 'invalid session id');

  const chunks = [];
  let size = 0;
  let tooLarge = false;
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY) tooLarge = true;
    else chunks.push(chunk);
  });
  req.on('end', () => {
    if (tooLarge) return httpError(res, 413, 'PAYLOAD_TOO_LARGE', 'body too large');
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch {
      return httpError(res, 400, 'INVALID_JSON', 'body is not JSON');
    }
    const items = Array.isArray(body) ? body : [body];
    if (items.length === 0) return httpError(res, 400, 'EMPTY_BATCH', 'empty batch');
    if (items.length > MAX_BATCH) return httpError(res, 400, 'BATCH_TOO_LARGE', 'batch too large');
    // Whole batch validated first: all-or-nothing.
    for (const item of items) {
      if (!isObject(item) || !EVENTS.has(item.event) || (item.data !== undefined && !isObject(item.data))) {
        return httpError(res, 400, 'INVALID_EVENT', 'each item needs { event, data }');
      }
      if (item.data && item.data.sessionId !== undefined && item.data.sessionId !== id) {
        return httpError(res, 400, 'INVALID_EVENT', 'data.sessionId does not match the path');
      }
    }

    let s = sessions.get(id);
    if (!s) {
      s = { lastSeq: 0, epoch: crypto.randomUUID(), log: [] };
      sessions.set(id, s);
    }
    const room = io.to(id);
    const ts = now();
    for (const item of items) {
      const seq = ++s.lastSeq;
      const data = { ...item.data, sessionId: id, seq };
      if (typeof data.timestamp !== 'string') data.timestamp = ts;
      s.log.push({ seq, event: item.event, data });
      room.emit(item.event, data);
    }
    if (s.log.length > RETAIN) s.log.splice(0, s.log.length - RETAIN);
    sendJson(res, 202, { accepted: items.length, duplicates: 0, lastSeq: s.lastSeq });
  });
});

const io = new Server(server, { cors: { origin: true, credentials: true } });

if (process.env.NODE_REF_KEEP_REQUEST !== '1') {
  // Socket.IO docs, "Performance tuning": free the handshake request once it has been used.
  io.engine.on('connection', (rawSocket) => {
    rawSocket.request = null;
  });
}

function parseSessionArg(payload) {
  if (typeof payload === 'string') return { sessionId: payload };
  if (isObject(payload) && typeof payload.sessionId === 'string') return payload;
  return null;
}

function protocolError(socket, ack, code, message, sessionId) {
  const err = { error: message, code, timestamp: now() };
  if (sessionId !== undefined) err.sessionId = sessionId;
  socket.emit('error', err);
  if (ack) ack({ ok: false, error: { code, message } });
}

io.on('connection', (socket) => {
  socket.on('subscribe', (payload, ack) => {
    if (typeof ack !== 'function') ack = null;
    const arg = parseSessionArg(payload);
    if (!arg) return protocolError(socket, ack, 'INVALID_PAYLOAD', 'expected a session id');
    const { sessionId } = arg;
    if (!SESSION_ID.test(sessionId)) {
      return protocolError(socket, ack, 'INVALID_SESSION_ID', 'invalid session id', sessionId);
    }
    const hasLastSeq = typeof arg.lastSeq === 'number';
    const s = sessions.get(sessionId);
    const lastSeq = s ? s.lastSeq : 0;
    const epoch = s ? s.epoch : '';
    socket.join(sessionId);

    let replay = [];
    let recovered;
    if (hasLastSeq) {
      const after = arg.lastSeq;
      const first = s && s.log.length ? s.log[0].seq : lastSeq + 1;
      const epochOk = !arg.epoch || arg.epoch === epoch;
      recovered = epochOk && after <= lastSeq && after >= first - 1;
      if (recovered && s) replay = s.log.filter((e) => e.seq > after);
    }
    const reply = { sessionId, timestamp: now(), lastSeq, epoch };
    if (hasLastSeq) reply.recovered = recovered;
    socket.emit('subscribed', reply);
    for (const e of replay) socket.emit(e.event, e.data);
    if (ack) {
      const a = { ok: true, sessionId, lastSeq, epoch };
      if (hasLastSeq) a.recovered = recovered;
      ack(a);
    }
  });

  socket.on('unsubscribe', (payload, ack) => {
    if (typeof ack !== 'function') ack = null;
    const arg = parseSessionArg(payload);
    if (!arg) return protocolError(socket, ack, 'INVALID_PAYLOAD', 'expected a session id');
    socket.leave(arg.sessionId);
    socket.emit('unsubscribed', { sessionId: arg.sessionId, timestamp: now() });
    if (ack) ack({ ok: true, sessionId: arg.sessionId });
  });

  socket.emit('connected', { socketId: socket.id, timestamp: now() });
});

/** Redis clients of the adapter (cluster mode only). */
let redisClients = [];

async function useRedisAdapter() {
  // As in the @socket.io/redis-adapter README: a `redis` client and its duplicate for
  // subscriptions, both connected before the adapter is installed.
  const { createClient } = require('redis');
  const { createAdapter } = require('@socket.io/redis-adapter');
  const pubClient = createClient({ url: REDIS_URL });
  const subClient = pubClient.duplicate();
  for (const [name, c] of [['pub', pubClient], ['sub', subClient]]) {
    c.on('error', (err) => process.stderr.write(`redis ${name} client error: ${err && err.message}\n`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);
  redisClients = [pubClient, subClient];
  io.adapter(createAdapter(pubClient, subClient, { key: REDIS_PREFIX }));
  process.stderr.write(`redis adapter on ${REDIS_URL} (key ${REDIS_PREFIX})\n`);
}

async function start() {
  if (REDIS_URL) await useRedisAdapter();
  server.listen(PORT, HOST, () => {
    const { port } = server.address();
    process.stdout.write(`herald-node-reference listening on http://${HOST}:${port}\n`);
  });
}

start().catch((err) => {
  process.stderr.write(`start failed: ${(err && err.stack) || err}\n`);
  process.exit(1);
});

function shutdown() {
  io.close();
  for (const c of redisClients) c.disconnect().catch(() => {});
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGINT', shutdown);
process.on('SIGTERM', shutdown);
