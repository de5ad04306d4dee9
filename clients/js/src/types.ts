/** Payload types of herald's Socket.IO and HTTP surface (SPEC §1–§2). */

export type SessionStatus = 'ACTIVE' | 'PROCESSING' | 'COMPLETED' | 'FAILED' | 'EXPIRED';
export type ModelResultStatus = 'processing' | 'completed' | 'failed';
export type ClarificationStatus = 'pending' | 'answered' | 'expired';

export interface PromptCounts {
  total: number;
  completed: number;
  processing: number;
  pending: number;
  failed: number;
}

/** Fields every logged session event carries. Producers' extra fields are kept. */
export interface SessionEventBase {
  sessionId: string;
  seq: number;
  timestamp: string;
  [extra: string]: unknown;
}

export interface ProgressEvent extends SessionEventBase {
  status: SessionStatus;
  progress: number;
  prompts: PromptCounts;
  hasClarifications: boolean;
  clarificationCount: number;
  hasResult?: boolean;
  result?: Record<string, unknown>;
}

export interface ModelResultEvent extends SessionEventBase {
  promptId: string;
  modelName: string;
  provider: string;
  duration: number;
  result: string;
  status: ModelResultStatus;
  error?: string;
}

export interface ClarificationEvent extends SessionEventBase {
  clarificationId: string;
  question: string;
  status: ClarificationStatus;
  answer?: string;
  /** herald's orchestrator adds these. */
  promptId?: string;
  modelName?: string;
}

export interface CompletedEvent extends SessionEventBase {
  result: Record<string, unknown>;
}

export interface ErrorEvent extends SessionEventBase {
  error: string;
  code?: string;
}

/** Wire event name → payload. */
export interface SessionEventMap {
  progress: ProgressEvent;
  model_result: ModelResultEvent;
  clarification: ClarificationEvent;
  completed: CompletedEvent;
  error: ErrorEvent;
}

export type SessionEventName = keyof SessionEventMap;

export const SESSION_EVENTS: readonly SessionEventName[] = [
  'progress',
  'model_result',
  'clarification',
  'completed',
  'error',
];

/** A session event tagged with its wire name (for `onEvent`). */
export type AnySessionEvent = {
  [K in SessionEventName]: { event: K; data: SessionEventMap[K] };
}[SessionEventName];

export interface ConnectedPayload {
  socketId: string;
  timestamp: string;
}

export interface SubscribedPayload {
  sessionId: string;
  timestamp: string;
  lastSeq: number;
  epoch: string;
  recovered?: boolean;
}

/** One session as the session feed describes it (SPEC §6 `session`). */
export interface SessionFeedEntry {
  sessionId: string;
  status: SessionStatus;
  progress: number;
  prompts: PromptCounts;
  hasClarifications: boolean;
  clarificationCount: number;
  createdAt: string;
  updatedAt: string;
}

/** The feed's first message: the sessions the caller may read, newest first. */
export interface SessionsPayload {
  sessions: SessionFeedEntry[];
  /** Older sessions were left out (herald lists at most 1,000). */
  truncated: boolean;
}

export type FeedAck =
  | { ok: true; feed: 'sessions'; sessions: number }
  | { ok: false; error: { code: string; message: string } };

export interface UnsubscribedPayload {
  sessionId: string;
  timestamp: string;
}

/** A refused socket request (no `seq`; not part of any session's log). */
export interface ProtocolErrorPayload {
  sessionId?: string;
  error: string;
  code: string;
  timestamp: string;
}

export type SubscribeAck =
  | { ok: true; sessionId: string; lastSeq: number; epoch: string; recovered?: boolean }
  | { ok: false; error: { code: string; message: string } };

export interface ClarificationSnapshot {
  clarificationId: string;
  question: string;
  status: ClarificationStatus;
  answer?: string;
  promptId?: string;
  modelName?: string;
  [extra: string]: unknown;
}

export interface ModelResultSnapshot {
  promptId: string;
  modelName: string;
  provider?: string;
  duration?: number;
  result?: string;
  status: ModelResultStatus;
  error?: string;
  [extra: string]: unknown;
}

/** `GET /api/wizard/session/{id}`. */
export interface SessionSnapshot extends SessionFeedEntry {
  clarifications: ClarificationSnapshot[];
  modelResults: ModelResultSnapshot[];
  result: Record<string, unknown> | null;
  error?: { error?: string; code?: string; message?: string; [extra: string]: unknown } | string | null;
  lastSeq: number;
  epoch: string;
  metadata?: Record<string, unknown> | null;
  [extra: string]: unknown;
}

export interface CreateSessionBody {
  prompts: Array<string | { id?: string; text: string }>;
  models?: string[];
  strategy?: 'all' | 'fallback';
  metadata?: Record<string, unknown>;
}

export interface RespondResult {
  ok: true;
  sessionId: string;
  clarificationId: string;
}
