import { io, type ManagerOptions, type Socket, type SocketOptions } from 'socket.io-client';
import {
  SESSION_EVENTS,
  type AnySessionEvent,
  type ClarificationEvent,
  type CompletedEvent,
  type CreateSessionBody,
  type ErrorEvent,
  type FeedAck,
  type SessionFeedEntry,
  type SessionsPayload,
  type ModelResultEvent,
  type ProgressEvent,
  type RespondResult,
  type SessionEventBase,
  type SessionEventName,
  type SessionSnapshot,
  type SubscribeAck,
} from './types.js';

/** An HTTP call to herald that failed: `status` (0 on a network failure), herald's `code`. */
export class HeraldError extends Error {
  readonly status: number;
  readonly code: string;
  constructor(status: number, code: string, message: string, options?: { cause?: unknown }) {
    super(message);
    this.name = 'HeraldError';
    // ES2022's Error `cause` (set by hand: the library targets ES2020)
    if (options && 'cause' in options) Object.defineProperty(this, 'cause', { value: options.cause, configurable: true });
    this.status = status;
    this.code = code;
  }
}

/** The codes of a refused credential (SPEC §5). */
export type AuthErrorCode = 'UNAUTHORIZED' | 'INVALID_TOKEN' | 'TOKEN_EXPIRED' | 'FORBIDDEN';
export const AUTH_ERROR_CODES: readonly AuthErrorCode[] = ['UNAUTHORIZED', 'INVALID_TOKEN', 'TOKEN_EXPIRED', 'FORBIDDEN'];

function isAuthCode(code: unknown): code is AuthErrorCode {
  return typeof code === 'string' && (AUTH_ERROR_CODES as readonly string[]).includes(code);
}

/**
 * herald refused the credential, or what it allows: `UNAUTHORIZED` (none, or unknown),
 * `INVALID_TOKEN` (signature, audience, issuer, format…), `TOKEN_EXPIRED` (get a fresh
 * token) or `FORBIDDEN` (valid, but not for this session or action). `status` is the HTTP
 * status (401, 403) for an HTTP call, 0 for a Socket.IO refusal.
 */
export class HeraldAuthError extends HeraldError {
  declare readonly code: AuthErrorCode;
  constructor(code: AuthErrorCode, message: string, status = 0, options?: { cause?: unknown }) {
    super(status, code, message, options);
    this.name = 'HeraldAuthError';
  }
}

/** The refusal a Socket.IO `connect_error` carries: herald's message starts with the code. */
export function authErrorFromMessage(message: string): HeraldAuthError | null {
  const m = /^([A-Z_]+): ([\s\S]*)$/.exec(message);
  return m && isAuthCode(m[1]) ? new HeraldAuthError(m[1], m[2]) : null;
}

/**
 * A token or API key, or a function returning a fresh one. The function is called on every
 * (re)connect and before every HTTP call, so it should return a cached token until that
 * is close to expiry.
 */
export type TokenSource = string | (() => string | Promise<string>);

export interface HeraldClientOptions extends Partial<ManagerOptions & SocketOptions> {
  /** Base URL of herald's HTTP API; defaults to the origin of the socket URL. */
  httpUrl?: string;
  /** Extra headers sent with every HTTP request. */
  headers?: Record<string, string>;
  /**
   * A JWT or API key, or a function returning a fresh one: sent as socket.io's
   * `auth: { token }` on every (re)connect (the function is called each time) and as
   * `Authorization: Bearer` on every HTTP call. With a function, the client also
   * reconnects by itself after herald expires the socket's token, and retries a refused
   * handshake with backoff. (Do not combine with socket.io's own `auth` option.)
   */
  token?: TokenSource;
  /**
   * Auth failures no call of yours can throw: a refused handshake (also on reconnects),
   * herald expiring the live socket's token (`TOKEN_EXPIRED`).
   */
  onAuthError?: (error: HeraldAuthError) => void;
  /**
   * socket.io-client does not reconnect after the server disconnects a socket
   * (`io server disconnect`). herald drops the transport instead when it cuts a socket off
   * (slow consumer, lagging node, shutdown), which socket.io-client retries by itself; this
   * option covers servers (or proxies) that still send DISCONNECT: by default the client
   * reconnects then too (unless `reconnection: false`).
   */
  reconnectOnServerDisconnect?: boolean;
  /** Ack timeout of `subscribe` before it is re-sent, ms (default 10000). */
  subscribeTimeoutMs?: number;
  /** How long an out-of-order gap may persist before re-subscribing, ms (default 2000). */
  gapTimeoutMs?: number;
}

export interface SubscribeError {
  code: string;
  message: string;
}

export interface SessionHandlers {
  progress?: (event: ProgressEvent) => void;
  modelResult?: (event: ModelResultEvent) => void;
  clarification?: (event: ClarificationEvent) => void;
  completed?: (event: CompletedEvent) => void;
  error?: (event: ErrorEvent) => void;
  /** Every delivered session event, in order, after its typed handler. */
  onEvent?: (event: AnySessionEvent) => void;
  /**
   * The events missed are no longer retained (or the session's log was recreated): this
   * is the fresh snapshot; delivery continues after `snapshot.lastSeq`.
   */
  onResync?: (snapshot: SessionSnapshot) => void;
  /** Every successful (re)subscribe. */
  onSubscribed?: (ack: { sessionId: string; lastSeq: number; epoch: string; recovered?: boolean }) => void;
  /**
   * A refused subscribe (`FORBIDDEN` comes as a `HeraldAuthError`), or a failed snapshot
   * fetch during a resync.
   */
  onSubscribeError?: (error: SubscribeError) => void;
}

export interface SubscribeOptions {
  /** Pretend the events up to this seq were already seen (default 0: the whole retained run). */
  lastSeq?: number;
  /** The epoch `lastSeq` belongs to. */
  epoch?: string;
}

export interface SessionFeedHandlers {
  /**
   * The whole list, newest first: on every (re)connect's fresh list and after each change
   * (a resync after a drop is simply the next call).
   */
  onSessions?: (sessions: SessionFeedEntry[], info: { truncated: boolean; synced: boolean }) => void;
  /** One session was created or changed (coalesced by herald: its latest state). */
  onSession?: (session: SessionFeedEntry) => void;
  /** herald refused the feed (`FORBIDDEN` as a `HeraldAuthError`). */
  onError?: (error: SubscribeError) => void;
}

/**
 * The session feed ("all my jobs", SPEC §6): every session the caller may read, kept up
 * to date. The list is refetched on every reconnect, so it never misses a change.
 */
export class SessionFeed {
  private readonly map = new Map<string, SessionFeedEntry>();
  private _synced = false;
  private _truncated = false;
  private _active = true;

  /** @internal */
  constructor(
    private readonly client: HeraldClient,
    private readonly handlers: SessionFeedHandlers,
  ) {}

  /** The sessions, newest first. */
  get sessions(): SessionFeedEntry[] {
    return [...this.map.values()].sort((a, b) => (a.createdAt < b.createdAt ? 1 : a.createdAt > b.createdAt ? -1 : 0));
  }
  /** Whether the list is the server's since the last (re)connect. */
  get synced(): boolean {
    return this._synced;
  }
  get active(): boolean {
    return this._active;
  }

  stop(): void {
    if (!this._active) return;
    this._active = false;
    this.client._removeFeed(this);
  }

  /** @internal the socket dropped: the list is stale until the next one arrives. */
  _disconnected(): void {
    this._synced = false;
  }

  /** @internal */
  _list(payload: SessionsPayload): void {
    if (!this._active || !payload || !Array.isArray(payload.sessions)) return;
    this.map.clear();
    for (const entry of payload.sessions) this.map.set(entry.sessionId, entry);
    this._synced = true;
    this._truncated = payload.truncated === true;
    this.emitList();
  }

  /** @internal */
  _change(entry: SessionFeedEntry): void {
    if (!this._active || !entry || typeof entry.sessionId !== 'string') return;
    this.map.set(entry.sessionId, entry);
    this.call(() => this.handlers.onSession?.(entry));
    this.emitList();
  }

  /** @internal */
  _refused(error: SubscribeError): void {
    if (this._active) this.call(() => this.handlers.onError?.(error));
  }

  private emitList(): void {
    const sessions = this.sessions;
    this.call(() => this.handlers.onSessions?.(sessions, { truncated: this._truncated, synced: this._synced }));
  }

  private call(fn: () => void): void {
    try {
      fn();
    } catch (err) {
      queueMicrotask(() => {
        throw err;
      });
    }
  }
}

const HANDLER_OF: Record<SessionEventName, keyof SessionHandlers> = {
  progress: 'progress',
  model_result: 'modelResult',
  clarification: 'clarification',
  completed: 'completed',
  error: 'error',
};

/** One application-level subscription to a session. */
export class Subscription {
  readonly sessionId: string;
  private _lastSeq: number;
  private _epoch: string;
  private _active = true;
  private pending = new Map<number, AnySessionEvent>();
  private resyncing = false;
  private inFlight = 0;
  private gapTimer: ReturnType<typeof setTimeout> | null = null;

  /** @internal */
  constructor(
    private readonly client: HeraldClient,
    sessionId: string,
    private readonly handlers: SessionHandlers,
    options: SubscribeOptions,
  ) {
    this.sessionId = sessionId;
    this._lastSeq = options.lastSeq ?? 0;
    this._epoch = options.epoch ?? '';
  }

  /** The seq of the last event delivered (or of the snapshot after a resync). */
  get lastSeq(): number {
    return this._lastSeq;
  }
  get epoch(): string {
    return this._epoch;
  }
  get active(): boolean {
    return this._active;
  }

  /** Stop delivering; unsubscribes on the server when no other subscription follows the session. */
  unsubscribe(): void {
    if (!this._active) return;
    this._active = false;
    this.clearGapTimer();
    this.pending.clear();
    this.client._remove(this);
  }

  /** @internal (re)send `subscribe { sessionId, lastSeq, epoch }`. */
  _sendSubscribe(): void {
    const socket = this.client.socket;
    if (!this._active || !socket.connected) return;
    const payload: { sessionId: string; lastSeq: number; epoch?: string } = {
      sessionId: this.sessionId,
      lastSeq: this._lastSeq,
    };
    if (this._epoch) payload.epoch = this._epoch;
    this.inFlight += 1;
    socket
      .timeout(this.client._subscribeTimeoutMs)
      .emit('subscribe', payload, (err: Error | null, ack: SubscribeAck) => {
        this.inFlight -= 1;
        if (!this._active) return;
        if (err) {
          // No ack in time: try again if still connected (a reconnect re-sends anyway).
          if (socket.connected) this._sendSubscribe();
          return;
        }
        if (!ack || ack.ok !== true) {
          const e = ack && ack.ok === false ? ack.error : { code: 'INTERNAL', message: 'bad subscribe ack' };
          // FORBIDDEN (the credential may not read the session) as a typed error
          this.handlers.onSubscribeError?.(isAuthCode(e.code) ? new HeraldAuthError(e.code, e.message) : e);
          return;
        }
        if (ack.epoch) this._epoch = ack.epoch;
        this.handlers.onSubscribed?.({
          sessionId: ack.sessionId,
          lastSeq: ack.lastSeq,
          epoch: ack.epoch,
          recovered: ack.recovered,
        });
        if (ack.recovered === false) void this.resync();
        else this.flush();
      });
  }

  private async resync(): Promise<void> {
    if (this.resyncing) return;
    this.resyncing = true;
    try {
      const snapshot = await this.client.getSession(this.sessionId);
      if (!this._active) return;
      this._lastSeq = snapshot.lastSeq;
      this._epoch = snapshot.epoch || this._epoch;
      for (const seq of [...this.pending.keys()]) if (seq <= this._lastSeq) this.pending.delete(seq);
      this.handlers.onResync?.(snapshot);
    } catch (err) {
      const e = err as Partial<HeraldError>;
      this.handlers.onSubscribeError?.({ code: e.code ?? 'INTERNAL', message: e.message ?? String(err) });
    } finally {
      this.resyncing = false;
    }
    this.flush();
  }

  /** @internal one session event from the socket. */
  _receive(event: AnySessionEvent): void {
    if (!this._active) return;
    const seq = event.data.seq;
    if (seq <= this._lastSeq) return; // already delivered (replay overlap, duplicate)
    if (!this.pending.has(seq)) this.pending.set(seq, event);
    this.flush();
  }

  private flush(): void {
    if (this.resyncing) return;
    for (;;) {
      if (!this._active) return;
      const next = this.pending.get(this._lastSeq + 1);
      if (!next) break;
      this.pending.delete(this._lastSeq + 1);
      this._lastSeq += 1;
      this.deliver(next);
    }
    if (this.pending.size > 0) this.armGapTimer();
    else this.clearGapTimer();
  }

  private deliver(event: AnySessionEvent): void {
    const handler = this.handlers[HANDLER_OF[event.event]] as ((data: SessionEventBase) => void) | undefined;
    try {
      handler?.(event.data);
      this.handlers.onEvent?.(event);
    } catch (err) {
      // An application handler threw: do not break the delivery loop.
      queueMicrotask(() => {
        throw err;
      });
    }
  }

  private armGapTimer(): void {
    if (this.gapTimer) return;
    this.gapTimer = setTimeout(() => {
      this.gapTimer = null;
      if (!this._active || this.pending.size === 0) return;
      // Still a hole after the timeout: ask herald to replay it.
      if (this.inFlight === 0 && !this.resyncing) this._sendSubscribe();
      this.armGapTimer();
    }, this.client._gapTimeoutMs);
  }

  private clearGapTimer(): void {
    if (this.gapTimer) clearTimeout(this.gapTimer);
    this.gapTimer = null;
  }
}

/**
 * A herald client: one Socket.IO connection plus the HTTP API. Subscriptions survive
 * reconnects: each remembers its last `seq` and `epoch` and re-subscribes with them, so
 * the handlers see every event exactly once, in order.
 */
export class HeraldClient {
  /** The underlying socket.io-client Socket. */
  readonly socket: Socket;
  readonly httpUrl: string;
  /** @internal */ readonly _subscribeTimeoutMs: number;
  /** @internal */ readonly _gapTimeoutMs: number;
  private readonly headers: Record<string, string>;
  private readonly token: TokenSource | undefined;
  private readonly onAuthError: ((error: HeraldAuthError) => void) | undefined;
  private readonly subs = new Map<string, Set<Subscription>>();
  private readonly feeds = new Set<SessionFeed>();
  private closed = false;
  private readonly detach: Array<() => void> = [];
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  /** herald said the socket's token expired (it disconnects the socket next). */
  private tokenExpired = false;
  /** What the token function threw for the handshake under way. */
  private tokenFailure: unknown = undefined;
  private authRetries = 0;

  constructor(url: string, options: HeraldClientOptions = {}) {
    const {
      httpUrl,
      headers,
      reconnectOnServerDisconnect,
      subscribeTimeoutMs,
      gapTimeoutMs,
      token,
      onAuthError,
      ...ioOptions
    } = options;
    this.httpUrl = (httpUrl ?? new URL(url).origin).replace(/\/+$/, '');
    this.headers = headers ?? {};
    this._subscribeTimeoutMs = subscribeTimeoutMs ?? 10000;
    this._gapTimeoutMs = gapTimeoutMs ?? 2000;
    this.onAuthError = onAuthError;
    if (token !== undefined && token !== '') {
      if (ioOptions.auth !== undefined) throw new Error('HeraldClient: give either `token` or `auth`, not both');
      if (typeof token !== 'string' && typeof token !== 'function') {
        throw new TypeError('HeraldClient: `token` must be a string or a function returning one');
      }
      this.token = token;
      // A callback, so that socket.io-client asks for the token on every (re)connect.
      ioOptions.auth = (cb: (data: object) => void) => {
        this.currentToken().then(
          (t) => cb({ token: t }),
          (err) => {
            // Connect without: herald refuses (UNAUTHORIZED), reported with this cause.
            this.tokenFailure = err;
            cb({});
          },
        );
      };
    }
    this.socket = io(url, ioOptions);
    const refreshable = typeof this.token === 'function';
    const reconnection = ioOptions.reconnection !== false;

    const on = (name: string, fn: (...args: any[]) => void) => {
      this.socket.on(name, fn);
      this.detach.push(() => this.socket.off(name, fn));
    };
    const reconnectIn = (delay: number) => {
      if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
      this.reconnectTimer = setTimeout(() => {
        this.reconnectTimer = null;
        if (!this.closed && !this.socket.connected && !this.socket.active) this.socket.connect();
      }, delay);
    };
    on('connect', () => {
      this.tokenExpired = false;
      this.authRetries = 0;
      for (const set of this.subs.values()) for (const sub of set) sub._sendSubscribe();
      if (this.feeds.size > 0) this.sendFeedSubscribe();
    });
    on('sessions', (payload: SessionsPayload) => {
      for (const feed of [...this.feeds]) feed._list(payload);
    });
    on('session', (entry: SessionFeedEntry) => {
      for (const feed of [...this.feeds]) feed._change(entry);
    });
    on('connect_error', (err: Error) => {
      let refusal = authErrorFromMessage(err?.message ?? '');
      if (!refusal) return; // a network failure: socket.io-client retries by itself
      if (this.tokenFailure !== undefined) {
        const cause = this.tokenFailure;
        refusal = new HeraldAuthError(
          'UNAUTHORIZED',
          `the token function failed: ${(cause as Error)?.message ?? String(cause)}`,
          0,
          { cause },
        );
      }
      this.tokenFailure = undefined;
      this.reportAuthError(refusal);
      // socket.io-client never retries a handshake the server refused; a token function may
      // do better next time, the same string cannot.
      if (refreshable && reconnection && !this.closed) {
        const base = ioOptions.reconnectionDelay ?? 1000;
        const max = ioOptions.reconnectionDelayMax ?? 5000;
        reconnectIn(Math.min(base * 2 ** this.authRetries, max));
        this.authRetries += 1;
      }
    });
    on('disconnect', (reason: string) => {
      for (const feed of this.feeds) feed._disconnected();
      if (reason !== 'io server disconnect' || this.closed || !reconnection) return;
      if (this.tokenExpired) {
        // herald ended the socket because its token expired: a token function gets a fresh one
        if (refreshable) reconnectIn(0);
        return;
      }
      if (reconnectOnServerDisconnect !== false) reconnectIn(Math.min(ioOptions.reconnectionDelay ?? 1000, 1000));
    });
    on('error', (data: unknown) => {
      const e = data as { code?: unknown; error?: unknown; sessionId?: unknown; seq?: unknown } | null;
      if (!e || typeof e !== 'object' || typeof e.seq === 'number' || e.sessionId !== undefined) return;
      if (e.code === 'TOKEN_EXPIRED') {
        this.tokenExpired = true;
        this.reportAuthError(new HeraldAuthError('TOKEN_EXPIRED', String(e.error ?? 'the token has expired')));
      }
    });
    for (const name of SESSION_EVENTS) {
      on(name, (data: SessionEventBase) => {
        if (!data || typeof data !== 'object' || typeof data.seq !== 'number') return; // protocol error
        const set = this.subs.get(data.sessionId);
        if (!set) return;
        const event = { event: name, data } as AnySessionEvent;
        for (const sub of [...set]) sub._receive(event);
      });
    }
  }

  /** Follow a session. Delivery starts from `options.lastSeq` (default 0: the whole retained run). */
  subscribe(sessionId: string, handlers: SessionHandlers, options: SubscribeOptions = {}): Subscription {
    if (this.closed) throw new Error('HeraldClient is closed');
    const sub = new Subscription(this, sessionId, handlers, options);
    let set = this.subs.get(sessionId);
    if (!set) this.subs.set(sessionId, (set = new Set()));
    set.add(sub);
    sub._sendSubscribe(); // no-op until connected; the connect handler sends it then
    return sub;
  }

  /**
   * Follow the session feed: every session this client may read, then each change, on
   * every node. One server-side feed serves all of this client's `SessionFeed`s.
   */
  followSessions(handlers: SessionFeedHandlers = {}): SessionFeed {
    if (this.closed) throw new Error('HeraldClient is closed');
    const feed = new SessionFeed(this, handlers);
    this.feeds.add(feed);
    // A later feed needs its own list: asking again sends a fresh one to all (harmless).
    if (this.socket.connected) this.sendFeedSubscribe();
    return feed;
  }

  /** @internal */
  _removeFeed(feed: SessionFeed): void {
    this.feeds.delete(feed);
    if (this.feeds.size === 0 && this.socket.connected) this.socket.emit('unsubscribe', { feed: 'sessions' });
  }

  private sendFeedSubscribe(): void {
    const socket = this.socket;
    socket.timeout(this._subscribeTimeoutMs).emit('subscribe', { feed: 'sessions' }, (err: Error | null, ack: FeedAck) => {
      if (err) {
        if (socket.connected && this.feeds.size > 0) this.sendFeedSubscribe();
        return;
      }
      if (ack && ack.ok === false) {
        const e = ack.error;
        const error = isAuthCode(e.code) ? new HeraldAuthError(e.code, e.message) : e;
        for (const feed of [...this.feeds]) feed._refused(error);
      }
    });
  }

  /** Number of active subscriptions (all sessions). */
  get subscriptionCount(): number {
    let n = 0;
    for (const set of this.subs.values()) n += set.size;
    return n;
  }

  /** @internal */
  _remove(sub: Subscription): void {
    const set = this.subs.get(sub.sessionId);
    if (!set) return;
    set.delete(sub);
    if (set.size === 0) {
      this.subs.delete(sub.sessionId);
      if (this.socket.connected) this.socket.emit('unsubscribe', sub.sessionId);
    }
  }

  /** `POST /api/wizard/sessions`: create and start an orchestrated session (the snapshot). */
  createSession(body: CreateSessionBody): Promise<SessionSnapshot> {
    return this.request('POST', '/api/wizard/sessions', body);
  }

  /** `GET /api/wizard/session/{id}`: the snapshot. */
  getSession(sessionId: string): Promise<SessionSnapshot> {
    return this.request('GET', `/api/wizard/session/${encodeURIComponent(sessionId)}`);
  }

  /** `POST /api/wizard/clarifications/respond`. */
  respond(sessionId: string, clarificationId: string, answer: string): Promise<RespondResult> {
    return this.request('POST', '/api/wizard/clarifications/respond', { sessionId, clarificationId, answer });
  }

  /** `POST /api/wizard/session/{id}/cancel`: the snapshot once the session is FAILED. */
  cancel(sessionId: string): Promise<SessionSnapshot> {
    return this.request('POST', `/api/wizard/session/${encodeURIComponent(sessionId)}/cancel`, {});
  }

  private reportAuthError(error: HeraldAuthError): void {
    if (!this.onAuthError) return;
    try {
      this.onAuthError(error);
    } catch (err) {
      queueMicrotask(() => {
        throw err;
      });
    }
  }

  /** The credential to send now (the token function's answer, if it is one). */
  private async currentToken(): Promise<string | undefined> {
    const source = this.token;
    if (source === undefined || typeof source === 'string') return source;
    const value = await source();
    if (typeof value !== 'string' || value === '') {
      throw new TypeError(`the token function returned ${JSON.stringify(value)}; it must return a non-empty string`);
    }
    return value;
  }

  /** Unsubscribe everything and disconnect. */
  close(): void {
    if (this.closed) return;
    for (const set of [...this.subs.values()]) for (const sub of [...set]) sub.unsubscribe();
    for (const feed of [...this.feeds]) feed.stop();
    this.closed = true;
    for (const fn of this.detach.splice(0)) fn();
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.socket.disconnect();
  }

  private async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const headers: Record<string, string> = { accept: 'application/json', ...this.headers };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const token = await this.currentToken();
    if (token !== undefined) headers.authorization = `Bearer ${token}`;
    let res: Response;
    try {
      res = await fetch(this.httpUrl + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new HeraldError(0, 'NETWORK_ERROR', (err as Error).message);
    }
    const text = await res.text();
    let parsed: any;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      parsed = undefined;
    }
    if (!res.ok) {
      const e = parsed && parsed.error;
      const code: string = (e && typeof e.code === 'string' && e.code) || `HTTP_${res.status}`;
      const message: string = (e && typeof e.message === 'string' && e.message) || text || res.statusText;
      if (isAuthCode(code)) throw new HeraldAuthError(code, message, res.status);
      if (res.status === 401 || res.status === 403) {
        // not herald's answer (a gateway, say): the status still says what it is
        throw new HeraldAuthError(res.status === 401 ? 'UNAUTHORIZED' : 'FORBIDDEN', message, res.status);
      }
      throw new HeraldError(res.status, code, message);
    }
    return parsed as T;
  }
}
