// @ts-check
// herald's dashboard (SPEC §8): the session feed, one session's live view and a form to
// start a session. It follows sessions with the same Socket.IO contract as any client
// (docs/protocol.md), so it is also a worked example of following a session correctly:
// every event applied once, in seq order, with no gap, across drops and reconnects.
// No framework and no build step: the server embeds these files as they are.

// ---------------------------------------------------------------------------------------
// Shapes (field names as the server writes them: src/store/mod.rs, src/feed.rs, src/http.rs)

/**
 * @typedef {{ total: number, completed: number, processing: number, pending: number, failed: number }} PromptCounts
 * @typedef {{ sessionId: string, status: string, progress: number, prompts: PromptCounts,
 *   hasClarifications: boolean, clarificationCount: number, createdAt: string, updatedAt: string }} FeedEntry
 * @typedef {{ seq: number, event: string, data: Record<string, any>, lc?: string }} LogEntry
 * @typedef {{ promptId: string, modelName: string, provider?: string, status?: string, output: string,
 *   duration?: number, attempt?: number, attempts?: number, error?: string }} Cell
 * @typedef {{ clarificationId: string, question: string, status: string, answer?: string,
 *   promptId?: string, modelName?: string }} Clar
 * @typedef {{ status: string, progress: number, prompts: PromptCounts | null, promptOrder: string[],
 *   promptText: Map<string, string>, models: string[], providers: Map<string, string>,
 *   cells: Map<string, Cell>, clarifications: Map<string, Clar>, result: any, error: any }} SessionModel
 *   What the session view shows: the snapshot with every later event folded in.
 * @typedef {{ head: boolean, structure: boolean, cells: Set<string>, clar: boolean, result: boolean,
 *   log: boolean, refilter: boolean }} Dirty
 *   What changed since the last frame, so a frame touches only that.
 * @typedef {Object} Follow  One followed session.
 * @property {string} sessionId
 * @property {number} lastSeq   seq of the last event applied; the next one must be lastSeq + 1
 * @property {string} epoch     the log's incarnation ("" while unknown)
 * @property {LogEntry[]} events  every event applied, in order
 * @property {any} snapshot     the last snapshot fetched (null: none)
 * @property {number} baseSeq   the snapshot's lastSeq: events up to it are already in `model`
 * @property {number} firstRetained  first seq the server still had when the log was read (0: from 1)
 * @property {SessionModel} model
 * @property {LogEntry[]} buffer  live events held while an HTTP catch-up runs
 * @property {boolean} fetching   an HTTP catch-up is running: live events go to `buffer`
 * @property {boolean} needFull   the next catch-up must start over from the snapshot
 * @property {Promise<void> | null} running
 * @property {boolean} ready      the first load finished (then the socket subscription follows)
 * @property {boolean} dead       refused for good (403, bad id): not subscribed
 * @property {number} ackGen      the connection whose subscribe ack came back last
 * @property {string} loadError
 * @property {string} subError
 * @property {boolean} notFound
 * @property {boolean} cancelling
 * @property {Dirty} dirty
 * @property {string} logFilter
 * @property {string} logSearch
 * @property {LogEntry[] | null} logItems  the filtered log (null: no filter, all events)
 */

const TOKEN_KEY = 'herald.token';
const PAGE = 1000; // the history route's largest page (MAX_HISTORY_PAGE)
const FEED = '#feed'; // the feed's key among the subscriptions a resync waits for
const SESSION_ROW = 64; // px, fixed so the list can be virtualized
const LOG_ROW = 28;
const OVERSCAN = 8; // rows rendered beyond each edge of a virtual list
const STATUSES = ['ACTIVE', 'PROCESSING', 'COMPLETED', 'FAILED', 'EXPIRED'];
const TERMINAL = new Set(['COMPLETED', 'FAILED', 'EXPIRED']);
const EVENTS = ['progress', 'model_result', 'clarification', 'completed', 'error'];
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;
const RETRYABLE = new Set(['BACKEND_UNAVAILABLE', 'RATE_LIMITED', 'SLOW_CONSUMER', 'SOCKET_GONE', 'NODE_UNAVAILABLE']);

const CONN_WORDS = {
  connecting: 'Connecting…', connected: 'Live', reconnecting: 'Reconnecting…',
  resynced: 'Resynced', offline: 'Offline',
};
/** @type {Record<string, string>} */
const TOKEN_WORDS = {
  UNAUTHORIZED: 'A token is required',
  INVALID_TOKEN: 'The token was not accepted',
  TOKEN_EXPIRED: 'The token has expired',
  FORBIDDEN: 'The token may not read sessions',
};
/** @type {Record<string, string>} */
const CODE_WORDS = {
  FORBIDDEN: 'You may not read this session',
  SESSION_NOT_FOUND: 'No such session',
  INVALID_SESSION_ID: 'That is not a valid session id',
  TOO_MANY_SUBSCRIPTIONS: 'This connection follows too many sessions',
  RATE_LIMITED: 'Too many requests; trying again shortly',
  BACKEND_UNAVAILABLE: "herald's backend is unavailable",
  SLOW_CONSUMER: 'The connection fell behind',
  TOKEN_EXPIRED: 'The token has expired',
  CANCELLED: 'Cancelled',
  ALL_PROMPTS_FAILED: 'Every prompt failed',
  NODE_LOST: 'The node running this session was lost; start it again',
  SESSION_ENDED: 'The session has already ended',
  NETWORK: 'herald did not answer',
};

/** @param {string} code @param {string} [message] @param {string} [fallback] */
function inWords(code, message, fallback = 'Refused') {
  return `${CODE_WORDS[code] ?? fallback} (${code})${message ? `: ${message}` : ''}`;
}

// ---------------------------------------------------------------------------------------
// State

const state = {
  token: '',
  tokenNeeded: false,
  tokenError: '',
  /** @type {keyof typeof CONN_WORDS} */
  conn: 'connecting',
  /** Bumped on every connect: acks from an older connection are stale. */
  gen: 0,
  everConnected: false,
  /** @type {Set<string> | null} subscriptions still to come back after a reconnect */
  resyncPending: null,
  /** @type {{ name: string, provider: string }[] | null} */
  models: null,
  /** @type {Map<string, FeedEntry>} */
  sessions: new Map(),
  /** @type {FeedEntry[] | null} newest first; null when it must be sorted again */
  sorted: null,
  sessionsLoaded: false,
  sessionsTruncated: false,
  /** @type {'' | 'loading' | 'done' | 'failed'} filling in what a truncated feed left out */
  sessionsRest: '',
  sessionsError: '',
  sessionsDirty: true,
  statusFilter: '',
  feedWanted: false,
  /** @type {Promise<void> | null} */
  feedCompleting: null,
  /** @type {Map<string, Follow>} */
  followed: new Map(),
  /** What this tab asked for when it created a session: the snapshot has no prompt texts.
   * @type {Map<string, { prompts: { id: string, text: string }[], models: string[] }>} */
  created: new Map(),
  duplicatesIgnored: 0,
};

const herald = {
  state,
  resyncs: 0,
  /** @param {string} id */
  seqs: (id) => state.followed.get(id)?.events.map((e) => e.seq) ?? [],
};
/** @type {any} */ (window).herald = herald;

/** @type {any} */
let socket = null;

// ---------------------------------------------------------------------------------------
// Small helpers

/**
 * Builds an element. Strings become text nodes, never markup: ids, prompts, outputs and
 * questions come from users and models.
 * @param {string} tag
 * @param {Record<string, any> | null} [attrs]
 * @param {...(Node | string | number | null | undefined | false)} children
 * @returns {HTMLElement}
 */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c != null && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

/** @param {string} sel */
const $ = (sel) => /** @type {HTMLElement} */ (document.querySelector(sel));
/** Sets text only when it changed, so live regions do not repeat themselves. @param {Element} el @param {string} text */
function setText(el, text) { if (el.textContent !== text) el.textContent = text; }
/** @param {unknown} x */
const str = (x) => (typeof x === 'string' ? x : undefined);
/** @param {unknown} x */
const num = (x) => (typeof x === 'number' && Number.isFinite(x) ? x : undefined);
/** @param {unknown} p */
const pct = (p) => Math.max(0, Math.min(100, Math.round(Number(p) || 0)));
/** @param {string} s @param {number} n */
const clip = (s, n) => (s.length > n ? `${s.slice(0, n)}…` : s);
/** @param {number} ms */
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/** @param {string} a @param {string} b */
const cellKey = (a, b) => `${a}\u0000${b}`;

/** @param {unknown} iso */
function fmtTime(iso) {
  const d = new Date(String(iso));
  if (Number.isNaN(d.getTime())) return '';
  return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
}
/** @param {unknown} iso */
function clock(iso) {
  const d = new Date(String(iso));
  if (Number.isNaN(d.getTime())) return '';
  const t = d.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
  return `${t}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

/** @param {number} n @param {string} one @param {string} many */
const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

// ---------------------------------------------------------------------------------------
// HTTP

/**
 * @typedef {{ ok: boolean, status: number, data: any, error: { code: string, message: string } }} Reply
 * @param {string} method @param {string} path @param {unknown} [body]
 * @returns {Promise<Reply>}
 */
async function api(method, path, body) {
  /** @type {Record<string, string>} */
  const headers = { Accept: 'application/json' };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    return { ok: false, status: 0, data: null, error: { code: 'NETWORK', message: String(/** @type {any} */ (e)?.message ?? e) } };
  }
  let data = null;
  try { data = await res.json(); } catch { /* an empty or non-JSON body */ }
  const e = data && typeof data.error === 'object' && data.error ? data.error : null;
  const error = {
    code: String(e?.code ?? `HTTP_${res.status}`),
    message: String(e?.message ?? res.statusText ?? ''),
  };
  if (res.status === 401) needToken(error);
  return { ok: res.ok, status: res.status, data, error };
}

/** An HTTP or socket refusal carried through a sync. */
class Refused extends Error {
  /** @param {string} code @param {string} message @param {number} [status] */
  constructor(code, message, status = 0) { super(message); this.code = code; this.status = status; }
}
/** @param {Reply} r */
const refusedBy = (r) => new Refused(r.error.code, r.error.message, r.status);

// ---------------------------------------------------------------------------------------
// The token (only asked for when auth is on)

/** Any 401, or a handshake refused for its credential, lands here. @param {{ code: string, message: string }} error */
function needToken(error) {
  state.tokenNeeded = true;
  state.tokenError = `${TOKEN_WORDS[error.code] ?? 'The token was refused'} (${error.code})${error.message ? `: ${error.message}` : ''}`;
  // A refused token is of no further use: a reload should not send it again.
  state.token = '';
  sessionStorage.removeItem(TOKEN_KEY);
  dropSocket();
  setConn('offline', 'a token is needed');
  renderHeader();
  route();
}

/** @param {string} value */
async function useToken(value) {
  const token = value.trim();
  if (!token) return;
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  state.tokenError = '';
  current?.render();
  const r = await api('GET', '/api/models');
  if (r.status === 401) return; // needToken has said why
  if (!r.ok) {
    state.tokenError = `${r.error.code}: ${r.error.message}`;
    current?.render();
    return;
  }
  state.models = r.data?.models ?? [];
  state.tokenNeeded = false;
  renderHeader();
  connectSocket();
  route();
}

function changeToken() {
  state.token = '';
  sessionStorage.removeItem(TOKEN_KEY);
  state.tokenNeeded = true;
  state.tokenError = '';
  dropSocket();
  setConn('offline', 'a token is needed');
  renderHeader();
  route();
}

// ---------------------------------------------------------------------------------------
// The socket and the connection state

/** @param {keyof typeof CONN_WORDS} s @param {string} [detail] */
function setConn(s, detail = '') {
  state.conn = s;
  const el = $('#conn');
  el.dataset.state = s;
  setText(el, CONN_WORDS[s]);
  el.title = detail;
  state.sessionsDirty = true; // the empty list says whether it waits for the connection
  invalidate();
}

function dropSocket() {
  const s = socket;
  if (!s) return;
  socket = null; // first, so the handlers below ignore what disconnect() emits
  s.disconnect();
  s.off();
  for (const f of state.followed.values()) f.ackGen = -1;
  state.resyncPending = null;
}

function connectSocket() {
  dropSocket();
  const ioFn = /** @type {any} */ (window).io;
  if (typeof ioFn !== 'function') {
    setConn('offline', 'the socket.io client did not load');
    return;
  }
  state.everConnected = false;
  setConn('connecting');
  // A callback, so each reconnect sends the token in force then. forceNew: a socket made
  // after a token change must not share the old connection.
  const s = ioFn({ auth: (/** @type {any} */ cb) => cb(state.token ? { token: state.token } : {}), forceNew: true });
  socket = s;
  const mine = () => socket === s;
  s.on('connect', () => mine() && onConnect());
  s.on('disconnect', (/** @type {string} */ reason) => {
    if (!mine()) return;
    state.resyncPending = null;
    if (s.active) setConn('reconnecting', reason);
    else if (reason === 'io server disconnect') {
      // herald drops sockets as a network failure would, so this is rare (an expired
      // token says so first, and needToken took over): try once more.
      setConn('reconnecting', reason);
      setTimeout(() => mine() && s.connect(), 1000);
    } else setConn('offline', reason);
  });
  s.on('connect_error', (/** @type {Error} */ err) => {
    if (!mine()) return;
    const message = String(err?.message ?? err);
    if (s.active) { // a network failure: socket.io retries by itself
      setConn(state.everConnected ? 'reconnecting' : 'connecting', message);
      return;
    }
    const m = /^([A-Z_]+):\s*([\s\S]*)$/.exec(message);
    if (m && m[1] in TOKEN_WORDS) needToken({ code: m[1], message: m[2] });
    else setConn('offline', message);
  });
  s.io.on('reconnect_failed', () => mine() && setConn('offline', 'gave up reconnecting'));
  s.on('subscribed', (/** @type {any} */ d) => mine() && onSubscribed(d));
  s.on('sessions', (/** @type {any} */ d) => mine() && onSessions(d));
  s.on('session', (/** @type {any} */ d) => mine() && onSessionEntry(d));
  for (const name of EVENTS) s.on(name, (/** @type {any} */ d) => mine() && onEvent(name, d));
}

/** Every (re)connect starts with no subscriptions: follow everything again from where it was. */
function onConnect() {
  state.gen += 1;
  const again = state.everConnected;
  state.everConnected = true;
  state.resyncPending = again ? new Set() : null;
  // After a drop the page is not live until every subscription is back and caught up.
  setConn(again ? 'reconnecting' : 'connected', again ? 'resubscribing' : '');
  for (const f of state.followed.values()) {
    if (f.dead) continue;
    state.resyncPending?.add(f.sessionId);
    if (f.ready) subscribeSession(f);
  }
  if (state.feedWanted) {
    state.resyncPending?.add(FEED);
    subscribeFeed();
  }
  checkResynced();
}

/** @param {string} key */
function settle(key) {
  if (state.resyncPending?.delete(key)) checkResynced();
}

function checkResynced() {
  if (!state.resyncPending || state.resyncPending.size > 0 || !socket?.connected) return;
  state.resyncPending = null;
  herald.resyncs += 1;
  setConn('resynced');
}

// ---------------------------------------------------------------------------------------
// Following one session
//
// The approach: read the snapshot and then the whole retained log over HTTP, then
// subscribe with { lastSeq, epoch } of what was read, so the server replays only what came
// after. Every event, from HTTP or the socket, goes through ingest(): a seq already applied
// is dropped, the next one is applied, and one beyond it (a gap) holds live events back
// while the missing ones are fetched over HTTP. A `subscribed` that is not `recovered`, or
// names another epoch, makes the next catch-up start over from the snapshot.

/** @param {string} sessionId @returns {Follow} */
function newFollow(sessionId) {
  return {
    sessionId, lastSeq: 0, epoch: '', events: [], snapshot: null, baseSeq: 0, firstRetained: 0,
    model: modelFrom(sessionId, null), buffer: [], fetching: false, needFull: false, running: null,
    ready: false, dead: false, ackGen: -1, loadError: '', subError: '', notFound: false,
    cancelling: false, dirty: allDirty(), logFilter: '', logSearch: '', logItems: null,
  };
}

/** @returns {Dirty} */
function allDirty() {
  return { head: true, structure: true, cells: new Set(), clar: true, result: true, log: true, refilter: false };
}

/** @param {Follow} f */
const isFollowed = (f) => state.followed.get(f.sessionId) === f;

/** @param {string} sessionId @returns {Follow} */
function follow(sessionId) {
  const f = newFollow(sessionId);
  state.followed.set(sessionId, f);
  requestSync(f, true);
  return f;
}

/** @param {string} sessionId */
function unfollow(sessionId) {
  if (!state.followed.delete(sessionId)) return;
  if (socket?.connected) socket.emit('unsubscribe', sessionId);
  settle(sessionId);
}

/** @param {Follow} f */
function subscribeSession(f) {
  if (!socket?.connected || !isFollowed(f) || f.dead) return;
  const gen = state.gen;
  /** @type {Record<string, unknown>} */
  const payload = { sessionId: f.sessionId, lastSeq: f.lastSeq };
  if (f.epoch) payload.epoch = f.epoch;
  socket.emit('subscribe', payload, (/** @type {any} */ ack) => {
    if (gen !== state.gen || !isFollowed(f)) return;
    f.ackGen = gen;
    if (ack?.ok) f.subError = '';
    else {
      const code = String(ack?.error?.code ?? 'INTERNAL');
      f.subError = inWords(code, str(ack?.error?.message));
      if (RETRYABLE.has(code)) setTimeout(() => gen === state.gen && subscribeSession(f), 2000);
    }
    touch(f);
    if (!f.fetching) settle(f.sessionId);
  });
}

/** @param {any} d */
function onSubscribed(d) {
  const f = state.followed.get(d?.sessionId);
  if (!f) return;
  const epoch = str(d.epoch) ?? '';
  if (f.epoch && epoch && epoch !== f.epoch) {
    // The log was recreated: what we hold, and anything buffered, describes the old one.
    f.buffer = [];
    requestSync(f, true);
  } else if (d.recovered === false) {
    // No replay follows: fetch what we missed (a catch-up that finds it trimmed starts over).
    requestSync(f, false);
  }
}

/** @param {string} name @param {any} data */
function onEvent(name, data) {
  if (!data || typeof data !== 'object') return;
  if (typeof data.seq !== 'number') {
    if (name === 'error') onSocketError(data);
    return;
  }
  const f = state.followed.get(data.sessionId);
  if (!f || f.dead) return;
  ingest(f, { seq: data.seq, event: name, data }, 'live');
}

/** A refusal sent to this socket (no seq, not logged). @param {any} d */
function onSocketError(d) {
  const code = String(d.code ?? 'ERROR');
  const message = String(d.error ?? '');
  if (code === 'TOKEN_EXPIRED') return needToken({ code, message });
  const f = d.sessionId ? state.followed.get(d.sessionId) : undefined;
  if (f) {
    f.subError = inWords(code, message);
    touch(f);
  } else if (state.feedWanted) {
    state.sessionsError = inWords(code, message, 'herald refused a request');
    state.sessionsDirty = true;
    invalidate();
  }
}

/**
 * The one way an event enters a followed session: in seq order, each exactly once.
 * @param {Follow} f @param {LogEntry} e @param {'live' | 'history' | 'buffer'} source
 * @returns {'dup' | 'applied' | 'buffered' | 'gap'}
 */
function ingest(f, e, source) {
  if (e.seq <= f.lastSeq) {
    state.duplicatesIgnored += 1;
    return 'dup';
  }
  if (source === 'live' && f.fetching) {
    f.buffer.push(e);
    return 'buffered';
  }
  if (e.seq !== f.lastSeq + 1) {
    if (source !== 'live') return 'gap';
    f.buffer.push(e);
    requestSync(f, false);
    return 'buffered';
  }
  apply(f, e);
  return 'applied';
}

/** @param {Follow} f @param {LogEntry} e */
function apply(f, e) {
  f.events.push(e);
  f.lastSeq = e.seq;
  if (f.logItems && logMatches(f, e)) f.logItems.push(e);
  if (e.seq > f.baseSeq) fold(f.model, f.dirty, e.event, e.data);
  if (f.notFound) { f.notFound = false; f.loadError = ''; }
  f.dirty.log = true;
  touch(f);
}

/** @param {Follow} f @param {boolean} full */
function requestSync(f, full) {
  if (full) f.needFull = true;
  f.fetching = true;
  if (!f.running) f.running = runSync(f);
}

/** Catches `f` up over HTTP until nothing is missing, then lets live events through. @param {Follow} f */
async function runSync(f) {
  let fulls = 0;
  let idle = 0;
  try {
    for (;;) {
      if (!isFollowed(f)) return;
      if (f.needFull) {
        f.needFull = false;
        if (++fulls > 4) throw new Refused('INTERNAL', 'the session kept changing while it was read; reload the page');
        await fullLoad(f);
      } else {
        const got = await readLog(f, false);
        const next = f.buffer.reduce((lo, e) => Math.min(lo, e.seq), Infinity);
        if (got === 0 && next > f.lastSeq + 1 && next !== Infinity) {
          // The log has not caught up with what was announced yet (another node): wait a little.
          if (++idle > 5) f.needFull = true;
          else await sleep(100 * idle);
        }
      }
      if (f.needFull || f.dead) continue;
      if (!drain(f)) break;
    }
    if (!f.notFound) f.loadError = '';
    if (!f.ready && !f.dead) {
      f.ready = true;
      subscribeSession(f);
    }
  } catch (err) {
    const e = err instanceof Refused ? err : new Refused('INTERNAL', String(err));
    if (!f.ready || e.status === 403) { f.dead = true; f.ready = false; }
    if (e.status !== 401) f.loadError = inWords(e.code, e.message);
  } finally {
    f.fetching = false;
    f.running = null;
    touch(f);
    if (f.dead || f.ackGen === state.gen) settle(f.sessionId);
  }
}

/** Applies what the buffer holds in order; true when a gap is left. @param {Follow} f */
function drain(f) {
  f.buffer.sort((a, b) => a.seq - b.seq);
  let i = 0;
  for (; i < f.buffer.length; i++) if (ingest(f, f.buffer[i], 'buffer') === 'gap') break;
  f.buffer = f.buffer.slice(i);
  return f.buffer.length > 0;
}

/** @param {any} e @returns {LogEntry} */
const toEntry = (e) => ({ seq: Number(e.seq), event: String(e.event), data: e.data && typeof e.data === 'object' ? e.data : {} });

/** The snapshot, then the retained log from its start. @param {Follow} f */
async function fullLoad(f) {
  const snap = await api('GET', `/api/wizard/session/${encodeURIComponent(f.sessionId)}`);
  if (!snap.ok && snap.status !== 404) throw refusedBy(snap);
  f.snapshot = snap.ok ? snap.data : null;
  // A session with no events yet is 404; we still subscribe and show it once it starts.
  f.notFound = !snap.ok;
  f.loadError = f.notFound ? inWords(snap.error.code, snap.error.message) : '';
  f.events = [];
  f.lastSeq = 0;
  f.firstRetained = 0;
  f.epoch = str(f.snapshot?.epoch) ?? '';
  f.baseSeq = num(f.snapshot?.lastSeq) ?? 0;
  f.model = modelFrom(f.sessionId, f.snapshot);
  f.dirty = allDirty();
  f.dirty.refilter = true;
  f.logItems = null;
  if (!f.notFound) await readLog(f, true);
}

/**
 * Reads the log after lastSeq, page by page; returns how many events it applied. Anything
 * that makes what we hold inconsistent with the log (a new epoch, trimmed events, a hole)
 * sets needFull instead.
 * @param {Follow} f @param {boolean} afterSnapshot  the snapshot was just read: it covers trimmed events
 */
async function readLog(f, afterSnapshot) {
  const id = encodeURIComponent(f.sessionId);
  let applied = 0;
  for (let first = true; ; first = false) {
    const r = await api('GET', `/api/wizard/session/${id}/events?after=${f.lastSeq}&limit=${PAGE}`);
    if (r.status === 404) return applied;
    if (!r.ok) throw refusedBy(r);
    const body = r.data ?? {};
    const events = Array.isArray(body.events) ? body.events : [];
    if (f.epoch && body.epoch && body.epoch !== f.epoch) { f.needFull = true; return applied; }
    if (!f.epoch) f.epoch = str(body.epoch) ?? '';
    if (body.truncated) {
      const start = events.length ? Number(events[0].seq) : (num(body.lastSeq) ?? 0) + 1;
      if (!afterSnapshot || !first || start - 1 > f.baseSeq) { f.needFull = true; return applied; }
      f.lastSeq = start - 1;
      f.firstRetained = start;
    }
    for (const e of events) {
      const got = ingest(f, toEntry(e), 'history');
      if (got === 'gap') { f.needFull = true; return applied; }
      if (got === 'applied') applied += 1;
    }
    if (!body.hasMore || events.length === 0) return applied;
  }
}

// ---------------------------------------------------------------------------------------
// The session model: the snapshot, then events folded in (the server's fold, in small)

/** @param {string} sessionId @param {any} snap @returns {SessionModel} */
function modelFrom(sessionId, snap) {
  /** @type {SessionModel} */
  const m = {
    status: '', progress: 0, prompts: null, promptOrder: [], promptText: new Map(), models: [],
    providers: new Map(), cells: new Map(), clarifications: new Map(), result: null, error: null,
  };
  const scratch = allDirty();
  const mine = state.created.get(sessionId);
  if (mine) {
    for (const p of mine.prompts) ensurePrompt(m, scratch, p.id, p.text);
    for (const name of mine.models) ensureModel(m, scratch, name, state.models?.find((x) => x.name === name)?.provider);
  }
  if (!snap) return m;
  m.status = str(snap.status) ?? '';
  m.progress = num(snap.progress) ?? 0;
  m.prompts = snap.prompts && typeof snap.prompts === 'object' ? snap.prompts : null;
  for (const r of Array.isArray(snap.modelResults) ? snap.modelResults : []) foldModelResult(m, scratch, r);
  for (const c of Array.isArray(snap.clarifications) ? snap.clarifications : []) foldClarification(m, scratch, c);
  if (snap.result && typeof snap.result === 'object') setResult(m, scratch, snap.result);
  if (snap.error && typeof snap.error === 'object') m.error = snap.error;
  return m;
}

/** @param {SessionModel} m @param {Dirty} d @param {string} name @param {Record<string, any>} data */
function fold(m, d, name, data) {
  d.head = true;
  switch (name) {
    case 'progress':
      if (typeof data.status === 'string') m.status = data.status;
      if (typeof data.progress === 'number') m.progress = data.progress;
      if (data.prompts && typeof data.prompts === 'object') m.prompts = data.prompts;
      if (data.result && typeof data.result === 'object') setResult(m, d, data.result);
      break;
    case 'model_result': foldModelResult(m, d, data); break;
    case 'clarification': foldClarification(m, d, data); break;
    case 'completed':
      m.status = 'COMPLETED';
      m.progress = 100;
      if (data.result && typeof data.result === 'object') setResult(m, d, data.result);
      break;
    case 'error':
      m.status = 'FAILED';
      m.error = data;
      break;
    default: break;
  }
}

/** @param {SessionModel} m @param {Dirty} d @param {string} id @param {string} [text] */
function ensurePrompt(m, d, id, text) {
  if (!m.promptText.has(id)) { m.promptOrder.push(id); m.promptText.set(id, ''); d.structure = true; }
  if (text && m.promptText.get(id) !== text) { m.promptText.set(id, text); d.structure = true; }
}
/** @param {SessionModel} m @param {Dirty} d @param {string} name @param {string} [provider] */
function ensureModel(m, d, name, provider) {
  if (!m.models.includes(name)) { m.models.push(name); d.structure = true; }
  if (provider && m.providers.get(name) !== provider) { m.providers.set(name, provider); d.structure = true; }
}
/** @param {SessionModel} m @param {Dirty} d @param {string} promptId @param {string} modelName @param {string} [provider] */
function ensureCell(m, d, promptId, modelName, provider) {
  ensurePrompt(m, d, promptId);
  ensureModel(m, d, modelName, provider);
  const key = cellKey(promptId, modelName);
  let c = m.cells.get(key);
  if (!c) { c = { promptId, modelName, output: '' }; m.cells.set(key, c); }
  d.cells.add(key);
  return c;
}

/** @param {SessionModel} m @param {Dirty} d @param {Record<string, any>} r */
function foldModelResult(m, d, r) {
  if (typeof r.promptId !== 'string' || typeof r.modelName !== 'string') return;
  const c = ensureCell(m, d, r.promptId, r.modelName, str(r.provider));
  c.provider = str(r.provider) ?? c.provider;
  c.status = str(r.status) ?? c.status;
  // A processing result is the whole partial output so far: it replaces what we had.
  c.output = str(r.result) ?? '';
  c.duration = num(r.duration);
  c.attempt = num(r.attempt);
  c.error = str(r.error);
}

/** @param {SessionModel} m @param {Dirty} d @param {Record<string, any>} c */
function foldClarification(m, d, c) {
  const id = str(c.clarificationId);
  if (!id) return;
  const prev = m.clarifications.get(id);
  m.clarifications.set(id, {
    clarificationId: id,
    question: str(c.question) ?? prev?.question ?? '',
    status: str(c.status) ?? prev?.status ?? 'pending',
    answer: str(c.answer) ?? prev?.answer,
    promptId: str(c.promptId) ?? prev?.promptId,
    modelName: str(c.modelName) ?? prev?.modelName,
  });
  d.clar = true;
}

/** The final result names every prompt's text and each unit's attempts. @param {SessionModel} m @param {Dirty} d @param {any} r */
function setResult(m, d, r) {
  m.result = r;
  d.result = true;
  for (const name of Array.isArray(r.models) ? r.models : []) {
    const n = typeof name === 'string' ? name : str(name?.name);
    if (n) ensureModel(m, d, n);
  }
  for (const p of Array.isArray(r.prompts) ? r.prompts : []) {
    if (typeof p?.promptId !== 'string') continue;
    ensurePrompt(m, d, p.promptId, str(p.text));
    for (const o of Array.isArray(p.outputs) ? p.outputs : []) {
      if (typeof o?.modelName !== 'string') continue;
      const c = ensureCell(m, d, p.promptId, o.modelName, str(o.provider));
      c.attempts = num(o.attempts);
      if (!c.status || c.status === 'processing') {
        c.status = str(o.status) ?? c.status;
        c.output = str(o.output) ?? c.output;
        c.duration = num(o.duration) ?? c.duration;
        c.error = str(o.error);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The session feed

function subscribeFeed() {
  if (!socket?.connected) return;
  const gen = state.gen;
  socket.emit('subscribe', { feed: 'sessions' }, (/** @type {any} */ ack) => {
    if (gen !== state.gen) return;
    if (!ack?.ok) {
      state.sessionsError = inWords(String(ack?.error?.code ?? 'INTERNAL'), str(ack?.error?.message), 'The session feed was refused');
      state.sessionsDirty = true;
      invalidate();
    }
    const done = () => settle(FEED);
    if (state.feedCompleting) state.feedCompleting.then(done);
    else done();
  });
}

/** The feed's first message, and after any reconnect the whole truth again. @param {any} d */
function onSessions(d) {
  if (!state.feedWanted) return;
  const list = Array.isArray(d?.sessions) ? d.sessions : [];
  state.sessions = new Map(list.filter((e) => typeof e?.sessionId === 'string').map((e) => [e.sessionId, e]));
  state.sorted = null;
  state.sessionsLoaded = true;
  state.sessionsError = '';
  state.sessionsTruncated = Boolean(d?.truncated);
  state.sessionsRest = '';
  if (state.sessionsTruncated) {
    // The feed sends the newest 1,000; the list route has the rest.
    const p = completeSessions();
    state.feedCompleting = p;
    p.then(() => { if (state.feedCompleting === p) state.feedCompleting = null; });
  }
  state.sessionsDirty = true;
  invalidate();
}

async function completeSessions() {
  state.sessionsRest = 'loading';
  const r = await api('GET', '/api/wizard/sessions');
  if (!state.feedWanted) return;
  if (!r.ok || !Array.isArray(r.data?.sessions)) {
    state.sessionsRest = 'failed';
  } else {
    for (const e of r.data.sessions) {
      if (typeof e?.sessionId !== 'string') continue;
      const have = state.sessions.get(e.sessionId);
      // The feed may already hold a newer state of it than this read.
      if (!have || String(e.updatedAt ?? '') > String(have.updatedAt ?? '')) state.sessions.set(e.sessionId, e);
    }
    state.sessionsRest = 'done';
    state.sorted = null;
  }
  state.sessionsDirty = true;
  invalidate();
}

/** A state to show, not an event to count: it replaces the entry. @param {any} e */
function onSessionEntry(e) {
  if (!state.feedWanted || typeof e?.sessionId !== 'string') return;
  state.sessions.set(e.sessionId, e);
  state.sorted = null;
  state.sessionsDirty = true;
  invalidate();
}

/** @param {string} a @param {string} b */
const cmp = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
function sortedSessions() {
  state.sorted ??= [...state.sessions.values()].sort((a, b) =>
    cmp(String(b.createdAt ?? ''), String(a.createdAt ?? '')) || cmp(b.sessionId, a.sessionId));
  return state.sorted;
}

// ---------------------------------------------------------------------------------------
// Rendering: one frame at a time, touching only what changed

let frame = 0;
function invalidate() {
  if (!frame) frame = requestAnimationFrame(() => { frame = 0; current?.render(); });
}
/** @param {Follow} f */
function touch(f) {
  f.dirty.head = true;
  invalidate();
}

/**
 * A scroll container that holds only the rows in view (plus a margin), over a spacer as
 * tall as all of them: thousands of rows cost what a screenful does.
 * @template T
 * @param {HTMLElement} scroller
 * @param {number} rowHeight
 * @param {(item: T) => HTMLElement} makeRow
 * @param {(item: T) => string} keyOf
 * @param {boolean} [stick]  follow the bottom while the user is there
 */
function virtualList(scroller, rowHeight, makeRow, keyOf, stick = false) {
  const spacer = h('div', { class: 'vspacer', role: 'none' });
  scroller.append(spacer);
  scroller.style.setProperty('--row-h', `${rowHeight}px`);
  /** @type {T[]} */
  let items = [];
  /** @type {HTMLElement[]} */
  let shown = [];
  let queued = false;
  const draw = () => {
    queued = false;
    const top = scroller.scrollTop;
    const first = Math.max(0, Math.floor(top / rowHeight) - OVERSCAN);
    const last = Math.min(items.length, Math.ceil((top + scroller.clientHeight) / rowHeight) + OVERSCAN);
    const active = document.activeElement;
    const focusKey = active && spacer.contains(active) ? active.getAttribute('data-key') : null;
    /** @type {HTMLElement[]} */
    const rows = [];
    for (let i = first; i < last; i++) {
      const row = makeRow(items[i]);
      row.style.top = `${i * rowHeight}px`;
      row.setAttribute('data-key', keyOf(items[i]));
      row.setAttribute('aria-posinset', String(i + 1));
      row.setAttribute('aria-setsize', String(items.length));
      rows.push(row);
    }
    // Moving nodes that are already in place would blur a focused row for nothing.
    if (rows.length !== shown.length || rows.some((r, i) => r !== shown[i])) {
      spacer.replaceChildren(...rows);
      shown = rows;
      if (focusKey) rows.find((r) => r.dataset.key === focusKey)?.focus({ preventScroll: true });
    }
  };
  const later = () => { if (!queued) { queued = true; requestAnimationFrame(draw); } };
  scroller.addEventListener('scroll', later, { passive: true });
  new ResizeObserver(later).observe(scroller);
  return {
    /** @param {T[]} next */
    set(next) {
      const atBottom = scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - rowHeight;
      items = next;
      spacer.style.height = `${items.length * rowHeight}px`;
      if (stick && atBottom) scroller.scrollTop = scroller.scrollHeight;
      draw();
    },
    /** Keyboard moves between rows, including ones not rendered yet. @param {number} i */
    focusIndex(i) {
      if (!items.length) return;
      const at = Math.max(0, Math.min(items.length - 1, i));
      const y = at * rowHeight;
      if (y < scroller.scrollTop) scroller.scrollTop = y;
      else if (y + rowHeight > scroller.scrollTop + scroller.clientHeight) scroller.scrollTop = y + rowHeight - scroller.clientHeight;
      draw();
      /** @type {HTMLElement | null} */ (spacer.querySelector(`[aria-posinset="${at + 1}"]`))?.focus({ preventScroll: true });
    },
  };
}

function renderHeader() {
  $('#token-change').hidden = !state.token;
  const hash = location.hash || '#/';
  for (const a of document.querySelectorAll('header nav a')) {
    const here = a.getAttribute('href') === hash;
    if (here) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

// ---------------------------------------------------------------------------------------
// Views

/** @typedef {{ key: string, el: HTMLElement, render: () => void, leave: () => void }} View */

/** @returns {View} */
function tokenView() {
  const input = /** @type {HTMLInputElement} */ (h('input', { id: 'token', type: 'password', autocomplete: 'off', required: true, spellcheck: 'false' }));
  const error = h('p', { id: 'token-error', role: 'alert', class: 'error' });
  const button = /** @type {HTMLButtonElement} */ (h('button', { type: 'submit' }, 'Use token'));
  const form = h('form', {
    id: 'token-form',
    onsubmit: async (/** @type {Event} */ ev) => {
      ev.preventDefault();
      button.disabled = true;
      try { await useToken(input.value); } finally { button.disabled = false; }
      if (input.isConnected) { input.value = ''; input.focus(); }
    },
  },
  h('div', { class: 'field' }, h('label', { for: 'token' }, 'Access token'), input),
  h('div', { class: 'actions' }, button),
  error);
  const el = h('section', { id: 'token-view', 'aria-labelledby': 'token-title' },
    h('h2', { id: 'token-title', tabindex: -1 }, 'Access token'),
    h('p', { class: 'hint' }, 'This herald needs an access token (a JWT or an API key). It is kept in this tab only and sent with each request.'),
    form);
  return {
    key: 'token', el, leave() {},
    render() { setText(error, state.tokenError); },
  };
}

/** @returns {View} */
function sessionsView() {
  const filter = /** @type {HTMLSelectElement} */ (h('select', { id: 'status-filter' },
    h('option', { value: '' }, 'All'), ...STATUSES.map((s) => h('option', { value: s }, s))));
  filter.value = state.statusFilter;
  filter.addEventListener('change', () => { state.statusFilter = filter.value; state.sessionsDirty = true; invalidate(); });
  const count = h('span', { id: 'session-count' }, '0');
  const note = h('p', { id: 'sessions-note', class: 'hint', 'aria-live': 'polite' });
  const error = h('p', { id: 'sessions-error', role: 'alert', class: 'error' });
  const empty = h('p', { class: 'hint' });
  const listEl = h('div', { id: 'session-list', role: 'list', class: 'vlist', 'aria-label': 'Sessions' });
  /** @type {WeakMap<FeedEntry, HTMLElement>} entries are replaced, never changed, so a row can be kept per entry */
  const rows = new WeakMap();
  const list = virtualList(listEl, SESSION_ROW, (/** @type {FeedEntry} */ e) => {
    let row = rows.get(e);
    if (!row) { row = sessionRow(e); rows.set(e, row); }
    return row;
  }, (e) => e.sessionId);
  listEl.addEventListener('keydown', (ev) => {
    const at = Number(/** @type {HTMLElement} */ (ev.target).getAttribute?.('aria-posinset')) - 1;
    if (Number.isNaN(at) || at < 0) return;
    /** @type {Record<string, number>} */
    const moves = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: Number.MAX_SAFE_INTEGER, PageDown: at + 8, PageUp: at - 8 };
    if (!(ev.key in moves)) return;
    ev.preventDefault();
    list.focusIndex(moves[ev.key]);
  });
  const el = h('section', { id: 'sessions-view', 'aria-labelledby': 'sessions-title' },
    h('div', { class: 'view-head' },
      h('h2', { id: 'sessions-title', tabindex: -1 }, 'Sessions'),
      h('div', { class: 'tools' },
        h('label', { for: 'status-filter' }, 'Status'), filter,
        h('span', { class: 'count', 'aria-live': 'polite' }, count, ' shown'))),
    error, note, empty, listEl);

  state.feedWanted = true;
  state.sessions = new Map();
  state.sorted = null;
  state.sessionsLoaded = false;
  state.sessionsError = '';
  state.sessionsDirty = true;
  subscribeFeed();

  return {
    key: 'sessions', el,
    leave() {
      state.feedWanted = false;
      if (socket?.connected) socket.emit('unsubscribe', { feed: 'sessions' });
      state.sessions = new Map();
      state.sorted = null;
      settle(FEED);
    },
    render() {
      if (!state.sessionsDirty) return;
      state.sessionsDirty = false;
      const all = sortedSessions();
      const shown = state.statusFilter ? all.filter((s) => s.status === state.statusFilter) : all;
      setText(count, String(shown.length));
      list.set(shown);
      setText(error, state.sessionsError);
      setText(note, !state.sessionsTruncated || state.sessionsRest === 'done' ? ''
        : state.sessionsRest === 'loading' ? 'Showing the newest 1,000; loading the rest…' : 'Showing the newest 1,000.');
      setText(empty, !state.sessionsLoaded ? (socket?.connected ? 'Loading sessions…' : 'Waiting for the connection…')
        : shown.length ? '' : all.length ? 'No session has this status.' : 'No sessions yet. Start one with "New session".');
      empty.hidden = !empty.textContent;
    },
  };
}

/** @param {FeedEntry} e */
function sessionRow(e) {
  const status = String(e.status ?? '');
  const p = e.prompts ?? /** @type {any} */ ({});
  const n = Number(e.clarificationCount) || 0;
  const value = pct(e.progress);
  return h('a', {
    role: 'listitem', class: 'session-row vrow', href: `#/session/${encodeURIComponent(e.sessionId)}`,
    'data-session-id': e.sessionId, 'data-status': status,
  },
  h('span', { class: 'sr-id' }, e.sessionId),
  h('span', { class: 'status', 'data-status': status }, status),
  h('span', { class: 'sr-line' },
    h('progress', { max: 100, value, 'aria-label': `Progress ${value}%` }),
    h('span', { class: 'sr-pct' }, `${value}%`),
    h('span', { class: 'sr-prompts' }, `${p.completed ?? 0}/${p.total ?? 0} prompts`),
    n > 0 ? h('span', { class: 'badge-clar' }, plural(n, 'question', 'questions')) : null,
    h('time', { class: 'sr-time', datetime: e.updatedAt, title: String(e.updatedAt ?? '') }, `updated ${fmtTime(e.updatedAt)}`)));
}

/** @returns {View} */
function newView() {
  const prompts = /** @type {HTMLTextAreaElement} */ (h('textarea', { id: 'prompts', required: true, rows: 5, 'aria-describedby': 'prompts-hint' }));
  const modelsBox = h('div', { class: 'models' }, 'Loading models…');
  const strategy = /** @type {HTMLSelectElement} */ (h('select', { id: 'strategy', 'aria-describedby': 'strategy-hint' },
    h('option', { value: 'all' }, 'all'), h('option', { value: 'fallback' }, 'fallback')));
  const metadata = /** @type {HTMLTextAreaElement} */ (h('textarea', { id: 'metadata', rows: 3, spellcheck: 'false', placeholder: '{"project": "q3-report"}' }));
  const error = h('p', { id: 'new-error', role: 'alert', class: 'error' });
  const submit = /** @type {HTMLButtonElement} */ (h('button', { type: 'submit' }, 'Start session'));
  const form = h('form', { id: 'new-session', onsubmit: (/** @type {Event} */ ev) => { ev.preventDefault(); start(); } },
    h('div', { class: 'field' },
      h('label', { for: 'prompts' }, 'Prompts (one per line)'), prompts,
      h('p', { id: 'prompts-hint', class: 'hint' }, 'Each line is one prompt, run on every selected model.')),
    h('fieldset', null, h('legend', null, 'Models'),
      h('p', { class: 'hint' }, 'Leave all unchecked to use the server default: every configured model.'), modelsBox),
    h('div', { class: 'field' },
      h('label', { for: 'strategy' }, 'Strategy'), strategy,
      h('p', { id: 'strategy-hint', class: 'hint' }, 'all: every model answers every prompt. fallback: models in order until one succeeds.')),
    h('div', { class: 'field' }, h('label', { for: 'metadata' }, 'Metadata (JSON object, optional)'), metadata),
    h('div', { class: 'actions' }, submit),
    error);
  const el = h('section', { id: 'new-view', 'aria-labelledby': 'new-title' }, h('h2', { id: 'new-title', tabindex: -1 }, 'New session'), form);

  const showModels = () => {
    if (!state.models) return;
    modelsBox.replaceChildren(...(state.models.length ? state.models.map((m) =>
      h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'model', value: m.name }),
        h('span', { class: 'model-name' }, m.name), ' ', h('span', { class: 'provider' }, `(${m.provider})`)))
      : ['No models are configured.']));
  };
  if (state.models) showModels();
  else {
    api('GET', '/api/models').then((r) => {
      if (r.ok) { state.models = r.data?.models ?? []; showModels(); }
      else if (r.status !== 401) { modelsBox.textContent = 'The models could not be listed.'; error.textContent = `${r.error.code}: ${r.error.message}`; }
    });
  }

  async function start() {
    error.textContent = '';
    const lines = prompts.value.split('\n').map((s) => s.trim()).filter(Boolean);
    if (!lines.length) { error.textContent = 'Write at least one prompt.'; prompts.focus(); return; }
    /** @type {any} */
    let meta;
    if (metadata.value.trim()) {
      try { meta = JSON.parse(metadata.value); } catch (e) {
        error.textContent = `Metadata is not valid JSON: ${/** @type {Error} */ (e).message}`;
        metadata.focus();
        return;
      }
      if (!meta || typeof meta !== 'object' || Array.isArray(meta)) {
        error.textContent = 'Metadata must be a JSON object, like {"key": "value"}.';
        metadata.focus();
        return;
      }
    }
    const models = [...form.querySelectorAll('input[name=model]:checked')].map((i) => /** @type {HTMLInputElement} */ (i).value);
    /** @type {Record<string, unknown>} */
    const body = { prompts: lines, strategy: strategy.value };
    if (models.length) body.models = models;
    if (meta) body.metadata = meta;
    submit.disabled = true;
    const r = await api('POST', '/api/wizard/sessions', body);
    submit.disabled = false;
    const id = str(r.data?.sessionId);
    if (r.ok && id) {
      // Prompts sent as plain strings get the ids p1, p2, … (docs/orchestrator.md).
      state.created.set(id, {
        prompts: lines.map((text, i) => ({ id: `p${i + 1}`, text })),
        models: models.length ? models : (state.models ?? []).map((m) => m.name),
      });
      location.hash = `#/session/${encodeURIComponent(id)}`;
    } else if (r.status !== 401) {
      error.textContent = `${r.error.code}: ${r.error.message}`;
    }
  }
  return { key: 'new', el, leave() {}, render() {} };
}

/** @param {string} id @returns {View} */
function sessionView(id) {
  const valid = ID_RE.test(id);
  const f = valid ? follow(id) : null;
  const status = h('span', { id: 'session-status', class: 'status', 'data-status': '', 'aria-live': 'polite' }, '…');
  const progress = /** @type {HTMLProgressElement} */ (h('progress', { id: 'session-progress', max: 100, value: 0, 'aria-label': 'Session progress' }));
  const pctEl = h('span', { class: 'pct' });
  const counts = h('p', { id: 'session-counts' });
  const cancelBtn = /** @type {HTMLButtonElement} */ (h('button', { id: 'cancel', type: 'button', disabled: true }, 'Cancel session'));
  const cancelError = h('p', { id: 'cancel-error', role: 'alert', class: 'error' });
  const error = h('p', { id: 'session-error', role: 'alert', class: 'error' });
  const clarBox = h('div', { id: 'clarifications' });
  const clarNone = h('p', { class: 'hint' }, 'No questions.');
  const grid = h('table', { id: 'grid' });
  const gridNone = h('p', { class: 'hint' }, 'No model results yet.');
  const resultPre = h('pre');
  const result = h('details', { id: 'result', hidden: true }, h('summary', null, 'Final result'), resultPre);
  const logFilter = /** @type {HTMLSelectElement} */ (h('select', { id: 'log-filter' },
    h('option', { value: '' }, 'all'), ...EVENTS.map((n) => h('option', { value: n }, n))));
  const logSearch = /** @type {HTMLInputElement} */ (h('input', { id: 'log-search', type: 'search', autocomplete: 'off' }));
  const logCount = h('span', { id: 'log-count' }, '0');
  const logNote = h('p', { class: 'hint' });
  const logBox = h('div', { id: 'event-log', class: 'vlist log', role: 'list', tabindex: 0, 'aria-label': 'Event log' });
  /** @type {WeakMap<LogEntry, HTMLElement>} */
  const logRows = new WeakMap();
  const log = virtualList(logBox, LOG_ROW, (/** @type {LogEntry} */ e) => {
    let row = logRows.get(e);
    if (!row) { row = logRow(e); logRows.set(e, row); }
    return row;
  }, (e) => String(e.seq), true);
  /** @type {Map<string, { td: HTMLElement, label: HTMLElement, pre: HTMLElement, meta: HTMLElement }>} */
  const cellEls = new Map();
  /** @type {Map<string, { el: HTMLElement, sig: string }>} */
  const clarEls = new Map();

  const el = h('section', { id: 'session-view', 'data-session-id': id, 'aria-labelledby': 'session-title' },
    h('div', { class: 'session-head' },
      h('h2', { id: 'session-title', tabindex: -1 }, 'Session ', h('code', null, id)),
      h('p', { class: 'headline' }, status, progress, pctEl),
      counts,
      h('div', { class: 'actions' }, cancelBtn),
      cancelError),
    error,
    h('h3', null, 'Questions'), clarBox, clarNone,
    h('h3', null, 'Outputs'), h('div', { class: 'grid-wrap', tabindex: 0, role: 'region', 'aria-label': 'Outputs per prompt and model' }, grid), gridNone,
    result,
    h('h3', null, 'Event log'),
    h('div', { class: 'tools' },
      h('label', { for: 'log-filter' }, 'Event'), logFilter,
      h('label', { for: 'log-search' }, 'Search the log'), logSearch,
      h('span', { class: 'count' }, logCount, ' events')),
    logNote, logBox);

  if (!f) {
    error.textContent = 'That is not a valid session id (INVALID_SESSION_ID).';
    return { key: `session:${id}`, el, leave() {}, render() {} };
  }
  const refilter = () => { f.logFilter = logFilter.value; f.logSearch = logSearch.value.trim().toLowerCase(); f.dirty.refilter = true; invalidate(); };
  logFilter.addEventListener('change', refilter);
  logSearch.addEventListener('input', refilter);
  cancelBtn.addEventListener('click', async () => {
    f.cancelling = true;
    cancelError.textContent = '';
    touch(f);
    const r = await api('POST', `/api/wizard/session/${encodeURIComponent(id)}/cancel`);
    if (!r.ok) {
      f.cancelling = false;
      if (r.status !== 401) cancelError.textContent = `${r.error.code}: ${r.error.message}`;
      touch(f);
    }
  });

  function buildGrid() {
    const m = f.model;
    cellEls.clear();
    const head = h('tr', null, h('th', { scope: 'col' }, 'Prompt'), ...m.models.map((name) =>
      h('th', { scope: 'col' }, h('span', { class: 'model-name' }, name),
        m.providers.get(name) ? h('span', { class: 'provider' }, m.providers.get(name)) : null)));
    const body = m.promptOrder.map((pid) => h('tr', null,
      h('th', { scope: 'row' }, h('span', { class: 'prompt-id' }, pid),
        m.promptText.get(pid) ? h('span', { class: 'prompt-text' }, m.promptText.get(pid)) : null),
      ...m.models.map((name) => {
        const label = h('span', { class: 'cell-status' });
        const pre = h('pre', { class: 'output' });
        const meta = h('span', { class: 'meta' });
        const td = h('td', { 'data-prompt-id': pid, 'data-model': name }, label, pre, meta);
        cellEls.set(cellKey(pid, name), { td, label, pre, meta });
        return td;
      })));
    grid.replaceChildren(h('caption', { class: 'sr-only' }, 'Output of each model for each prompt'),
      h('thead', null, head), h('tbody', null, ...body));
    gridNone.hidden = m.promptOrder.length > 0 && m.models.length > 0;
    f.dirty.cells = new Set(cellEls.keys());
  }

  /** @param {string} key */
  function renderCell(key) {
    const x = cellEls.get(key);
    if (!x) return;
    const c = f.model.cells.get(key);
    if (!c?.status) {
      x.td.removeAttribute('data-status');
      setText(x.label, 'waiting');
      setText(x.pre, '');
      setText(x.meta, '');
      return;
    }
    x.td.dataset.status = c.status;
    setText(x.label, c.status);
    const pre = x.pre;
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    setText(pre, c.output);
    if (atEnd) pre.scrollTop = pre.scrollHeight;
    const meta = [];
    if (c.duration !== undefined) meta.push(`${(c.duration / 1000).toFixed(1)} s`);
    if (c.attempts !== undefined) meta.push(plural(c.attempts, 'attempt', 'attempts'));
    else if (c.attempt !== undefined) meta.push(`attempt ${c.attempt}`);
    if (c.status === 'failed' && c.error) meta.push(c.error);
    setText(x.meta, meta.join(' · '));
  }

  function renderClarifications() {
    const m = f.model;
    for (const [cid, c] of m.clarifications) {
      const sig = `${c.status}\u0000${c.question}\u0000${c.answer ?? ''}\u0000${c.modelName ?? ''}`;
      const have = clarEls.get(cid);
      // Rebuilding a pending question would throw away what the user is typing.
      if (have && have.sig === sig) continue;
      const next = clarificationEl(f, c);
      if (have) {
        const hadFocus = have.el.contains(document.activeElement);
        have.el.replaceWith(next);
        if (hadFocus) next.focus();
      } else clarBox.append(next);
      clarEls.set(cid, { el: next, sig });
    }
    for (const [cid, have] of clarEls) if (!m.clarifications.has(cid)) { have.el.remove(); clarEls.delete(cid); }
    clarNone.hidden = m.clarifications.size > 0;
  }

  function renderHead() {
    const m = f.model;
    const s = m.status || '';
    status.dataset.status = s;
    setText(status, s || '…');
    progress.value = pct(m.progress);
    setText(pctEl, `${pct(m.progress)}%`);
    const p = m.prompts;
    setText(counts, p ? `${plural(Number(p.total) || 0, 'prompt', 'prompts')}: ${p.completed ?? 0} completed, ${p.processing ?? 0} processing, ${p.pending ?? 0} pending, ${p.failed ?? 0} failed` : '');
    cancelBtn.disabled = !s || TERMINAL.has(s) || f.cancelling || f.dead;
    const lines = [f.loadError, f.subError, m.error ? sessionErrorText(m.error) : ''].filter(Boolean);
    const sig = lines.join('\n');
    // An alert re-announces whatever is written into it, so write only what changed.
    if (error.dataset.sig !== sig) {
      error.dataset.sig = sig;
      error.replaceChildren(...lines.map((t) => h('span', { class: 'line' }, t)));
    }
  }

  function renderLog() {
    if (f.dirty.refilter) {
      f.dirty.refilter = false;
      f.logItems = f.logFilter || f.logSearch ? f.events.filter((e) => logMatches(f, e)) : null;
    }
    log.set(f.logItems ?? f.events);
    setText(logCount, String(f.events.length));
    setText(logNote, f.firstRetained > 1
      ? `Events before seq ${f.firstRetained} are no longer kept by the server; the view above includes them.` : '');
    logNote.hidden = !logNote.textContent;
  }

  return {
    key: `session:${id}`, el,
    leave() { unfollow(id); },
    render() {
      if (!isFollowed(f)) return;
      const d = f.dirty;
      if (d.structure) { d.structure = false; buildGrid(); }
      if (d.cells.size) { for (const key of d.cells) renderCell(key); d.cells.clear(); }
      if (d.clar) { d.clar = false; renderClarifications(); }
      if (d.result) {
        d.result = false;
        result.hidden = !f.model.result;
        setText(resultPre, f.model.result ? JSON.stringify(f.model.result, null, 2) : '');
      }
      if (d.head) { d.head = false; renderHead(); }
      if (d.log || d.refilter) { d.log = false; renderLog(); }
    },
  };
}

/** @param {any} d */
function sessionErrorText(d) {
  const code = str(d.code);
  return code ? inWords(code, str(d.error), 'The session failed') : `The session failed: ${str(d.error) ?? ''}`;
}

/** @param {Follow} f @param {Clar} c */
function clarificationEl(f, c) {
  const el = h('div', { class: 'clarification', 'data-clarification-id': c.clarificationId, 'data-status': c.status, tabindex: -1 },
    h('p', { class: 'clar-head' },
      h('span', { class: 'clar-status', 'data-status': c.status }, c.status),
      c.modelName ? ` asked by ${c.modelName}${c.promptId ? ` on ${c.promptId}` : ''}` : ''),
    h('p', { class: 'question' }, c.question));
  if (c.status === 'pending') el.append(answerForm(f, c));
  else if (c.status === 'answered') el.append(h('p', { class: 'answer' }, h('strong', null, 'Answer: '), c.answer ?? '(answered)'));
  else el.append(h('p', { class: 'hint' }, 'Expired without an answer.'));
  return el;
}

/** @param {Follow} f @param {Clar} c */
function answerForm(f, c) {
  const text = /** @type {HTMLTextAreaElement} */ (h('textarea', { name: 'answer', required: true, rows: 2 }));
  const button = /** @type {HTMLButtonElement} */ (h('button', { type: 'submit' }, 'Send answer'));
  const note = h('span', { class: 'hint', 'aria-live': 'polite' });
  const error = h('p', { class: 'clar-error', role: 'alert' });
  const send = async () => {
    const answer = text.value;
    if (!answer.trim()) { error.textContent = 'Write an answer first.'; text.focus(); return; }
    button.disabled = true;
    error.textContent = '';
    note.textContent = 'Sending…';
    const r = await api('POST', '/api/wizard/clarifications/respond', { sessionId: f.sessionId, clarificationId: c.clarificationId, answer });
    if (r.ok) {
      // Stays disabled: the `answered` event replaces this form once it is logged.
      note.textContent = 'Sent; waiting for the session to confirm…';
      return;
    }
    button.disabled = false;
    note.textContent = '';
    if (r.status === 401) return;
    error.textContent = r.status === 409
      ? `Already answered or expired (${r.error.code}): ${r.error.message}`
      : `${r.error.code}: ${r.error.message}`;
  };
  return h('form', { class: 'answer-form', onsubmit: (/** @type {Event} */ ev) => { ev.preventDefault(); send(); } },
    h('label', null, 'Your answer', text),
    h('div', { class: 'actions' }, button, note),
    error);
}

/** @param {Follow} f @param {LogEntry} e */
function logMatches(f, e) {
  if (f.logFilter && e.event !== f.logFilter) return false;
  if (!f.logSearch) return true;
  e.lc ??= `${e.event} ${JSON.stringify(e.data)}`.toLowerCase();
  return e.lc.includes(f.logSearch);
}

/** @param {LogEntry} e */
function logRow(e) {
  const text = clip(summary(e), 240);
  return h('div', { class: 'log-row vrow', role: 'listitem', 'data-seq': e.seq, 'data-event': e.event, title: text },
    h('span', { class: 'l-seq' }, String(e.seq)),
    h('span', { class: 'l-ev' }, e.event),
    h('time', { class: 'l-time', datetime: str(e.data.timestamp) }, clock(e.data.timestamp)),
    h('span', { class: 'l-sum' }, text));
}

/** @param {LogEntry} e */
function summary(e) {
  const d = e.data;
  switch (e.event) {
    case 'progress': {
      const p = d.prompts ?? {};
      const q = Number(d.clarificationCount) || 0;
      return `${d.status ?? '?'} ${pct(d.progress)}% · ${p.completed ?? 0}/${p.total ?? 0} prompts${q ? ` · ${plural(q, 'question', 'questions')}` : ''}`;
    }
    case 'model_result':
      return `${d.modelName} on ${d.promptId}: ${d.status}${d.attempt ? ` (attempt ${d.attempt})` : ''}`
        + `${typeof d.result === 'string' && d.result ? ` · ${d.result.length} chars` : ''}${d.error ? ` · ${d.error}` : ''}`;
    case 'clarification':
      return `${d.status}: ${d.question ?? ''}${d.answer ? ` → ${d.answer}` : ''}`;
    case 'completed': return 'the result is ready';
    case 'error': return `${d.code ?? 'error'}: ${d.error ?? ''}`;
    default: return '';
  }
}

// ---------------------------------------------------------------------------------------
// Routing and start

/** @type {View | null} */
let current = null;

/** @param {boolean} [moveFocus] */
function route(moveFocus = false) {
  const hash = location.hash || '#/';
  let key = 'sessions';
  let id = '';
  if (state.tokenNeeded) key = 'token';
  else if (hash === '#/new') key = 'new';
  else if (hash.startsWith('#/session/')) {
    const raw = hash.slice('#/session/'.length);
    try { id = decodeURIComponent(raw); } catch { id = raw; }
    key = `session:${id}`;
  }
  renderHeader();
  if (current?.key === key) { current.render(); return; }
  current?.leave();
  current = key === 'token' ? tokenView() : key === 'new' ? newView() : key === 'sessions' ? sessionsView() : sessionView(id);
  $('#main').replaceChildren(current.el);
  current.render();
  invalidate();
  if (moveFocus) /** @type {HTMLElement | null} */ (current.el.querySelector('h2'))?.focus();
}

async function boot() {
  state.token = sessionStorage.getItem(TOKEN_KEY) ?? '';
  $('#token-change').addEventListener('click', changeToken);
  window.addEventListener('hashchange', () => route(true));
  renderHeader();
  // Whether a token is needed: a 401 here shows the token form (needToken).
  const r = await api('GET', '/api/models');
  if (r.status === 401) return;
  if (r.ok) state.models = r.data?.models ?? [];
  connectSocket();
  route();
}

boot().catch((e) => {
  setConn('offline', String(e));
  console.error(e);
});
