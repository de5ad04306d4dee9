import { useEffect, useState } from 'react';
import type { HeraldClient } from './client.js';
import type {
  ClarificationSnapshot,
  ModelResultSnapshot,
  PromptCounts,
  SessionFeedEntry,
  SessionSnapshot,
  SessionStatus,
} from './types.js';

/** What `useSession` returns: the session as its events (or a resync snapshot) describe it. */
export interface SessionState {
  status: SessionStatus | null;
  progress: number;
  prompts: PromptCounts | null;
  /** Latest model result per prompt and model, in first-seen order. */
  modelResults: ModelResultSnapshot[];
  /** Latest state per clarification, in first-seen order. */
  clarifications: ClarificationSnapshot[];
  result: Record<string, unknown> | null;
  error: { error: string; code?: string } | null;
  /** Whether the client's socket is connected. */
  connected: boolean;
  /** The seq of the last event applied. */
  lastSeq: number;
}

function initialState(connected: boolean): SessionState {
  return {
    status: null,
    progress: 0,
    prompts: null,
    modelResults: [],
    clarifications: [],
    result: null,
    error: null,
    connected,
    lastSeq: 0,
  };
}

function upsert<T>(list: T[], item: T, same: (a: T) => boolean): T[] {
  const i = list.findIndex(same);
  if (i < 0) return [...list, item];
  const copy = list.slice();
  copy[i] = item;
  return copy;
}

function fromSnapshot(snapshot: SessionSnapshot, connected: boolean): SessionState {
  let error: SessionState['error'] = null;
  const e = snapshot.error;
  if (typeof e === 'string') error = { error: e };
  else if (e && typeof e === 'object') {
    error = { error: String(e.error ?? e.message ?? ''), code: typeof e.code === 'string' ? e.code : undefined };
  }
  return {
    status: snapshot.status,
    progress: snapshot.progress,
    prompts: snapshot.prompts,
    modelResults: snapshot.modelResults ?? [],
    clarifications: snapshot.clarifications ?? [],
    result: snapshot.result ?? null,
    error,
    connected,
    lastSeq: snapshot.lastSeq,
  };
}

/**
 * Follow a session from a React component. Subscribes through the client (so reconnects
 * resume where they left off, without duplicates), unsubscribes and removes its socket
 * listeners on unmount or when `sessionId` changes. `sessionId` null/undefined: idle.
 */
export function useSession(client: HeraldClient, sessionId: string | null | undefined): SessionState {
  const [state, setState] = useState<SessionState>(() => initialState(client.socket.connected));
  const [stateOf, setStateOf] = useState<{ client: HeraldClient; sessionId: string | null | undefined }>({
    client,
    sessionId,
  });

  useEffect(() => {
    const socket = client.socket;
    setState(initialState(socket.connected));
    setStateOf({ client, sessionId });
    const onConnect = () => setState((s) => ({ ...s, connected: true }));
    const onDisconnect = () => setState((s) => ({ ...s, connected: false }));
    socket.on('connect', onConnect);
    socket.on('disconnect', onDisconnect);
    if (!sessionId) {
      return () => {
        socket.off('connect', onConnect);
        socket.off('disconnect', onDisconnect);
      };
    }
    const sub = client.subscribe(sessionId, {
      progress: (e) =>
        setState((s) => ({
          ...s,
          status: e.status,
          progress: e.progress,
          prompts: e.prompts,
          result: e.result ?? s.result,
          lastSeq: e.seq,
        })),
      modelResult: (e) =>
        setState((s) => ({
          ...s,
          modelResults: upsert<ModelResultSnapshot>(
            s.modelResults,
            e,
            (m) => m.promptId === e.promptId && m.modelName === e.modelName,
          ),
          lastSeq: e.seq,
        })),
      clarification: (e) =>
        setState((s) => ({
          ...s,
          clarifications: upsert<ClarificationSnapshot>(
            s.clarifications,
            e,
            (c) => c.clarificationId === e.clarificationId,
          ),
          lastSeq: e.seq,
        })),
      completed: (e) => setState((s) => ({ ...s, result: e.result, lastSeq: e.seq })),
      error: (e) => setState((s) => ({ ...s, error: { error: e.error, code: e.code }, lastSeq: e.seq })),
      onResync: (snapshot) => setState((s) => fromSnapshot(snapshot, s.connected)),
    });
    return () => {
      sub.unsubscribe();
      socket.off('connect', onConnect);
      socket.off('disconnect', onDisconnect);
    };
  }, [client, sessionId]);

  // Between a sessionId change and its effect, never show the previous session's state.
  if (stateOf.client !== client || stateOf.sessionId !== sessionId) return initialState(client.socket.connected);
  return state;
}

/** What `useSessions` returns. */
export interface SessionsState {
  /** Every session the client may read, newest first. */
  sessions: SessionFeedEntry[];
  /** Whether `sessions` is herald's list since the last (re)connect; false while reconnecting. */
  synced: boolean;
  /** Older sessions were left out of herald's list. */
  truncated: boolean;
  /** A refusal of the feed (e.g. `FORBIDDEN`), else null. */
  error: { code: string; message: string } | null;
}

/**
 * Follow the session feed ("all my jobs") from a React component: the list, kept live
 * across reconnects; stops (and removes its listeners) on unmount.
 */
export function useSessions(client: HeraldClient): SessionsState {
  const [state, setState] = useState<SessionsState>({ sessions: [], synced: false, truncated: false, error: null });
  useEffect(() => {
    const socket = client.socket;
    const onDisconnect = () => setState((s) => ({ ...s, synced: false }));
    socket.on('disconnect', onDisconnect);
    const feed = client.followSessions({
      onSessions: (sessions, info) => setState({ sessions, synced: info.synced, truncated: info.truncated, error: null }),
      onError: (e) => setState((s) => ({ ...s, error: { code: e.code, message: e.message } })),
    });
    return () => {
      feed.stop();
      socket.off('disconnect', onDisconnect);
    };
  }, [client]);
  return state;
}
